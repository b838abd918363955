"""Which Ray runtime a job runs on: the cluster it was submitted to, or an embedded one.

``RAY_ADDRESS`` (set by ``ray job submit``) or a live ``ray start`` cluster on this
machine is joined; otherwise an embedded local runtime starts. A cluster that died
without ``ray stop`` leaves its address file behind, and a plain ``ray.init()`` would
then wait a minute for it and fail; ``connect`` starts an embedded runtime instead.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
from dataclasses import dataclass

import psutil
import ray
from ray._common.utils import reset_ray_address
from ray._private.utils import read_ray_address
from ray._raylet import GcsClient
from ray.core.generated.autoscaler_pb2 import AutoscalingState, GetClusterStatusReply

from forgeml import console
from forgeml.config import StorageConfig

logger = logging.getLogger(__name__)

#: Set in this process before Ray starts, so an embedded runtime's workers inherit them
#: (on a ``ray start`` cluster, set them where the nodes start). Ray Data's default
#: rate-based cluster autoscaler (Ray 2.60) hands concurrent streaming executions a
#: zero CPU budget on a small cluster, so two tuning trials stall; V2 shares the CPUs.
#: Ray Train's controller polls its workers every 2 s and waits a poll at each step of a
#: run; at 0.5 s the ``fit`` of a tiny run takes 14.5 s instead of 19 s (2 cores), and
#: two polls a second per worker cost a small cluster nothing it would notice (the
#: embedded runtime polls faster still: ``start_embedded_runtime``).
#: Ray Train's state tracking records every run (the dashboard's Train view reads it);
#: through it a search withdraws the autoscaler requests its trials' runs leave behind
#: (``forgeml.tune.search.release_autoscaler_requests``).
#: Ray Data's Parquet reader starts 32 footer-reading actors, each a new process, for
#: every read, however few the files; one reads 128 footers at once, and a tiny run's
#: data preparation takes 3 s instead of 7 s (2 cores).
#: Ray Data aggregates with hash-shuffle actors by default: ``TASK_AGGREGATION``.
#: Serve's throughput-optimised mode runs replicas' code on their own event loop
#: (not a thread beside it), keeps their logs off stderr (the log files keep them),
#: calls between replicas over gRPC and freezes the start-up objects out of the
#: garbage collector: a model's predict path then answered 635 requests a second
#: instead of 379 (2 cores, concurrency 32; docs/benchmarks.md).
#: Two of its settings are put back: access-log lines are written as they come, not
#: 1000 at a time (a quiet service's would wait for hours), and deployment handles
#: route on a loop of their own, so that a driver's plain calls work.
#: HAProxy (Serve's ingress where ``RAY_SERVE_ENABLE_HA_PROXY=1``) sends a request again
#: to another replica when the one it reached closed the connection without an answer
#: (a replica lost with its node), not only when it could not connect: the gateway's
#: ``MODEL_CALL_TRIES`` for the predict path, which skips the gateway. As there,
#: inference may run twice. In that mode every HTTP-serving replica holds on for 30 s
#: when stopped, so that load balancers which list replicas themselves can drop it; with
#: Serve's own proxies (HAProxy, which Serve reconfigures itself and which resends a
#: refused connection) 5 s covers the reload, and a version switch or a scale-down
#: does not wait 30 s for each replica.
RAY_ENV_DEFAULTS = {
    "RAY_DATA_CLUSTER_AUTOSCALER": "V2",
    "RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1",
    "RAY_DATA_DEFAULT_SHUFFLE_STRATEGY": "sort_shuffle_pull_based",
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "1",
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
}
#: How Ray Data aggregates, in forgeml's drivers and (by the variable above) in the
#: processes of a runtime it starts: with tasks (a pull-based sort shuffle). The fits of
#: the preprocessing (pixel moments, column statistics and category counts, PCA's sums)
#: are global aggregates, one partition, whose hash-shuffle aggregator actors (new
#: processes) took seconds to start for each: a warm penguins run's data preparation
#: with selection and PCA took 4.1-5.4 s with them and 0.9-1.0 s with tasks, a tiny
#: wafer run's 3.5-5.6 s and 2.3-3.2 s (2 cores).
TASK_AGGREGATION = RAY_ENV_DEFAULTS["RAY_DATA_DEFAULT_SHUFFLE_STRATEGY"]


#: What Ray Tune copies from the driver's environment into every trial's runtime_env,
#: which Ray's runtime-env agent then writes, values and all, into its log on each node.
TUNE_COPIED_CREDENTIALS = frozenset(
    {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN"}
)


def keep_credentials_out_of_trial_envs() -> None:
    """Stop Ray Tune from copying the driver's S3 credentials into its trials' runtime
    environments, and so into Ray's logs. Trials need no copy: like every process of a
    node they inherit the node's environment (the chart's Secret, the environment of
    ``ray start``, or the embedded runtime's driver), or the job's runtime_env."""
    from ray.tune.execution import class_cache

    copied = class_cache.ENV_VARS_TO_PROPAGATE
    class_cache.ENV_VARS_TO_PROPAGATE = copied - TUNE_COPIED_CREDENTIALS


def _reachable(address: str, timeout: float = 1.0) -> bool:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
        return True
    except (OSError, ValueError):
        return False


def forget_stale_cluster() -> bool:
    """Remove the address file of a local cluster that is gone, as ``ray stop`` would.

    Ray's own clients read that file too (Ray Train's placement-group cleaner does, to
    free the workers of a trial that Tune stopped), and would wait on a dead address.
    Returns whether a stale address was forgotten.
    """
    recorded = read_ray_address()
    if not recorded or _reachable(recorded):
        return False
    logger.warning("ignoring the stale local Ray cluster address %s (not reachable)", recorded)
    reset_ray_address()
    return True


def _address() -> str | None:
    """None to let Ray join RAY_ADDRESS or the live local cluster, "local" to start
    embedded."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    return "local" if forget_stale_cluster() or not read_ray_address() else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """``values`` set in this process's environment, the previous ones back afterwards."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_embedded_runtime(**init_options):
    """Start an embedded runtime (``ray.init(address="local", ...)``, its context returned)
    with its dashboard on a port of its own, named to its workers as their State API
    server.

    Ray's clients inside a job look for their cluster in RAY_ADDRESS, then in the
    address file ``ray start`` writes, then among the GCS processes running on the
    machine, and fail when they find several: a second embedded run, or a cluster
    started with a temp dir of its own. Ray Train's placement-group cleaner is one such
    client, and without it a trial that Tune stops keeps its workers' CPUs.

    The address goes into the environment the runtime's processes start with, not into
    the job's runtime_env: a job with environment variables of its own cannot use the
    worker processes Ray starts ahead, so each of its tasks and actors would wait for a
    new one (2 cores: a first task 1.07 s instead of 0.54 s, a first actor 0.85 s
    instead of 0.25 s).

    Its runs start no preemption watcher: Ray Train's watcher is an actor per run that
    polls the nodes' drain state, and an embedded runtime's one node is the driver's
    own, which no autoscaler drains (the watcher's process costs a warm tiny run about
    1.2 of its 21 CPU-seconds on 2 cores).

    Its runs' controllers poll their workers every 0.1 s, not 0.5 s as on clusters: a
    worker's ``ray.train.report`` waits until the controller's poll has taken the one
    before, so epochs shorter than the interval, and a run's end, wait for polls. A warm
    tiny run of six epochs took 14.2-16.3 s instead of 17.1-21.0 s, for about 5 ms of
    the controller's CPU a poll (2 cores); a cluster's controller, polling many workers,
    keeps the slower interval.

    It is shut down by ``shutdown``, at the latest when this process exits.
    """
    port = free_port()
    node_environment = {
        "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    }
    children = {process.pid for process in psutil.Process().children()}
    with environment(node_environment):
        context = ray.init(
            address="local", include_dashboard=True, dashboard_port=port, **init_options
        )
    _embedded_runtime[:] = [p for p in psutil.Process().children() if p.pid not in children]
    atexit.register(shutdown, exiting_interpreter=True)  # runs before Ray's own
    return context


#: The processes ``start_embedded_runtime`` started in this process (its GCS, raylet,
#: dashboard and log monitor); every other process of the runtime descends from them.
_embedded_runtime: list[psutil.Process] = []


def shutdown(exiting_interpreter: bool = False) -> None:
    """Leave Ray; an embedded runtime this process started ends, with every process it
    started. A Ray worker ends itself when its node goes, unless its exit hangs: Ray
    core can deadlock in a worker's exit (seen with Ray Train's controllers), and user
    code can leave a thread that never returns. Such a process would stay, orphaned and
    holding its memory, after the runtime; what is left once Ray has shut down is
    killed (nothing remains for it to do, its node being gone). ``exiting_interpreter``:
    called as this process exits, when Ray first lets its workers' last lines print."""
    atexit.unregister(shutdown)
    started = list(_embedded_runtime)
    for process in _embedded_runtime:
        with contextlib.suppress(psutil.NoSuchProcess):
            started += process.children(recursive=True)
    _embedded_runtime.clear()
    ray.shutdown(_exiting_interpreter=exiting_interpreter)
    for process in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def connect(require_cluster: bool = False) -> None:
    """Join or start Ray once per process, with Ray's logs routed as ``forgeml.console``
    says (info to the run's log file, warnings and errors to the console too) and Ray
    Data's progress bars off (forgeml reports progress itself).

    With ``require_cluster`` an embedded runtime is refused: what is started on it
    (a Serve deployment) would end with this process.
    """
    if ray.is_initialized():
        _configure_ray_data()
        return
    address = _address()
    if require_cluster and address == "local":
        raise ValueError("no running Ray cluster: start one (ray start --head) or set RAY_ADDRESS")
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    routed = console.route_ray_logs()
    options = {"configure_logging": not routed, "logging_level": logging.WARNING}
    if address == "local":
        start_embedded_runtime(**options)  # its processes inherit this one's environment
    else:
        ray.init(address=address, runtime_env=console.worker_runtime_env(), **options)
    if routed:
        console.route_ray_logs()
        console.record_worker_output()
    _configure_ray_data()
    resources = ray.cluster_resources()
    logger.info(
        "ray %s at %s: %g CPUs, %g GPUs",
        ray.__version__,
        ray.get_runtime_context().gcs_address,
        resources.get("CPU", 0),
        resources.get("GPU", 0),
    )


def _configure_ray_data() -> None:
    """This process's Ray Data settings for forgeml's pipelines (its datasets take a
    copy when they are made)."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.shuffle_strategy = TASK_AGGREGATION


@dataclass(frozen=True)
class Node:
    """What a placement needs to know of one alive Ray node."""

    node_id: str
    address: str
    cpus: float
    gpus: float
    labels: dict[str, str]

    def describe(self) -> str:
        return f"{self.node_id[:8]} ({self.address}): {self.cpus:g} CPU" + (
            f", {self.gpus:g} GPU" if self.gpus else ""
        )


def cluster_nodes() -> list[Node]:
    """The alive nodes of the connected cluster."""
    return [
        Node(
            node_id=entry["NodeID"],
            address=entry["NodeManagerAddress"],
            cpus=entry["Resources"].get("CPU", 0.0),
            gpus=entry["Resources"].get("GPU", 0.0),
            labels=dict(entry.get("Labels") or {}),
        )
        for entry in ray.nodes()
        if entry["Alive"]
    ]


def autoscaler_state() -> AutoscalingState | None:
    """What Ray's autoscaler (v2, as KubeRay runs it with ``autoscalerOptions.version:
    v2``) last reported to the connected cluster's GCS: the node launches it has asked for
    and the requests no node type could ever hold. None when no autoscaler reports."""
    reply = GetClusterStatusReply()
    reply.ParseFromString(GcsClient(ray.get_runtime_context().gcs_address).get_cluster_status())
    state = reply.autoscaling_state
    return state if state.autoscaler_state_version else None


def require_shared_storage(storage: StorageConfig) -> None:
    """Refuse a local ``storage.root`` on a cluster of several nodes unless it is declared
    shared: each node would write its checkpoints, and read models, on its own disk."""
    if storage.root.startswith("s3://") or storage.shared:
        return
    nodes = cluster_nodes()
    if len(nodes) > 1:
        raise ValueError(
            f"storage.root: {storage.root!r} is a local folder and this Ray cluster has "
            f"{len(nodes)} nodes; a checkpoint written on one node is not on the others. "
            "Use an s3:// root (storage.endpoint_url for MinIO and other S3 servers), or "
            "set storage.shared: true if every node mounts that folder at the same path "
            "(NFS, a shared Kubernetes volume)"
        )
