"""Putting registered models behind the gateway, and switching versions without failed requests.

Every model version runs as an application of its own, one per gateway
(``<gateway>.<name>-v<N>``); the gateway application reaches them through deployment
handles and keeps its routing table in ``user_config``. The newest served version of a
model is also mounted at the model's predict path (``/v1/models/<name>/predict`` under
the gateway's prefix), so that predictions, the hot path, go from Serve's HTTP ingress
straight to the model's replicas, one hop fewer; Serve routes by the longest matching
prefix, so everything else reaches the gateway. ``deploy`` changes what is served in
ordered steps:

1. start the application of every requested version that is not running yet;
2. hand the gateway its new routing table; it waits for the new versions to answer,
   moves traffic, and lets calls on versions that left the table finish;
3. move the predict paths: take them from the versions that lose them (their requests
   then reach the gateway, which already routes to the new version), start deleting
   the model applications that the gateway no longer routes to, and give the paths to
   the new newest versions.

``serve_config`` writes the same applications as a Serve config file for ``serve deploy``
and a RayService's ``serveConfigV2``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass

from pydantic import BaseModel, Field
from ray import serve

import forgeml
from forgeml.config import ExperimentConfig, StorageConfig
from forgeml.data.kinds import preprocessor_from_dict
from forgeml.model_package import package_config
from forgeml.serve.apps import GatewayArgs, ModelAppArgs, bind_gateway, model_app
from forgeml.serve.auth import read_access
from forgeml.serve.gateway import (
    MODEL_DEPLOYMENT,
    Gateway,
    Route,
    RoutingTable,
    newest_by_name,
)
from forgeml.serve.model_server import PREDICT_ROUTE
from forgeml.serve.schemas import ModelInfo
from forgeml.storage import ModelRegistry, ModelVersion, PackageIntegrityError, Storage

logger = logging.getLogger(__name__)

GATEWAY_APP = "forgeml"
#: Longest wait for the retired model applications to be gone (their replicas finish
#: the calls they hold first).
RETIRE_TIMEOUT_S = 300.0


class AppArgs(BaseModel):
    """What to serve: ``forgeml serve run|deploy|build`` arguments."""

    models: list[str] = Field(min_length=1, description="Model refs: name, name:latest or name:vN.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    auth: bool = Field(True, description="Require a bearer token on /v1 routes.")
    overrides: list[str] = Field(
        default_factory=list, description="serve.* overrides applied to every model's config."
    )


@dataclass(frozen=True)
class ServingPlan:
    """The applications that serve ``AppArgs``, with every version pinned."""

    models: list[ModelAppArgs]
    gateway: GatewayArgs
    table: RoutingTable
    #: Each model application's route prefix: the predict path of its model for the
    #: newest served version of each model (not a policy's), None for the others.
    direct: dict[str, str | None]


def model_app_name(gateway: str, version: ModelVersion) -> str:
    """The application of one model version behind ``gateway``: each gateway has its own,
    which checks that gateway's tokens on its predict path."""
    return f"{gateway}.{version.name}-v{version.version}"


def predict_path(gateway_prefix: str, name: str) -> str:
    """Where clients POST a model's predictions, under the gateway's route prefix."""
    return gateway_prefix.rstrip("/") + PREDICT_ROUTE.format(name=name)


def _direct_routes(routes: list[Route], gateway_prefix: str) -> dict[str, str | None]:
    """The gateway's newest version of each model (not a policy) gets the model's
    predict path, the other versions none."""
    direct = dict.fromkeys((route.app for route in routes), None)
    for name, route in newest_by_name(routes).items():
        if not route.acts:
            direct[route.app] = predict_path(gateway_prefix, name)
    return direct


