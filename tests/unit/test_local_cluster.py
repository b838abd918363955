"""What a local autoscaling cluster takes from Ray's private modules, pinned: when Ray
moves or renames them, these fail before any cluster starts."""

import importlib

from forgeml.local_cluster import (
    LOCAL_HEAD_NODE_ID,
    LOCAL_HEAD_NODE_TYPE,
    LOCAL_NODE_PROVIDER,
    autoscaling_from_raycluster,
)


def test_the_local_node_provider_is_where_the_config_says():
    module, _, name = LOCAL_NODE_PROVIDER.rpartition(".")
    provider = importlib.import_module(module)

    assert callable(getattr(provider, name))
    assert (provider.FAKE_HEAD_NODE_ID, provider.FAKE_HEAD_NODE_TYPE) == (
        LOCAL_HEAD_NODE_ID,
        LOCAL_HEAD_NODE_TYPE,
    )


def _group(cpu: str, **extra) -> dict:
    resources = {"limits": {"cpu": cpu, "memory": "2Gi", **extra}}
    return {"template": {"spec": {"containers": [{"name": "ray", "resources": resources}]}}}


def test_worker_groups_become_node_types_as_kuberays_autoscaler_makes_them():
    raycluster = {
        "metadata": {"name": "forge"},
        "spec": {
            "autoscalerOptions": {"idleTimeoutSeconds": 30, "upscalingMode": "Conservative"},
            "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, **_group("2")},
            "workerGroupSpecs": [
                {"groupName": "cpu", "minReplicas": 0, "maxReplicas": 3, **_group("1")},
                {
                    "groupName": "gpu",
                    "minReplicas": 0,
                    "maxReplicas": 2,
                    "labels": {"market": "spot"},
                    **_group("4", **{"nvidia.com/gpu": 1}),
                },
            ],
        },
    }

    config = autoscaling_from_raycluster(raycluster)

    types = config["available_node_types"]
    assert config["head_node_type"] == LOCAL_HEAD_NODE_TYPE
    assert types[LOCAL_HEAD_NODE_TYPE]["resources"] == {"CPU": 0}
    assert (types["cpu"]["min_workers"], types["cpu"]["max_workers"]) == (0, 3)
    assert types["cpu"]["resources"] == {"CPU": 1}  # memory is the machine's
    assert types["gpu"]["resources"] == {"CPU": 4, "GPU": 1}
    assert types["gpu"]["labels"] == {"market": "spot"}
    assert config["idle_timeout_minutes"] == 0.5
    assert config["upscaling_speed"] == 1
