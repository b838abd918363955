"""A cluster of three Ray nodes on this machine, as a user's first cluster: a head with no
CPUs for work and two worker nodes of one CPU each (labelled zone a and b), token auth
on, storage on an S3 API server. Jobs are submitted with `ray job submit`.

The run that trains here is the shape from the field: the wafer CNN with augmentation,
two workers of one CPU each, which fill the cluster. Its ranks must land on different
nodes and learn what the same config learns on one node.
"""

from __future__ import annotations

import io
import itertools
import json
import subprocess
import time
from dataclasses import dataclass

import boto3
import pandas as pd
import pytest
import ray
from forgeml.config import StorageConfig
from forgeml.local_cluster import LocalCluster
from forgeml.runtime import RAY_ENV_DEFAULTS, environment, shutdown
from forgeml.storage import ModelRegistry, Storage
from forgeml.train.trainer import run_training
from forgeml.tune.search import RESULTS_FILE

from tests.conftest import S3_ENV, tiny_config, tiny_raw_config, write_config
from tests.e2e.jobs import RAY_INFO_LINES, BackgroundJob, submit

BUCKET = "multinode"

#: Augmented 16x16 maps, 2 workers that take every CPU of the cluster; it learns to about
#: half accuracy on 9 classes in 8 epochs (chance: 0.11).
SHAPE = {
    "data": {
        "source": {"kind": "wafer", "samples_per_class": 40, "image_size": 16, "shards": 4},
        "augment": {"rotate90": True, "flip": True},
    },
    "model": {"kind": "cnn", "width": 8, "depth": 2, "dropout": 0.0},
    "train": {"max_epochs": 8, "batch_size": 16},
    "scaling": {"num_workers": 2, "cpus_per_worker": 1, "torch_threads": 1},
}


@pytest.fixture(scope="module")
def single_node_run(tmp_path_factory):
    """The same experiment on one node (an embedded runtime with two CPUs), trained
    before the cluster starts."""
    shutdown()  # the integration runtime, if this session started one
    with environment(RAY_ENV_DEFAULTS):
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False)
        try:
            outcome = run_training(tiny_config(tmp_path_factory.mktemp("single"), **SHAPE))
        finally:
            ray.shutdown()
    return outcome.metrics


#: The worker nodes of the module's cluster, one CPU each, labelled with their zone.
WORKER_ZONES = ("a", "b")


def _with_the_original_worker_nodes(cluster: LocalCluster) -> LocalCluster:
    """The cluster as it started: worker nodes a and b back if a test took them away,
    and every node a test added stopped. Tests that kill, drain or add nodes leave the
    next test the cluster every test expects."""
    for name, node in list(cluster.nodes.items()):
        if name not in ("head", *WORKER_ZONES) and node.alive:
            cluster.stop_node(name)
    for zone in WORKER_ZONES:
        if zone not in cluster.nodes or not cluster.nodes[zone].alive:
            cluster.add_node(zone, cpus=1, labels={"zone": zone})
    return cluster


@pytest.fixture(scope="module")
def started_cluster(tmp_path_factory, s3_endpoint, single_node_run):
    """The module's one cluster, started once (after the single-node run) and stopped
    when the module ends."""
    with environment(S3_ENV):  # for this process's own S3 client
        boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=BUCKET)
        with LocalCluster(
            tmp_path_factory.mktemp("cluster"),
            head_cpus=0,
            extra_env={**RAY_ENV_DEFAULTS, **S3_ENV},
        ) as started:
            yield _with_the_original_worker_nodes(started)


@pytest.fixture
def cluster(started_cluster) -> LocalCluster:
    """The module's cluster with its original worker nodes, whatever an earlier test
    did to them."""
    return _with_the_original_worker_nodes(started_cluster)


def _s3_storage(s3_endpoint: str, prefix: str) -> dict:
    return {"root": f"s3://{BUCKET}/{prefix}", "endpoint_url": s3_endpoint}


