"""Registrations of one model name racing each other, from threads and processes, on a
local disk and on S3: each gets its own version and no package is lost.

S3 takes a version number with a conditional PUT (``If-None-Match: *``). moto checks
that condition and stores the object in two steps, and its usual server runs requests in
threads that can interleave between them, which S3 itself never does; the races here
run against moto's S3 application served one request at a time, so that its check and
write are as atomic as S3's. moto's threaded server is still used for a deterministic
race: a registration whose listing is stale."""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from forgeml.config import StorageConfig
from forgeml.storage import ModelRegistry, Storage
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import make_server

from tests.conftest import S3_ENV

WRITERS_PER_KIND = 4
#: Seconds from now at which every writer starts registering, once all are ready.
START_DELAY_S = 4.0


@pytest.fixture(scope="module")
def serial_s3_endpoint():
    """moto's S3 application on 127.0.0.1, one request at a time."""
    server = make_server(
        "127.0.0.1",
        0,
        DomainDispatcherApplication(create_backend_app),
        threaded=False,
        request_handler=MotoRequestHandler,
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join()


def _register_at(root: str, endpoint: str | None, writer: str, start_at: float) -> int:
    """Register a package naming its writer at ``start_at`` (wall clock); its version."""
    registry = ModelRegistry(Storage(StorageConfig(root=root, endpoint_url=endpoint)))
    time.sleep(max(0.0, start_at - time.time()))
    return registry.register("raced", {"model.pt": writer.encode()}).version


def _race(root: str, endpoint: str | None) -> dict[str, int]:
    """Writers in threads and in processes registering at once: each writer's version."""
    start_at = time.time() + START_DELAY_S
    threads = [f"thread-{i}" for i in range(WRITERS_PER_KIND)]
    processes = [f"process-{i}" for i in range(WRITERS_PER_KIND)]
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(WRITERS_PER_KIND) as pool, ThreadPoolExecutor(WRITERS_PER_KIND) as local:
        in_processes = [
            pool.apply_async(_register_at, (root, endpoint, w, start_at)) for w in processes
        ]
        in_threads = [local.submit(_register_at, root, endpoint, w, start_at) for w in threads]
        versions = [f.result(timeout=120) for f in in_threads]
        versions += [r.get(timeout=120) for r in in_processes]
    return dict(zip(threads + processes, versions, strict=True))


def _assert_each_writer_has_its_own_package(registry: ModelRegistry, versions: dict) -> None:
    assert sorted(versions.values()) == list(range(1, 2 * WRITERS_PER_KIND + 1)), versions
    assert registry.versions("raced") == sorted(versions.values())
    for writer, number in versions.items():
        version = registry.resolve(f"raced:v{number}")
        assert registry.read(version, "model.pt") == writer.encode()
        assert registry.verify(version) == []
    assert registry.resolve("raced").version == 2 * WRITERS_PER_KIND


def test_racing_registrations_on_a_local_disk_each_get_a_version(tmp_path):
    versions = _race(str(tmp_path), None)

    _assert_each_writer_has_its_own_package(
        ModelRegistry(Storage(StorageConfig(root=str(tmp_path)))), versions
    )


def test_racing_registrations_on_s3_each_get_a_version(serial_s3_endpoint, monkeypatch):
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)  # inherited by the spawned writers
    boto3.client("s3", endpoint_url=serial_s3_endpoint).create_bucket(Bucket="races")

    versions = _race("s3://races/team", serial_s3_endpoint)

    storage = Storage(StorageConfig(root="s3://races/team", endpoint_url=serial_s3_endpoint))
    _assert_each_writer_has_its_own_package(ModelRegistry(storage), versions)


def test_a_registration_with_a_stale_listing_takes_the_next_free_version(s3_endpoint, monkeypatch):
    """The listing says no version exists, but another writer has taken v1 and v2: the
    conditional writes are refused (412) and the registration takes v3."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="stale")
    storage = StorageConfig(root="s3://stale/team", endpoint_url=s3_endpoint)
    other = ModelRegistry(Storage(storage))
    other.register("raced", {"model.pt": b"first"})
    other.register("raced", {"model.pt": b"second"})
    stale = ModelRegistry(Storage(storage))
    monkeypatch.setattr(stale, "_version_numbers", lambda name, complete_only: [])

    version = stale.register("raced", {"model.pt": b"third"})

    assert version.version == 3
    contents = Counter(other.read(other.resolve(f"raced:v{n}"), "model.pt") for n in (1, 2, 3))
    assert contents == Counter([b"first", b"second", b"third"])
