"""The chart's RayJob and RayService, run on a cluster that Ray's autoscaler grows and
shrinks as KubeRay's would.

`helm template` renders a RayJob (with its experiment ConfigMap) and, once the job has
registered a model, a RayService whose ``serveConfigV2`` is `forgeml serve build`'s. The
RayJob's own cluster starts here as KubeRay would start it (tests/e2e/kuberay.py): a head
with no CPUs for work and no worker node, and the autoscaler with the chart's CPU group
sized to one CPU, zero to three nodes, and a short idle timeout. Jobs are submitted with
the RayJob's entrypoint through the Jobs API, the Serve config applied as the operator
applies it, and every scale-up and scale-down is watched in Ray's node table.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import re
import secrets as secrets_module
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import boto3
import psutil
import pytest
import requests
import yaml
from forgeml.config import StorageConfig
from forgeml.local_cluster import LocalCluster
from forgeml.runtime import environment, free_port, shutdown
from forgeml.storage import ModelRegistry, Storage
from ray.job_submission import JobStatus, JobSubmissionClient

from tests.conftest import S3_ENV, tiny_raw_config
from tests.e2e.chart import render
from tests.e2e.kuberay import (
    IMAGE_WORKDIR,
    autoscaling_of,
    local_command,
    mount_config_maps,
    node_env,
    only,
    serve_config,
    start_cluster,
)

BIN = Path(sys.executable).parent
BUCKET = "autoscaling"
#: Seconds an idle worker node stays (the chart's autoscaling.idleTimeoutSeconds).
IDLE_TIMEOUT_S = 10
#: The chart's values for this machine: worker nodes of one CPU, none at the start.
VALUES = {
    "workers": {
        "cpu": {
            "replicas": 0,
            "minReplicas": 0,
            "maxReplicas": 3,
            "resources": {
                "requests": {"cpu": "1", "memory": "2Gi"},
                "limits": {"cpu": "1", "memory": "2Gi"},
            },
        }
    },
    "autoscaling": {"idleTimeoutSeconds": IDLE_TIMEOUT_S},
    "s3": {"region": "us-east-1", "credentialsSecret": "forgeml-s3"},
}
SERVE_TOKEN = "serve-token-for-the-autoscaling-tests"


@dataclass
class ChartCluster:
    """The rendered chart's RayJob cluster, running, and the values it was rendered with."""

    cluster: LocalCluster
    secrets: dict[str, dict[str, str]]
    values: dict
    folder: Path
    haproxy_log: HAProxyLog | None = None

    @property
    def headers(self) -> dict[str, str]:
        """What KubeRay sends the dashboard: the cluster's token."""
        return {"Authorization": f"Bearer {self.secrets['forgeml-ray-token']['auth_token']}"}

    @cached_property
    def jobs(self) -> JobSubmissionClient:
        """The Jobs API client, made once: making one asks the dashboard for its version."""
        return JobSubmissionClient(self.cluster.dashboard_url, headers=self.headers)

    def render(self, *args: str) -> list[dict]:
        values = self.folder / "values.yaml"
        values.write_text(yaml.safe_dump(self.values))
        return render("-f", str(values), *args)

    def experiment(self, **sections) -> dict:
        """A tiny experiment on the chart's S3 storage, set as the RayJob's."""
        raw = tiny_raw_config(f"s3://{BUCKET}/store", **sections)
        self.values["job"]["experiment"] = raw
        return raw

    def metrics(self, ref: str) -> dict:
        """The metrics.json of a registered model version."""
        storage = StorageConfig(root=f"s3://{BUCKET}/store")
        with environment({**S3_ENV, "AWS_ENDPOINT_URL": self.values["s3"]["endpointUrl"]}):
            registry = ModelRegistry(Storage(storage))
            return json.loads(registry.read(registry.resolve(ref), "metrics.json"))


