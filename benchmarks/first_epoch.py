"""Time from `python jobs/train.py` to the first epoch line, and where it goes.

Trains the test suite's tiny config (16x16 wafer maps, 30 per class, a 2-block CNN,
2 epochs, one worker) on a fresh embedded runtime, each repeat in a new process, and
times every console line from the launch: the config summary (imports done), the
runtime line (Ray started), the run line (data prepared), the first epoch line, the
registration, the exit; the package's run record adds the first training step (the
workers' start, from the run line). Ray Train's controller log splits its worker-group
start-up (worker actors created, train context initialized, train function launched).

The baseline, in the same run: a new plain Python process that builds the same model
with forgeml's code and takes one training step on a batch of the same shape; the floor
of Python, PyTorch and the model with no Ray at all. Prints one JSON object.

    python benchmarks/first_epoch.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
#: The tiny config of the test suite (tests/conftest.py).
TINY = {
    "name": "tiny-wafer",
    "seed": 7,
    "data": {"source": {"kind": "wafer", "samples_per_class": 30, "image_size": 16, "shards": 4}},
    "model": {"kind": "cnn", "width": 4, "depth": 2, "dropout": 0.0},
    "train": {"max_epochs": 2, "batch_size": 32},
    "scaling": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 1},
}
#: Console milestones, in the order they appear: name and the pattern of their line.
MILESTONES = [
    ("config_read_s", re.compile(r"^tiny-wafer: ")),
    ("runtime_up_s", re.compile(r"^ray \S+ at \S+: ")),
    ("data_prepared_s", re.compile(r"^training tiny-wafer as run ")),
    ("first_epoch_line_s", re.compile(r"epoch 1/2 ")),
    ("registered_s", re.compile(r"^registered tiny-wafer:v")),
]
#: Ray Train's own timings of a worker group's start, from its controller log.
WORKER_GROUP = re.compile(r"\[Worker Group Initialization\] (.+?) in ([0-9.]+)s")

BASELINE = """
import sys, time
started = float(sys.argv[1])
import torch
from forgeml.model_package import load_model
from forgeml.storage import ModelRegistry, Storage
from forgeml.config import StorageConfig
loaded = load_model(ModelRegistry(Storage(StorageConfig(root=sys.argv[2]))), "tiny-wafer:v1")
model = loaded.model.train()
torch.manual_seed(0)
shape = loaded.preprocessor.model_inputs.shape
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
logits = model(torch.rand(32, *shape))
target = torch.randint(0, logits.shape[1], (32,))
loss = torch.nn.functional.cross_entropy(logits, target)
loss.backward()
optimizer.step()
print(time.time() - started)
"""


def run_forgeml(folder: Path) -> dict:
    """One `jobs/train.py` process: seconds from launch to each milestone line."""
    raw = {**TINY, "storage": {"root": str(folder / "store")}}
    config = folder / "tiny.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(config)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: dict[str, float] = {}
    for line in process.stdout:
        for name, pattern in MILESTONES:
            if name not in seen and pattern.search(line):
                seen[name] = round(time.monotonic() - started, 2)
    code = process.wait()
    seen["exit_s"] = round(time.monotonic() - started, 2)
    if code != 0 or len(seen) != len(MILESTONES) + 1:
        raise SystemExit(f"jobs/train.py exited {code}; milestones seen: {seen}")
    package = folder / "store" / "models" / "tiny-wafer" / "v1"
    startup = json.loads((package / "metrics.json").read_text())["run"]["startup_s"]
    seen["first_step_s"] = round(seen["data_prepared_s"] + startup["workers"], 2)
    return seen | worker_group_start()


def worker_group_start() -> dict:
    """Ray Train's worker-group start-up steps of the newest embedded session's run."""
    logs = Path(tempfile.gettempdir()) / "ray" / "session_latest" / "logs" / "train"
    (controller,) = logs.glob("ray-train-sys-controller-*.log")
    steps = {}
    for line in controller.read_text().splitlines():
        message = json.loads(line).get("message", "")
        if match := WORKER_GROUP.search(message):
            step = re.sub(r"\W+", "_", match.group(1).lower()).strip("_")
            steps[f"worker_group.{step}_s"] = float(match.group(2))
    return steps


def run_baseline(store: Path) -> float:
    """Seconds from launch to one training step of the same model, in plain PyTorch."""
    done = subprocess.run(
        [sys.executable, "-c", BASELINE, str(time.time()), str(store)],
        capture_output=True,
        text=True,
        check=True,
    )
    return round(float(done.stdout.strip().splitlines()[-1]), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    runs, baselines = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            runs.append(run_forgeml(Path(folder)))
            baselines.append(run_baseline(Path(folder) / "store"))
    median = {key: round(statistics.median(run[key] for run in runs), 2) for key in runs[0]}
    first_epoch, floor = median["first_epoch_line_s"], statistics.median(baselines)
    print(
        json.dumps(
            {
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
                "repeats": args.repeats,
                "forgeml_median": median,
                "plain_pytorch_first_step_s": round(floor, 2),
                "first_epoch_line_over_plain_first_step": round(first_epoch / floor, 2),
                "runs": runs,
                "plain_pytorch_runs": baselines,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
