"""Training and searching through storage faults injected for real: an S3 endpoint that
goes away in the middle of a checkpoint upload, for a while or for good, and a local
storage root on a small tmpfs that fills up."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import boto3
import pytest
from forgeml.cli import EXIT_STORAGE, main
from forgeml.config import StorageConfig
from forgeml.storage import ModelRegistry, Storage
from forgeml.train.loop import CHECKPOINT_FILE

from tests.conftest import tiny_raw_config, write_config
from tests.faults import EndpointOutage
from tests.integration.test_training import _last_registered_epoch

OUTAGE_S = 20


@pytest.fixture
def outage(s3_endpoint):
    """A relay to the S3 server, and a bucket of the test's own behind it."""
    relay = EndpointOutage(urlparse(s3_endpoint).port)
    yield relay
    relay.down()


def _s3_config(tmp_path, outage, s3_endpoint, bucket: str, **storage) -> tuple:
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    root = f"s3://{bucket}/team"
    raw = tiny_raw_config(
        root,
        storage={"root": root, "endpoint_url": outage.endpoint, **storage},
        train={"max_epochs": 6, "max_failures": 0},
    )
    return write_config(tmp_path / "tiny.yaml", raw), raw


def _registered_epoch(s3_endpoint: str, bucket: str, folder: str) -> int:
    """The epoch of the newest checkpoint Ray Train has registered (0 if none) for a run
    under ``folder`` (runs, or tune for a search's trials), read from the S3 server
    itself, past the relay."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    listing = s3.list_objects_v2(Bucket=bucket, Prefix=f"team/{folder}/").get("Contents", [])
    for key in (o["Key"] for o in listing):
        if key.endswith("/checkpoint_manager_snapshot.json"):
            snapshot = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
            if latest := snapshot["latest_checkpoint_result"]:
                return latest["metrics"]["epoch"]
    return 0


def _go_down_in_a_checkpoint_upload_after_epoch_1(
    outage, s3_endpoint, bucket, back_after_s, folder="runs"
):
    """Once epoch 1's checkpoint is registered, the relay goes down in the middle of the
    next checkpoint file's upload; it comes back ``back_after_s`` later (None: never)."""
    deadline = time.monotonic() + 240
    while _registered_epoch(s3_endpoint, bucket, folder) < 1:
        assert time.monotonic() < deadline, "no checkpoint was registered"
        time.sleep(0.1)
    outage.down_during(b"/checkpoint_")
    assert outage.tripped.wait(120), "no checkpoint upload after epoch 1"
    if back_after_s is not None:
        time.sleep(back_after_s)
        outage.up()


def _metrics(raw: dict) -> dict:
    registry = ModelRegistry(Storage(StorageConfig(**raw["storage"])))
    (version,) = registry.versions("tiny-wafer")
    assert registry.verify(registry.resolve("tiny-wafer")) == []
    return json.loads(registry.read(registry.resolve(f"tiny-wafer:v{version}"), "metrics.json"))


def test_training_rides_out_an_s3_outage_in_a_checkpoint_upload(
    ray_runtime, s3_endpoint, outage, tmp_path, capsys
):
    config, raw = _s3_config(tmp_path, outage, s3_endpoint, "outage-short")
    fault = threading.Thread(
        target=_go_down_in_a_checkpoint_upload_after_epoch_1,
        args=(outage, s3_endpoint, "outage-short", OUTAGE_S),
    )
    fault.start()
    started = time.monotonic()
    code = main(["train", "--config", str(config)])
    fault.join()

    assert code == 0, capsys.readouterr().err
    assert outage.tripped.is_set()
    assert time.monotonic() - started > OUTAGE_S  # the run waited for the endpoint
    metrics = _metrics(raw)
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 7))
    assert metrics["run"]["restarts"] == []  # retries carried it: no worker restarted


def test_a_lasting_s3_outage_fails_clearly_and_resume_finishes_the_run(
    ray_runtime, s3_endpoint, outage, tmp_path, capsys
):
    """With 5 tries (waits of 0.75 s in all) and no restart allowed, the run fails once
    the endpoint has been gone for that long; nothing is registered; after it is back,
    --resume goes on from the last checkpoint."""
    config, raw = _s3_config(tmp_path, outage, s3_endpoint, "outage-long", max_attempts=5)
    fault = threading.Thread(
        target=_go_down_in_a_checkpoint_upload_after_epoch_1,
        args=(outage, s3_endpoint, "outage-long", None),
    )
    fault.start()
    code = main(["train", "--config", str(config)])
    fault.join()

    err = capsys.readouterr().err
    assert code == EXIT_STORAGE, err
    assert "s3://outage-long/team" in err and "--resume" in err, err
    outage.up()
    registry = ModelRegistry(Storage(StorageConfig(**raw["storage"])))
    assert registry.versions("tiny-wafer") == []

    assert main(["train", "--config", str(config), "--resume"]) == 0
    metrics = _metrics(raw)
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 7))
    (restart,) = metrics["run"]["restarts"]
    assert restart["epoch"] >= 1


