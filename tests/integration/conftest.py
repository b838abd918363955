"""One local Ray runtime for the whole session."""

from __future__ import annotations

import pytest
import ray
from forgeml.runtime import RAY_ENV_DEFAULTS, forget_stale_cluster

from tests.conftest import S3_ENV, environment


@pytest.fixture(scope="session")
def ray_runtime():
    """The shared runtime. Four logical CPUs on two cores leave a slot for Ray Data
    beside two single-CPU training workers. S3 test credentials and forgeml's Ray
    settings are in the environment before Ray starts so that every worker inherits them."""
    with environment({**RAY_ENV_DEFAULTS, **S3_ENV}):
        # The dashboard serves the State API, which Ray Train's placement-group cleaner
        # queries to free the workers of a trial that Tune stopped.
        forget_stale_cluster()
        ray.init(address="local", num_cpus=4, include_dashboard=True, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
        ray.shutdown()