def _model_info(registry: ModelRegistry, version: ModelVersion, cfg: ExperimentConfig) -> ModelInfo:
    metrics = json.loads(registry.read(version, "metrics.json"))
    if cfg.task.acts:
        from forgeml.rl.package import load_policy  # RLlib, only for a policy

        policy, _ = load_policy(registry, version.ref)
        classes, input_shape = [], list(policy.observation_space.shape)
        inputs = {
            "environment": cfg.env.name,
            "observation_space": str(policy.observation_space),
            "action_space": str(policy.action_space),
        }
    else:
        stored = json.loads(registry.read(version, "preprocessor.json"))
        preprocessor = preprocessor_from_dict(stored)
        classes, input_shape = (
            list(preprocessor.target.classes),
            list(preprocessor.model_inputs.shape),
        )
        inputs = preprocessor.describe()
    return ModelInfo(
        name=version.name,
        version=f"v{version.version}",
        task=cfg.task.kind,
        classes=classes,
        input_shape=input_shape,
        inputs=inputs,
        test_metrics={k: v for k, v in metrics["test"].items() if isinstance(v, float)},
    )


def plan(args: AppArgs, gateway: str = GATEWAY_APP, route_prefix: str = "/") -> ServingPlan:
    """Resolve every requested ref to a registered version and read what serving needs,
    behind the gateway application ``gateway`` at ``route_prefix``."""
    if "." in gateway:
        raise ValueError(f"gateway name {gateway!r}: no '.' (it separates its model apps)")
    registry = ModelRegistry(Storage(args.storage))
    models, routes, max_body_bytes = [], [], 0
    for requested in args.models:
        version = registry.resolve(requested)
        problems = registry.verify(version)
        if problems:
            raise PackageIntegrityError(f"{version.ref} is damaged: " + "; ".join(problems))
        cfg = package_config(registry, version, args.overrides)
        if not (cfg.task.served or cfg.task.acts):
            raise ValueError(
                f"{version.ref}: a {cfg.task.kind} model is not served over /predict; "
                "draw samples from it with forgeml generate"
            )
        models.append(
            ModelAppArgs(
                model=version.ref, storage=args.storage, auth=args.auth, overrides=args.overrides
            )
        )
        routes.append(
            Route(
                app=model_app_name(gateway, version),
                info=_model_info(registry, version, cfg),
                max_instances=cfg.serve.max_instances,
                acts=cfg.task.acts,
            )
        )
        max_body_bytes = max(max_body_bytes, cfg.serve.max_body_bytes)
    return ServingPlan(
        models=models,
        gateway=GatewayArgs(auth=args.auth, max_body_bytes=max_body_bytes),
        table=RoutingTable(routes=routes),
        direct=_direct_routes(routes, route_prefix),
    )


