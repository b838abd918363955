"""An s3:// storage root against moto's S3 server: data, checkpoints and the model package."""

from __future__ import annotations

import json

import boto3
from forgeml.model_package import load_model
from forgeml.storage import ModelRegistry, Storage
from forgeml.train.trainer import run_training

from tests.conftest import tiny_config


def test_s3_storage_root_writes_and_reads_back_a_model_package(ray_runtime, s3_endpoint):
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="forge")
    cfg = tiny_config(
        "s3://forge/team-a", storage={"root": "s3://forge/team-a", "endpoint_url": s3_endpoint}
    )

    outcome = run_training(cfg)

    assert outcome.version.uri == "s3://forge/team-a/models/tiny-wafer/v1"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="forge")["Contents"]}
    assert "team-a/models/tiny-wafer/latest" in keys
    assert "team-a/models/tiny-wafer/v1/model.pt" in keys
    assert any(k.startswith("team-a/datasets/wafer/") and k.endswith(".parquet") for k in keys)
    assert any(k.startswith(f"team-a/runs/{outcome.run_name}/checkpoint_") for k in keys)
    # TensorBoard files are written locally and copied up after every epoch
    events = [k for k in keys if k.startswith(f"team-a/runs/{outcome.run_name}/tensorboard/")]
    assert any("events.out.tfevents" in k for k in events)
    assert any("/hparams/" in k for k in events)  # the registration's test metrics

    registry = ModelRegistry(Storage(cfg.storage))
    loaded = load_model(registry, "tiny-wafer:latest")
    stored = json.loads(registry.read(loaded.version, "metrics.json"))
    assert stored["test"] == outcome.metrics["test"]
    assert loaded.config == cfg
