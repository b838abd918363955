"""Reading back what a run logged: TensorBoard event files and MLflow runs."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient
from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer


def tensorboard_scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag under ``folder`` (all its event files and sub-folders, as
    TensorBoard merges them) to its (step, value) points in step order."""
    multiplexer = EventMultiplexer().AddRunsFromDirectory(str(folder)).Reload()
    points: dict[str, dict[int, float]] = {}
    for run in multiplexer.Runs():
        accumulator = multiplexer.GetAccumulator(run)
        for tag in accumulator.Tags()["scalars"]:
            for event in accumulator.Scalars(tag):
                points.setdefault(tag, {})[event.step] = event.value
    return {tag: sorted(values.items()) for tag, values in points.items()}


def mlflow_client(store: Path) -> MlflowClient:
    """A client of a storage root's default sqlite store."""
    return MlflowClient(f"sqlite:///{store}/mlflow.db")


def mlflow_runs(store: Path, experiment: str) -> list:
    """The runs of an MLflow experiment in a storage root's default sqlite store."""
    client = mlflow_client(store)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []
