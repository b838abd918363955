"""Which Ray runtime a job runs on: the cluster it was submitted to, or an embedded one.

``ray.init()`` with no address joins ``RAY_ADDRESS`` (set by ``ray job submit``) or a
``ray start`` cluster on this machine, and otherwise starts an embedded local runtime.
"""

from __future__ import annotations

import logging
import os

import ray

logger = logging.getLogger(__name__)


def connect() -> None:
    """Join or start Ray once per process; quiet Ray Data's progress bars in logs."""
    if ray.is_initialized():
        return
    joined = os.environ.get("RAY_ADDRESS")
    ray.init(configure_logging=True, logging_level=logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = ray.cluster_resources()
    logger.info(
        "ray %s: %s with %g CPUs, %g GPUs",
        ray.__version__,
        f"joined {joined}" if joined else "runtime ready",
        resources.get("CPU", 0),
        resources.get("GPU", 0),
    )
