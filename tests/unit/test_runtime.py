import socket

import pytest
import ray
from forgeml import runtime


def test_no_cluster_or_a_stale_address_starts_an_embedded_runtime(monkeypatch):
    dead = f"127.0.0.1:{runtime.free_port()}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime, "read_ray_address", lambda: dead)
    forgotten = []
    monkeypatch.setattr(runtime, "reset_ray_address", lambda: forgotten.append(dead))
    assert runtime._address() == "local"
    assert forgotten == [dead]  # the address file goes, as after `ray stop`
    monkeypatch.setattr(runtime, "read_ray_address", lambda: None)
    assert runtime._address() == "local"


def test_live_or_configured_clusters_are_joined(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        live = f"127.0.0.1:{server.getsockname()[1]}"
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        monkeypatch.setattr(runtime, "read_ray_address", lambda: live)
        assert runtime._address() is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    assert runtime._address() is None


def test_deploying_to_a_cluster_refuses_an_embedded_runtime(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(runtime, "read_ray_address", lambda: None)
    with pytest.raises(ValueError, match="no running Ray cluster"):
        runtime.connect(require_cluster=True)
    assert not ray.is_initialized()
