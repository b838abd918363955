import errno
import hashlib
import json
import pickle
import time

import pytest
from forgeml.cli import EXIT_BAD_INPUT, EXIT_DAMAGED, main
from forgeml.config import StorageConfig
from forgeml.storage import (
    MANIFEST_FILE,
    ModelRegistry,
    PackageIntegrityError,
    RetryingS3FileSystem,
    Storage,
    StorageFailure,
)
from ray.train import ControllerError, WorkerGroupError

from tests.conftest import S3_ENV


def test_register_versions_and_latest(store):
    registry = ModelRegistry(Storage(StorageConfig(root=str(store))))
    first = registry.register("m", {"a.txt": b"1"})
    second = registry.register("m", {"a.txt": b"2"})
    assert (first.version, second.version) == (1, 2)
    assert registry.resolve("m").version == 2
    assert registry.resolve("m:latest").version == 2
    assert registry.read(registry.resolve("m:v1"), "a.txt") == b"1"
    assert (store / "models" / "m" / "latest").read_text().strip() == "v2"
    assert registry.models() == ["m"]


def test_incomplete_version_is_invisible_and_never_reused(store):
    registry = ModelRegistry(Storage(StorageConfig(root=str(store))))
    registry.register("m", {"a.txt": b"1"})
    crashed = store / "models" / "m" / "v2"
    crashed.mkdir()
    (crashed / "model.pt").write_bytes(b"half")
    assert registry.versions("m") == [1]
    assert registry.resolve("m").version == 1
    with pytest.raises(KeyError, match="no version 'v2'"):
        registry.resolve("m:v2")
    assert registry.register("m", {"a.txt": b"3"}).version == 3


def test_failed_write_leaves_no_version(store):
    registry = ModelRegistry(Storage(StorageConfig(root=str(store))))

    with pytest.raises(TypeError):
        registry.register("m", {"a.txt": b"ok", "b.txt": object()})
    assert registry.versions("m") == []
    assert not (store / "models" / "m" / "v1").exists()
    assert not (store / "models" / "m" / "latest").exists()


def test_unknown_model_is_a_key_error(store):
    registry = ModelRegistry(Storage(StorageConfig(root=str(store))))
    with pytest.raises(KeyError, match="no registered model named 'nope'"):
        registry.resolve("nope")


def test_atomic_write_replaces_whole_file(store):
    storage = Storage(StorageConfig(root=str(store)))
    path = storage.path("x", "f.txt")
    storage.write_text(path, "old")
    storage.write_text(path, "new")
    assert storage.read_text(path) == "new"
    assert [p.name for p in (store / "x").iterdir()] == ["f.txt"]


def test_rejects_other_schemes():
    with pytest.raises(ValueError, match="local path or s3://"):
        Storage(StorageConfig(root="gs://bucket/x"))


def _registered(store, files=None):
    registry = ModelRegistry(Storage(StorageConfig(root=str(store))))
    version = registry.register("m", files or {"model.pt": b"w" * 100, "metrics.json": b"{}"})
    return registry, version, store / "models" / "m" / "v1"


def test_the_manifest_states_every_file_and_is_written_before_the_marker(store, monkeypatch):
    written = []
    original = Storage.write_bytes
    monkeypatch.setattr(
        Storage,
        "write_bytes",
        lambda self, path, data: (written.append(path), original(self, path, data)),
    )

    _, _, package = _registered(store)

    names = [path.rsplit("/", 1)[1] for path in written]
    assert names.index(MANIFEST_FILE) < names.index("_COMPLETE")
    manifest = json.loads((package / MANIFEST_FILE).read_text())["files"]
    assert manifest == {
        "metrics.json": {"bytes": 2, "sha256": hashlib.sha256(b"{}").hexdigest()},
        "model.pt": {"bytes": 100, "sha256": hashlib.sha256(b"w" * 100).hexdigest()},
    }


def test_reserved_file_names_are_refused(store):
    registry = ModelRegistry(Storage(StorageConfig(root=str(store))))
    with pytest.raises(ValueError, match="cannot hold a file named MANIFEST.json"):
        registry.register("m", {MANIFEST_FILE: b"{}"})
    assert registry.versions("m") == []


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda f: f.write_bytes(b"w" * 50), "model.pt has 50 bytes, registered with 100"),
        (
            lambda f: f.write_bytes(b"w" * 99 + b"x"),
            "model.pt does not match its registered sha256",
        ),
        (lambda f: f.unlink(), "model.pt is missing"),
    ],
    ids=["truncated", "altered", "deleted"],
)
def test_a_damaged_file_is_refused_by_name_and_found_by_verify(store, damage, message):
    registry, version, package = _registered(store)
    damage(package / "model.pt")
    fresh = ModelRegistry(Storage(StorageConfig(root=str(store))))  # no cached manifest

    with pytest.raises(PackageIntegrityError, match=message):
        fresh.read(version, "model.pt")
    assert fresh.read(version, "metrics.json") == b"{}"
    (problem,) = fresh.verify(version)
    assert problem.startswith(f"{package}/model.pt") and message.split(" ", 1)[1] in problem


