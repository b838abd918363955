"""Serving throughput and latency: forgeml's Ray Serve app against a hand-written FastAPI server.

Both serve the same registered wafer CNN with the same request schema, preprocessing
and inference; a separate load process (aiohttp, 127.0.0.1, bounded in time and count)
drives each at several concurrency levels, one server at a time. forgeml is measured on
its two paths: the model's predict path (Serve's ingress straight to the model's
replica) and the same model's pinned-version path, which goes through the gateway.
Ray starts with forgeml's runtime settings (``forgeml.runtime.RAY_ENV_DEFAULTS``), the
environment variables already set taking precedence. Prints one JSON object.

    python benchmarks/serve_load.py [--seconds 10] [--concurrency 1 8 32 128]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from forgeml.runtime import RAY_ENV_DEFAULTS, free_port

# Module level on purpose: FastAPI resolves the handler's (string) annotations here.
from forgeml.serve.schemas import PredictRequest, PredictResponse

HERE = Path(__file__).resolve()


# ------------------------------------------------------------------ the load process


async def _drive(url: str, body: bytes, concurrency: int, seconds: float, max_requests: int):
    import aiohttp

    latencies, errors, sent, codes = [], 0, 0, {}
    deadline = time.perf_counter() + seconds
    headers = {"Content-Type": "application/json"}

    async def client(session):
        nonlocal errors, sent
        while time.perf_counter() < deadline and sent < max_requests:
            sent += 1
            started = time.perf_counter()
            try:
                # A redirect is an error: a served path answers itself.
                async with session.post(
                    url, data=body, headers=headers, allow_redirects=False
                ) as response:
                    await response.read()
                    codes[response.status] = codes.get(response.status, 0) + 1
                    if response.status != 200:
                        errors += 1
            except aiohttp.ClientError:
                errors += 1
            latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "rps": round(len(latencies) / elapsed, 1),
        "p50_ms": round(float(np.percentile(ms, 50)), 2),
        "p99_ms": round(float(np.percentile(ms, 99)), 2),
        "errors": errors,
        "status_codes": {str(k): v for k, v in sorted(codes.items())},
    }


def load(url: str, concurrency: int, seconds: float, max_requests: int) -> dict:
    """Run the load generator in its own process so it does not share the server's GIL."""
    out = subprocess.run(
        [
            sys.executable,
            str(HERE),
            "--load",
            url,
            str(concurrency),
            str(seconds),
            str(max_requests),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 120,
    )
    return json.loads(out.stdout)


def _request_body() -> bytes:
    from forgeml.data.wafer import generate_map

    wafer = generate_map(2, 32, np.random.default_rng(0))
    return json.dumps({"instances": [{"image": wafer.tolist()}]}).encode()


# ----------------------------------------------------------------- the plain server


def plain_app(storage_root: str, ref: str):
    """What a user would write by hand: FastAPI, the same schema, preprocessing and model."""
    import torch
    from fastapi import FastAPI
    from forgeml.config import StorageConfig
    from forgeml.model_package import load_model
    from forgeml.storage import ModelRegistry, Storage

    torch.set_num_threads(1)
    loaded = load_model(ModelRegistry(Storage(StorageConfig(root=storage_root))), ref)
    app = FastAPI()

    @app.post("/v1/models/{name}/predict", response_model=PredictResponse)
    def predict(name: str, body: PredictRequest) -> PredictResponse:
        columns = loaded.preprocessor.request_columns(body.instances)
        inputs = torch.from_numpy(loaded.preprocessor.transform(columns)["inputs"])
        with torch.inference_mode():
            probabilities = loaded.task.predict(loaded.model(inputs)).numpy()
        return PredictResponse(
            model=name,
            version=f"v{loaded.version.version}",
            predictions=loaded.task.prediction_records(probabilities),
        )

    return app


def _wait_for(url: str, seconds: float = 60) -> None:
    import requests

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=2)
            return
        except requests.ConnectionError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up")


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--max-requests", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument(
        "--proxy",
        choices=["haproxy", "default"],
        default="haproxy",
        help="Serve's HTTP ingress: HAProxy (RAY_SERVE_ENABLE_HA_PROXY=1) or the Python proxy",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="serve.PATH=VALUE",
        help="serve settings of the forgeml side, e.g. --set serve.torch_threads=2",
    )
    parser.add_argument("--load", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--plain-server", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.load:
        url, concurrency, seconds, max_requests = args.load
        stats = asyncio.run(
            _drive(url, _request_body(), int(concurrency), float(seconds), int(max_requests))
        )
        print(json.dumps(stats))
        return
    if args.plain_server:
        import uvicorn

        root, ref, port = args.plain_server
        uvicorn.run(plain_app(root, ref), host="127.0.0.1", port=int(port), log_level="warning")
        return

    import ray
    import requests
    from forgeml.config import config_from_dict
    from forgeml.serve.deploy import AppArgs, deploy
    from forgeml.train.trainer import run_training
    from ray import serve

    paths = {
        "forgeml_serve": "/v1/models/bench-wafer/predict",
        "forgeml_serve_through_gateway": "/v1/models/bench-wafer/versions/v1/predict",
    }
    results: dict = {"plain_fastapi": {}, **{side: {} for side in paths}}
    with tempfile.TemporaryDirectory() as root:
        cfg = config_from_dict(
            {
                "name": "bench-wafer",
                "storage": {"root": root},
                "data": {"source": {"kind": "wafer", "samples_per_class": 100}},
                "model": {"kind": "cnn", "width": 16, "depth": 3},
                "train": {"max_epochs": 1},
                "scaling": {"torch_threads": 2},
            }
        )
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        ref = run_training(cfg).version.ref
        ray.shutdown()

        port = free_port()
        server = subprocess.Popen(
            [sys.executable, str(HERE), "--plain-server", root, ref, str(port)],
            stdout=subprocess.DEVNULL,
        )
        try:
            _wait_for(f"http://127.0.0.1:{port}/docs")
            probe = requests.post(
                f"http://127.0.0.1:{port}/v1/models/bench-wafer/predict",
                data=_request_body(),
                headers={"Content-Type": "application/json"},
                timeout=10,
            )
            probe.raise_for_status()
            url = f"http://127.0.0.1:{port}/v1/models/bench-wafer/predict"
            for c in args.concurrency:
                results["plain_fastapi"][c] = load(url, c, args.seconds, args.max_requests)
        finally:
            server.terminate()
            server.wait()

        os.environ["RAY_SERVE_ENABLE_HA_PROXY"] = "1" if args.proxy == "haproxy" else "0"
        for name, value in RAY_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        deploy(AppArgs(models=[ref], storage=cfg.storage, auth=False, overrides=args.overrides))
        for side, path in paths.items():
            url = f"http://127.0.0.1:{port}{path}"
            for c in args.concurrency:
                results[side][c] = load(url, c, args.seconds, args.max_requests)
        serve.shutdown()
        ray.shutdown()

    plain = results["plain_fastapi"]
    ratios = {
        side: {
            c: {
                "rps": round(results[side][c]["rps"] / plain[c]["rps"], 3),
                "p99": round(results[side][c]["p99_ms"] / plain[c]["p99_ms"], 3),
            }
            for c in args.concurrency
        }
        for side in paths
    }
    print(
        json.dumps(
            {
                "benchmark": "serve_load",
                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                "seconds_per_level": args.seconds,
                "proxy": args.proxy,
                "serve_overrides": args.overrides,
                "serve_environment": {
                    name: os.environ[name] for name in sorted(os.environ) if "SERVE" in name
                },
                **results,
                "ratio_forgeml_to_plain": ratios,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
