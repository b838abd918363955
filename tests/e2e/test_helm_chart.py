"""The Helm chart, rendered by the real helm binary for every values profile in the repo
and checked strictly: core kinds against Kubernetes' own schemas, KubeRay kinds against
the schemas of KubeRay's CRDs in helm/kuberay-schemas with unknown fields refused, the
security policies we promise, and the experiments it mounts against forgeml's config."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import string
import subprocess
import sys
from functools import cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from forgeml.config import load_config
from forgeml.monitor.retrain import rayjob_manifests
from forgeml.runtime import RAY_ENV_DEFAULTS

from tests.conftest import REPO
from tests.e2e.chart import CHART, helm, render

PROFILES = sorted((CHART / "ci").glob("*-values.yaml"))
#: The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a current one.
KUBERNETES_VERSIONS = ("1.30.0", "1.35.0")
KUBERAY_KINDS = {"RayCluster", "RayJob", "RayService"}
#: Kinds whose CRDs are not at hand; checked by the policy tests only.
UNVALIDATED_KINDS = {"PodMonitor"}


PLAIN_MANIFESTS = REPO / "deploy" / "k8s"
KIND_SCRIPT = PLAIN_MANIFESTS / "e2e-kind.sh"
FORGEML = Path(sys.executable).parent / "forgeml"
#: KubeRay's CRDs beside the repository, when there, to check the committed schemas against.
CRDS = REPO.parent / "shared" / "kuberay-crds"


def _load_generator(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


KUBERAY_SCHEMAS = _load_generator(REPO / "helm" / "kuberay_schemas.py")
SCHEMAS = KUBERAY_SCHEMAS.SCHEMAS


@pytest.fixture(scope="module", params=[*PROFILES, PLAIN_MANIFESTS], ids=lambda path: path.name)
def rendered(request) -> list[dict]:
    """The chart rendered with a values profile, or the plain manifests."""
    if request.param == PLAIN_MANIFESTS:
        files = sorted(PLAIN_MANIFESTS.glob("*.yaml"))
        docs = [yaml.safe_load_all(f.read_text()) for f in files if f.name != "values.yaml"]
        return [doc for stream in docs for doc in stream if doc]
    return render("-f", str(request.param))


@cache
def crd_validator(kind: str) -> jsonschema.Validator:
    """A validator with the schema of KubeRay's CRD for ``kind``, unknown fields refused."""
    path = SCHEMAS / KUBERAY_SCHEMAS.schema_file_name(kind)
    return jsonschema.Draft202012Validator(json.loads(path.read_text()))


def experiments(docs: list[dict]) -> list[str]:
    """The experiment files held by the ConfigMaps among ``docs``."""
    return [
        doc["data"]["experiment.yaml"]
        for doc in docs
        if doc["kind"] == "ConfigMap" and "experiment.yaml" in doc.get("data", {})
    ]


