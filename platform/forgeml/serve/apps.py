"""Serve applications built from arguments: one per model version, and the gateway.

``build_model_app`` and ``build_gateway`` are the ``import_path`` targets of the Serve
config file that ``forgeml serve build`` writes; ``forgeml.serve.deploy`` builds the
same applications itself, with versions pinned.
"""

from pydantic import BaseModel, Field
from ray.serve import Application, Deployment

from forgeml.config import ServeConfig, StorageConfig
from forgeml.model_package import package_config
from forgeml.serve.auth import read_access
from forgeml.serve.gateway import MODEL_DEPLOYMENT, Gateway
from forgeml.serve.http import ACCESS_LOGS
from forgeml.serve.model_server import ModelServer
from forgeml.storage import ModelRegistry, Storage


class ModelAppArgs(BaseModel):
    """One model version's Serve application (``forgeml.serve.apps:build_model_app``)."""

    model: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*:v[0-9]+$", description="Pinned ref name:vN.")
    storage: StorageConfig = Field(default_factory=StorageConfig)
    auth: bool = Field(True, description="Require a bearer token on its predict route.")
    overrides: list[str] = Field(
        default_factory=list, description="serve.* overrides applied to the package's config."
    )


class GatewayArgs(BaseModel):
    """The gateway application (``import_path: forgeml.serve.apps:build_gateway``).

    Which versions it routes to is its ``user_config``, a ``RoutingTable``."""

    auth: bool = Field(True, description="Require a bearer token on /v1 routes.")
    max_body_bytes: int = Field(ServeConfig().max_body_bytes, ge=1024)


def model_app(args: ModelAppArgs, version: str | None = None) -> Application:
    """The model version ``args`` names as ``ModelServer`` (``PolicyServer`` for a
    policy), deployment MODEL_DEPLOYMENT either way, with the replica, batching and
    autoscaling settings of its package; Serve's deployment version pinned to
    ``version`` where one is given."""
    registry = ModelRegistry(Storage(args.storage))
    package = package_config(registry, registry.resolve(args.model), args.overrides)
    cfg, scaling = package.serve, package.serve.autoscaling
    options = {
        "name": MODEL_DEPLOYMENT,
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": cfg.max_queued_requests,
        "backpressure_config": {"retry_after_s": cfg.retry_after_s},
        "autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "initial_replicas": max(scaling.min_replicas, 1),
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
            "upscale_delay_s": scaling.upscale_delay_s,
            "downscale_delay_s": scaling.downscale_delay_s,
            "look_back_period_s": scaling.look_back_period_s,
        },
        "ray_actor_options": {"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
        "logging_config": ACCESS_LOGS,
        **({"version": version, "_internal": True} if version else {}),
    }
    served = (args.model, args.storage.model_dump(), args.overrides)
    if package.task.acts:
        from forgeml.serve.policy_server import PolicyServer  # RLlib, only where it serves

        return PolicyServer.options(**options).bind(*served)
    return ModelServer.options(**options).bind(*served, read_access(args.auth))


def build_model_app(args: dict | ModelAppArgs) -> Application:
    """Serve application builder for one model version."""
    return model_app(ModelAppArgs.model_validate(args))


def bind_gateway(deployment: Deployment, args: GatewayArgs) -> Application:
    """``deployment`` (a ``Gateway``) bound to the tokens and body limit of ``args``."""
    return deployment.bind(read_access(args.auth), args.max_body_bytes)


def build_gateway(args: dict | GatewayArgs) -> Application:
    """Serve application builder for the gateway; its routing table comes as user_config."""
    return bind_gateway(Gateway, GatewayArgs.model_validate(args))