def _fingerprint(*parts: object) -> str:
    encoded = json.dumps([forgeml.__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def deploy(args: AppArgs, name: str = GATEWAY_APP, route_prefix: str = "/") -> ServingPlan:
    """Serve ``args`` behind the gateway application ``name``; see the module docstring.

    Serve's Python API gives every deployment a fresh random version on each
    ``serve.run``, which restarts all its replicas. Here each deployment gets a version
    derived from its arguments instead, as Serve does itself for config files, so an
    unchanged model is left running, a route prefix moves without a restart, and a
    routing change reaches the gateway's live replicas through ``reconfigure``
    (``_internal`` is how ``options`` accepts a version). Run one deploy at a time per
    gateway.
    """
    serving = plan(args, name, route_prefix)
    access = read_access(args.auth)
    tokens = access and access.fingerprint
    apps = {
        route.app: model_app(model, version=_fingerprint(model, tokens))
        for model, route in zip(serving.models, serving.table.routes, strict=True)
    }
    held = _route_prefixes()
    taken = set(held.values())
    for app, application in apps.items():
        # A running version keeps its path until the gateway routes to its successor; a
        # new one takes its path at once only where no other application holds it.
        wanted = serving.direct[app]
        prefix = held.get(app, wanted if wanted not in taken else None)
        held[app] = prefix
        serve.run(application, name=app, route_prefix=prefix)
    gateway = Gateway.options(user_config=serving.table.model_dump(mode="json")).options(
        version=_fingerprint(serving.gateway, tokens), _internal=True
    )
    handle = serve.run(bind_gateway(gateway, serving.gateway), name=name, route_prefix=route_prefix)
    routed = set(handle.routed_apps.remote().result())
    if routed != set(apps):
        raise RuntimeError(
            f"gateway {name!r} kept its previous routes {sorted(routed)}: a new version did "
            "not answer in time (see the gateway replica's log)"
        )
    moving = [app for app in apps if held[app] != serving.direct[app]]
    for app in moving:
        if held[app] is not None:
            serve.run(apps[app], name=app, route_prefix=None)
    retired = _start_retiring(name)
    for app in moving:
        if serving.direct[app] is not None:
            serve.run(apps[app], name=app, route_prefix=serving.direct[app])
    _wait_until_deleted(retired)
    if retired:
        logger.info("deleted model applications %s no longer routes to: %s", name, retired)
    return serving


def _route_prefixes() -> dict[str, str | None]:
    """The route prefix of every Serve application not being deleted (Serve's public
    status leaves the prefixes out; its controller's details have them)."""
    details = serve.context._get_global_client().get_serve_details()
    return {
        app: detail.get("route_prefix")
        for app, detail in details.get("applications", {}).items()
        if detail.get("status") != "DELETING"
    }


def undeploy(gateway: str = GATEWAY_APP) -> list[str]:
    """Stop serving behind ``gateway``: delete it and all its model applications at
    once (each replica drains what it holds); returns their names once they are gone
    (``_wait_until_deleted``)."""
    applications = serve.status().applications
    doomed = [app for app in applications if app == gateway or app.startswith(f"{gateway}.")]
    for app in doomed:
        serve.delete(app, _blocking=False)
    _wait_until_deleted(doomed)
    return doomed


def _start_retiring(gateway: str) -> list[str]:
    """Start deleting ``gateway``'s unrouted model applications, which gives up their
    route prefixes at once; their replicas finish the calls they hold.

    Nothing is deleted while the gateway is starting or updating: its table is not
    known yet, and a call into a deleted application would wait forever.
    """
    applications = serve.status().applications
    status = applications.get(gateway)
    if status is not None and status.status != "RUNNING":
        logger.warning(
            "gateway %s is %s; none of its model applications is deleted", gateway, status.status
        )
        return []
    routed = set(serve.get_app_handle(gateway).routed_apps.remote().result()) if status else set()
    unrouted = [
        app
        for app, s in applications.items()
        if app.startswith(f"{gateway}.")
        and MODEL_DEPLOYMENT in s.deployments
        and app not in routed
        and s.status != "DELETING"
    ]
    for app in unrouted:
        serve.delete(app, _blocking=False)
    return unrouted


def _wait_until_deleted(apps: list[str]) -> None:
    """Return once Serve lists none of ``apps``, or after RETIRE_TIMEOUT_S with a warning."""
    deadline = time.monotonic() + RETIRE_TIMEOUT_S
    while set(apps) & serve.status().applications.keys():
        if time.monotonic() > deadline:
            left = sorted(set(apps) & serve.status().applications.keys())
            logger.warning("model applications still being deleted: %s", left)
            return
        time.sleep(0.5)


def serve_config(args: AppArgs, host: str, port: int) -> dict:
    """A Serve config file (``serve deploy``; a RayService's serveConfigV2), versions pinned.

    Serve applies a changed file to all applications at once and refuses a route prefix
    that another application still holds, so switching versions without failed requests
    takes three applies there, as ``deploy`` orders it: add the new version's
    application (no route prefix yet) and its route; then drop the old version's route
    and its application's prefix; then delete the old application and give the new one
    the prefix. A RayService upgrade that starts a new cluster needs none of this.
    """
    serving = plan(args)
    models = [
        {
            "name": route.app,
            "route_prefix": serving.direct[route.app],
            "import_path": "forgeml.serve.apps:build_model_app",
            "args": model.model_dump(mode="json"),
        }
        for model, route in zip(serving.models, serving.table.routes, strict=True)
    ]
    gateway = {
        "name": GATEWAY_APP,
        "route_prefix": "/",
        "import_path": "forgeml.serve.apps:build_gateway",
        "args": serving.gateway.model_dump(mode="json"),
        "deployments": [{"name": "Gateway", "user_config": serving.table.model_dump(mode="json")}],
    }
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [*models, gateway],
    }
