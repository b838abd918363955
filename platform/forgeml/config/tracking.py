"""The ``tracking`` section: where runs log params, metrics and artifacts."""

from __future__ import annotations

from pydantic import Field

from forgeml.config.base import Section


class MlflowConfig(Section):
    """An MLflow tracking store: every run logs its params, per-epoch metrics, test
    metrics and model package there."""

    tracking_uri: str | None = Field(
        None,
        description="http(s):// server, sqlite:///file.db or a folder. Null: "
        "$MLFLOW_TRACKING_URI, else sqlite:///<storage.root>/mlflow.db (local roots only).",
    )
    experiment: str | None = Field(None, description="MLflow experiment; null: `name`.")


class TrackingConfig(Section):
    tensorboard: bool = Field(
        True, description="Write TensorBoard event files into the run's tensorboard/ folder."
    )
    mlflow: MlflowConfig | None = Field(
        None, description="Log to MLflow too; `{}` for the defaults, null: off."
    )