def _registered_metrics(storage: dict) -> dict:
    registry = ModelRegistry(Storage(StorageConfig(**storage)))
    return json.loads(registry.read(registry.resolve("tiny-wafer"), "metrics.json"))


def _latest_checkpoints(storage: dict, *folder: str) -> dict[str, dict]:
    """The metrics of the newest checkpoint Ray Train has registered in each run under
    ``folder``, by run: a checkpoint folder appears while it is still uploading, the
    snapshot only after."""
    store = Storage(StorageConfig(**storage))
    found = {}
    for run in store.list_dirs(store.path(*folder)):
        try:
            snapshot = store.read_text(store.path(*folder, run, "checkpoint_manager_snapshot.json"))
            latest = json.loads(snapshot)["latest_checkpoint_result"]
        except (OSError, ValueError, KeyError):
            continue
        if latest:
            found[run] = latest["metrics"]
    return found


def _latest_checkpoint(storage: dict) -> dict | None:
    """The metrics of the newest checkpoint of the one training run in ``storage``."""
    return next(iter(_latest_checkpoints(storage, "runs").values()), None)


def _checkpoint_where(storage: dict, wanted, what: str, timeout: float = 240) -> dict:
    """The metrics of the newest checkpoint, once they are ``wanted``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = _latest_checkpoint(storage)
        if latest and wanted(latest):
            return latest
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint {what} within {timeout:g} s")


def _after_epoch(storage: dict, epoch: int) -> dict:
    return _checkpoint_where(
        storage,
        lambda latest: latest.get("epoch", 0) >= epoch and latest.get("step", 0) == 0,
        f"of epoch {epoch}",
    )


def _worker_nodes(cluster) -> list[str]:
    return [name for name, node in cluster.nodes.items() if name != "head" and node.alive]


def _train(cluster, tmp_path, raw: dict):
    config = write_config(tmp_path / "experiment.yaml", raw)
    started = time.monotonic()
    job = submit(cluster, "train.py", "--config", str(config))
    return job, job.stdout + job.stderr, time.monotonic() - started


@dataclass(frozen=True)
class TwoNodeRun:
    """The module's one submission of SHAPE with a rank on each worker node: the finished
    job, its output, the S3 storage it registered tiny-wafer in, and Ray's node id of each
    worker node while it ran."""

    job: subprocess.CompletedProcess
    output: str
    storage: dict
    node_ids: dict[str, str]


@pytest.fixture(scope="module")
def two_node_run(started_cluster, s3_endpoint, tmp_path_factory) -> TwoNodeRun:
    """SHAPE submitted once, its ranks spread over zones a and b, for every test of it."""
    cluster = _with_the_original_worker_nodes(started_cluster)
    storage = _s3_storage(s3_endpoint, "shape")
    raw = tiny_raw_config("unused", **SHAPE, storage=storage)
    raw["scaling"] |= {"placement_strategy": "STRICT_SPREAD", "label_selector": {"zone": "in(a,b)"}}

    job, output, _ = _train(cluster, tmp_path_factory.mktemp("two-nodes"), raw)

    return TwoNodeRun(job, output, storage, cluster.node_ids())


def test_ddp_ranks_on_two_nodes_learn_what_one_node_learns(two_node_run, single_node_run):
    storage = two_node_run.storage

    assert two_node_run.job.returncode == 0, two_node_run.output[-4000:]
    registry = ModelRegistry(Storage(StorageConfig(**storage)))
    (version,) = registry.versions("tiny-wafer")
    metrics = json.loads(registry.read(registry.resolve(f"tiny-wafer:v{version}"), "metrics.json"))
    nodes = two_node_run.node_ids
    ranks = metrics["run"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert {r["node_id"] for r in ranks} == {nodes["a"], nodes["b"]}
    assert metrics["data"]["augmented"]
    multi, single = metrics["test"]["accuracy"], single_node_run["test"]["accuracy"]
    print(f"test accuracy: two nodes {multi:.4f}, one node {single:.4f}")
    assert single > 0.35 and abs(multi - single) <= 0.1


@dataclass(frozen=True)
class Refusal:
    """A submission refused before launch: its exit status, output and seconds."""

    code: int
    output: str
    seconds: float


@pytest.fixture(scope="module")
def refusals(started_cluster, s3_endpoint, tmp_path_factory) -> dict[str, Refusal]:
    """Three experiments the cluster cannot run, submitted side by side: they end before
    anything launches, so none waits for another's resources."""
    cluster = _with_the_original_worker_nodes(started_cluster)
    folder = tmp_path_factory.mktemp("refused")
    local = tiny_raw_config(folder / "store")
    streaming = tiny_raw_config("unused", **SHAPE, storage=_s3_storage(s3_endpoint, "streaming"))
    streaming["data"]["cache"] = False
    unmatched = tiny_raw_config("unused", **SHAPE, storage=_s3_storage(s3_endpoint, "refused"))
    unmatched["scaling"]["label_selector"] = {"zone": "c"}
    started = time.monotonic()
    jobs = {}
    for name, raw in (("local", local), ("streaming", streaming), ("unmatched", unmatched)):
        (folder / name).mkdir()
        config = write_config(folder / name / "experiment.yaml", raw)
        jobs[name] = BackgroundJob(cluster, folder / name, "train.py", "--config", str(config))
    finished = {name: job.finish() for name, job in jobs.items()}
    seconds = time.monotonic() - started
    refused = {name: Refusal(code, output, seconds) for name, (code, output) in finished.items()}
    assert not (folder / "store" / "runs").exists()  # the local root: nothing written
    return refused


