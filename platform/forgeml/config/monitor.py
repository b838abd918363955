"""The ``monitor`` section: drift tests on served traffic and the retraining they trigger."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from forgeml.config.base import Section


class RetrainConfig(Section):
    """What a drift alarm starts: the registered model's experiment trained again, with
    ``append`` added to its data (``data.append``), registering the next version."""

    append: list[str] = Field(
        default_factory=list,
        description="Newly labelled data (files or folders in the source's format) to add.",
    )
    submit_to: Literal["ray", "kubernetes"] = Field(
        "ray",
        description="ray: a Ray job through the Jobs API of `ray_address`; kubernetes: a "
        "RayJob (from the Helm chart's retrain template) created with the Kubernetes API.",
    )
    ray_address: str | None = Field(
        None,
        description="Ray dashboard address (http://host:8265); null: $RAY_ADDRESS, else the "
        "runtime this job runs on.",
    )
    namespace: str | None = Field(
        None,
        description="Kubernetes namespace of the RayJob; null: the pod's own (in a cluster), "
        "else default.",
    )
    rayjob_template: str = Field(
        "/etc/forgeml-retrain/rayjob.yaml",
        description="The RayJob manifest the Helm chart renders for retraining "
        "(retrain.enabled mounts it on the standing cluster's head).",
    )


class MonitorConfig(Section):
    """Drift checks of served traffic against the package's reference.json."""

    window_minutes: float = Field(60, gt=0, description="Recorded traffic compared, back from now.")
    min_rows: int = Field(200, ge=10, description="Fewer recorded rows than this: no verdict.")
    psi_threshold: float = Field(
        0.2, gt=0, description="Population stability index from which a shift counts (0.2: large)."
    )
    p_value: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Family-wise significance: a value drifts if its test's p-value is below "
        "p_value / values tested (Bonferroni) and its PSI reaches psi_threshold.",
    )
    retrain: RetrainConfig | None = Field(
        None, description="Retraining on an alarm (once per model version); null: report only."
    )
