"""The gateway: one FastAPI ingress in front of the applications of the served model versions.

    GET  /healthz                                   liveness (no auth)
    GET  /readyz                                    every model version answers (no auth)
    GET  /v1/models                                 served models and versions (a token
                                                    with ``list`` sees its models)
    POST /v1/models/{name}/predict                  newest served version of a model
    POST /v1/models/{name}/versions/{version}/predict
    POST /v1/models/{name}/explain                  Grad-CAM or SHAP values
    POST /v1/models/{name}/versions/{version}/explain
    POST /v1/models/{name}/act                      a policy's actions for observations
    POST /v1/models/{name}/versions/{version}/act

The routing table is the deployment's ``user_config``, so a new version is switched in
place (``forgeml.serve.deploy``). Each replica builds its HTTP app from its own settings
(``gateway_api``), after its constructor, through Serve's ``__serve_build_asgi_app__``.
"""

import asyncio
import logging
import math
import time
from collections import Counter

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, Field
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException

import forgeml
from forgeml.serve.auth import Access, authorise, bearer_credentials
from forgeml.serve.http import (
    ACCESS_LOGS,
    RequestAccounting,
    add_error_handlers,
    answer_or_refuse,
    limit_instances,
)
from forgeml.serve.metrics import RequestMetrics
from forgeml.serve.schemas import (
    ActRequest,
    ActResponse,
    ErrorResponse,
    ExplainRequest,
    ExplainResponse,
    ModelInfo,
    PredictRequest,
    PredictResponse,
)

logger = logging.getLogger(__name__)

#: Longest wait, when the routing changes, for new versions to answer and old calls to end.
SWITCH_TIMEOUT_S = 300.0
#: Instances one /explain request may hold: a table row or text costs 32 forward passes
#: of a batch as wide as its features, a map's Grad-CAM a forward and backward pass.
MAX_EXPLAIN_INSTANCES = 16
#: Longest wait of /readyz for each model version.
READY_TIMEOUT_S = 10.0
#: A /readyz probe not answered after this long is sent again beside the first: one
#: that reached a replica whose node was just lost waits until Ray knows (about 15 s),
#: while Serve's router sends the new one to a replica with a shorter queue.
READY_HEDGE_S = 2.0
#: A version that answered any call this recently is ready without a probe of its own:
#: under load the answers are already there, and a probe would queue behind that load on
#: the replicas left when a node is lost.
READY_RECENT_S = 5.0
#: The deployment of every model version's application (a ModelServer, or a PolicyServer
#: for a policy): the gateway reaches each version through it.
MODEL_DEPLOYMENT = "ModelServer"
#: Tries of one model call. A replica lost with its node fails the calls it holds
#: (ActorDiedError, or ActorUnavailableError until its death is known); Serve's router
#: stops picking a dead replica and probes an unavailable one before picking it again, so
#: the call goes to another replica. Inference may run twice (an unavailable replica may
#: have answered), which costs at most a batch recorded twice by traffic capture.
MODEL_CALL_TRIES = 3


class Route(BaseModel):
    """One served model version: the Serve application running it and what clients see."""

    app: str
    info: ModelInfo
    max_instances: int = Field(ge=1)
    acts: bool = Field(False, description="A policy: /act, not /predict or /explain.")

    @property
    def ref(self) -> str:
        return f"{self.info.name}:{self.info.version}"


def newest_by_name(routes) -> dict[str, Route]:
    """Each model name's newest version among ``routes``: what /v1/models/{name}/... means."""
    newest: dict[str, Route] = {}
    for route in sorted(routes, key=lambda r: int(r.info.version[1:])):
        newest[route.info.name] = route
    return newest


class RoutingTable(BaseModel):
    """The gateway's ``user_config``: the model versions it routes to."""

    routes: list[Route] = Field(default_factory=list)


#: Requests Serve's proxy holds for each gateway replica while it is full; beyond them
#: clients get 503 with Retry-After at once, as for a model's queue (serve.max_queued_requests).
GATEWAY_MAX_QUEUED_REQUESTS = 1024