def test_a_local_storage_root_is_refused_on_several_nodes(refusals):
    refused = refusals["local"]

    assert refused.code != 0
    assert "exit code 2" in refused.output
    assert "storage.root" in refused.output and "s3://" in refused.output
    assert "storage.shared" in refused.output
    assert refused.seconds < 120


def test_streaming_splits_need_a_cpu_beside_the_workers_and_say_so(refusals):
    """Two 1-CPU workers fill the cluster; uncached splits stream through Ray Data tasks
    every epoch, which would then wait forever. Refused before launch, with the numbers."""
    refused = refusals["streaming"]

    assert refused.code != 0 and "exit code 2" in refused.output
    assert "3 CPUs are needed, 2 there" in refused.output
    assert "data.cache: true" in refused.output
    assert refused.seconds < 120


def test_a_label_selector_no_node_matches_is_refused(refusals):
    """Ray would queue the workers forever; forgeml reads the nodes' labels first."""
    refused = refusals["unmatched"]

    assert refused.code != 0 and "exit code 2" in refused.output
    assert "no node of this cluster has those labels" in refused.output
    assert "'zone': 'a'" in refused.output
    assert refused.seconds < 120


# The tests below take nodes away or add some; the `cluster` fixture puts the original
# worker nodes back for the next test.


def _running_past_epoch_2(cluster, storage: dict, tmp_path, **train) -> BackgroundJob:
    """A submitted run of SHAPE with ``train`` settings, once its epoch 2 is checkpointed;
    with --verbose, so that the job's output has Ray's info lines, which say how Ray Train
    counted a restart (forgeml keeps them off the console by default)."""
    raw = tiny_raw_config("unused", **SHAPE, storage=storage)
    raw["train"] |= train
    raw["scaling"]["placement_strategy"] = "STRICT_SPREAD"  # a rank on each node
    config = write_config(tmp_path / "experiment.yaml", raw)
    job = BackgroundJob(cluster, tmp_path, "train.py", "--config", str(config), "--verbose")
    _after_epoch(storage, 2)
    return job


