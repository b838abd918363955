"""The ``env`` section: the Gymnasium environment a reinforcement task learns in, instead
of a dataset. Either a registered id (``CartPole-v1``) or a user's own environment by
import path; both are checked here, so a typo fails before Ray starts."""

from __future__ import annotations

import difflib
import importlib
from typing import Any

from pydantic import Field, model_validator

from forgeml.config.base import Section


def _import_entry_point(path: str) -> Any:
    """The object at ``module:attribute``; raises ValueError naming what is missing."""
    module_name, _, attribute = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"entry_point: cannot import {module_name!r} ({exc})") from None
    target = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"entry_point: {module_name!r} has no attribute {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"entry_point: {path} is not callable (an Env class or a factory)")
    return target


class EnvConfig(Section):
    """A Gymnasium environment: ``id`` of a registered one, or ``entry_point``, an Env
    class or a function that returns an Env, by import path. ``kwargs`` go to it."""

    id: str | None = Field(
        None, description="A registered Gymnasium environment, e.g. CartPole-v1, Pendulum-v1."
    )
    entry_point: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$",
        description="module:attribute of an Env class or a function returning an Env; its "
        "module must be importable on every node: installed, in the folder forgeml runs "
        "from (that folder on every node), or in the job's working_dir.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the environment's constructor."
    )
    max_episode_steps: int | None = Field(
        None, ge=1, description="Cut episodes at this many steps; null: the environment's own."
    )

    @model_validator(mode="after")
    def _one_environment(self) -> EnvConfig:
        if (self.id is None) == (self.entry_point is None):
            raise ValueError("give exactly one of id (a registered environment) or entry_point")
        if self.entry_point is not None:
            _import_entry_point(self.entry_point)
            return self
        import gymnasium

        registered = gymnasium.envs.registry
        if self.id not in registered:
            close = difflib.get_close_matches(self.id, list(registered), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ValueError(f"id: no registered Gymnasium environment {self.id!r}{hint}")
        return self

    @property
    def name(self) -> str:
        """How the environment is named in logs and the model card."""
        return self.id or self.entry_point  # type: ignore[return-value]

    def make(self):
        """A new instance of the environment."""
        import gymnasium

        if self.id is not None:
            return gymnasium.make(self.id, max_episode_steps=self.max_episode_steps, **self.kwargs)
        env = _import_entry_point(self.entry_point)(**self.kwargs)  # type: ignore[arg-type]
        if self.max_episode_steps is not None:
            env = gymnasium.wrappers.TimeLimit(env, self.max_episode_steps)
        return env
