"""Before a run launches: can the cluster hold its workers and the data tasks that feed them?

Ray queues a placement group or a task that does not fit and waits for the cluster to
grow; on a cluster that cannot grow, a run whose workers take every CPU its data tasks
need hangs with no error. So the driver checks the plan against the cluster's nodes
first and refuses, with the numbers, what could never run:

- each worker is a bundle of ``scaling.cpus_per_worker`` CPUs (and a GPU with
  ``use_gpu``) on a node that ``scaling.label_selector`` accepts, placed as
  ``scaling.placement_strategy`` says (STRICT_PACK: one node; STRICT_SPREAD: a node
  each; PACK and SPREAD: wherever they fit);
- a run that streams its splits from storage every epoch (``data.cache: false``) runs
  Ray Data read and transform tasks of one CPU each beside its workers, so one node must
  keep a CPU free once the workers are placed. Cached splits are read from the object
  store and augmented on the workers (train/augment.py): they need no CPU of their own.

An elastic run (``scaling.num_workers: [min, max]``) is checked at its minimum: Ray
starts it with as many workers as the nodes hold, up to the maximum.

The check reads the nodes' total resources: a run that fits waits while other work
holds them, as Ray does. A cluster with an autoscaler can add nodes, so a run its present
nodes cannot hold is put to the autoscaler instead, which alone knows its node types
(KubeRay's worker groups): the workers' bundles are reserved as a placement group, and
if the autoscaler marks it infeasible (a GPU worker on a CPU-only cluster, more CPUs per
worker than any node type has) the run is refused instead of waiting forever for a node
that never comes. Otherwise the reservation is held until the nodes the autoscaler adds
for it are up, then released for the run's own.
"""

from __future__ import annotations

import logging
import math
import time

from ray.util.placement_group import placement_group, remove_placement_group

from forgeml.config import ScalingConfig
from forgeml.runtime import Node, autoscaler_state, cluster_nodes

logger = logging.getLogger(__name__)

#: CPUs of one Ray Data read or map task (Ray Data's default ``num_cpus``).
DATA_TASK_CPUS = 1.0

#: How long the pre-launch check waits for the nodes the autoscaler adds for the
#: workers (cloud VMs or Kubernetes pods take minutes) before it lets the run wait for
#: them itself.
AUTOSCALER_WAIT_S = 600.0