def test_a_preempted_node_costs_a_few_steps_and_a_killed_one_the_epoch_in_progress(
    cluster, s3_endpoint, tmp_path
):
    """One run loses two nodes. First `ray drain-node --reason PREEMPTION` with a
    deadline, as the autoscaler drains a spot node before it is reclaimed: the ranks see
    the notice and checkpoint inside the epoch, and the run restarts as a preemption, not
    a failure. Then SIGKILL of the other node's whole process group, as when its machine
    is lost: Ray Train restarts the group from the last epoch checkpoint, a failure. With
    max_failures 1 the run only finishes if the preemption was not counted as one."""
    storage = _s3_storage(s3_endpoint, "node-loss")
    survivor, preempted = _worker_nodes(cluster)
    job = _running_past_epoch_2(
        cluster,
        storage,
        tmp_path,
        max_epochs=60,  # epochs of about 0.6 s: still training after both losses
        max_failures=1,
        early_stopping={"enabled": False},  # every one of them
    )

    cluster.drain_node(preempted, deadline_s=10)  # an epoch end and its upload fit, on 2 busy cores
    # Two CPUs on each new node: one for a restarted worker, one for the task that rebuilds
    # the cached blocks the lost node held. With one, that task never runs and the run
    # waits (the launch warns of it).
    cluster.add_node("d", cpus=2, labels={"zone": "d"})
    time.sleep(12)  # past the deadline: the machine goes
    cluster.kill_node(preempted)
    # The group restarted on the survivor and d trains two epochs past where it resumed.
    _after_epoch(storage, _latest_checkpoint(storage)["epoch"] + 2)

    cluster.kill_node(survivor)
    killed_at = time.time()
    cluster.add_node("c", cpus=2, labels={"zone": "c"})
    code, output = job.finish()

    assert code == 0, output[-4000:]
    assert "Source: preemption" in output, output[-3000:]
    assert "preemption notice: checkpoint at step" in output
    assert "Source: worker group" in output  # the kill: a failure, counted against max_failures
    assert "the workers leave no CPU free on any node" in output
    for line in RAY_INFO_LINES:  # --verbose brought Ray's info logs back, workers' too
        assert line in output
    metrics = _registered_metrics(storage)
    preemption, failure = metrics["run"]["restarts"]
    # The run resumes from its newest checkpoint: the one written at the notice or just
    # before the deadline, or an epoch's end that came after them (these epochs are short).
    # Ray Train ends the group once it sees the deadline passed, which may be a moment
    # after it, so a checkpoint saved in that moment counts too (it lost nothing).
    longest_epoch_s = max(h["epoch_s"] for h in metrics["history"])
    assert preemption["checkpoint"] in {"preemption notice", "preemption deadline", "epoch"}
    lost = preemption["deadline"] - preemption["saved_at"]  # trained, then given up
    assert lost <= longest_epoch_s + 1, preemption
    assert failure["checkpoint"] == "epoch" and failure["step"] == 0
    redone = killed_at - failure["saved_at"]  # trained after the checkpoint, then lost
    assert 0 <= redone <= longest_epoch_s + 1, failure
    print(json.dumps(metrics["run"]["restarts"]))
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 61))
    nodes = cluster.node_ids()
    assert {r["node_id"] for r in metrics["run"]["ranks"]} == {nodes["d"], nodes["c"]}


