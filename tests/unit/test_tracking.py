"""Tracking without Ray: flattening, the MLflow store's default, and runs list/compare
over a registry of packages."""

from __future__ import annotations

import json
import re

import pytest
from forgeml.cli import main
from forgeml.storage import ModelRegistry, Storage
from forgeml.tracking import config_params, flatten, mlflow_uri, scalar_metrics

from tests.conftest import tiny_config


def test_flatten_and_scalar_metrics_keep_numbers_by_dotted_path():
    metrics = {
        "accuracy": 0.9,
        "per_class_f1": {"a": 0.5, "b": float("nan")},
        "confusion_matrix": {"labels": ["a", "b"], "matrix": [[1, 0], [0, 1]]},
        "converged": True,
    }
    assert flatten({"a": {"b": 1, "c": {}}}) == {"a.b": 1, "a.c": {}}
    assert scalar_metrics(metrics) == {"accuracy": 0.9, "per_class_f1.a": 0.5}


def test_config_params_are_flat_strings(tmp_path):
    params = config_params(tiny_config(tmp_path, tracking={"mlflow": {}}))
    assert params["model.kind"] == "cnn"
    assert params["train.max_epochs"] == "2"
    assert params["tune"] == "null"
    assert all(isinstance(value, str) for value in params.values())


def test_the_default_mlflow_store_is_an_sqlite_file_in_a_local_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(tmp_path, tracking={"mlflow": {}})
    assert mlflow_uri(cfg, Storage(cfg.storage)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert mlflow_uri(cfg, Storage(cfg.storage)) == "http://127.0.0.1:5000"
    configured = tiny_config(tmp_path, tracking={"mlflow": {"tracking_uri": "sqlite:///x.db"}})
    assert mlflow_uri(configured, Storage(configured.storage)) == "sqlite:///x.db"


def test_an_s3_root_needs_a_tracking_server(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config("s3://bucket/prefix", tracking={"mlflow": {}})
    cfg.storage.endpoint_url = "http://127.0.0.1:1"
    with pytest.raises(ValueError, match="tracking.mlflow.tracking_uri: storage.root is s3://"):
        mlflow_uri(cfg, Storage(cfg.storage))


def _register(store, lr: float, accuracy: float, status: str) -> None:
    cfg = tiny_config(store, train={"optimizer": {"name": "adamw", "lr": lr}})
    metrics = {
        "test": {"accuracy": accuracy, "per_class_f1": {"none": accuracy}},
        "best_epoch": 2,
        "selected_by": {"metric": "val_loss", "mode": "min"},
        "status": status,
        "history": [{"epoch": 1, "val_loss": 1.5}, {"epoch": 2, "val_loss": 1.25}],
        "run": {"name": f"run-{lr}", "wall_s": 12.5},
        "registered_at": "2026-11-25T10:00:00Z",
    }
    files = {"config.yaml": cfg.to_yaml().encode(), "metrics.json": json.dumps(metrics).encode()}
    ModelRegistry(Storage(cfg.storage)).register(cfg.name, files)


def test_runs_list_and_compare_read_the_registry(tmp_path, capsys):
    _register(tmp_path, 0.01, 0.5, "completed")
    _register(tmp_path, 0.03, 0.75, "early_stopped")
    root = ["--storage-root", str(tmp_path)]

    assert main(["runs", "list", *root]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["MODEL", "REGISTERED", "RUN", "STATUS"]
    assert lines[1].split()[:4] == [
        "tiny-wafer:v1",
        "2026-11-25T10:00:00Z",
        "run-0.01",
        "completed",
    ]
    assert "val_loss=1.25" in lines[2]

    assert main(["runs", "compare", "tiny-wafer:v1", "tiny-wafer:v2", *root, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows["model"] == ["tiny-wafer:v1", "tiny-wafer:v2"]
    assert rows["test.accuracy"] == [0.5, 0.75]
    assert rows["test.per_class_f1.none"] == [0.5, 0.75]
    # only the config values that differ, unless --all
    assert [label for label in rows if label.startswith("config.")] == ["config.train.optimizer.lr"]
    assert main(["runs", "compare", "tiny-wafer:v1", "tiny-wafer:v2", *root, "--all"]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^config\.model\.kind +cnn +cnn$", table, re.MULTILINE)
    assert re.search(r"^config\.train\.optimizer\.lr +0\.01 +0\.03$", table, re.MULTILINE)

    assert main(["runs", "compare", "tiny-wafer:v9", *root]) == 2
    assert "has no version 'v9'" in capsys.readouterr().err
