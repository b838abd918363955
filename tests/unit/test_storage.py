import pytest
from forgeml.config import StorageConfig
from forgeml.storage import ModelRegistry, Storage


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