def _go_down_in_a_trials_second_checkpoint(outage, s3_endpoint, bucket):
    """Once an in-process trial's first checkpoint (Tune's ``checkpoint_000000``) holds
    its state, the relay goes down in the middle of the next checkpoint's upload, for
    good."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    deadline = time.monotonic() + 240
    while not any(
        o["Key"].endswith(f"/checkpoint_000000/{CHECKPOINT_FILE}")
        for o in s3.list_objects_v2(Bucket=bucket, Prefix="team/tune/").get("Contents", [])
    ):
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(0.1)
    outage.down_during(b"/checkpoint_000001/")
    assert outage.tripped.wait(120), "no second checkpoint"


def test_a_search_that_loses_its_s3_storage_fails_clearly_and_resume_finishes_it(
    ray_runtime, s3_endpoint, outage, tmp_path, capsys
):
    """The same lasting outage in the one trial of a search (in-process, so that no Train
    run starts twice): the search ends with the storage's exit and the command that goes
    on; once the endpoint is back, that command finishes the search (from where Tune
    last saved it) and registers its model."""
    config, raw = _s3_config(tmp_path, outage, s3_endpoint, "outage-tune", max_attempts=4)
    raw["tune"] = {
        "metric": "val_loss",
        "mode": "min",
        "trial_mode": "in_process",
        "search": {"kind": "grid"},
        "scheduler": {"kind": "none"},
        "space": {"train.optimizer.lr": {"kind": "grid", "values": [3e-3]}},
    }
    write_config(config, raw)
    fault = threading.Thread(
        target=_go_down_in_a_trials_second_checkpoint, args=(outage, s3_endpoint, "outage-tune")
    )
    fault.start()
    code = main(["tune", "--config", str(config)])
    fault.join()

    err = capsys.readouterr().err
    assert code == EXIT_STORAGE, err
    assert "s3://outage-tune/team did not answer" in err, err
    (search,) = re.findall(rf"forgeml tune --config {config} --resume (\S+)", err)
    outage.up()
    registry = ModelRegistry(Storage(StorageConfig(**raw["storage"])))
    assert registry.versions("tiny-wafer") == []

    assert main(["tune", "--config", str(config), "--resume", search]) == 0
    metrics = _metrics(raw)
    assert metrics["status"] == "tuned" and metrics["run"]["name"] == search
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 7))


@pytest.fixture
def small_disk(tmp_path):
    """A 32 MiB tmpfs mounted for the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(disk: Path, leave: int) -> Path:
    """A file taking all but ``leave`` bytes of the disk's free space."""
    ballast = disk / "ballast"
    with ballast.open("wb") as f:
        f.truncate(0)
        os.posix_fallocate(f.fileno(), 0, max(shutil.disk_usage(disk).free - leave, 1))
    return ballast


def test_a_full_disk_fails_clearly_lists_nothing_partial_and_resume_finishes(
    ray_runtime, small_disk, tmp_path, capsys
):
    """Once epoch 1's checkpoint is registered, the disk fills up but for 8 KiB: a
    checkpoint no longer fits. The run fails naming the path and the bytes it needed;
    what Ray Train lists is an intact checkpoint, the registry lists nothing; with the
    space freed, --resume finishes."""
    store = small_disk / "store"
    raw = tiny_raw_config(store, train={"max_epochs": 8, "max_failures": 0})
    config = write_config(tmp_path / "tiny.yaml", raw)
    filled: list[Path] = []

    def fill_after_epoch_1():
        deadline = time.monotonic() + 240
        while _last_registered_epoch(store) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        filled.append(_fill(small_disk, leave=8192))

    filler = threading.Thread(target=fill_after_epoch_1)
    filler.start()
    code = main(["train", "--config", str(config)])
    filler.join()

    err = capsys.readouterr().err
    assert code == EXIT_STORAGE, err
    (run,) = (store / "runs").iterdir()
    assert f"{run}: no room for a checkpoint of " in err and "--resume" in err, err
    registry = ModelRegistry(Storage(StorageConfig(root=str(store))))
    assert registry.versions("tiny-wafer") == []
    snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
    listed = Path(snapshot["latest_checkpoint_result"]["checkpoint_dir_name"])
    assert (run / listed / "state.pt").stat().st_size > 0

    filled[0].unlink()
    assert main(["train", "--config", str(config), "--resume"]) == 0
    metrics = json.loads(registry.read(registry.resolve("tiny-wafer"), "metrics.json"))
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, 9))
