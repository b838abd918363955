"""The ``serve`` section: the Ray Serve deployment of a registered model."""

from __future__ import annotations

from pydantic import Field, model_validator

from forgeml.config.base import Section


class AutoscalingConfig(Section):
    """Ray Serve autoscaling of each model deployment."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle.")
    max_replicas: int = Field(2, ge=1, description="Upper bound on replicas.")
    target_ongoing_requests: float = Field(
        16, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="Load must persist this long to add.")
    downscale_delay_s: float = Field(30.0, ge=0, description="Idle this long to remove.")
    look_back_period_s: float = Field(
        30.0,
        gt=10,
        description="The autoscaler averages ongoing requests over this window; replicas "
        "report every 10 s, so it must be longer.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) must be <= max_replicas ({self.max_replicas})"
            )
        return self


class TrafficConfig(Section):
    """What each model replica records of the traffic it serves, for drift monitoring:
    per served row the input summaries and predictions that reference.json holds, in
    Parquet files under <storage.root>/monitoring/<name>/v<N>/traffic/."""

    capture: bool = Field(True, description="Record served traffic.")
    sample_rate: float = Field(
        1.0, gt=0, le=1, description="Share of served rows recorded (a random draw per row)."
    )
    flush_interval_s: float = Field(
        60.0, gt=0, description="Seconds between writes of the rows a replica has recorded."
    )
    max_buffer_rows: int = Field(
        10_000, ge=1, description="Rows a replica holds between writes; the oldest are dropped."
    )
    payloads: bool = Field(
        False, description="Also record each row's raw instance (JSON); off: summaries only."
    )
    retention_hours: float = Field(
        168, gt=0, description="Recorded files older than this are deleted."
    )


class ServeConfig(Section):
    """How the registered model is served; stored in the package, overridable at deploy."""

    max_batch_size: int = Field(32, ge=1, description="Requests merged into one forward pass.")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="Longest wait for a batch to fill."
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Concurrent requests per replica.")
    max_queued_requests: int = Field(
        256,
        ge=1,
        description="Requests held for this model while its replicas are full, by each of "
        "Serve's proxies (its predict path) and each gateway replica (pinned versions, "
        "explanations); beyond it clients get 503 with Retry-After at once, not a wait.",
    )
    retry_after_s: int = Field(
        1, ge=0, description="Retry-After (seconds) of a 503 for a full queue."
    )
    cpus_per_replica: float = Field(1, gt=0, description="CPUs reserved per model replica.")
    gpus_per_replica: float = Field(0, ge=0, description="GPUs per model replica.")
    torch_threads: int = Field(1, ge=1, description="intra-op threads per model replica.")
    autoscaling: AutoscalingConfig = Field(
        default_factory=AutoscalingConfig, description="Replica autoscaling."
    )
    max_body_bytes: int = Field(4_000_000, ge=1024, description="Larger request bodies get 413.")
    max_instances: int = Field(256, ge=1, description="Instances allowed in one request.")
    traffic: TrafficConfig = Field(
        default_factory=TrafficConfig, description="Recording served traffic for drift checks."
    )
