"""The deployment that serves one registered model version.

``ModelServer`` loads the model package (weights plus the stored preprocessing, so
serving computes exactly what evaluation computed), batches concurrent requests with
``@serve.batch`` and hands served traffic to the drift monitor. Its replica, batching
and autoscaling settings come from the package's ``serve`` section
(``forgeml.serve.apps.model_app``).

Predictions of the newest served version of a model reach it straight from Serve's
HTTP ingress: the deployer mounts its application at ``/v1/models/<name>/predict``
(``forgeml.serve.deploy``), where its own HTTP app checks the token, the body and the
instances as the gateway does. Everything else (pinned versions, explanations, the
model list, readiness) goes through the gateway, which calls it by deployment handle.
"""

import logging

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.security import HTTPAuthorizationCredentials
from ray import serve

import forgeml
from forgeml.config import StorageConfig
from forgeml.explain import explain
from forgeml.model_package import load_model, package_config
from forgeml.monitor.traffic import TrafficRecorder
from forgeml.serve.auth import Access, authorise, bearer_credentials
from forgeml.serve.http import (
    PrefixAsRoot,
    RequestAccounting,
    add_error_handlers,
    answer_or_refuse,
    limit_instances,
)
from forgeml.serve.metrics import RequestMetrics, batch_size_histogram
from forgeml.serve.schemas import ErrorResponse, PredictRequest, PredictResponse
from forgeml.storage import ModelRegistry, Storage

logger = logging.getLogger(__name__)

#: The public path of a model's predictions, under the gateway's route prefix.
PREDICT_ROUTE = "/v1/models/{name}/predict"


@serve.deployment
@serve.ingress()
class ModelServer:
    """One registered model version: its preprocessing, its module, batched inference."""

    def __init__(self, ref: str, storage: dict, overrides: list[str], access: Access | None):
        storage = Storage(StorageConfig(**storage))
        registry = ModelRegistry(storage)
        self.loaded = load_model(registry, ref)
        cfg = package_config(registry, self.loaded.version, overrides).serve
        self.access = access
        self.max_body_bytes = cfg.max_body_bytes
        self.max_instances = cfg.max_instances
        torch.set_num_threads(cfg.torch_threads)
        self.predict.set_max_batch_size(cfg.max_batch_size)
        self.predict.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.batch_maps = batch_size_histogram(self.loaded.version)
        self.traffic = (
            TrafficRecorder(storage, self.loaded.version, cfg.traffic)
            if cfg.traffic.capture
            else None
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this on each replica after ``__init__``: the HTTP app of the
        model's own predict route (used where the deployer mounts it)."""
        api = FastAPI(
            title=f"forgeml {self.loaded.version.ref}",
            version=forgeml.__version__,
            responses={code: {"model": ErrorResponse} for code in (401, 403, 413, 422)},
        )
        api.add_middleware(
            RequestAccounting,
            max_body_bytes=self.max_body_bytes,
            metrics=RequestMetrics(),
            route=PREDICT_ROUTE,
        )
        api.add_middleware(PrefixAsRoot)
        add_error_handlers(api)
        api.add_api_route(
            "/", self.predict_request, methods=["POST"], response_model=PredictResponse
        )
        return api

    async def predict_request(
        self,
        body: PredictRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer_credentials),
    ) -> PredictResponse:
        """POST /v1/models/<name>/predict, straight from Serve's HTTP ingress."""
        name, version = self.loaded.version.name, f"v{self.loaded.version.version}"
        request.state.model, request.state.version = name, version
        authorise(self.access, credentials, "predict", name)
        limit_instances(len(body.instances), self.max_instances)
        result = answer_or_refuse(await self.infer(body.instances))
        return PredictResponse(model=name, version=version, predictions=result["predictions"])

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