def config_validate(experiment: str, folder: Path) -> subprocess.CompletedProcess:
    """``forgeml config validate`` run on the experiment file's text."""
    path = folder / "experiment.yaml"
    path.write_text(experiment)
    command = [str(FORGEML), "config", "validate", "--config", str(path)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def kind_script_values() -> str:
    """The values file e2e-kind.sh installs the chart with, as the shell writes it: the
    heredoc behind ``helm install ... -f FILE``, its variables expanded."""
    script = KIND_SCRIPT.read_text()
    install = re.search(r"^helm install \S+ helm/forgeml -f (\S+)", script, re.MULTILINE)
    assert install, f"{KIND_SCRIPT.name}: no `helm install ... helm/forgeml -f FILE`"
    values_file = re.escape(install[1])
    heredoc = re.search(
        rf"^cat > {values_file} <<(['\"]?)(\w+)\1\n(.*?)^\2$", script, re.MULTILINE | re.DOTALL
    )
    assert heredoc, f"{KIND_SCRIPT.name}: no heredoc writes {install[1]}"
    quoted, text = heredoc[1], heredoc[3]
    if quoted:
        return text
    # Variables set to a literal at the top level of the script; substitute() raises on
    # any other, as the values would then not be what the script installs.
    variables = dict(re.findall(r"^(\w+)=([^\s$\"'`]+)$", script, re.MULTILINE))
    return string.Template(text).substitute(variables)


def ray_cluster_specs(doc: dict) -> list[dict]:
    """The RayCluster specs inside a KubeRay object (none for a RayJob on a selected cluster)."""
    if doc["kind"] not in KUBERAY_KINDS:
        return []
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    return [cluster] if "headGroupSpec" in cluster else []


def pod_templates(doc: dict) -> list[tuple[str, dict]]:
    """Every pod template of a KubeRay object, named by where it sits."""
    spec = doc["spec"]
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig") or spec
    found = []
    if "headGroupSpec" in cluster:
        found.append(("head", cluster["headGroupSpec"]["template"]))
        found += [(g["groupName"], g["template"]) for g in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        found.append(("submitter", spec["submitterPodTemplate"]))
    return [(f"{doc['kind']}/{where}", template) for where, template in found]


def all_pod_templates(docs: list[dict]) -> list[tuple[str, dict]]:
    return [t for doc in docs if doc["kind"] in KUBERAY_KINDS for t in pod_templates(doc)]


def test_lint_strict_passes_for_every_profile():
    for profile in PROFILES:
        result = helm("lint", "--strict", str(CHART), "-f", str(profile), check=False)
        assert result.returncode == 0, result.stdout + result.stderr


def test_every_rendered_object_validates_strictly(rendered):
    kinds = {doc["kind"] for doc in rendered}
    assert kinds & KUBERAY_KINDS
    for doc in rendered:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] in KUBERAY_KINDS:
            errors = sorted(crd_validator(doc["kind"]).iter_errors(doc), key=str)
            assert not errors, f"{name}: " + "; ".join(
                f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:5]
            )
        elif doc["kind"] not in UNVALIDATED_KINDS:
            for version in KUBERNETES_VERSIONS:
                kubernetes_validate.validate(doc, version, strict=True)


def test_the_strict_crd_check_refuses_an_unknown_field():
    cluster = next(d for d in render() if d["kind"] == "RayCluster")
    cluster = copy.deepcopy(cluster)
    cluster["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    errors = list(crd_validator("RayCluster").iter_errors(cluster))
    assert any("'maxReplica' was unexpected" in e.message for e in errors)


def test_the_kuberay_schemas_are_of_the_operator_the_chart_names():
    version = KUBERAY_SCHEMAS.kuberay_version()
    for kind in KUBERAY_KINDS:
        schema = json.loads((SCHEMAS / KUBERAY_SCHEMAS.schema_file_name(kind)).read_text())
        assert schema["$comment"].startswith(f"KubeRay v{version} {kind} "), (
            "run: python helm/kuberay_schemas.py with the CRDs of KubeRay " + version
        )


# The tests read the committed schemas; the CRDs they come from are outside the repository,
# so a clone without them checks everything but this: that the conversion is current.
@pytest.mark.skipif(not CRDS.is_dir(), reason=f"no KubeRay CRDs in {CRDS} to convert again")
def test_the_kuberay_schemas_are_the_crds_converted(tmp_path):
    KUBERAY_SCHEMAS.write(KUBERAY_SCHEMAS.schemas(CRDS), tmp_path)
    generated = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    committed = {path.name: path.read_bytes() for path in SCHEMAS.iterdir()}
    assert sorted(committed) == sorted(generated)
    stale = [name for name in sorted(generated) if committed[name] != generated[name]]
    assert not stale, f"{stale} differ: run python helm/kuberay_schemas.py {CRDS}"


def test_every_mounted_experiment_passes_config_validate(rendered, tmp_path):
    """The experiment of every RayJob a profile or the plain manifests install is one
    that `forgeml config validate` takes."""
    found = experiments(rendered)
    jobs = [doc for doc in rendered if doc["kind"] == "RayJob"]
    assert len(found) == len(jobs), "one experiment ConfigMap per RayJob"
    for experiment in found:
        result = config_validate(experiment, tmp_path)
        assert result.returncode == 0, result.stderr


def test_the_kind_scripts_experiment_passes_config_validate(tmp_path):
    values = tmp_path / "values.yaml"
    values.write_text(kind_script_values())
    found = experiments(render("-f", str(values)))
    assert len(found) == 1, f"{KIND_SCRIPT.name} installs {len(found)} experiments, not one"
    result = config_validate(found[0], tmp_path)
    assert result.returncode == 0, result.stderr


def test_worker_groups_carry_the_ray_labels_experiments_select_on():
    profile = CHART / "ci" / "production-values.yaml"
    cluster = next(d for d in render("-f", str(profile)) if d["kind"] == "RayCluster")
    labels = {g["groupName"]: g.get("labels") for g in cluster["spec"]["workerGroupSpecs"]}
    assert labels == {"cpu": {"market": "on-demand"}, "gpu": {"market": "spot"}}
    default = next(d for d in render() if d["kind"] == "RayCluster")
    assert "labels" not in default["spec"]["workerGroupSpecs"][0]


def test_every_pod_passes_the_restricted_pod_security_standard(rendered):
    templates = all_pod_templates(rendered)
    assert templates
    for where, template in templates:
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, where
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", where
        # The API token is mounted into the autoscaler sidecar alone (see below).
        assert pod["automountServiceAccountToken"] is False, where
        # KubeRay's head services select app.kubernetes.io/name=kuberay: never overridden.
        assert "app.kubernetes.io/name" not in template["metadata"]["labels"], where
        assert not pod.get("hostNetwork") and not pod.get("hostPID"), where
        assert not [v for v in pod.get("volumes", []) if "hostPath" in v], where
        for container in pod["containers"]:
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"]["drop"] == ["ALL"], where
            assert context["readOnlyRootFilesystem"] is True, where
            assert not context.get("privileged"), where
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}: Ray needs a writable /tmp"
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][part]), where