@serve.deployment(
    max_ongoing_requests=256,
    max_queued_requests=GATEWAY_MAX_QUEUED_REQUESTS,
    backpressure_config={"retry_after_s": 1},
    logging_config=ACCESS_LOGS,
)
@serve.ingress()
class Gateway:
    """Routes requests to model versions, checks tokens, validates inputs."""

    def __init__(self, access: Access | None, max_body_bytes: int):
        self.access = access
        self.max_body_bytes = max_body_bytes
        self.routes: dict[str, Route] = {}
        self.handles: dict[str, DeploymentHandle] = {}
        self.latest: dict[str, str] = {}
        self.in_flight: Counter[str] = Counter()
        #: When each version last answered a call (time.monotonic()).
        self.answered_at: dict[str, float] = {}

    def __serve_build_asgi_app__(self) -> FastAPI:
        """Serve calls this on each replica after ``__init__``: the HTTP app of this gateway."""
        return gateway_api(self, self.max_body_bytes)

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
            or serve.get_deployment_handle(MODEL_DEPLOYMENT, route.app, _check_exists=False)
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
        self.latest = {name: route.ref for name, route in newest_by_name(routes.values()).items()}
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

    async def healthz(self) -> dict:
        return {"status": "ok"}

    async def readyz(self) -> JSONResponse:
        if not self.routes:
            return JSONResponse({"status": "not ready", "reason": "no models routed"}, 503)
        try:
            for ref, handle in list(self.handles.items()):
                if time.monotonic() - self.answered_at.get(ref, -math.inf) < READY_RECENT_S:
                    continue
                self.in_flight[ref] += 1  # a routing switch waits for this call too
                try:
                    await asyncio.wait_for(_a_replica_answers(handle), READY_TIMEOUT_S)
                finally:
                    self.in_flight[ref] -= 1
                self.answered_at[ref] = time.monotonic()
        except Exception as exc:  # any replica failure or a timeout means not ready
            return JSONResponse({"status": "not ready", "reason": type(exc).__name__}, 503)
        return JSONResponse({"status": "ready", "models": sorted(self.routes)})

    async def list_models(
        self, credentials: HTTPAuthorizationCredentials | None = Depends(bearer_credentials)
    ) -> list[ModelInfo]:
        grant = self._authorise(credentials, "list", None)
        return [
            route.info
            for route in self.routes.values()
            if grant is None or grant.allows("list", route.info.name)
        ]

    async def predict_latest(
        self,
        name: str,
        body: PredictRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer_credentials),
    ) -> PredictResponse:
        self._authorise(credentials, "predict", name)
        return await self._predict(self._latest(name), body, request)

    async def predict_version(
        self,
        name: str,
        version: str,
        body: PredictRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer_credentials),
    ) -> PredictResponse:
        self._authorise(credentials, "predict", name)
        return await self._predict(self._served(name, version), body, request)

    async def explain_latest(
        self,
        name: str,
        body: ExplainRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer_credentials),
    ) -> ExplainResponse:
        self._authorise(credentials, "explain", name)
        return await self._explain(self._latest(name), body, request)

    async def explain_version(
        self,
        name: str,
        version: str,
        body: ExplainRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer_credentials),
    ) -> ExplainResponse:
        self._authorise(credentials, "explain", name)
        return await self._explain(self._served(name, version), body, request)

    async def act_latest(
        self,
        name: str,
        body: ActRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer_credentials),
    ) -> ActResponse:
        self._authorise(credentials, "act", name)
        return await self._act(self._latest(name), body, request)

    async def act_version(
        self,
        name: str,
        version: str,
        body: ActRequest,
        request: Request,
        credentials: HTTPAuthorizationCredentials | None = Depends(bearer_credentials),
    ) -> ActResponse:
        self._authorise(credentials, "act", name)
        return await self._act(self._served(name, version), body, request)

    def _authorise(self, credentials, action: str, model: str | None):
        return authorise(self.access, credentials, action, model)

    def _latest(self, name: str) -> str:
        if name not in self.latest:
            raise HTTPException(404, f"no served model named {name!r}; see /v1/models")
        return self.latest[name]

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
        limit_instances(len(args[0]), limit)
        self.in_flight[ref] += 1
        try:
            result = await _call_replica(handle, method, *args)
            self.answered_at[ref] = time.monotonic()
        except BackPressureError as full:
            retry = {"Retry-After": str(math.ceil(full.retry_after_s or 0))}
            raise HTTPException(503, str(full), headers=retry) from None
        finally:
            self.in_flight[ref] -= 1
        return answer_or_refuse(result)

    def _route(self, ref: str, acting: bool) -> Route:
        """``ref``'s route, or a 404 where the endpoint is not this model's: a policy
        answers /act only, every other model /predict and /explain."""
        route = self.routes[ref]
        if route.acts != acting:
            name = route.info.name
            kind = "a policy" if route.acts else f"a {route.info.task} model"
            answers = "act" if route.acts else "predict"
            raise HTTPException(404, f"{ref} is {kind}: POST /v1/models/{name}/{answers}")
        return route

    async def _predict(self, ref: str, body: PredictRequest, request: Request) -> PredictResponse:
        # Read before awaiting: a routing switch may drop ``ref`` while the call runs.
        route = self._route(ref, acting=False)
        result = await self._call(ref, request, route.max_instances, "infer", body.instances)
        info = route.info
        return PredictResponse(
            model=info.name, version=info.version, predictions=result["predictions"]
        )

    async def _explain(self, ref: str, body: ExplainRequest, request: Request) -> ExplainResponse:
        route = self._route(ref, acting=False)  # before awaiting, as in _predict
        limit = min(route.max_instances, MAX_EXPLAIN_INSTANCES)
        result = await self._call(ref, request, limit, "explain", body.instances, body.target)
        info = route.info
        return ExplainResponse(
            model=info.name, version=info.version, explanations=result["explanations"]
        )

    async def _act(self, ref: str, body: ActRequest, request: Request) -> ActResponse:
        route = self._route(ref, acting=True)  # before awaiting, as in _predict
        result = await self._call(ref, request, route.max_instances, "act", body.observations)
        return ActResponse(model=route.info.name, version=route.info.version, **result)


