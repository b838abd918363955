"""Putting registered models behind the gateway, and switching versions without failed requests.

Every model version runs as its own Serve application (``<name>-v<N>``, no HTTP route);
the gateway application reaches them through deployment handles and keeps its routing
table in ``user_config``. ``deploy`` changes what is served in three ordered steps:

1. start the application of every requested version that is not running yet;
2. hand the gateway its new routing table; it waits for the new versions to answer,
   moves traffic, and lets calls on versions that left the table finish;
3. delete the model applications that no gateway routes to any more.

``serve_config`` writes the same applications as a Serve config file for ``serve deploy``
and a RayService's ``serveConfigV2``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass

from pydantic import BaseModel, Field
from ray import serve

import forgeml
from forgeml.config import ExperimentConfig, StorageConfig
from forgeml.data.kinds import preprocessor_from_dict
from forgeml.model_package import package_config
from forgeml.serve.apps import (
    GatewayArgs,
    ModelAppArgs,
    bind_gateway,
    bind_model,
    model_deployment,
)
from forgeml.serve.auth import read_access
from forgeml.serve.gateway import MODEL_DEPLOYMENT, Gateway, Route, RoutingTable
from forgeml.serve.schemas import ModelInfo
from forgeml.storage import ModelRegistry, ModelVersion, PackageIntegrityError, Storage

logger = logging.getLogger(__name__)

GATEWAY_APP = "forgeml"


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


def model_app_name(version: ModelVersion) -> str:
    return f"{version.name}-v{version.version}"


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


def plan(args: AppArgs) -> ServingPlan:
    """Resolve every requested ref to a registered version and read what serving needs."""
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
            ModelAppArgs(model=version.ref, storage=args.storage, overrides=args.overrides)
        )
        routes.append(
            Route(
                app=model_app_name(version),
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
    )


def _fingerprint(*parts: object) -> str:
    encoded = json.dumps([forgeml.__version__, *parts], sort_keys=True, default=str)
    return hashlib.sha256(encoded.encode()).hexdigest()[:16]


def deploy(args: AppArgs, name: str = GATEWAY_APP, route_prefix: str = "/") -> ServingPlan:
    """Serve ``args`` behind the gateway application ``name``; see the module docstring.

    Serve's Python API gives every deployment a fresh random version on each
    ``serve.run``, which restarts all its replicas. Here each deployment gets a version
    derived from its arguments instead, as Serve does itself for config files, so an
    unchanged model is left running and a routing change reaches the gateway's live
    replicas through ``reconfigure`` (``_internal`` is how ``options`` accepts a version).
    Run one deploy at a time per Serve instance: a deploy deletes the model
    applications that no gateway routes to, including ones another deploy has just
    started.
    """
    serving = plan(args)
    access = read_access(args.auth)
    for model, route in zip(serving.models, serving.table.routes, strict=True):
        deployment = model_deployment(model).options(version=_fingerprint(model), _internal=True)
        serve.run(bind_model(deployment, model), name=route.app, route_prefix=None)
    gateway = Gateway.options(user_config=serving.table.model_dump(mode="json")).options(
        version=_fingerprint(serving.gateway, access and access.fingerprint),
        _internal=True,
    )
    handle = serve.run(bind_gateway(gateway, serving.gateway), name=name, route_prefix=route_prefix)
    routed = set(handle.routed_apps.remote().result())
    if routed != {route.app for route in serving.table.routes}:
        raise RuntimeError(
            f"gateway {name!r} kept its previous routes {sorted(routed)}: a new version did "
            "not answer in time (see the gateway replica's log)"
        )
    retired = retire_unrouted_models()
    if retired:
        logger.info("deleted model applications no gateway routes to: %s", retired)
    return serving


def retire_unrouted_models() -> list[str]:
    """Delete the model applications that no running gateway routes to.

    Nothing is deleted while a gateway is still starting or updating: its table is
    not known yet, and a call into a deleted application would wait forever.
    """
    applications = serve.status().applications
    gateways = {app: s for app, s in applications.items() if "Gateway" in s.deployments}
    if any(s.status != "RUNNING" for s in gateways.values()):
        logger.warning("a gateway is not running; no model application is deleted")
        return []
    routed = {
        model_app
        for app in gateways
        for model_app in serve.get_app_handle(app).routed_apps.remote().result()
    }
    unrouted = [
        app
        for app, s in applications.items()
        if MODEL_DEPLOYMENT in s.deployments and app not in routed
    ]
    for app in unrouted:
        serve.delete(app)
    return unrouted


def serve_config(args: AppArgs, host: str, port: int) -> dict:
    """A Serve config file (``serve deploy``; a RayService's serveConfigV2), versions pinned.

    Serve applies a changed file to all applications at once, so switching versions
    without failed requests takes three applies there, as ``deploy`` orders it: add the
    new version's application and route, then drop the old route, then the old
    application. A RayService upgrade that starts a new cluster needs none of this.
    """
    serving = plan(args)
    models = [
        {
            "name": route.app,
            "route_prefix": None,
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
