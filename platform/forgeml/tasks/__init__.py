"""Task registry: what a task's head predicts, its loss, and its metrics."""

from __future__ import annotations

from collections.abc import Callable

_TASKS: dict[str, Callable] = {}


def register_task(kind: str):
    def decorate(cls):
        _TASKS[kind] = cls
        return cls

    return decorate


def build_task(cfg, class_names: tuple[str, ...]):
    return _TASKS[cfg.kind](cfg, class_names)


from forgeml.tasks import classification  # noqa: E402,F401
