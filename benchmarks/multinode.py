"""Two nodes against one at equal cores, and what a killed or a preempted node costs.

Starts its own cluster on this machine (forgeml.local_cluster): a head with no CPUs, a
node of 2 CPUs (zone "one") and two of 1 CPU (zones "a" and "b"), and trains the wafer
CNN on it from this process, with augmentation, storage in a local folder that every
node of this machine shares. Prints one JSON object.

- throughput: one worker of 2 CPUs (2 torch threads) on the 2-CPU node against two
  workers of 1 CPU (1 thread each) on nodes a and b: the same cores, the same global
  batch (the single worker's batch is twice the per-worker batch); the median
  training samples/s of the epochs after the first. Two workers packed on the 2-CPU
  node separate what DDP costs from what crossing nodes costs.
- node kill: the 2-worker run, SIGKILL of node b half an epoch after a checkpoint,
  a new node joins zone b: training redone (kill time - checkpoint time) and downtime (kill
  to resumed).
- preemption: the 2-worker run, zone b's node drained with a deadline, a new node
  joins zone b, the drained one is killed after the deadline: time lost (deadline - the
  last checkpoint's state), of which the checkpoint's writing and the rest steps
  trained in vain, and downtime (deadline to resumed).

    python benchmarks/multinode.py [--samples-per-class 700] [--epochs 8] [--parts ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
from forgeml.config import config_from_dict
from forgeml.local_cluster import LocalCluster
from forgeml.runtime import RAY_ENV_DEFAULTS
from forgeml.train.trainer import run_training


def experiment(root: str, name: str, args, scaling: dict):
    """The wafer run of ``args`` (sizes), with the global batch of two workers."""
    return config_from_dict(
        {
            "name": name,
            "storage": {"root": root, "shared": True},
            "data": {
                "source": {"kind": "wafer", "samples_per_class": args.samples_per_class},
                "augment": {"rotate90": True, "flip": True},
            },
            "model": {"kind": "cnn", "width": 16, "depth": 3, "dropout": 0.2},
            "train": {
                "max_epochs": args.epochs,
                "batch_size": args.batch * (2 // scaling["num_workers"]),
                "max_failures": 1,
                "early_stopping": {"enabled": False},
            },
            "scaling": scaling,
        }
    )


def two_workers() -> dict:
    """Two workers of 1 CPU on the nodes of zones a and b."""
    return {
        "num_workers": 2,
        "cpus_per_worker": 1,
        "torch_threads": 1,
        "placement_strategy": "STRICT_SPREAD",
        "label_selector": {"zone": "in(a,b)"},
    }


def steady(history: list[dict]) -> float:
    return statistics.median(h["samples_per_s"] for h in history[1:])


def waited(history: list[dict]) -> float:
    """The median seconds an epoch after the first waited on its data, per rank."""
    return round(statistics.median(h["data_wait_s"] for h in history[1:]), 2)


def latest_checkpoint(root: str, name: str) -> dict | None:
    for snapshot in Path(root, "runs").glob(f"{name}-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
        except (OSError, ValueError, KeyError):
            continue
        if latest:
            return latest["metrics"]
    return None


def in_background(cfg) -> tuple[threading.Thread, dict]:
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(metrics=run_training(cfg).metrics), daemon=True
    )
    thread.start()
    return thread, outcome


def after_epoch(root: str, name: str, epoch: int) -> dict:
    while True:
        latest = latest_checkpoint(root, name)
        if latest and latest.get("epoch", 0) >= epoch and latest.get("step", 0) == 0:
            return latest
        time.sleep(0.1)


def node_kill(cluster: LocalCluster, root: str, args) -> dict:
    cfg = experiment(root, "kill", args, two_workers())
    thread, outcome = in_background(cfg)
    checkpoint = after_epoch(root, "kill", 2)
    time.sleep(checkpoint["epoch_s"] / 2)
    cluster.kill_node("b")
    killed_at = time.time()
    cluster.add_node("c", 1, {"zone": "b"})  # its replacement
    thread.join()
    (restart,) = outcome["metrics"]["run"]["restarts"]
    epoch_s = statistics.median(h["epoch_s"] for h in outcome["metrics"]["history"][1:])
    return {
        "checkpoint_interval_s": round(epoch_s, 2),
        "redone_s": round(killed_at - restart["saved_at"], 2),
        "downtime_s": round(restart["resumed_at"] - killed_at, 2),
        "redone_within_one_interval": killed_at - restart["saved_at"] <= epoch_s,
    }


def preemption(cluster: LocalCluster, root: str, args) -> dict:
    cfg = experiment(root, "drain", args, two_workers())
    thread, outcome = in_background(cfg)
    after_epoch(root, "drain", 2)
    cluster.drain_node("c", args.deadline)
    cluster.add_node("d", 1, {"zone": "b"})  # its replacement
    time.sleep(args.deadline + 2)
    cluster.kill_node("c")
    thread.join()
    metrics = outcome["metrics"]
    (restart,) = metrics["run"]["restarts"]
    step_s = 2 * args.batch / steady(metrics["history"])
    lost = restart["deadline"] - restart["saved_at"]
    return {
        "checkpoint": restart["checkpoint"],
        "step_s": round(step_s, 3),
        "lost_s": round(lost, 2),
        "checkpoint_write_s": restart["write_s"],
        # steps trained after the checkpoint was written, until the deadline
        "lost_steps": round((lost - restart["write_s"]) / step_s, 1),
        "downtime_s": round(restart["resumed_at"] - restart["deadline"], 2),
    }


def throughput(root: str, args) -> dict:
    one = {"num_workers": 1, "cpus_per_worker": 2, "torch_threads": 2}
    one["label_selector"] = {"zone": "one"}
    single = run_training(experiment(root, "one", args, one)).metrics
    packed = {
        **two_workers(),
        "placement_strategy": "STRICT_PACK",
        "label_selector": one["label_selector"],
    }
    ddp = run_training(experiment(root, "packed", args, packed)).metrics
    double = run_training(experiment(root, "two", args, two_workers())).metrics
    measured = {
        "train_rows": single["data"]["rows"]["train"],
        "one_node_1x2cpu_samples_per_s": round(steady(single["history"]), 1),
        "one_node_2x1cpu_samples_per_s": round(steady(ddp["history"]), 1),
        "two_nodes_2x1cpu_samples_per_s": round(steady(double["history"]), 1),
        "one_node_1x2cpu_data_wait_s": waited(single["history"]),
        "one_node_2x1cpu_data_wait_s": waited(ddp["history"]),
        "two_nodes_2x1cpu_data_wait_s": waited(double["history"]),
        "one_node_test_accuracy": round(single["test"]["accuracy"], 4),
        "two_nodes_test_accuracy": round(double["test"]["accuracy"], 4),
    }
    measured["ratio"] = round(
        measured["two_nodes_2x1cpu_samples_per_s"] / measured["one_node_1x2cpu_samples_per_s"], 3
    )
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples-per-class", type=int, default=700)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch", type=int, default=128, help="per worker of two")
    parser.add_argument(
        "--parts", nargs="+", default=["throughput", "kill", "preemption"], help="what to measure"
    )
    parser.add_argument("--deadline", type=int, default=10, help="drain deadline, seconds")
    args = parser.parse_args()
    # Killed, still stop the nodes: each runs in a process group of its own.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with (
        tempfile.TemporaryDirectory() as root,
        # No token: this process drives the runs, and Ray reads a token once, on import.
        LocalCluster(Path(root) / "cluster", RAY_ENV_DEFAULTS, token_auth=False) as cluster,
    ):
        cluster.add_node("one", 2, {"zone": "one"})
        cluster.add_node("a", 1, {"zone": "a"})
        cluster.add_node("b", 1, {"zone": "b"})
        os.environ["RAY_ADDRESS"] = cluster.gcs_address
        store = str(Path(root) / "store")
        report = {
            "benchmark": "multinode",
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "settings": vars(args),
        }
        if "throughput" in args.parts:
            report["throughput"] = throughput(store, args)
        if "kill" in args.parts:
            report["node_kill"] = node_kill(cluster, store, args)
        if "preemption" in args.parts:
            report["preemption"] = preemption(cluster, store, args)
        ray.shutdown()  # before the nodes stop: a driver that loses its node exits
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
