"""The Ray side of what KubeRay does with the chart's objects, on this machine: a
RayCluster spec becomes a local cluster (head ``rayStartParams``, the pods' environment
with their Secrets resolved, the token of ``authOptions``, and Ray's autoscaler with the
node types KubeRay's autoscaler derives from the worker groups), a RayJob's entrypoint
runs with the ConfigMaps mounted where the pod would mount them, and a RayService's
``serveConfigV2`` is applied through the dashboard's Serve REST API, as the operator
does. Nothing of this is rewritten by hand: a name that drifts between the chart and the
code fails here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml
from forgeml.local_cluster import LocalCluster, autoscaling_from_raycluster

from tests.conftest import REPO

#: The folder the project's image holds the code in (its WORKDIR).
IMAGE_WORKDIR = re.search(r"^WORKDIR (\S+)", (REPO / "Dockerfile").read_text(), re.M)[1]


def only(docs: list[dict], kind: str) -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def pod_env(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's environment as the kubelet gives it: ``value``s, ``secretKeyRef``s
    and ``envFrom`` Secrets from ``secrets`` (name -> data), an optional one left out."""
    env = {}
    for source in container.get("envFrom", []):
        env.update(secrets[source["secretRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]["secretKeyRef"]
        if ref["name"] in secrets:
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        else:
            assert ref.get("optional"), f"Secret {ref['name']} of {var['name']} is missing"
    return env


def ray_container(group: dict) -> dict:
    """The Ray container of a head or worker group (KubeRay: the first one)."""
    return group["template"]["spec"]["containers"][0]


def node_env(spec: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """The environment of every Ray node of a RayCluster spec, with the token KubeRay sets
    for ``authOptions``; the groups must agree, as one environment starts them all here.
    HOME is the pod's own and stays this machine's."""
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    envs = [pod_env(ray_container(group), secrets) for group in groups]
    assert all(env == envs[0] for env in envs), "the head and worker pods' env differ"
    env = {name: value for name, value in envs[0].items() if name != "HOME"}
    auth = spec.get("authOptions")
    if auth and auth["mode"] == "token":
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets[auth["secretName"]]["auth_token"])
    return env


def autoscaling_of(name: str, spec: dict) -> dict | None:
    """The autoscaler config KubeRay's autoscaler would run with for RayCluster ``spec``."""
    if not spec.get("enableInTreeAutoscaling"):
        return None
    return autoscaling_from_raycluster({"metadata": {"name": name}, "spec": spec})


def start_cluster(
    folder: Path,
    name: str,
    spec: dict,
    secrets: dict[str, dict[str, str]],
    extra_env: dict[str, str] | None = None,
) -> LocalCluster:
    """A local cluster as KubeRay would bring up RayCluster ``spec`` named ``name``
    (``extra_env``: the test's own variables on every node besides the pods')."""
    params = dict(spec["headGroupSpec"]["rayStartParams"])
    head_cpus = int(params.pop("num-cpus"))
    return LocalCluster(
        folder,
        extra_env={**node_env(spec, secrets), **(extra_env or {})},
        head_cpus=head_cpus,
        token_auth=False,
        autoscaling=autoscaling_of(name, spec),
        head_params=params,
    )


def mount_config_maps(
    group: dict, docs: list[dict], root: Path, image_root: Path = REPO
) -> dict[str, Path]:
    """Writes the ConfigMaps that ``group``'s Ray container mounts under ``root``, as the
    kubelet would at their mount paths, and maps those paths and the image's code folder
    to this machine's: pod path -> local folder."""
    volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    mounted = {IMAGE_WORKDIR: image_root}
    for mount in ray_container(group)["volumeMounts"]:
        source = volumes[mount["name"]].get("configMap")
        if source is None:
            continue
        folder = root / mount["mountPath"].strip("/").replace("/", "_")
        folder.mkdir(parents=True)
        for key, text in maps[source["name"]]["data"].items():
            (folder / key).write_text(text)
        mounted[mount["mountPath"]] = folder
    return mounted


def local_command(entrypoint: str, mounted: dict[str, Path]) -> str:
    """A pod's command with its paths mapped by ``mounted``; a path outside every mount
    and the image's code folder is an error, as it would be in the pod."""
    words = []
    for word in shlex.split(entrypoint):
        if word.startswith("/"):
            prefix = next((p for p in mounted if word == p or word.startswith(p + "/")), None)
            assert prefix, f"{word} is neither in the image's {IMAGE_WORKDIR} nor mounted"
            local = Path(str(mounted[prefix]) + word[len(prefix) :])
            assert local.exists(), f"{word} ({local}) does not exist"
            word = str(local)
        words.append(word)
    return shlex.join(words)


def serve_config(service: dict, port: int) -> dict:
    """A RayService's ``serveConfigV2`` with one proxy, on the head, at ``port``: the
    nodes of this machine share its ports, where pods each have their own (a proxy per
    node would bind the same port, and HAProxy's fixed stats ports, twice)."""
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    config["http_options"]["port"] = port
    config["proxy_location"] = "HeadOnly"
    return config
