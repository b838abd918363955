"""The metrics serving exports through Ray's metrics agent.

Prometheus sees them with the ``ray_`` prefix: ``ray_forgeml_requests_total`` and
``ray_forgeml_request_latency_s`` from the gateway, ``ray_forgeml_batch_maps`` from each
model replica. Create them inside a Serve replica, not in the driver.
"""

from ray.serve import metrics

from forgeml.storage import ModelVersion

LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class RequestMetrics:
    """Request counts by route, model, version and status code, and their latency."""

    def __init__(self):
        tags = ("route", "model", "version", "code")
        self.requests = metrics.Counter(
            "forgeml_requests", description="HTTP requests by outcome.", tag_keys=tags
        )
        self.latency = metrics.Histogram(
            "forgeml_request_latency_s",
            description="Time from request to response in the gateway.",
            boundaries=LATENCY_BUCKETS_S,
            tag_keys=tags,
        )

    def record(self, state: dict, route: str, code: int, seconds: float) -> None:
        """Count one answered request; ``state`` is the request's scope state, where the
        gateway notes the model and version it routed to."""
        tags = {
            "route": route,
            "model": state.get("model", ""),
            "version": state.get("version", ""),
            "code": str(code),
        }
        self.requests.inc(tags=tags)
        self.latency.observe(seconds, tags=tags)


def batch_size_histogram(version: ModelVersion) -> metrics.Histogram:
    """Instances per batched forward pass of one model version."""
    histogram = metrics.Histogram(
        "forgeml_batch_maps",
        description="Instances per batched forward pass.",
        boundaries=BATCH_BUCKETS,
        tag_keys=("model", "version"),
    )
    histogram.set_default_tags({"model": version.name, "version": f"v{version.version}"})
    return histogram
