"""The pre-launch placement check on made-up clusters: what fits, what never can, and
what the refusal says."""

import pytest
from forgeml.config import ScalingConfig
from forgeml.runtime import Node
from forgeml.train.placement import (
    PlacementError,
    autoscaler_verdict,
    check_placement,
    selector_matches,
)
from ray.core.generated.autoscaler_pb2 import AutoscalingState, GangResourceRequest


def _nodes(*cpus: float, gpus: float = 0) -> list[Node]:
    """A head with no CPUs, then worker nodes of ``cpus``, in zones a, b, c..."""
    head = Node("f" * 56, "10.0.0.1", 0, 0, {})
    workers = [
        Node(f"{i:056x}", f"10.0.0.{i + 2}", c, gpus, {"zone": "abcdefgh"[i]})
        for i, c in enumerate(cpus)
    ]
    return [head, *workers]


def test_two_single_cpu_workers_fit_two_single_cpu_nodes():
    assert check_placement(ScalingConfig(num_workers=2), 0, _nodes(1, 1)) == (
        "2 worker(s) of 1 CPU, PACK"
    )


def test_streaming_data_needs_a_whole_cpu_left_on_one_node():
    with pytest.raises(PlacementError, match=r"3 CPUs are needed, 2 there .*data.cache: true"):
        check_placement(ScalingConfig(num_workers=2), 1, _nodes(1, 1))
    # half-CPU workers: PACK puts both on one node and keeps the other free
    scaling = ScalingConfig(num_workers=2, cpus_per_worker=0.5)
    assert "1 CPU for the data tasks" in check_placement(scaling, 1, _nodes(1, 1))
    # STRICT_SPREAD leaves half a CPU on each node, no whole one for a task
    strict = ScalingConfig(num_workers=2, cpus_per_worker=0.5, placement_strategy="STRICT_SPREAD")
    with pytest.raises(PlacementError, match="no node of this cluster a free CPU"):
        check_placement(strict, 1, _nodes(1, 1))
    assert check_placement(strict, 1, _nodes(1, 1, 1))


@pytest.mark.parametrize(
    ("scaling", "nodes", "fits"),
    [
        (ScalingConfig(num_workers=2, placement_strategy="STRICT_PACK"), _nodes(1, 1), False),
        (ScalingConfig(num_workers=2, placement_strategy="STRICT_PACK"), _nodes(1, 2), True),
        (ScalingConfig(num_workers=3, placement_strategy="STRICT_SPREAD"), _nodes(2, 2), False),
        (ScalingConfig(num_workers=3, placement_strategy="SPREAD"), _nodes(2, 2), True),
        (ScalingConfig(num_workers=3, cpus_per_worker=1.5), _nodes(2, 2), False),
        (ScalingConfig(num_workers=2, use_gpu=True), _nodes(8, 8), False),
        (ScalingConfig(num_workers=2, use_gpu=True), _nodes(8, 8, gpus=1), True),
        (ScalingConfig(num_workers=1, label_selector={"zone": "b"}), _nodes(1, 1), True),
        (ScalingConfig(num_workers=2, label_selector={"zone": "b"}), _nodes(1, 1), False),
        (ScalingConfig(num_workers=2, label_selector={"zone": "!c"}), _nodes(1, 1), True),
    ],
)
def test_what_fits(scaling, nodes, fits):
    if fits:
        assert check_placement(scaling, 0, nodes)
    else:
        with pytest.raises(PlacementError, match="do not fit"):
            check_placement(scaling, 0, nodes)


def test_an_elastic_run_needs_room_for_its_minimum_only():
    elastic = ScalingConfig(num_workers=(2, 8))
    assert check_placement(elastic, 0, _nodes(1, 1)) == (
        "2 worker(s) of 1 CPU, PACK, growing to 8 as the cluster allows"
    )
    with pytest.raises(PlacementError, match="at least 2 worker"):
        check_placement(elastic, 0, _nodes(1))


def test_a_selector_nothing_matches_lists_the_labels_there_are():
    with pytest.raises(PlacementError, match=r"no node .* those labels .*'zone': 'b'"):
        check_placement(ScalingConfig(label_selector={"zone": "in(x,y)"}), 0, _nodes(1, 1))


@pytest.mark.parametrize(
    ("condition", "matched"),
    [("a", {"a"}), ("!a", {"b", "c", None}), ("in(a, b)", {"a", "b"}), ("!in(a,b)", {"c", None})],
)
def test_label_selector_conditions(condition, matched):
    for value in ("a", "b", "c", None):
        labels = {} if value is None else {"zone": value}
        assert selector_matches({"zone": condition}, labels) == (value in matched)


def test_a_malformed_selector_is_a_config_error():
    with pytest.raises(ValueError, match="label_selector"):
        ScalingConfig(label_selector={"zone": "in(a,"})


def test_the_autoscaler_judges_a_reservation_after_two_update_rounds():
    """Infeasible as soon as the autoscaler says so; feasible only once a round that
    certainly saw the request has passed without a word."""
    ours, other = "aa" * 18, "bb" * 18
    refused = GangResourceRequest(details=f"{ours}:PACK|PENDING")
    stale = GangResourceRequest(details=f"{other}:PACK|PENDING")

    def state(version, *infeasible):
        return AutoscalingState(
            autoscaler_state_version=version, infeasible_gang_resource_requests=infeasible
        )

    assert autoscaler_verdict(state(5, stale), ours, since_version=5) is None
    assert autoscaler_verdict(state(6, stale), ours, since_version=5) is None
    assert autoscaler_verdict(state(6, stale, refused), ours, since_version=5) is True
    assert autoscaler_verdict(state(7, stale), ours, since_version=5) is False
