"""One local Ray runtime for the whole session."""

from __future__ import annotations

import pytest
import ray
from forgeml.runtime import (
    RAY_ENV_DEFAULTS,
    environment,
    forget_stale_cluster,
    shutdown,
    start_embedded_runtime,
)

from tests.conftest import S3_ENV


@pytest.fixture(scope="session")
def ray_runtime():
    """The shared runtime (its ``ray.init`` context). Four logical CPUs on two cores
    leave a slot for Ray Data beside two single-CPU training workers. S3 test credentials
    and forgeml's Ray settings are in the environment before Ray starts so that every
    worker inherits them. Started as forgeml starts an embedded runtime, with its own
    State API server, which Ray Train's placement-group cleaner queries to free the
    workers of a trial that Tune stopped, while other Ray clusters run on the machine."""
    with environment({**RAY_ENV_DEFAULTS, **S3_ENV}):
        forget_stale_cluster()
        context = start_embedded_runtime(num_cpus=4, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield context
        shutdown()
