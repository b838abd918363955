"""The Ray Serve applications: a FastAPI gateway in front of one application per model version.

    GET  /healthz                                   liveness (no auth)
    GET  /readyz                                    every model replica answers (no auth)
    GET  /v1/models                                 served models and versions
    POST /v1/models/{name}/predict                  newest served version of a model
    POST /v1/models/{name}/versions/{version}/predict
    POST /v1/models/{name}/explain                  Grad-CAM or Integrated Gradients
    POST /v1/models/{name}/versions/{version}/explain

Each model version's ``ModelServer`` loads its package (weights plus the stored
preprocessing, so serving computes exactly what evaluation computed), batches concurrent
requests with ``@serve.batch`` and autoscales by the package's ``serve`` section. The
gateway's routing table is its ``user_config``, so a new version is switched in place
(``forgeml.serve.deploy``). Every error is a JSON body with a code, a message and the
request id; no stack trace leaves the server.

No ``from __future__ import annotations`` here: Serve re-wraps the ingress methods, and
FastAPI could then no longer resolve string annotations of their parameters.
"""

import asyncio
import logging
import os
import secrets
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from ray import serve
from ray.serve import Application, Deployment, metrics
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

import forgeml
from forgeml.config import ServeConfig, StorageConfig
from forgeml.explain import explain
from forgeml.model_package import load_model, package_config
from forgeml.monitor.traffic import TrafficRecorder
from forgeml.serve.schemas import (
    ErrorResponse,
    ExplainRequest,
    ExplainResponse,
    ModelInfo,
    PredictRequest,
    PredictResponse,
)
from forgeml.storage import ModelRegistry, Storage

logger = logging.getLogger(__name__)

TOKEN_ENV = "FORGEML_SERVE_TOKEN"
TOKEN_FILE_ENV = "FORGEML_SERVE_TOKEN_FILE"
REQUEST_ID_HEADER = "X-Request-ID"


#: Longest wait, when the routing changes, for new versions to answer and old calls to end.
SWITCH_TIMEOUT_S = 300.0
#: Instances one /explain request may hold: each costs tens of forward and backward passes.
MAX_EXPLAIN_INSTANCES = 16
#: Longest wait of /readyz for each model version.
READY_TIMEOUT_S = 10.0


def read_token(auth: bool) -> str | None:
    """The bearer token from FORGEML_SERVE_TOKEN or the file FORGEML_SERVE_TOKEN_FILE names."""
    if not auth:
        return None
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token and os.environ.get(TOKEN_FILE_ENV):
        token = Path(os.environ[TOKEN_FILE_ENV]).read_text().strip()
    if not token:
        raise ValueError(
            f"serving needs a bearer token: set {TOKEN_ENV} or {TOKEN_FILE_ENV} "
            "(or serve without authentication with --no-auth)"
        )
    return token


# -------------------------------------------------------------------------- metrics

LATENCY_BUCKETS_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]


class GatewayMetrics:
    """Request counts by route, model, version and status code, and latency, exported
    through Ray's metrics agent (Prometheus names get the ``ray_`` prefix)."""

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
        tags = {
            "route": route,
            "model": state.get("model", ""),
            "version": state.get("version", ""),
            "code": str(code),
        }
        self.requests.inc(tags=tags)
        self.latency.observe(seconds, tags=tags)