class PlacementError(ValueError):
    """The cluster can never hold the run as configured."""


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Ray's label selector semantics: ``value``, ``!value``, ``in(a,b)``, ``!in(a,b)``;
    a negated condition also holds where the node lacks the label."""
    for key, condition in selector.items():
        negated = condition.startswith("!")
        condition = condition.removeprefix("!")
        if condition.startswith("in(") and condition.endswith(")"):
            allowed = {value.strip() for value in condition[3:-1].split(",")}
        else:
            allowed = {condition}
        if (labels.get(key) in allowed) == negated:
            return False
    return True


def _bundles_on(node: Node, scaling: ScalingConfig, reserved_cpus: float) -> int:
    """How many worker bundles fit on ``node`` with ``reserved_cpus`` kept free."""
    fit = math.floor((node.cpus - reserved_cpus) / scaling.cpus_per_worker + 1e-9)
    if scaling.use_gpu:
        fit = min(fit, math.floor(node.gpus + 1e-9))
    return max(fit, 0)


def _workers_fit(scaling: ScalingConfig, capacities: list[int]) -> bool:
    workers = scaling.min_workers
    if scaling.placement_strategy == "STRICT_PACK":
        return max(capacities, default=0) >= workers
    if scaling.placement_strategy == "STRICT_SPREAD":
        return sum(1 for c in capacities if c >= 1) >= workers
    return sum(capacities) >= workers


def check_placement(scaling: ScalingConfig, data_cpus: float, nodes: list[Node]) -> str:
    """The plan in one line, or PlacementError saying why ``nodes`` can never hold it.

    ``data_cpus`` is what one node must keep free beside the workers for data tasks.
    """
    workers = scaling.min_workers
    bundle = f"{scaling.cpus_per_worker:g} CPU" + (" + 1 GPU" if scaling.use_gpu else "")
    selector = scaling.label_selector or {}
    eligible = [n for n in nodes if selector_matches(selector, n.labels)]
    listing = "; ".join(n.describe() for n in nodes)
    if not eligible:
        raise PlacementError(
            f"scaling.label_selector {selector}: no node of this cluster has those labels "
            f"(nodes: {'; '.join(f'{n.node_id[:8]} {n.labels}' for n in nodes)})"
        )
    capacities = [_bundles_on(n, scaling, 0) for n in eligible]
    if not _workers_fit(scaling, capacities):
        where = (
            f"{len(eligible)} node(s) that scaling.label_selector accepts"
            if selector
            else (f"{len(nodes)} node(s)")
        )
        raise PlacementError(
            f"scaling: {'at least ' if scaling.elastic else ''}{workers} worker(s) of "
            f"{bundle} placed {scaling.placement_strategy} "
            f"do not fit this cluster's {where}, which hold {sum(capacities)} such "
            f"worker(s) in all, at most {max(capacities)} on one node ({listing}). Lower "
            "scaling.num_workers or scaling.cpus_per_worker, relax "
            "scaling.placement_strategy, or add nodes"
        )
    plan = f"{workers} worker(s) of {bundle}, {scaling.placement_strategy}"
    if scaling.elastic:
        plan += f", growing to {scaling.max_workers} as the cluster allows"
    if data_cpus <= 0:
        return plan
    for spare in nodes:
        if spare.cpus + 1e-9 < data_cpus:
            continue
        kept = [
            _bundles_on(n, scaling, data_cpus if n.node_id == spare.node_id else 0)
            for n in eligible
        ]
        if _workers_fit(scaling, kept):
            return f"{plan}, and {data_cpus:g} CPU for the data tasks"
    needed = workers * scaling.cpus_per_worker + data_cpus
    raise PlacementError(
        f"scaling: {workers} worker(s) of {bundle} leave no node of this cluster a free "
        f"CPU for the Ray Data tasks that stream the splits every epoch (data.cache: "
        f"false), which would wait forever: {needed:g} CPUs are needed, "
        f"{sum(n.cpus for n in nodes):g} there ({listing}). Set data.cache: true (the "
        "splits then stay in the object store), lower scaling.num_workers or "
        "scaling.cpus_per_worker, or add a node"
    )


def autoscaler_verdict(state, placement_group_id: str, since_version: int) -> bool | None:
    """What an autoscaler state says of a reservation made when its version was
    ``since_version``: True once marked infeasible, False once two update rounds have
    passed without that (the first may predate the request), None before."""
    if any(
        request.details.startswith(placement_group_id)
        for request in state.infeasible_gang_resource_requests
    ):
        return True
    return False if state.autoscaler_state_version >= since_version + 2 else None


def _refused_by_autoscaler(scaling: ScalingConfig) -> bool:
    """Whether the cluster's autoscaler marks the run's worker group infeasible. A group
    it can hold is kept reserved until its nodes are up, so that the data preparation
    that comes next uses them rather than asking for more."""
    bundle = {"CPU": scaling.cpus_per_worker, **({"GPU": 1} if scaling.use_gpu else {})}
    workers = scaling.min_workers
    selector = [scaling.label_selector] * workers if scaling.label_selector else None
    since = autoscaler_state().autoscaler_state_version
    group = placement_group(
        [bundle] * workers,
        strategy=scaling.placement_strategy,
        bundle_label_selector=selector,
    )
    try:
        deadline = time.monotonic() + AUTOSCALER_WAIT_S
        judged = False
        while not group.wait(timeout_seconds=0.5):
            if not judged:
                verdict = autoscaler_verdict(autoscaler_state(), group.id.hex(), since)
                if verdict:
                    return True
                if verdict is False:
                    judged = True
                    logger.info("placement: the autoscaler adds nodes for the workers")
            if time.monotonic() > deadline:
                logger.warning("placement: the workers' nodes are not up yet; the run waits")
                break
        return False
    finally:
        remove_placement_group(group)


def plan_placement(scaling: ScalingConfig, streams_data: bool) -> None:
    """Check the connected cluster before a run launches; PlacementError if it never fits."""
    nodes = cluster_nodes()
    try:
        plan = check_placement(scaling, DATA_TASK_CPUS if streams_data else 0.0, nodes)
    except PlacementError as error:
        if autoscaler_state() is None:
            raise
        if _refused_by_autoscaler(scaling):
            raise PlacementError(
                f"{error}. The cluster's autoscaler cannot add such nodes either: none of "
                "its node types holds these workers"
            ) from None
        return
    logger.info("placement: %s", plan)
    if streams_data and scaling.elastic:
        logger.warning(
            "placement: an elastic group grows to every worker the nodes hold, up to "
            "%d; streamed splits then wait for a CPU unless one stays free beside them "
            "(set data.cache: true, or a maximum below what the cluster holds)",
            scaling.max_workers,
        )
    if not streams_data and len(nodes) > 1:
        try:
            check_placement(scaling, DATA_TASK_CPUS, nodes)
        except PlacementError:
            logger.warning(
                "placement: the workers leave no CPU free on any node; if a node is lost, "
                "Ray cannot rebuild the cached blocks it held and the restarted run waits "
                "until a node with a free CPU joins"
            )
