"""An s3:// storage root against moto's S3 server: data, checkpoints and the model
package of a training run, and a policy search's state, trials and policy."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import numpy as np
import yaml
from forgeml.config import config_from_dict
from forgeml.model_package import load_model
from forgeml.rl.package import load_policy
from forgeml.rl.search import run_reinforcement_search
from forgeml.storage import ModelRegistry, Storage
from forgeml.train.trainer import run_training

from tests.conftest import REPO, S3_ENV, tiny_config


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
    _assert_no_s3_keys_in(s3, "forge", keys, ray_runtime)


def test_s3_storage_root_holds_a_policy_search_its_trials_and_the_policy(
    ray_runtime, s3_endpoint, capsys
):
    """A reinforcement search on S3 (one trial: searching itself is tested locally):
    Tune's state and the trial's checkpoints, the results, and the registered policy,
    read back from S3 to act."""
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)
    s3.create_bucket(Bucket="policies")
    raw = yaml.safe_load((REPO / "examples" / "cartpole" / "config.yaml").read_text())
    raw["storage"] = {"root": "s3://policies/team-b", "endpoint_url": s3_endpoint}
    raw["task"] |= {"max_iterations": 2, "evaluation_episodes": 5, "target_return": None}
    raw["tune"] = {
        "search": {"kind": "grid"},
        "max_concurrent_trials": 1,
        "space": {"task.algorithm.lr": {"kind": "grid", "values": [1e-3]}},
    }
    cfg = config_from_dict(raw)

    outcome = run_reinforcement_search(cfg)

    assert outcome.version.uri == "s3://policies/team-b/models/cartpole-ppo/v1"
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="policies")["Contents"]}
    search = f"team-b/tune/{outcome.experiment}/"
    assert f"{search}tune_results.parquet" in keys and f"{search}best_config.yaml" in keys
    checkpoints = {k.split("/checkpoint_")[0] for k in keys if "/checkpoint_" in k}
    assert len(checkpoints) == 1 and all(c.startswith(search) for c in checkpoints), sorted(keys)
    registry = ModelRegistry(Storage(cfg.storage))
    policy, _ = load_policy(registry, "cartpole-ppo:v1")
    assert policy.act(np.zeros((2, 4), dtype=np.float32))["actions"].shape == (2,)
    _assert_no_s3_keys_in(s3, "policies", keys, ray_runtime)


def _assert_no_s3_keys_in(s3, bucket: str, keys: set[str], ray_runtime) -> None:
    """No object a run wrote (run log, checkpoints, records, TensorBoard, a search's
    state and results, the package and its report), and no file of the Ray session
    that ran it (every process's log), holds the S3 credentials it used."""
    secrets = [S3_ENV["AWS_ACCESS_KEY_ID"].encode(), S3_ENV["AWS_SECRET_ACCESS_KEY"].encode()]
    for key in keys:
        body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert not any(secret in body for secret in secrets), key
    session = Path(ray_runtime.address_info["session_dir"])
    logs = [path for path in session.rglob("*") if path.is_file() and not path.is_symlink()]
    assert len(logs) > 20
    for path in logs:
        assert not any(secret in path.read_bytes() for secret in secrets), path