def test_only_the_autoscaler_gets_the_service_account_token(rendered):
    """KubeRay binds the pods' service account to its autoscaler Role; the chart adds no
    rights and mounts the token into the autoscaler sidecar only."""
    assert not [d for d in rendered if d["kind"] in ("Role", "ClusterRole", "RoleBinding")]
    accounts = {d["metadata"]["name"] for d in rendered if d["kind"] == "ServiceAccount"}
    for where, template in all_pod_templates(rendered):
        assert template["spec"]["serviceAccountName"] in accounts, where
        for container in template["spec"]["containers"]:
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert "/var/run/secrets/kubernetes.io/serviceaccount" not in mounts, where
    for doc in rendered:
        for cluster in ray_cluster_specs(doc):
            if cluster["enableInTreeAutoscaling"]:
                mounts = {m["name"]: m for m in cluster["autoscalerOptions"]["volumeMounts"]}
                token = mounts["kube-api-access"]
                assert token["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount"
                head_volumes = cluster["headGroupSpec"]["template"]["spec"]["volumes"]
                assert "kube-api-access" in {v["name"] for v in head_volumes}


def test_mounted_config_maps_are_the_ones_rendered(rendered):
    config_maps = {d["metadata"]["name"] for d in rendered if d["kind"] == "ConfigMap"}
    for where, template in all_pod_templates(rendered):
        for volume in template["spec"].get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, where


def test_images_are_pinned(rendered):
    for where, template in all_pod_templates(rendered):
        for container in template["spec"]["containers"]:
            image = container["image"]
            assert "@sha256:" in image or (
                ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
            ), f"{where}: {image}"


def test_every_cluster_uses_token_auth_from_the_secret(rendered):
    """KubeRay's authOptions: the operator sets RAY_AUTH_MODE and RAY_AUTH_TOKEN in every
    Ray container from the Secret and authenticates its own calls with it."""
    clusters = [c for doc in rendered for c in ray_cluster_specs(doc)]
    for cluster in clusters:
        assert cluster["authOptions"] == {"mode": "token", "secretName": "forgeml-ray-token"}
    for where, template in all_pod_templates(rendered):
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert "RAY_AUTH_TOKEN" not in env, where
        if where.endswith("submitter"):
            continue
        serve_token = env["FORGEML_SERVE_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert serve_token["name"] == "forgeml-serve-token", where
        assert env["RAY_SERVE_ENABLE_HA_PROXY"]["value"] == "1"
        assert env["RAY_max_direct_call_object_size"]["value"] == "262144"
        for name, value in RAY_ENV_DEFAULTS.items():  # what the embedded runtime sets
            assert env[name]["value"] == value, (where, name)


def test_no_secret_values_and_no_exposed_dashboard_by_default():
    docs = render()
    assert "Secret" not in {doc["kind"] for doc in docs}
    for doc in docs:
        if doc["kind"] == "RayCluster":
            assert doc["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_network_policy_opens_only_the_serve_port_beyond_the_release():
    docs = render("--set", "serving.enabled=true", "--set", "serving.serveConfigV2=x: 1")
    policies = [doc for doc in docs if doc["kind"] == "NetworkPolicy"]
    release = {"app.kubernetes.io/instance": "forge", "app.kubernetes.io/part-of": "forgeml"}
    for policy in policies:
        assert policy["spec"]["podSelector"]["matchLabels"] == release
        for rule in policy["spec"]["ingress"]:
            peers = rule.get("from", [])
            within_release = peers == [{"podSelector": {"matchLabels": release}}]
            ports = {p["port"] for p in rule.get("ports", [])}
            assert within_release or ports in ({8000}, {8265, 8000}), rule
            if 8265 in ports:  # the dashboard: the KubeRay operator only
                assert all("podSelector" in peer for peer in peers), rule
    open_rules = [r for p in policies for r in p["spec"]["ingress"] if "from" not in r]
    assert [{p["port"] for p in r["ports"]} for r in open_rules] == [{8000}]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["workers.cpu.minReplicas=-1"], "at '/workers/cpu/minReplicas': minimum: got -1"),
        (
            ["workers.cpu.minReplicas=0", "workers.cpu.replicas=0", "workers.cpu.maxReplicas=0"],
            None,
        ),
        (
            ["workers.cpu.minReplicas=3", "workers.cpu.replicas=3", "workers.cpu.maxReplicas=2"],
            "at '/workers/cpu/maxReplicas': minimum: got 2, want 3",
        ),
        (["clusterName=x"], "additional properties 'clusterName' not allowed"),
        (["image.tag=latest"], "at '/image/tag'"),
        (["head.serviceType=Ingress"], "at '/head/serviceType'"),
        (["workers.gpu.gpusPerWorker=zero"], "at '/workers/gpu/gpusPerWorker'"),
    ],
)
def test_values_schema_rejects_bad_values(values, message):
    args = [arg for value in values for arg in ("--set", value)]
    result = helm("lint", "--strict", str(CHART), *args, check=False)
    if message is None:
        assert result.returncode == 0, result.stdout + result.stderr
    else:
        assert result.returncode != 0
        assert message in result.stdout + result.stderr


