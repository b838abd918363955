"""Several Ray nodes on one machine: a head and worker nodes started with ``ray start``.

Each node is its own raylet with its own object store, CPUs and labels, exactly as on
separate machines, so multi-node behaviour (placement, storage, node loss, draining)
can be tried on a laptop and tested without a cloud. Every node runs ``ray start
--block`` in a process group of its own; stopping or killing a node signals that group
and nothing else, so other Ray clusters on the machine are left alone (``ray stop``
would end them all). Every node has a temporary folder of its own too, as a machine
has: nodes sharing one would share their runtime-environment caches, and a joining
node's agent would delete the working folder of a job that another node runs.

A cluster can also start with Ray's autoscaler on its head (``autoscaling``), which then
adds and removes worker nodes as work asks for them, the way KubeRay's in-tree autoscaler
adds and removes worker pods: ``autoscaling_from_raycluster`` derives its node types
from a RayCluster object with the autoscaler's own translation. The nodes it adds are
started on this machine by Ray's local node provider (a private Ray module, pinned by a
test); they share the head's temporary folder, so jobs on such a cluster should not
upload a working directory (bring the code with the image, as pods do).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from forgeml.runtime import free_port

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


#: Ray's node provider that starts the nodes an autoscaler asks for as raylets on this
#: machine, and the node id and type it gives the head. Ray 2.60's wheel lacks the
#: defaults file its ``fake_multinode`` provider type reads, so it is loaded as an
#: external provider by module path.
LOCAL_NODE_PROVIDER = "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider"
LOCAL_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
LOCAL_HEAD_NODE_TYPE = "ray.head.default"


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _kill_at_once(roots: list[psutil.Process]) -> None:
    """SIGKILL ``roots`` and every process they started, none able to react: all are
    stopped first, until no stopped one has started another, so none is orphaned unseen
    (Ray's workers run in process groups of their own, which signalling a group misses)."""
    stopped: dict[int, psutil.Process] = {}
    while found := [
        process
        for root in roots
        for process in (root, *_children(root))
        if process.pid not in stopped
    ]:
        for process in found:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.suspend()
            stopped[process.pid] = process
    for process in stopped.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def autoscaling_from_raycluster(raycluster: dict) -> dict:
    """The autoscaler config that KubeRay's autoscaler derives from ``raycluster`` (a
    RayCluster object, or a RayJob's or RayService's ``rayClusterSpec`` wrapped in one):
    one node type per worker group, with the CPUs and GPUs of its ``rayStartParams`` or
    container limits, ``minReplicas`` to ``maxReplicas`` nodes, and the idle timeout and
    upscaling mode of ``autoscalerOptions``. Node memory is left to the machine: the
    local provider cannot give a node a memory size."""
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    raycluster = copy.deepcopy(raycluster)
    raycluster["metadata"].setdefault("namespace", "default")
    config = _derive_autoscaling_config_from_ray_cr(raycluster)
    node_types = config["available_node_types"]
    node_types[LOCAL_HEAD_NODE_TYPE] = node_types.pop(config["head_node_type"])
    config["head_node_type"] = LOCAL_HEAD_NODE_TYPE
    for node_type in node_types.values():
        node_type["resources"].pop("memory", None)
    return config


@dataclass
class LocalNode:
    """One ``ray start --block`` process group."""

    name: str
    cpus: int
    process: subprocess.Popen
    log: Path
    temp_dir: Path
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.process.poll() is None


class LocalCluster:
    """A head node on 127.0.0.1, with token authentication unless told otherwise, plus
    worker nodes.

    ``env`` is what a client of this cluster runs with (the token, the cluster's
    address for ``ray job submit`` and ``ray.init``); ``extra_env`` is set on every node
    so that its workers inherit it (S3 credentials, Ray settings). ``autoscaling``: an
    autoscaler config (``autoscaling_from_raycluster``) whose node types the head's
    autoscaler adds and removes; ``head_params``: more ``ray start`` options of the head
    (a RayCluster's head ``rayStartParams``).
    """

    def __init__(
        self,
        folder: Path,
        extra_env: dict[str, str] | None = None,
        head_cpus: int = 0,
        token_auth: bool = True,
        start_timeout_s: float = 120,
        autoscaling: dict | None = None,
        head_params: dict[str, str] | None = None,
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
        self._temp_dirs: list[Path] = []
        head = [
            "--head",
            f"--port={self.gcs_port}",
            f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={free_port()}",
            # ray start takes the last of a repeated option: what follows head_params here
            # and in _start (one machine's address, no fixed ports) wins over them.
            *(f"--{name}={value}" for name, value in (head_params or {}).items()),
            "--dashboard-host=127.0.0.1",
        ]
        head_env = {}
        if autoscaling is not None:
            head.append(f"--autoscaling-config={self._write_autoscaling(autoscaling)}")
            head_env = {
                # Ray's own local autoscaling clusters look every second; KubeRay's every
                # 5 s, which only delays each decision.
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_FAKE_CLUSTER": "1",
                "RAY_enable_autoscaler_v2": "1",
                "RAY_CLOUD_INSTANCE_ID": LOCAL_HEAD_NODE_ID,
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": LOCAL_HEAD_NODE_ID,
            }
        self._start("head", head_cpus, {}, head, head_env)
        self._wait_for("head")

    @property
    def client_env(self) -> dict[str, str]:
        """The environment of a driver that joins this cluster with ``ray.init()``."""
        return {**self.env, "RAY_ADDRESS": self.gcs_address}

    def _write_autoscaling(self, autoscaling: dict) -> Path:
        """``autoscaling`` with the local node provider, joined to this head, in a file."""
        config = copy.deepcopy(autoscaling)
        config["provider"] = {
            **config["provider"],
            "type": "external",
            "module": LOCAL_NODE_PROVIDER,
            "gcs_address": self.gcs_address,
            "head_node_id": LOCAL_HEAD_NODE_ID,
            "launch_multiple": True,
        }
        path = self.folder / "autoscaling.json"
        path.write_text(json.dumps(config, indent=1))
        return path

    def add_node(self, name: str, cpus: int, labels: dict[str, str] | None = None) -> LocalNode:
        """Start a worker node with ``cpus`` CPUs and ``labels``; returns once Ray lists it."""
        if name in self.nodes and self.nodes[name].alive:
            raise ValueError(f"node {name!r} is already running")
        self._start(name, cpus, labels or {}, [f"--address={self.gcs_address}"])
        self._wait_for(name)
        return self.nodes[name]

    def state(self, kind: str) -> list[dict]:
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

    def autoscaled_nodes(self) -> set[str]:
        """Ray's node ids of the alive nodes the autoscaler added."""
        return {
            s["node_id"]
            for s in self.state("nodes")
            if s["state"] == "ALIVE" and NODE_LABEL not in s["labels"]
        }

    def node_ids(self) -> dict[str, str]:
        """Ray's node id of every alive node this cluster started, by name."""
        return {
            s["labels"][NODE_LABEL]: s["node_id"]
            for s in self.state("nodes")
            if s["state"] == "ALIVE" and NODE_LABEL in s["labels"]
        }

    def status(self) -> str:
        """`ray status -v`: the nodes, what keeps each busy, and what was asked of the
        autoscaler (``request_resources``)."""
        command = [str(_BIN / "ray"), "status", "-v", f"--address={self.gcs_address}"]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True)
        return done.stdout + done.stderr

    def requests_left(self, timeout_s: float = 30) -> str | None:
        """None once `ray status` shows nothing asked of the autoscaler with
        ``request_resources`` (Ray Train's and Ray Data's requests go that way), within
        ``timeout_s``: without autoscaler v2 it shows the monitor's last report, made
        every few seconds. Otherwise the last status, for a failure message."""
        deadline = time.monotonic() + timeout_s
        while "From request_resources:\n (none)" not in (status := self.status()):
            if time.monotonic() > deadline:
                return status
            time.sleep(1)
        return None

    def nodes_running(self, actor_class: str) -> set[str]:
        """The names of the nodes where an alive actor of ``actor_class`` runs."""
        names = {node_id: name for name, node_id in self.node_ids().items()}
        return {
            names[actor["node_id"]]
            for actor in self.state("actors")
            if actor["class_name"] == actor_class
            and actor["state"] == "ALIVE"
            and actor["node_id"] in names
        }

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of a node at once, as when its machine is lost."""
        node = self.nodes[name]
        _kill_at_once([psutil.Process(node.process.pid)])
        with contextlib.suppress(ProcessLookupError):  # what left the tree but not the group
            os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait()

    def kill_autoscaled_node(self, node_id: str) -> None:
        """SIGKILL the processes of a node the autoscaler added (Ray's node id) that run
        or hold work, as when its machine is lost: its raylet and agents, found among
        what the head started by the node id they were started with, and everything
        they started. Its log monitor, which names no node id, is left for the
        autoscaler to end with the node once Ray has marked the node dead."""
        head = psutil.Process(self.nodes["head"].process.pid)
        flags = {f"--node_id={node_id}", f"--node-id={node_id}"}
        roots = [p for p in head.children(recursive=True) if flags & set(_cmdline(p))]
        if not roots:
            raise ValueError(f"no process of an autoscaled node {node_id} runs")
        _kill_at_once(roots)

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
        """Stop one node the way Ctrl-C stops ``ray start --block``, then kill whatever
        it started that outlived it (the head's autoscaler starts nodes of its own)."""
        node = self.nodes[name]
        if not node.alive:
            return
        started = psutil.Process(node.process.pid).children(recursive=True)
        os.killpg(node.process.pid, signal.SIGINT)
        try:
            node.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(node.process.pid, signal.SIGKILL)
            node.process.wait()
        for process in started:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()

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

    def _start(
        self,
        name: str,
        cpus: int,
        labels: dict[str, str],
        role: list[str],
        env: dict[str, str] | None = None,
    ) -> None:
        labels = {**labels, NODE_LABEL: name}
        log = self.folder / f"{name}.log"
        temp_dir = self._temp_dir(name)
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
            f"--temp-dir={temp_dir}",
        ]
        process = subprocess.Popen(
            command,
            env={**self.env, **(env or {})},
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.nodes[name] = LocalNode(name, cpus, process, log, temp_dir, labels)

    def _temp_dir(self, name: str) -> Path:
        """A fresh temporary folder for node ``name``, under /tmp and not the cluster's
        folder: Ray's socket paths inside it must stay within the 107 characters a Unix
        socket path may have."""
        folder = Path(tempfile.mkdtemp(prefix=f"ray-{name}-"))
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