class HAProxyLog:
    """The lines Serve's HAProxy logs (syslog over UDP, one request a line with its
    status, retries and how its session ended), received on a port of 127.0.0.1, for
    the failure message of a test that loses requests."""

    def __init__(self):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.socket.bind(("127.0.0.1", 0))
        self.target = f"127.0.0.1:{self.socket.getsockname()[1]}"
        self.lines: list[str] = []
        threading.Thread(target=self._receive, daemon=True).start()

    def _receive(self) -> None:
        with contextlib.suppress(OSError):  # closed
            while True:
                self.lines.append(self.socket.recv(65536).decode(errors="replace").strip())

    def unanswered(self) -> list[str]:
        """The predictions that did not end with a 200, as HAProxy logged them (a 307
        among them: the predict path answers itself)."""
        return [
            line for line in self.lines if "/predict" in line and not re.search(r" 200 \d+ ", line)
        ]


@pytest.fixture(scope="module")
def chart_cluster(tmp_path_factory, s3_endpoint):
    """The module's one cluster: the RayJob's, started with the Secrets a user would
    create, stopped when the module ends, with nothing of it left running. Its HAProxy
    logs to ``chart.haproxy_log``."""
    shutdown()  # the integration runtime, if this session started one
    folder = tmp_path_factory.mktemp("chart-cluster")
    with environment(S3_ENV):
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
    secrets = {
        "forgeml-ray-token": {"auth_token": secrets_module.token_hex(32)},
        "forgeml-s3": {k: v for k, v in S3_ENV.items() if k != "AWS_DEFAULT_REGION"},
        "forgeml-serve-token": {"token": SERVE_TOKEN},
    }
    values = {**VALUES, "s3": {**VALUES["s3"], "endpointUrl": s3_endpoint}}
    chart = ChartCluster(None, secrets, {**values, "job": {"enabled": True}}, folder)
    chart.experiment()
    rayjob = only(chart.render(), "RayJob")
    spec = rayjob["spec"]["rayClusterSpec"]
    chart.haproxy_log = HAProxyLog()
    logged = {"RAY_SERVE_HAPROXY_LOG_TARGET": chart.haproxy_log.target}
    with start_cluster(folder / "nodes", rayjob["metadata"]["name"], spec, secrets, logged) as (
        cluster
    ):
        chart.cluster = cluster
        yield chart
    chart.haproxy_log.socket.close()
    # Stopping the head's process group ended every node its autoscaler started.
    deadline = time.monotonic() + 30
    while left := [
        " ".join(p.info["cmdline"])[:300]
        for p in psutil.process_iter(["cmdline"])
        if cluster.gcs_address in " ".join(p.info["cmdline"] or [])
    ]:
        assert time.monotonic() < deadline, f"processes of the stopped cluster run on: {left}"
        time.sleep(1)


@dataclass
class Scaling:
    """What the node table showed while a job ran and after it ended."""

    peak_nodes: int
    first_node_s: float | None
    all_nodes_s: float | None
    scale_down_s: float
    status: JobStatus
    logs: str


def _run_and_watch(chart: ChartCluster, entrypoint: str, timeout: float = 420) -> Scaling:
    """Submits ``entrypoint``, follows the autoscaled nodes until it ends and until they
    are all gone again."""
    cluster = chart.cluster
    assert cluster.autoscaled_nodes() == set(), "a worker node is left from an earlier test"
    started = time.monotonic()
    job = chart.jobs.submit_job(entrypoint=entrypoint)
    peak, first, all_up = 0, None, None
    deadline = started + timeout
    while not (status := chart.jobs.get_job_status(job)).is_terminal():
        nodes = len(cluster.autoscaled_nodes())
        if nodes and first is None:
            first = time.monotonic() - started
        if nodes > peak:
            peak, all_up = nodes, time.monotonic() - started
        assert time.monotonic() < deadline, chart.jobs.get_job_logs(job)[-3000:]
        time.sleep(0.5)
    ended = time.monotonic()
    while cluster.autoscaled_nodes():
        assert time.monotonic() < ended + IDLE_TIMEOUT_S + 60, cluster.status()
        time.sleep(1)
    scaling = Scaling(
        peak, first, all_up, time.monotonic() - ended, status, chart.jobs.get_job_logs(job)
    )
    print(json.dumps({"entrypoint": entrypoint.split()[1], **scaling.__dict__} | {"logs": None}))
    return scaling


def _entrypoint(chart: ChartCluster, docs: list[dict]) -> str:
    """The RayJob's entrypoint, its ConfigMaps mounted where the head pod mounts them."""
    rayjob = only(docs, "RayJob")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]
    root = chart.folder / f"mounts-{time.monotonic_ns()}"
    return local_command(rayjob["spec"]["entrypoint"], mount_config_maps(head, docs, root))