def test_a_search_retries_the_trial_whose_node_is_lost_from_its_checkpoint(
    cluster, s3_endpoint, tmp_path
):
    """Two Train trials at once, results and checkpoints on S3. Once both have
    checkpointed epoch 2, a node where a trial trains is SIGKILLed and another joins: the
    trial goes on from its checkpoint, and the search ends with both trials completed."""
    storage = _s3_storage(s3_endpoint, "tune")
    raw = tiny_raw_config("unused", **SHAPE, storage=storage)
    raw["data"]["source"]["samples_per_class"] = 150  # epochs of about half a second
    raw["train"] |= {"max_epochs": 16, "max_failures": 2, "schedule": {"kind": "constant"}}
    raw["scaling"]["num_workers"] = 1
    raw["tune"] = {
        "metric": "val_loss",
        "mode": "min",
        "max_concurrent_trials": 2,
        "search": {"kind": "grid"},
        "scheduler": {"kind": "none"},
        "space": {"train.optimizer.lr": {"kind": "grid", "values": [1e-2, 3e-3]}},
    }
    config = write_config(tmp_path / "tune.yaml", raw)
    job = BackgroundJob(cluster, tmp_path, "tune.py", "--config", str(config))
    store = Storage(StorageConfig(**storage))
    deadline = time.monotonic() + 240
    while True:
        experiments = store.list_dirs(store.path("tune"))
        latest = _latest_checkpoints(storage, "tune", *experiments[:1], "trials")
        if len(latest) == 2 and all(m["epoch"] >= 2 for m in latest.values()):
            break
        assert time.monotonic() < deadline, f"trials did not reach epoch 2: {latest}"
        time.sleep(0.5)

    victim = sorted(cluster.nodes_running("RayTrainWorker"))[0]
    cluster.kill_node(victim)
    cluster.add_node("t", cpus=2, labels={"zone": "t"})  # a worker and a spare CPU
    code, output = job.finish()

    assert code == 0, output[-4000:]
    (experiment,) = experiments
    results = store.read_bytes(store.path("tune", experiment, RESULTS_FILE))
    trials = pd.read_parquet(io.BytesIO(results))
    assert len(trials) == 2
    assert list(trials["state"]) == ["completed", "completed"]
    assert list(trials["epochs"]) == [16, 16]
    assert "resumed from the checkpoint at the end of epoch" in output
    # The lost attempt's Train run could not withdraw its request to the autoscaler; the
    # trial's retry did, or the CPU it counts would stay reserved for another 180 s.
    assert (left := cluster.requests_left()) is None, left


def test_an_elastic_run_grows_onto_a_new_node_and_shrinks_when_it_goes(
    cluster, s3_endpoint, tmp_path
):
    """scaling.num_workers [1, 2] on one node of one CPU: a second node joins and the group
    grows to two workers; that node is stopped (as a scale-down deletes a pod), and the
    group goes on with one. Each time it restarts from its latest checkpoint, and every
    step keeps the global batch of 2 x 16 rows.

    Ray 2.60's elastic policy counts a node for a while after it went, so its first
    restart asks for two workers and waits out Ray Train's worker-group start timeout
    (one failure) before it starts one: 20 s here instead of the default 60 s."""
    epochs = 45  # of about a second; it grew at about epoch 22 and shrank at 23 here
    for name in _worker_nodes(cluster):
        cluster.stop_node(name)
    kept = "f"
    cluster.add_node(kept, cpus=1, labels={"zone": "f"})
    storage = _s3_storage(s3_endpoint, "elastic")
    raw = tiny_raw_config("unused", **SHAPE, storage=storage)
    raw["data"]["source"]["samples_per_class"] = 300  # epochs of about a second
    raw["train"] |= {"max_epochs": epochs, "max_failures": 3}
    raw["train"]["early_stopping"]["patience"] = epochs
    raw["scaling"] |= {"num_workers": [1, 2], "resize_interval_s": 2}
    config = write_config(tmp_path / "experiment.yaml", raw)
    job = BackgroundJob(
        cluster,
        tmp_path,
        "train.py",
        "--config",
        str(config),
        env_vars={"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "20"},
    )

    _after_epoch(storage, 2)
    cluster.add_node("e", cpus=1, labels={"zone": "e"})
    _checkpoint_where(storage, lambda latest: latest.get("workers") == 2, "of two workers")
    cluster.stop_node("e")
    code, output = job.finish()

    assert code == 0, output[-4000:]
    metrics = _registered_metrics(storage)
    history = metrics["history"]
    print(json.dumps(metrics["run"]["restarts"]))
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert [size for size, _ in itertools.groupby(h["workers"] for h in history)] == [1, 2, 1]
    assert {h["global_batch"] for h in history} == {32}
    assert [r["workers"] for r in metrics["run"]["restarts"]][-2:] == [2, 1]
    nodes = cluster.node_ids()
    assert [r["node_id"] for r in metrics["run"]["ranks"]] == [nodes[kept]]
    assert "placement: 1 worker(s) of 1 CPU, PACK, growing to 2" in output