def test_verify_finds_unlisted_files_and_a_missing_manifest(store):
    registry, version, package = _registered(store)
    assert registry.verify(version) == []
    (package / "extra.py").write_text("import os")
    assert registry.verify(version) == [f"{package}/extra.py is not in the manifest"]
    with pytest.raises(PackageIntegrityError, match="extra.py is not in the package"):
        registry.read(version, "extra.py")

    (package / MANIFEST_FILE).unlink()
    fresh = ModelRegistry(Storage(StorageConfig(root=str(store))))
    with pytest.raises(PackageIntegrityError, match="has no MANIFEST.json"):
        fresh.read(version, "metrics.json")
    (package / MANIFEST_FILE).write_text("[1, 2]")
    assert "MANIFEST.json is not a manifest" in ModelRegistry(fresh.storage).verify(version)[0]


def test_a_replaced_file_keeps_the_package_intact(store):
    registry, version, _ = _registered(store)
    registry.replace_file(version, "report.html", b"<html>")
    fresh = ModelRegistry(Storage(StorageConfig(root=str(store))))
    assert fresh.verify(version) == [] and fresh.read(version, "report.html") == b"<html>"


def test_forgeml_models_verify_checks_versions_names_and_the_registry(store, capsys):
    registry, _, package = _registered(store)
    registry.register("m", {"model.pt": b"second"})
    registry.register("other", {"model.pt": b"third"})
    root = ["--storage-root", str(store)]

    assert main(["models", "verify", *root]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "3 versions checked, 0 damaged"

    (package / "model.pt").write_bytes(b"w" * 10)
    assert main(["models", "verify", "m", *root]) == EXIT_DAMAGED
    out = capsys.readouterr().out
    assert "m:v1  DAMAGED" in out and "model.pt has 10 bytes" in out and "m:v2  ok" in out
    assert main(["models", "verify", "m:v2", "other", *root]) == 0
    assert main(["models", "verify", "nope", *root]) == EXIT_BAD_INPUT
    assert "no registered model named 'nope'" in capsys.readouterr().err


def test_s3_requests_keep_their_tries_in_the_copies_ray_sends_to_workers(monkeypatch):
    """Five tries of a request to a closed port wait 50+100+200+400 ms, in a pickled
    copy too (pyarrow's own pickle would give the 3 s default)."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    storage = Storage(
        StorageConfig(root="s3://forge/x", endpoint_url="http://127.0.0.1:1", max_attempts=5)
    )
    copy = pickle.loads(pickle.dumps(storage.fs))
    assert isinstance(copy, RetryingS3FileSystem)
    started = time.monotonic()
    with pytest.raises(OSError, match="NETWORK_CONNECTION") as refused:
        copy.get_file_info("forge/x/a")
    assert 0.7 < time.monotonic() - started < 2.5

    failure = storage.failure(refused.value, run="r-1")
    assert isinstance(failure, StorageFailure) and failure.run == "r-1"
    assert str(failure).startswith("s3://forge/x did not answer (storage.max_attempts: 5)")
    with pytest.raises(StorageFailure, match="did not answer"), storage.failures_named("r-1"):
        storage.create_exclusive("forge/x/_CLAIM", b"me")  # boto3's request, no answer


def test_a_storage_failure_is_found_behind_ray_trains_errors(store):
    storage = Storage(StorageConfig(root=str(store)))
    full = OSError(errno.ENOSPC, "No space left on device")
    in_a_worker = WorkerGroupError("rank 0 failed", {0: RuntimeError("wrapped")})
    in_a_worker.worker_failures[0].__cause__ = full
    failure = storage.failure(in_a_worker, run="r-2")
    assert failure is not None and failure.run == "r-2"
    assert str(failure).startswith(f"{store} is full (")
    assert storage.failure(ControllerError(ValueError("a bug"))) is None

    with pytest.raises(StorageFailure, match="is full") as raised, storage.failures_named("r-2"):
        raise ControllerError(full)
    assert raised.value.run == "r-2"