def test_the_rayjob_grows_the_cluster_to_its_workers_and_it_shrinks_after(chart_cluster):
    """Two workers of one CPU on a cluster with none: the autoscaler adds two nodes, the
    run trains and registers, and the nodes go once idle."""
    chart = chart_cluster
    chart.experiment()["scaling"]["num_workers"] = 2

    scaling = _run_and_watch(chart, _entrypoint(chart, chart.render()))

    assert scaling.status == JobStatus.SUCCEEDED, scaling.logs[-3000:]
    assert "registered tiny-wafer:v1" in scaling.logs
    ranks = chart.metrics("tiny-wafer:v1")["run"]["ranks"]
    # Two nodes for the ranks; Ray Data's request for the data preparation may have
    # added a third while they came up.
    nodes = {rank["node_id"] for rank in ranks}
    assert len(nodes) == 2 and chart.cluster.node_ids()["head"] not in nodes
    assert 2 <= scaling.peak_nodes <= 3
    assert scaling.scale_down_s <= IDLE_TIMEOUT_S + 60


def test_a_search_grows_the_cluster_to_its_concurrent_trials_and_it_shrinks_after(
    chart_cluster,
):
    """Three Train trials at once, each a worker of one CPU: three nodes, gone after the
    search (forgeml withdraws what Ray Train leaves asked for)."""
    chart = chart_cluster
    chart.experiment(
        name="searched-wafer",
        train={"max_epochs": 1},
        tune={
            "num_trials": 3,
            "max_concurrent_trials": 3,
            "search": {"kind": "grid"},
            "scheduler": {"kind": "none"},
            "space": {"train.optimizer.lr": {"kind": "grid", "values": [1e-2, 3e-3, 1e-3]}},
        },
    )
    tune = (
        f"job.entrypoint=python {IMAGE_WORKDIR}/jobs/tune.py --config /etc/forgeml/experiment.yaml"
    )

    scaling = _run_and_watch(chart, _entrypoint(chart, chart.render("--set", tune)))

    assert scaling.status == JobStatus.SUCCEEDED, scaling.logs[-3000:]
    assert scaling.peak_nodes == 3
    assert (left := chart.cluster.requests_left()) is None, left  # none left asked for
    assert "registered searched-wafer:v1" in scaling.logs
    assert chart.metrics("searched-wafer:v1")["test"]


def test_a_gpu_worker_on_a_cpu_only_cluster_is_refused_before_launch(chart_cluster):
    """No hang on a placement group no node could ever hold: the autoscaler marks it
    infeasible and the job fails at once, saying so (the same path refuses more CPUs per
    worker than a group has; tests/unit/test_placement.py has the reading)."""
    chart = chart_cluster
    chart.experiment(name="refused-wafer")["scaling"]["use_gpu"] = True

    result = _run_and_watch(chart, _entrypoint(chart, chart.render()), timeout=90)

    assert result.status == JobStatus.FAILED
    assert "1 CPU + 1 GPU" in result.logs
    assert "autoscaler cannot add such nodes" in result.logs
    assert result.peak_nodes == 0


