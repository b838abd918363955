"""Several Ray nodes on one machine: a head and worker nodes started with ``ray start``.

Each node is its own raylet with its own object store, CPUs and labels, exactly as on
separate machines, so multi-node behaviour (placement, storage, node loss, draining)
can be tried on a laptop and tested without a cloud. Every node runs ``ray start
--block`` in a process group of its own; stopping or killing a node signals that group
and nothing else, so other Ray clusters on the machine are left alone (``ray stop``
would end them all). Every node has a temporary folder of its own too, as a machine
has: nodes sharing one would share their runtime-environment caches, and a joining
node's agent would delete the working folder of a job that another node runs.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

#: The label that names each node this module starts, for finding it in Ray's node table.
NODE_LABEL = "forgeml-local-node"

_BIN = Path(sys.executable).parent

#: Runs a command with SIGINT's default action, which a process started in the background
#: of a non-interactive shell inherits as "ignored"; ``ray start --block`` stops its node
#: at once on SIGINT, and takes about 30 s on SIGTERM.
_WITH_DEFAULT_SIGINT = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LocalNode:
    """One ``ray start --block`` process group."""

    name: str
    cpus: int
    process: subprocess.Popen
    log: Path
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class LocalCluster:
    """A head node on 127.0.0.1, with token authentication unless told otherwise, plus
    worker nodes.

    ``env`` is what a client of this cluster runs with (the token, the cluster's
    address for ``ray job submit`` and ``ray.init``); ``extra_env`` is set on every node
    so that its workers inherit it (S3 credentials, Ray settings).
    """

    def __init__(
        self,
        folder: Path,
        extra_env: dict[str, str] | None = None,
        head_cpus: int = 0,
        token_auth: bool = True,
        start_timeout_s: float = 120,
    ):
        self.folder = Path(folder)
        (self.folder / "home").mkdir(parents=True, exist_ok=True)
        self.start_timeout_s = start_timeout_s
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.gcs_address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {
            **os.environ,
            **(extra_env or {}),
            "HOME": str(self.folder / "home"),
            "PATH": f"{_BIN}{os.pathsep}{os.environ['PATH']}",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.env.pop("RAY_ADDRESS", None)
        if token_auth:
            self.env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.nodes: dict[str, LocalNode] = {}
        self._temp_dirs: list[str] = []
        self._start(
            "head",
            head_cpus,
            {},
            [
                "--head",
                f"--port={self.gcs_port}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
            ],
        )
        self._wait_for("head")

    @property
    def client_env(self) -> dict[str, str]:
        """The environment of a driver that joins this cluster with ``ray.init()``."""
        return {**self.env, "RAY_ADDRESS": self.gcs_address}

    def add_node(self, name: str, cpus: int, labels: dict[str, str] | None = None) -> LocalNode:
        """Start a worker node with ``cpus`` CPUs and ``labels``; returns once Ray lists it."""
        if name in self.nodes and self.nodes[name].alive:
            raise ValueError(f"node {name!r} is already running")
        self._start(name, cpus, labels or {}, [f"--address={self.gcs_address}"])
        self._wait_for(name)
        return self.nodes[name]

    def _state(self, kind: str) -> list[dict]:
        """Ray's State API listing of ``kind`` (nodes, actors...), from the dashboard."""
        response = requests.get(
            f"{self.dashboard_url}/api/v0/{kind}",
            params={"detail": 1, "limit": 10000},
            headers=(
                {"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"}
                if "RAY_AUTH_TOKEN" in self.env
                else {}
            ),
            timeout=30,
        )
        response.raise_for_status()
        return response.json()["data"]["result"]["result"]

    def node_ids(self) -> dict[str, str]:
        """Ray's node id of every alive node this cluster started, by name."""
        return {
            s["labels"][NODE_LABEL]: s["node_id"]
            for s in self._state("nodes")
            if s["state"] == "ALIVE" and NODE_LABEL in s["labels"]
        }

    def nodes_running(self, actor_class: str) -> set[str]:
        """The names of the nodes where an alive actor of ``actor_class`` runs."""
        names = {node_id: name for name, node_id in self.node_ids().items()}
        return {
            names[actor["node_id"]]
            for actor in self._state("actors")
            if actor["class_name"] == actor_class
            and actor["state"] == "ALIVE"
            and actor["node_id"] in names
        }

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of a node at once, as when its machine is lost. Ray's
        workers run in process groups of their own, so the node's group is stopped
        first (no new worker starts) and its processes are killed with everything
        they started."""
        node = self.nodes[name]
        os.killpg(node.process.pid, signal.SIGSTOP)
        started = psutil.Process(node.process.pid).children(recursive=True)
        os.killpg(node.process.pid, signal.SIGKILL)
        for process in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        node.process.wait()

    def drain_node(self, name: str, deadline_s: int, reason: str = "PREEMPTION") -> None:
        """Tell Ray that a node goes away in ``deadline_s`` seconds, as a cloud's spot
        reclamation or a Kubernetes eviction does through the autoscaler."""
        command = [
            str(_BIN / "ray"),
            "drain-node",
            f"--address={self.gcs_address}",
            f"--node-id={self.node_ids()[name]}",
            f"--reason=DRAIN_NODE_REASON_{reason}",
            f"--reason-message=local cluster: {name} is {reason.lower()}",
            f"--deadline-remaining-seconds={deadline_s}",
        ]
        subprocess.run(command, env=self.env, check=True, capture_output=True, timeout=60)

    def stop_node(self, name: str) -> None:
        """Stop one node the way Ctrl-C stops ``ray start --block``."""
        node = self.nodes[name]
        if not node.alive:
            return
        os.killpg(node.process.pid, signal.SIGINT)
        try:
            node.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait()

    def shutdown(self) -> None:
        """Stop the worker nodes, then the head, and forget the cluster's address file."""
        from forgeml.runtime import forget_stale_cluster

        for name in [n for n in self.nodes if n != "head"] + ["head"]:
            self.stop_node(name)
        forget_stale_cluster()
        for folder in self._temp_dirs:
            shutil.rmtree(folder, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def _start(self, name: str, cpus: int, labels: dict[str, str], role: list[str]) -> None:
        labels = {**labels, NODE_LABEL: name}
        log = self.folder / f"{name}.log"
        command = [
            *_WITH_DEFAULT_SIGINT,
            str(_BIN / "ray"),
            "start",
            "--block",
            *role,
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            "--labels=" + ",".join(f"{k}={v}" for k, v in labels.items()),
            # Nodes on one machine must not share their fixed default ports.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--temp-dir={self._temp_dir(name)}",
        ]
        process = subprocess.Popen(
            command,
            env=self.env,
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.nodes[name] = LocalNode(name, cpus, process, log, labels)

    def _temp_dir(self, name: str) -> str:
        """A fresh temporary folder for node ``name``, under /tmp and not the cluster's
        folder: Ray's socket paths inside it must stay within the 107 characters a Unix
        socket path may have."""
        folder = tempfile.mkdtemp(prefix=f"ray-{name}-")
        self._temp_dirs.append(folder)
        return folder

    def _wait_for(self, name: str) -> None:
        node = self.nodes[name]
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                if name in self.node_ids():
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass  # the dashboard is not up, or not answering the State API yet
            if not node.alive or time.monotonic() > deadline:
                if node.alive:
                    os.killpg(node.process.pid, signal.SIGKILL)
                raise RuntimeError(f"ray node {name!r} did not start:\n{node.log.read_text()}")
            time.sleep(0.5)