def test_the_values_schema_file_is_generated():
    generator = _load_generator(REPO / "helm" / "values_schema.py")
    assert (CHART / "values.schema.json").read_text() == generator.render()


def test_the_plain_manifests_are_the_charts_rendering():
    generator = _load_generator(PLAIN_MANIFESTS / "generate.py")
    expected = generator.manifests()
    written = {f.name: f.read_text() for f in PLAIN_MANIFESTS.glob("*.yaml")}
    written.pop("values.yaml")
    assert written == expected, "run: python deploy/k8s/generate.py"


def test_image_chart_and_project_use_one_ray_version():
    ray_pin = re.search(r'"ray\[[a-z,]+\]==([0-9.]+)"', (REPO / "pyproject.toml").read_text())
    base = re.search(r"ARG BASE_IMAGE=rayproject/ray:([0-9.]+)-", (REPO / "Dockerfile").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert ray_pin and base
    assert ray_pin[1] == base[1] == values["rayVersion"]


def _rayjob(*args: str) -> dict:
    docs = render("--set", "job.enabled=true", *args)
    return next(doc for doc in docs if doc["kind"] == "RayJob")


def test_rayjob_follows_kuberays_rules_for_retries_and_cleanup(tmp_path):
    """KubeRay refuses backoffLimit with clusterSelector and a TTL without shutdown."""
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text((REPO / "examples" / "wafer" / "config.yaml").read_text())
    from_file = ("--set-file", f"job.experiment={experiment}")

    selected = _rayjob(*from_file, "--set", "job.useClusterSelector=true")
    assert selected["spec"]["clusterSelector"] == {"ray.io/cluster": "forge-forgeml"}
    assert not {"backoffLimit", "ttlSecondsAfterFinished", "rayClusterSpec"} & set(selected["spec"])
    kept = _rayjob(*from_file, "--set", "job.shutdownAfterJobFinishes=false")
    assert kept["spec"]["shutdownAfterJobFinishes"] is False
    assert "ttlSecondsAfterFinished" not in kept["spec"]
    own = _rayjob(*from_file)
    assert own["spec"]["ttlSecondsAfterFinished"] == 600 and own["spec"]["backoffLimit"] == 1

    docs = render("--set", "job.enabled=true", *from_file)
    (config_map,) = [doc for doc in docs if doc["kind"] == "ConfigMap"]
    assert config_map["data"]["experiment.yaml"].strip() == experiment.read_text().strip()


def test_a_job_without_an_experiment_is_refused():
    result = helm("template", "forge", str(CHART), "--set", "job.enabled=true", check=False)
    assert result.returncode != 0
    assert "job.experiment is required" in result.stderr


def test_the_standing_cluster_recreates_its_pods_on_upgrade():
    (cluster,) = [doc for doc in render() if doc["kind"] == "RayCluster"]
    assert cluster["spec"]["upgradeStrategy"] == {"type": "Recreate"}


def test_a_retraining_rayjob_is_the_charts_job_under_a_new_name(tmp_path):
    """What a drift monitor creates with `monitor.retrain.submit_to: kubernetes`: the
    chart's retraining template, renamed with its own experiment ConfigMap. It is the
    RayJob the chart renders for a job with that experiment, and KubeRay's CRD takes it."""
    cfg = load_config(
        REPO / "examples" / "wafer" / "config.yaml", ["data.append=[s3://forgeml/new-maps]"]
    )
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(cfg.to_yaml())
    docs = render("--set", "retrain.enabled=true")
    (template_map,) = [d for d in docs if d["metadata"]["name"] == "forge-forgeml-retrain-template"]
    template = yaml.safe_load(template_map["data"]["rayjob.yaml"])
    config_map, rayjob = rayjob_manifests(template, cfg, "wafer-cnn:v1")

    errors = sorted(crd_validator("RayJob").iter_errors(rayjob), key=str)
    assert not errors, "; ".join(e.message for e in errors[:5])
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(config_map, version, strict=True)

    charted = render("--set", "job.enabled=true", "--set-file", f"job.experiment={experiment}")
    job = next(d for d in charted if d["kind"] == "RayJob")
    job_map = next(d for d in charted if d["kind"] == "ConfigMap")
    name = rayjob["metadata"]["name"]
    renamed = json.loads(json.dumps(job["spec"]).replace(job_map["metadata"]["name"], name))
    assert rayjob["spec"] == renamed
    assert rayjob["metadata"]["labels"] == {
        **job["metadata"]["labels"],
        "forgeml/retrain-of": "wafer-cnn-v1",
    }
    sent = yaml.safe_load(config_map["data"]["experiment.yaml"])
    assert sent == yaml.safe_load(job_map["data"]["experiment.yaml"])
    assert sent["data"]["append"] == ["s3://forgeml/new-maps"]


def test_retraining_adds_only_the_rights_it_needs_and_only_on_the_standing_head():
    docs = render("--set", "retrain.enabled=true")
    (role,) = [d for d in docs if d["kind"] == "Role"]
    assert role["rules"] == [
        {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]},
    ]
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert binding["subjects"][0]["name"] == "forge-forgeml"
    token = "/var/run/secrets/kubernetes.io/serviceaccount"
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    for where, template in pod_templates(cluster):
        (container,) = template["spec"]["containers"]
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        on_head = where == "RayCluster/head"
        assert (token in mounts) == on_head and ("/etc/forgeml-retrain" in mounts) == on_head
    template_map = next(d for d in docs if d["metadata"]["name"].endswith("-retrain-template"))
    retraining = yaml.safe_load(template_map["data"]["rayjob.yaml"])
    for where, template in pod_templates(retraining):
        for container in template["spec"]["containers"]:
            mounts = {m["mountPath"] for m in container.get("volumeMounts", [])}
            assert token not in mounts, where


def test_retraining_needs_a_job_with_its_own_cluster():
    args = ["--set", "retrain.enabled=true", "--set", "job.useClusterSelector=true"]
    result = helm("template", "forge", str(CHART), *args, check=False)
    assert result.returncode != 0 and "set job.useClusterSelector to false" in result.stderr
