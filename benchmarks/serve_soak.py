"""Serving soak: steady load for minutes, version switches, a replica killed under load.

Serves two registered models behind the gateway on 127.0.0.1 (HAProxy ingress, traffic
capture on): ``steady`` with two replicas for the whole run, and ``switched``, whose
served version alternates between v1 and v2 every ``--switch-every`` seconds (a new
model application each time, the gateway rerouted, the old one deleted). A separate
load process sends ``--rps`` requests a second, alternating between the two, and
records every answer; half-way through, one of ``steady``'s replica processes is
SIGKILLed. Every ``--sample-every`` seconds the resident memory and open file
descriptors of the long-lived processes are sampled: HAProxy (its processes, which a
reload replaces), its manager actor and Serve's proxy actor, the gateway replica, the
controller, and the ``steady`` replica that is not killed.

Growth is measured after the warm-up (``--warmup``): over the whole rest, and over its
second half, where the bound applies: at most ``--max-late-growth-mib`` (4 MiB) per
process. Why that bound: allocator arenas and caches grow early and settle, while a
leak grows with the requests; at 40 requests a second the second half of a 10-minute
run serves about 10,000, so a leak of 400 bytes a request (a fraction of one request's
JSON) would break it. File descriptors may not grow beyond a margin of 4 (sockets of
requests in flight). Prints one JSON object.

    python benchmarks/serve_soak.py [--minutes 10] [--rps 40] [--switch-every 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve()
MIB = 1024 * 1024


# ------------------------------------------------------------------ the load process


async def _steady_load(urls: list[str], body: bytes, rps: float, seconds: float) -> dict:
    """``rps`` requests a second for ``seconds``, round-robin over ``urls``, each
    started on schedule whatever the others do; every failure with its time."""
    import aiohttp

    codes: dict[str, int] = {}
    failures: list[tuple[float, str]] = []
    latencies: list[float] = []
    started = time.perf_counter()

    async def one(session, url):
        sent = time.perf_counter()
        try:
            async with session.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as r:
                await r.read()
                code = str(r.status)
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            code = type(exc).__name__
        latencies.append(time.perf_counter() - sent)
        codes[code] = codes.get(code, 0) + 1
        if code != "200":
            failures.append((round(sent - started, 1), code))

    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        tasks, count = [], int(rps * seconds)
        for i in range(count):
            await asyncio.sleep(max(0.0, started + i / rps - time.perf_counter()))
            tasks.append(asyncio.create_task(one(session, urls[i % len(urls)])))
        await asyncio.gather(*tasks)
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "failed": len(failures),
        "codes": codes,
        "failures": failures[:1000],
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
    }


# ------------------------------------------------------------ the processes sampled


def _actor_pids(class_name: str) -> list[int]:
    from ray.util.state import list_actors

    alive = list_actors(filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])
    return sorted(actor.pid for actor in alive)


def _usage(processes: list) -> dict:
    """Resident memory and open file descriptors of ``processes`` (psutil) together, the
    descriptors also by kind (socket, pipe, anon_inode, or a file)."""
    kinds: dict[str, int] = {}
    for process in processes:
        for fd in Path(f"/proc/{process.pid}/fd").iterdir():
            try:
                kind = os.readlink(fd).split(":")[0]
            except OSError:
                continue  # closed meanwhile
            kind = "file" if kind.startswith("/") else kind
            kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "rss_mib": round(sum(p.memory_info().rss for p in processes) / MIB, 1),
        "fds": sum(p.num_fds() for p in processes),
        "fd_kinds": kinds,
    }


def _growth(samples: list[tuple[float, dict]], warmup_s: float) -> dict:
    after = [(t, s) for t, s in samples if t >= warmup_s]
    times = np.array([t for t, _ in after])
    rss = np.array([s["rss_mib"] for _, s in after])
    late = rss[times >= (times[0] + times[-1]) / 2]
    slope = np.polyfit(times / 3600, rss, 1)[0] if len(after) > 2 else float("nan")
    return {
        "rss_mib_at_warmup": after[0][1]["rss_mib"],
        "rss_mib_at_end": after[-1][1]["rss_mib"],
        "rss_growth_mib": round(float(rss[-1] - rss[0]), 1),
        "rss_late_growth_mib": round(float(late[-1] - late[0]), 1),
        "rss_max_mib": round(float(rss.max()), 1),
        "rss_slope_mib_per_hour": round(float(slope), 1),
        "fds_at_warmup": after[0][1]["fds"],
        "fds_at_end": after[-1][1]["fds"],
        "fd_kinds_at_warmup": after[0][1]["fd_kinds"],
        "fd_kinds_at_end": after[-1][1]["fd_kinds"],
        "fds_max": max(s["fds"] for _, s in after),
    }


# ---------------------------------------------------------------------------- main


def _train_models(root: str) -> None:
    """``steady`` and ``switched`` (v1 and a copy, v2): small wafer CNNs."""
    from forgeml.config import StorageConfig, config_from_dict
    from forgeml.storage import ModelRegistry, Storage
    from forgeml.train.trainer import run_training

    for name in ("steady", "switched"):
        cfg = config_from_dict(
            {
                "name": name,
                "storage": {"root": root},
                "data": {"source": {"kind": "wafer", "samples_per_class": 60}},
                "model": {"kind": "cnn", "width": 8, "depth": 2},
                "train": {"max_epochs": 1},
            }
        )
        run_training(cfg)
    registry = ModelRegistry(Storage(StorageConfig(root=root)))
    registry.register("switched", registry.read_package(registry.resolve("switched:v1")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--rps", type=float, default=40)
    parser.add_argument("--switch-every", type=float, default=60)
    parser.add_argument("--sample-every", type=float, default=10)
    parser.add_argument("--warmup", type=float, default=120)
    parser.add_argument("--max-late-growth-mib", type=float, default=4)
    parser.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()

    body = json.dumps({"instances": [{"image": np.zeros((32, 32)).tolist()}]}).encode()
    if args.load:
        urls, rps, seconds, out = args.load
        stats = asyncio.run(_steady_load(urls.split(","), body, float(rps), float(seconds)))
        Path(out).write_text(json.dumps(stats))
        return

    os.environ.setdefault("RAY_SERVE_ENABLE_HA_PROXY", "1")
    import psutil
    import ray
    from forgeml import runtime
    from forgeml.config import StorageConfig
    from forgeml.serve.deploy import GATEWAY_APP, AppArgs, deploy
    from ray import serve

    seconds = args.minutes * 60
    with tempfile.TemporaryDirectory() as root:
        runtime.connect()
        _train_models(root)
        port = runtime.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        settings = [
            "serve.cpus_per_replica=0.1",
            "serve.autoscaling.min_replicas=2",
            "serve.autoscaling.max_replicas=2",
        ]

        def serving(version: int) -> None:
            models = ["steady:v1", f"switched:v{version}"]
            deploy(
                AppArgs(
                    models=models, storage=StorageConfig(root=root), auth=False, overrides=settings
                )
            )

        serving(1)
        steady = _actor_pids("ServeReplica:steady-v1:ModelServer")
        assert len(steady) == 2, steady
        killed, survivor = steady
        (manager,) = map(psutil.Process, _actor_pids("HAProxyManager"))
        watched = {
            "haproxy": lambda: manager.children(recursive=True),
            "haproxy_manager": lambda: [manager],
            "proxy_actor": lambda: list(map(psutil.Process, _actor_pids("ProxyActor"))),
            "gateway": lambda: list(
                map(psutil.Process, _actor_pids(f"ServeReplica:{GATEWAY_APP}:Gateway"))
            ),
            "controller": lambda: list(map(psutil.Process, _actor_pids("ServeController"))),
            "steady_replica": lambda: [psutil.Process(survivor)],
        }

        urls = ",".join(
            f"http://127.0.0.1:{port}/v1/models/{m}/predict" for m in ("steady", "switched")
        )
        results = Path(root) / "load.json"
        load = subprocess.Popen(
            [sys.executable, str(HERE), "--load", urls, str(args.rps), str(seconds), str(results)]
        )
        started = time.monotonic()
        samples: dict[str, list] = {role: [] for role in watched}
        events, version, next_switch, next_sample = [], 1, args.switch_every, 0.0
        while load.poll() is None:
            now = time.monotonic() - started
            if now >= next_sample:
                for role, processes in watched.items():
                    samples[role].append((round(now, 1), _usage(processes())))
                next_sample += args.sample_every
            if now >= next_switch and now < seconds - 10:
                version = 3 - version
                began = time.monotonic()
                serving(version)
                events.append(
                    {
                        "at_s": round(now, 1),
                        "switched_to": f"v{version}",
                        "took_s": round(time.monotonic() - began, 1),
                    }
                )
                next_switch += args.switch_every
            if killed and now >= seconds / 2:
                os.kill(killed, signal.SIGKILL)
                events.append({"at_s": round(now, 1), "sigkilled_steady_replica": killed})
                killed = None
            time.sleep(0.5)
        traffic = json.loads(results.read_text())
        serve.shutdown()
        ray.shutdown()

    killed_at = next(e["at_s"] for e in events if "sigkilled_steady_replica" in e)
    after_kill = [f for f in traffic["failures"] if killed_at - 5 <= f[0] <= killed_at + 60]
    growth = {role: _growth(s, args.warmup) for role, s in samples.items()}
    outside = [
        role
        for role, g in growth.items()
        if g["rss_late_growth_mib"] > args.max_late_growth_mib
        or g["fds_at_end"] > g["fds_at_warmup"] + 4
    ]
    print(
        json.dumps(
            {
                "benchmark": "serve_soak",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "minutes": args.minutes,
                "rps": args.rps,
                "traffic": traffic,
                "failed_share": round(traffic["failed"] / max(traffic["requests"], 1), 5),
                "events": events,
                "growth_after_warmup": growth,
                "bound": {"rss_late_growth_mib": args.max_late_growth_mib, "fds_growth": 4},
                "within_bound": not outside,
                "outside_bound": outside,
                "failed_within_60_s_of_the_kill": len(after_kill),
                "failed_otherwise": traffic["failed"] - len(after_kill),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