async def _call_replica(handle: DeploymentHandle, method: str, *args):
    """``method`` of a replica of ``handle``'s deployment, sent again to another replica
    when the one it reached is lost, up to MODEL_CALL_TRIES times."""
    for tries_left in range(MODEL_CALL_TRIES - 1, -1, -1):
        try:
            return await getattr(handle, method).remote(*args)
        except RayActorError as lost:
            if not tries_left:
                raise
            logger.warning(
                "%s during %s: sending it to another replica", type(lost).__name__, method
            )


async def _a_replica_answers(handle: DeploymentHandle) -> None:
    """Return once a replica of ``handle``'s deployment answers the readiness call, sent
    again beside the unanswered ones every ``READY_HEDGE_S``; a failed call raises."""
    probes: set[asyncio.Future] = set()
    try:
        while True:
            probes.add(asyncio.ensure_future(_call_replica(handle, "ready")))
            done, probes = await asyncio.wait(
                probes, timeout=READY_HEDGE_S, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                done.pop().result()
                return
    finally:
        for probe in probes:
            probe.cancel()


def gateway_api(gateway: "Gateway", max_body_bytes: int) -> FastAPI:
    """The FastAPI app of one gateway replica: its routes, error bodies, request metrics
    and a body limit of ``max_body_bytes``. Call it in the replica (it creates metrics)."""
    api = FastAPI(
        title="forgeml",
        version=forgeml.__version__,
        description="Predictions from registered forgeml model packages.",
        responses={
            401: {"model": ErrorResponse},
            403: {"model": ErrorResponse},
            404: {"model": ErrorResponse},
            413: {"model": ErrorResponse},
            422: {"model": ErrorResponse},
        },
    )
    api.add_middleware(RequestAccounting, max_body_bytes=max_body_bytes, metrics=RequestMetrics())
    add_error_handlers(api)
    api.add_api_route("/healthz", gateway.healthz, methods=["GET"])
    api.add_api_route("/readyz", gateway.readyz, methods=["GET"])
    api.add_api_route(
        "/v1/models", gateway.list_models, methods=["GET"], response_model=list[ModelInfo]
    )
    predict = {"methods": ["POST"], "response_model": PredictResponse}
    api.add_api_route("/v1/models/{name}/predict", gateway.predict_latest, **predict)
    api.add_api_route(
        "/v1/models/{name}/versions/{version}/predict", gateway.predict_version, **predict
    )
    explain = {"methods": ["POST"], "response_model": ExplainResponse}
    api.add_api_route("/v1/models/{name}/explain", gateway.explain_latest, **explain)
    api.add_api_route(
        "/v1/models/{name}/versions/{version}/explain", gateway.explain_version, **explain
    )
    act = {"methods": ["POST"], "response_model": ActResponse}
    api.add_api_route("/v1/models/{name}/act", gateway.act_latest, **act)
    api.add_api_route("/v1/models/{name}/versions/{version}/act", gateway.act_version, **act)
    return api
