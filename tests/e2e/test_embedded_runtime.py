"""Two forgeml runs at once on one machine, each on the embedded runtime it starts and
ends."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import psutil

#: A run's stand-in: joins or starts Ray as every forgeml job does, starts an actor,
#: lists the cluster's actors from inside a task (Ray Train's placement-group cleaner
#: asks the State API the same way) and the Ray Train settings a worker starts with,
#: lets the actor go, as a run lets its Train controller go, and stays up until its
#: stdin closes. The actor's process cannot end (a thread that never returns), as a
#: worker whose exit deadlocks in Ray core.
RUN = """
import os
import sys
import threading
import ray
from forgeml.runtime import connect

@ray.remote
class Marker:
    def ready(self):
        threading.Thread(target=threading.Event().wait).start()
        return os.getpid()

@ray.remote
def actors_seen_from_a_worker():
    from ray.util.state import list_actors
    try:
        return sorted(a.class_name for a in list_actors() if a.state == "ALIVE")
    except Exception as error:
        return repr(error)

@ray.remote
def train_settings_of_a_worker():
    names = ("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER")
    return [os.environ.get(name) for name in names]

connect()
marker = Marker.remote()
print(ray.get(marker.ready.remote()), flush=True)
print("seen", ray.get(actors_seen_from_a_worker.remote()), flush=True)
print("train", ray.get(train_settings_of_a_worker.remote()), flush=True)
del marker
sys.stdin.read()
"""


def _start_run() -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    return subprocess.Popen(
        [sys.executable, "-c", RUN],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_each_runs_workers_reach_their_own_runtime_which_ends_with_the_run():
    """With a second Ray instance on the machine, Ray's in-cluster clients find no
    address to choose; each embedded runtime names its own dashboard to its workers.
    When a run exits, no process of its runtime stays behind, not even one whose exit
    hangs. Its workers poll and watch as an embedded runtime's should (fast polls, no
    preemption watcher), whatever the cluster defaults in this process say."""
    runs, actors, seen, settings = [], [], [], []
    try:
        for _ in range(2):  # the second starts while the first runtime is up
            runs.append(_start_run())
            actors.append(int(runs[-1].stdout.readline()))
            seen.append(runs[-1].stdout.readline())
            settings.append(runs[-1].stdout.readline())
    finally:
        for run in runs:
            run.stdin.close()
            run.wait(timeout=60)
    assert seen == ["seen ['Marker']\n"] * 2
    assert settings == ["train ['0.1', '0']\n"] * 2
    deadline = time.monotonic() + 10
    while any(map(_alive, actors)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in actors if _alive(pid)]
