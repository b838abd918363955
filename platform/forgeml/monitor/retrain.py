"""Retraining a drifting model: its registered experiment trained again with new data
appended (``data.append``), registering the next version of the same name.

Two ways to start it (``monitor.retrain.submit_to``):

- ``ray``: a Ray job through the Jobs API, on the cluster the monitor runs on (or
  ``ray_address``). The experiment file travels as the job's working directory.
- ``kubernetes``: a RayJob created with the Kubernetes API, built from the manifest the
  Helm chart renders for retraining (``monitor.retrain.rayjob_template``, mounted from a
  ConfigMap), so the job runs on exactly the cluster spec the chart gives training
  runs. Only its name and the ConfigMap holding the experiment file change.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import yaml

from forgeml.config import ExperimentConfig, RetrainConfig, config_from_dict
from forgeml.storage import ModelRegistry, ModelVersion

logger = logging.getLogger(__name__)

#: What a retraining Ray job runs, in the working directory holding the experiment file.
RAY_JOB_ENTRYPOINT = "python -m forgeml.cli train --config experiment.yaml"
#: Where the chart's RayJob pods mount the experiment ConfigMap (its key experiment.yaml).
EXPERIMENT_KEY = "experiment.yaml"
#: The namespace of the pod this runs in, when it runs in one.
POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
#: Seconds a refused job submission is retried.
SUBMIT_PATIENCE_S = 60
#: Kubernetes names are at most 63 characters (labels, and RayJob names KubeRay derives from).
NAME_LIMIT = 63


def retrain_config(registry: ModelRegistry, version: ModelVersion, append: list[str]):
    """The experiment that registered ``version``, with ``append`` added to its data."""
    raw = yaml.safe_load(registry.read(version, "config.yaml"))
    data = raw.setdefault("data", {})
    data["append"] = list(dict.fromkeys([*data.get("append", []), *append]))
    return config_from_dict(raw, f"{version.ref}/config.yaml")


def _stamp() -> str:
    return f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"


def submit_ray_job(cfg: ExperimentConfig, address: str | None, drifted: str) -> str:
    """Submit the retraining as a Ray job; its submission id. The head's job agent may
    still be starting (a fresh cluster answers 500 "No available agent"), so a refused
    submission is retried for up to ``SUBMIT_PATIENCE_S``."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    submission_id = f"{cfg.name}-retrain-{_stamp()}"
    deadline = time.monotonic() + SUBMIT_PATIENCE_S
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, EXPERIMENT_KEY).write_text(cfg.to_yaml())
        while True:
            try:
                return client.submit_job(
                    entrypoint=RAY_JOB_ENTRYPOINT,
                    submission_id=submission_id,
                    runtime_env={"working_dir": folder},
                    metadata={"forgeml.retrain_of": drifted},
                )
            except RuntimeError as exc:
                if time.monotonic() > deadline:
                    raise
                logger.warning("submitting %s failed (%s); retrying", submission_id, exc)
                time.sleep(2)


def rayjob_manifests(template: dict, cfg: ExperimentConfig, drifted: str) -> tuple[dict, dict]:
    """The ConfigMap holding the retraining experiment and the RayJob that runs it, from
    the chart's retraining RayJob: a new name, and its experiment volumes pointed at the
    new ConfigMap."""
    base = template["metadata"]["name"]
    suffix = f"-retrain-{_stamp()}"
    name = f"{base[: NAME_LIMIT - len(suffix)]}{suffix}"
    labels = {
        **template["metadata"].get("labels", {}),
        "forgeml/retrain-of": drifted.replace(":", "-"),
    }
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "labels": labels},
        "data": {EXPERIMENT_KEY: cfg.to_yaml()},
    }
    rayjob = copy.deepcopy(template)
    rayjob["metadata"] = {"name": name, "labels": labels}
    experiment = template["metadata"]["annotations"]["forgeml/experiment-configmap"]
    for volume in _volumes(rayjob):
        if volume.get("configMap", {}).get("name") == experiment:
            volume["configMap"]["name"] = name
    return config_map, rayjob


def _volumes(rayjob: dict):
    """Every pod volume of a RayJob: its cluster's head and worker groups, its submitter."""
    spec = rayjob["spec"]
    pods = []
    cluster = spec.get("rayClusterSpec")
    if cluster:
        pods.append(cluster["headGroupSpec"]["template"])
        pods += [group["template"] for group in cluster.get("workerGroupSpecs", [])]
    if "submitterPodTemplate" in spec:
        pods.append(spec["submitterPodTemplate"])
    for pod in pods:
        yield from pod["spec"].get("volumes", [])


def submit_rayjob(cfg: ExperimentConfig, settings: RetrainConfig, drifted: str) -> str:
    """Create the retraining ConfigMap and RayJob with the Kubernetes API; the job's name.
    In a pod the service account's credentials are used, elsewhere the kubeconfig."""
    from kubernetes import client, config

    try:
        template = yaml.safe_load(Path(settings.rayjob_template).read_text())
    except OSError as exc:
        raise ValueError(
            f"monitor.retrain.rayjob_template: cannot read {settings.rayjob_template}: "
            f"{exc.strerror}; mount the chart's retrain template (monitor.enabled)"
        ) from None
    config_map, rayjob = rayjob_manifests(template, cfg, drifted)
    try:
        config.load_incluster_config()
        namespace = settings.namespace or Path(POD_NAMESPACE_FILE).read_text().strip()
    except config.ConfigException:
        config.load_kube_config()
        namespace = settings.namespace or "default"
    client.CoreV1Api().create_namespaced_config_map(namespace, config_map)
    client.CustomObjectsApi().create_namespaced_custom_object(
        "ray.io", "v1", namespace, "rayjobs", rayjob
    )
    return rayjob["metadata"]["name"]
