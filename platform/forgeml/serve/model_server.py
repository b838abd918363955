"""The deployment that serves one registered model version.

``ModelServer`` loads the model package (weights plus the stored preprocessing, so
serving computes exactly what evaluation computed), batches concurrent requests with
``@serve.batch`` and hands served traffic to the drift monitor. The gateway reaches it
through deployment handles; its replica, batching and autoscaling settings come from
the package's ``serve`` section (``forgeml.serve.apps.model_deployment``).
"""

import logging

import numpy as np
import torch
from ray import serve

from forgeml.config import StorageConfig
from forgeml.explain import explain
from forgeml.model_package import load_model, package_config
from forgeml.monitor.traffic import TrafficRecorder
from forgeml.serve.metrics import batch_size_histogram
from forgeml.storage import ModelRegistry, Storage

logger = logging.getLogger(__name__)


@serve.deployment
class ModelServer:
    """One registered model version: its preprocessing, its module, batched inference."""

    def __init__(self, ref: str, storage: dict, overrides: list[str]):
        storage = Storage(StorageConfig(**storage))
        registry = ModelRegistry(storage)
        self.loaded = load_model(registry, ref)
        cfg = package_config(registry, self.loaded.version, overrides).serve
        torch.set_num_threads(cfg.torch_threads)
        self.predict.set_max_batch_size(cfg.max_batch_size)
        self.predict.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batch_maps = batch_size_histogram(self.loaded.version)
        self.traffic = (
            TrafficRecorder(storage, self.loaded.version, cfg.traffic)
            if cfg.traffic.capture
            else None
        )

    async def infer(self, instances: list) -> dict:
        """Predictions for one request's instances, or the reason they are not valid input.

        Instances are checked here, one request at a time, so a bad one never fails the
        batch it would have joined."""
        try:
            columns = self.loaded.preprocessor.request_columns(instances)
        except ValueError as exc:
            return {"error": str(exc)}
        predictions = await self.predict(columns)
        return {"predictions": self.loaded.task.prediction_records(predictions)}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def predict(self, requests: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Each request's predictions (raw columns in), in one forward pass for the batch."""
        sizes = [len(next(iter(columns.values()))) for columns in requests]
        self.batch_maps.observe(sum(sizes))
        merged = {name: np.concatenate([r[name] for r in requests]) for name in requests[0]}
        inputs = self.loaded.preprocessor.transform(merged)["inputs"]
        with torch.inference_mode():
            predictions = self.loaded.task.predict(self.loaded.model(torch.from_numpy(inputs)))
        predictions = predictions.numpy()
        if self.traffic:
            self._record(merged, inputs, predictions)
        return np.split(predictions, np.cumsum(sizes)[:-1])

    def _record(self, columns: dict, inputs: np.ndarray, predictions: np.ndarray) -> None:
        """Hand a batch to the traffic recorder; a failure there never fails a request."""
        try:
            instances = None
            if self.traffic.settings.payloads:
                rows = len(predictions)
                instances = [
                    {name: np.asarray(values[i]).tolist() for name, values in columns.items()}
                    for i in range(rows)
                ]
            self.traffic.record(
                self.loaded.preprocessor.input_summary(inputs),
                self.loaded.task.drift_values(predictions),
                instances,
            )
        except Exception:
            logger.exception("recording served traffic failed")

    def __del__(self):
        if getattr(self, "traffic", None):
            self.traffic.close()

    def explain(self, instances: list, target: str | None) -> dict:
        """Explanations of one request's instances (not batched: a few rows at a time)."""
        try:
            columns = self.loaded.preprocessor.request_columns(instances)
            return {"explanations": explain(self.loaded, columns, target)}
        except ValueError as exc:
            return {"error": str(exc)}

    def ready(self) -> str:
        """This replica's model ref, once it has loaded (the gateway's readiness probe)."""
        return self.loaded.version.ref