def _ready(url: str) -> bool:
    try:
        return requests.get(url + "/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _serve_status(chart: ChartCluster) -> dict:
    response = requests.get(
        f"{chart.cluster.dashboard_url}/api/serve/applications/",
        headers=chart.headers,
        timeout=30,
    )
    response.raise_for_status()
    return response.json()


def _replicas(chart: ChartCluster, deployment: str) -> list[dict]:
    """The RUNNING replicas of ``deployment`` (their ids and nodes), by Serve's status."""
    return [
        replica
        for app in _serve_status(chart)["applications"].values()
        for name, status in app["deployments"].items()
        if name == deployment
        for replica in status["replicas"]
        if replica["state"] == "RUNNING"
    ]


def _replica_log(chart: ChartCluster, replica: dict) -> str:
    """The access log of a model replica, read from its node through Ray's log API."""
    app = "forgeml.tiny-wafer-v1"  # the gateway's application of the model's version
    response = requests.get(
        f"{chart.cluster.dashboard_url}/api/v0/logs/file",
        params={
            "node_id": replica["node_id"],
            "filename": f"serve/replica_{app}_ModelServer_{replica['replica_id']}.log",
        },
        headers=chart.headers,
        timeout=30,
    )
    return response.text if response.ok else ""


def _large_objects(chart: ChartCluster) -> list[tuple]:
    """Objects in the cluster's object stores of over 50 kB, with the actor whose call
    made each (a node that holds one is not idle to the autoscaler) and the owner's pid.
    A returned object's id is its task's id (8 bytes, then the actor's 16) and an index."""
    actors = {a["actor_id"]: (a["name"], a["state"]) for a in chart.cluster.state("actors")}
    return [
        (o["object_id"], o["object_size"], o["pid"], actors.get(o["object_id"][16:48]))
        for o in chart.cluster.state("objects")
        if o["object_size"] > 50_000
    ]


def _wait_for_requests_on(chart: ChartCluster, replica: dict, deadline: float) -> None:
    """Returns once ``replica``'s access log shows a prediction it served (Serve logs a
    request to the application's own path as ``POST __call__ 200``)."""
    while not re.search(r"POST \S+ 200 ", _replica_log(chart, replica)):
        assert time.monotonic() < deadline, f"replica {replica['replica_id']} logged no request"
        time.sleep(0.5)


def test_the_rayservice_serves_grows_onto_a_new_node_and_outlives_losing_it(
    chart_cluster, tmp_path
):
    """`forgeml serve build`'s config through the chart's RayService, applied with the
    Serve REST API (KubeRay's call): the gateway and one model replica take a node each.
    Under load the model asks for a second replica, which fits nowhere until the
    autoscaler adds a node; it serves there. Then that node is SIGKILLed: its calls go to
    the other replica, Serve starts a replacement on a node the autoscaler adds, /readyz
    never fails twice in a row, and at most 0.1% of requests fail. After the load the
    replica and the node go."""
    chart = chart_cluster
    settings = {
        "autoscaling.min_replicas": 1,
        "autoscaling.max_replicas": 2,
        "autoscaling.target_ongoing_requests": 1,
        "autoscaling.upscale_delay_s": 0.5,
        "autoscaling.downscale_delay_s": 3,
        "autoscaling.look_back_period_s": 12,
        "batch_wait_timeout_s": 0.05,
    }
    command = [str(BIN / "forgeml"), "serve", "build", "--model", "tiny-wafer"]
    command += ["--storage-root", f"s3://{BUCKET}/store", "--host", "0.0.0.0"]
    command += [arg for k, v in settings.items() for arg in ("--set", f"serve.{k}={v}")]
    env = {**S3_ENV, "AWS_ENDPOINT_URL": chart.values["s3"]["endpointUrl"]}
    built = subprocess.run(
        command, env={**chart.cluster.env, **env}, capture_output=True, text=True, timeout=120
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (tmp_path / "serve.yaml").write_text(built.stdout)
    docs = chart.render(
        "--set",
        "serving.enabled=true",
        "--set-file",
        f"serving.serveConfigV2={tmp_path / 'serve.yaml'}",
    )
    service = only(docs, "RayService")
    # KubeRay would start the RayService a cluster of its own, from the same groups.
    rayjob = only(docs, "RayJob")
    service_spec = service["spec"]["rayClusterConfig"]
    job_spec = rayjob["spec"]["rayClusterSpec"]
    assert node_env(service_spec, chart.secrets) == node_env(job_spec, chart.secrets)
    assert autoscaling_of("s", service_spec) == autoscaling_of("s", job_spec)
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    applied = requests.put(
        f"{chart.cluster.dashboard_url}/api/serve/applications/",
        json=serve_config(service, port),
        headers=chart.headers,
        timeout=60,
    )
    assert applied.status_code == 200, applied.text
    deadline = time.monotonic() + 180
    while _serve_status(chart)["applications"].get("forgeml", {}).get("status") != "RUNNING":
        assert time.monotonic() < deadline, json.dumps(_serve_status(chart))[-3000:]
        time.sleep(1)
    before = chart.cluster.autoscaled_nodes()
    assert len(before) == 2
    predict = f"{url}/v1/models/tiny-wafer/predict"
    headers = {"Authorization": f"Bearer {SERVE_TOKEN}"}
    body = {"instances": [{"image": [[1] * 16] * 16}]}
    assert requests.post(predict, json=body, timeout=60).status_code == 401
    assert requests.post(predict, json=body, headers=headers, timeout=60).status_code == 200

    stop, codes, ready_codes, not_ready = threading.Event(), [], [], []
    failures = []  # (seconds into the load, what went wrong), for the failure message

    def load():
        with requests.Session() as session:
            while not stop.is_set():
                try:
                    response = session.post(predict, json=body, headers=headers, timeout=60)
                    codes.append(response.status_code)
                    if response.status_code != 200:
                        failures.append((time.monotonic() - load_started, response.text[:200]))
                except requests.RequestException as exc:
                    codes.append(type(exc).__name__)
                    failures.append((time.monotonic() - load_started, repr(exc)[:200]))

    def probe_readiness():
        """Every /readyz answer's code; for each other than 200, when (seconds into the
        test's load) and why, for the failure message."""
        while not stop.is_set():
            try:
                response = requests.get(f"{url}/readyz", timeout=30)
                ready_codes.append(response.status_code)
                reason = response.text
            except requests.RequestException as exc:
                ready_codes.append(type(exc).__name__)
                reason = repr(exc)
            if ready_codes[-1] != 200:
                not_ready.append((round(time.monotonic() - load_started, 1), reason[:300]))
            time.sleep(0.2)

    threads = [threading.Thread(target=load) for _ in range(6)]
    threads.append(threading.Thread(target=probe_readiness))
    load_started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 120
        while len(replicas := _replicas(chart, "ModelServer")) < 2:
            assert time.monotonic() < deadline, "no second replica under load"
            time.sleep(0.5)
        added = chart.cluster.autoscaled_nodes() - before
        assert len(added) == 1
        (new,) = [r for r in replicas if r["node_id"] in added]
        _wait_for_requests_on(chart, new, deadline)

        # The new replica's node is lost, as a pod whose machine goes: its calls go to
        # the other replica, and Serve starts a replacement on a node the autoscaler adds.
        chart.cluster.kill_autoscaled_node(new["node_id"])
        killed = time.monotonic()
        deadline = killed + 180
        while len(back := _replicas(chart, "ModelServer")) < 2 or new["node_id"] in {
            r["node_id"] for r in back
        }:
            assert time.monotonic() < deadline, "the lost replica did not come back"
            time.sleep(0.5)
        (replacement,) = [r for r in back if r["node_id"] not in before]
        _wait_for_requests_on(chart, replacement, deadline)
        recovered_s = time.monotonic() - killed
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    deadline = time.monotonic() + 120
    while (
        len(_replicas(chart, "ModelServer")) > 1 or len(chart.cluster.autoscaled_nodes()) > 2
    ):  # Serve may keep either replica; the node left without one goes
        assert time.monotonic() < deadline, (
            f"replicas {_replicas(chart, 'ModelServer')}:\n{chart.cluster.status()}\n"
            f"objects held: {_large_objects(chart)}"
        )
        time.sleep(1)
    failed = Counter(code for code in codes if code != 200)
    print(json.dumps({"requests": len(codes), "failed": failed, "recovered_s": recovered_s}))
    assert codes and failed.total() <= len(codes) / 1000, (
        f"{failed}; killed at {killed - load_started:.1f} s: "
        f"{[(round(at, 1), why) for at, why in failures]}; HAProxy's log of predictions "
        f"not answered 200: {chart.haproxy_log.unanswered()[-20:]}"
    )
    # /readyz said ready: the predictions the other replica answers count, so no probe
    # waits behind them. Never two failed probes in a row: Kubernetes marks a pod unready
    # only after three (failureThreshold), each a probe period apart.
    print(json.dumps({"readyz": Counter(map(str, ready_codes)), "not_ready": not_ready}))
    failed_in_a_row = max(
        (len(list(run)) for ok, run in itertools.groupby(c == 200 for c in ready_codes) if not ok),
        default=0,
    )
    assert ready_codes and failed_in_a_row <= 1, (
        f"{Counter(ready_codes)}; killed at {killed - load_started:.1f} s: {not_ready}"
    )
    deleted = requests.delete(
        f"{chart.cluster.dashboard_url}/api/serve/applications/",
        headers=chart.headers,
        timeout=60,
    )
    assert deleted.status_code == 200
