"""Two forgeml runs at once on one machine, each on the embedded runtime it starts."""

from __future__ import annotations

import os
import subprocess
import sys

#: A run's stand-in: joins or starts Ray as every forgeml job does, starts an actor,
#: lists the cluster's actors from inside a task (Ray Train's placement-group cleaner
#: asks the State API the same way), and stays up until its stdin closes.
RUN = """
import sys
import ray
from forgeml.runtime import connect

@ray.remote
class Marker:
    def ready(self):
        return True

@ray.remote
def actors_seen_from_a_worker():
    from ray.util.state import list_actors
    try:
        return sorted(a.class_name for a in list_actors() if a.state == "ALIVE")
    except Exception as error:
        return repr(error)

connect()
marker = Marker.remote()
ray.get(marker.ready.remote())
print("seen", ray.get(actors_seen_from_a_worker.remote()), flush=True)
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


def test_each_runs_workers_reach_the_state_api_of_their_own_runtime():
    """With a second Ray instance on the machine, Ray's in-cluster clients find no
    address to choose; each embedded runtime names its own dashboard to its workers."""
    runs = [_start_run()]
    try:
        seen = [runs[0].stdout.readline()]
        runs.append(_start_run())  # starts while the first runtime is up
        seen.append(runs[1].stdout.readline())
    finally:
        for run in runs:
            run.stdin.close()
            run.wait(timeout=60)
    assert seen == ["seen ['Marker']\n"] * 2