# --------------------------------------------------------------------------- models


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
        version = self.loaded.version
        self.batch_maps = metrics.Histogram(
            "forgeml_batch_maps",
            description="Instances per batched forward pass.",
            boundaries=BATCH_BUCKETS,
            tag_keys=("model", "version"),
        )
        self.batch_maps.set_default_tags({"model": version.name, "version": f"v{version.version}"})
        self.traffic = (
            TrafficRecorder(storage, version, cfg.traffic) if cfg.traffic.capture else None
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
        return self.loaded.version.ref


# ---------------------------------------------------------------------------- gateway

api = FastAPI(
    title="forgeml",
    version=forgeml.__version__,
    description="Predictions from registered forgeml model packages.",
    responses={
        401: {"model": ErrorResponse},
        404: {"model": ErrorResponse},
        413: {"model": ErrorResponse},
        422: {"model": ErrorResponse},
    },
)
bearer = HTTPBearer(auto_error=False)


def _error(request: Request, code: int, message: str, headers: dict | None = None):
    request_id = getattr(request.state, "request_id", "")
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    # Serve's proxy already puts the request id into the X-Request-ID response header.
    return JSONResponse(body, status_code=code, headers=headers)


class RequestLimits:
    """Pure ASGI middleware: request ids, metrics, and a hard limit on body size (413).

    Serve's proxy puts the request id into the X-Request-ID header of both the request
    and the response; error bodies repeat it so a client can quote it.

    It reads the body itself, up to the limit, before the app sees it, so an oversize
    or unterminated body never reaches JSON parsing.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        app_state = scope["app"].state
        limit = app_state.max_body_bytes
        status = {"code": 500}
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(REQUEST_ID_HEADER.lower().encode(), b"").decode()[:128]
        scope.setdefault("state", {})["request_id"] = request_id or uuid.uuid4().hex
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                response = _error(Request(scope), 413, f"request body exceeds {limit} bytes")
                await response(scope, receive, send)
                app_state.metrics.record(scope["state"], "", 413, time.perf_counter() - started)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_recording_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, replay, send_recording_status)
        finally:
            route = getattr(scope.get("route"), "path", "")
            app_state.metrics.record(
                scope["state"], route, status["code"], time.perf_counter() - started
            )


api.add_middleware(RequestLimits)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    errors = exc.errors()
    if any(item["type"] == "json_invalid" for item in errors):
        return _error(request, 422, "request body is not valid JSON")
    problems = [
        f"{'.'.join(str(p) for p in item['loc'] if p != 'body') or 'body'}: {item['msg']}"
        for item in errors[:3]
    ]
    if len(errors) > 3:
        problems.append(f"and {len(errors) - 3} more problems")
    return _error(request, 422, "; ".join(problems))


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException):
    return _error(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception):
    logger.exception("request %s failed", getattr(request.state, "request_id", ""))
    return _error(request, 500, "internal error; the request id identifies it in the logs")


# Structured access logs: Serve writes one JSON line per request, request id included.
ACCESS_LOGS = {"encoding": "JSON", "enable_access_log": True}


class Route(BaseModel):
    """One served model version: the Serve application running it and what clients see."""

    app: str
    info: ModelInfo
    max_instances: int = Field(ge=1)

    @property
    def ref(self) -> str:
        return f"{self.info.name}:{self.info.version}"


class RoutingTable(BaseModel):
    """The gateway's ``user_config``: the model versions it routes to."""

    routes: list[Route] = Field(default_factory=list)


@serve.deployment(max_ongoing_requests=256, logging_config=ACCESS_LOGS)
@serve.ingress(api)
class Gateway:
    """Routes requests to model versions, checks tokens, validates inputs."""

    def __init__(self, token: str | None, max_body_bytes: int):
        self.token = token
        api.state.max_body_bytes = max_body_bytes
        api.state.metrics = GatewayMetrics()
        self.routes: dict[str, Route] = {}
        self.handles: dict[str, DeploymentHandle] = {}
        self.latest: dict[str, str] = {}
        self.in_flight: Counter[str] = Counter()

    async def reconfigure(self, table: dict) -> None:
        """Switch to a new routing table without failing a request.

        Versions new to the table must answer before traffic moves to them; if one does
        not within SWITCH_TIMEOUT_S, the old table stays (the deployer sees that in
        ``routed_apps`` and reports it). Calls still running on versions that left the
        table finish before this returns. Serve applies a ``user_config`` change in
        place, on every replica, and the deployer only deletes a model's application
        after that, so no call can reach a deleted one.
        """
        routes = {route.ref: route for route in RoutingTable.model_validate(table).routes}
        handles = {
            # No existence check: it blocks this event loop, and in a Serve config file
            # the model's application may still be starting; ready() waits for it.
            ref: self.handles.get(ref)
            or serve.get_deployment_handle("ModelServer", route.app, _check_exists=False)
            for ref, route in routes.items()
        }
        new = routes.keys() - self.routes.keys()
        try:
            await asyncio.wait_for(
                asyncio.gather(*(handles[ref].ready.remote() for ref in new)),
                timeout=SWITCH_TIMEOUT_S,
            )
        except Exception:
            logger.exception("new model versions %s did not answer; routes unchanged", new)
            return
        dropped = self.routes.keys() - routes.keys()
        self.routes, self.handles = routes, handles
        newest_first = sorted(routes.values(), key=lambda r: int(r.info.version[1:]), reverse=True)
        self.latest = {}
        for route in newest_first:
            self.latest.setdefault(route.info.name, route.ref)
        deadline = time.monotonic() + SWITCH_TIMEOUT_S
        while any(self.in_flight[ref] for ref in dropped):
            if time.monotonic() > deadline:
                busy = {ref: self.in_flight[ref] for ref in dropped if self.in_flight[ref]}
                logger.warning("calls still running on dropped versions: %s", busy)
                return
            await asyncio.sleep(0.02)

    def routed_apps(self) -> list[str]:
        """The model applications this gateway sends traffic to (the deployer keeps these)."""
        return [route.app for route in self.routes.values()]

    def _authorize(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self.token is None:
            return
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        if not secrets.compare_digest(credentials.credentials.encode(), self.token.encode()):
            raise HTTPException(401, "invalid bearer token", {"WWW-Authenticate": "Bearer"})

    @api.get("/healthz")
    async def healthz(self) -> dict:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        if not self.routes:
            return JSONResponse({"status": "not ready", "reason": "no models routed"}, 503)
        try:
            for ref, handle in list(self.handles.items()):
                self.in_flight[ref] += 1  # a routing switch waits for this call too
                try:
                    await asyncio.wait_for(handle.ready.remote(), READY_TIMEOUT_S)
                finally:
                    self.in_flight[ref] -= 1
        except Exception as exc:  # any replica failure or a timeout means not ready
            return JSONResponse({"status": "not ready", "reason": type(exc).__name__}, 503)
        return JSONResponse({"status": "ready", "models": sorted(self.routes)})

    @api.get("/v1/models", response_model=list[ModelInfo])
    async def list_models(
        self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)
    ) -> list[ModelInfo]:
        self._authorize(credentials)
        return [route.info for route in self.routes.values()]

    @api.post("/v1/models/{name}/predict", response_model=PredictResponse)
    async def predict_latest(
        self,
        name: str,
        body: PredictRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> PredictResponse:
        self._authorize(credentials)
        if name not in self.latest:
            raise HTTPException(404, f"no served model named {name!r}; see /v1/models")
        return await self._predict(self.latest[name], body, request)

    @api.post("/v1/models/{name}/versions/{version}/predict", response_model=PredictResponse)
    async def predict_version(
        self,
        name: str,
        version: str,
        body: PredictRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> PredictResponse:
        self._authorize(credentials)
        return await self._predict(self._served(name, version), body, request)

    @api.post("/v1/models/{name}/explain", response_model=ExplainResponse)
    async def explain_latest(
        self,
        name: str,
        body: ExplainRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> ExplainResponse:
        self._authorize(credentials)
        if name not in self.latest:
            raise HTTPException(404, f"no served model named {name!r}; see /v1/models")
        return await self._explain(self.latest[name], body, request)

    @api.post("/v1/models/{name}/versions/{version}/explain", response_model=ExplainResponse)
    async def explain_version(
        self,
        name: str,
        version: str,
        body: ExplainRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer),
    ) -> ExplainResponse:
        self._authorize(credentials)
        return await self._explain(self._served(name, version), body, request)

    def _served(self, name: str, version: str) -> str:
        ref = f"{name}:{version}"
        if ref not in self.routes:
            served = sorted(r for r in self.routes if r.startswith(f"{name}:"))
            raise HTTPException(404, f"model version {ref!r} is not served; served: {served}")
        return ref

    async def _call(self, ref: str, request: Request, limit: int, method: str, *args) -> dict:
        """One model call for ``ref``, counted in flight so a routing switch waits for it;
        a 413 beyond ``limit`` instances, a 422 for what the model refuses."""
        # No await until the call is counted in flight: a routing switch waits for it.
        route, handle = self.routes[ref], self.handles[ref]
        request.state.model, request.state.version = route.info.name, route.info.version
        count = len(args[0])
        if count > limit:
            raise HTTPException(413, f"{count} instances exceed the limit of {limit}")
        self.in_flight[ref] += 1
        try:
            result = await getattr(handle, method).remote(*args)
        finally:
            self.in_flight[ref] -= 1
        if "error" in result:
            raise HTTPException(422, result["error"])
        return result

    async def _predict(self, ref: str, body: PredictRequest, request: Request) -> PredictResponse:
        # Read before awaiting: a routing switch may drop ``ref`` while the call runs.
        route = self.routes[ref]
        result = await self._call(ref, request, route.max_instances, "infer", body.instances)
        info = route.info
        return PredictResponse(
            model=info.name, version=info.version, predictions=result["predictions"]
        )

    async def _explain(self, ref: str, body: ExplainRequest, request: Request) -> ExplainResponse:
        route = self.routes[ref]  # before awaiting, as in _predict
        limit = min(route.max_instances, MAX_EXPLAIN_INSTANCES)
        result = await self._call(ref, request, limit, "explain", body.instances, body.target)
        info = route.info
        return ExplainResponse(
            model=info.name, version=info.version, explanations=result["explanations"]
        )


# ---------------------------------------------------------------------------- builders


class ModelAppArgs(BaseModel):
    """One model version's Serve application (``forgeml.serve.app:build_model_app``)."""

    model: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*:v[0-9]+$", description="Pinned ref name:vN.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    overrides: list[str] = Field(
        default_factory=list, description="serve.* overrides applied to the package's config."
    )


class GatewayArgs(BaseModel):
    """The gateway application (``import_path: forgeml.serve.app:build_gateway``).

    Which versions it routes to is its ``user_config``, a ``RoutingTable``."""

    auth: bool = Field(True, description="Require a bearer token on /v1 routes.")
    max_body_bytes: int = Field(ServeConfig().max_body_bytes, ge=1024)


def model_deployment(args: ModelAppArgs) -> Deployment:
    """``ModelServer`` with the replica, batching and autoscaling settings of the package."""
    registry = ModelRegistry(Storage(args.storage))
    cfg = package_config(registry, registry.resolve(args.model), args.overrides).serve
    scaling = cfg.autoscaling
    return ModelServer.options(
        max_ongoing_requests=cfg.max_ongoing_requests,
        autoscaling_config={
            "min_replicas": scaling.min_replicas,
            "initial_replicas": max(scaling.min_replicas, 1),
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s,
        },
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
        logging_config=ACCESS_LOGS,
    )


def bind_model(deployment: Deployment, args: ModelAppArgs) -> Application:
    return deployment.bind(args.model, args.storage.model_dump(), args.overrides)


def build_model_app(args: dict | ModelAppArgs) -> Application:
    """Serve application builder for one model version."""
    args = ModelAppArgs.model_validate(args)
    return bind_model(model_deployment(args), args)


def bind_gateway(deployment: Deployment, args: GatewayArgs) -> Application:
    return deployment.bind(read_token(args.auth), args.max_body_bytes)


def build_gateway(args: dict | GatewayArgs) -> Application:
    """Serve application builder for the gateway; its routing table comes as user_config."""
    return bind_gateway(Gateway, GatewayArgs.model_validate(args))
