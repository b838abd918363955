"""Loading a config: YAML, ``--set a.b=c`` overrides, errors that name the field, and
the check that every value a search could try makes a valid config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from forgeml.config.base import ConfigError
from forgeml.config.experiment import ExperimentConfig
from forgeml.config.tune import ChoiceParam, IntParam, SearchParam


def _field_path(loc: tuple, raw: Any) -> str:
    """Dotted path of an error location, without the tags pydantic adds for unions."""
    parts, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part not in node and node.get("kind", part) == part:
            continue  # the discriminator tag of a tagged union, not a field
        parts.append(str(part))
        node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def _format_validation_error(error: ValidationError, raw: Any, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for item in error.errors():
        got = item.get("input")
        shown = "" if isinstance(got, dict) or item["type"] == "missing" else f" (got {got!r})"
        lines.append(f"  {_field_path(item['loc'], raw)}: {item['msg']}{shown}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b=value`` into a key path and a YAML-parsed value (``3`` is an int)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return key.strip().split("."), value


def set_path(raw: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """Set ``value`` at a key path of a raw config mapping, creating sections as needed."""
    node = raw
    for i, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: i + 1])} is a value, not a section")
        node = child
    node[path[-1]] = value
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Set each ``a.b=value`` into the raw config mapping, creating sections as needed."""
    for text in overrides:
        path, value = parse_override(text)
        try:
            set_path(raw, path, value)
        except ConfigError as exc:
            raise ConfigError(f"override {text!r}: {exc}") from None
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    """Read a YAML experiment, apply ``--set`` overrides and validate it.

    Raises ConfigError naming every offending field path; never touches Ray.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections, got {type(raw).__name__}")
    return config_from_dict(apply_overrides(raw, overrides or []), source=str(path))


def config_from_dict(raw: dict[str, Any], source: str = "<dict>") -> ExperimentConfig:
    try:
        cfg = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, raw, source)) from None
    if cfg.tune is not None:
        _check_search_space(cfg, source)
    return cfg


#: Paths a trial cannot change: every trial shares the data prepared once for the search
#: (its source, split, preprocessing and seed), the storage and the registered name.
FIXED_FOR_TUNING = ("name", "seed", "storage", "data", "tune")
#: And what the trials of a reinforcement search share: the environment (registered
#: once), the algorithm (the class Tune runs), the limits (Tune's stop criteria, one set
#: for the search), and how runs are retried and checkpointed and the winner scored.
FIXED_FOR_REINFORCEMENT_SEARCH = (
    "env",
    "train",
    "task.algorithm.name",
    "task.max_iterations",
    "task.max_env_steps",
    "task.target_return",
    "task.checkpoint_every",
    "task.evaluation_episodes",
)


def _candidates(param: SearchParam) -> list[Any]:
    """Values that stand for all a trial could get: both bounds, and a point between
    them that is not a whole number (catching a float range over an integer field)."""
    if isinstance(param, ChoiceParam):
        return param.values
    if isinstance(param, IntParam):
        return [param.low, param.high]
    return [param.low, param.high, param.low + (param.high - param.low) * 0.381966]


def _check_search_space(cfg: ExperimentConfig, source: str) -> None:
    """Every value a trial could get must make a valid config: unknown paths, wrong
    types and out-of-range bounds fail here, before any trial starts."""
    base = {section: value for section, value in cfg.resolved().items() if section != "tune"}
    problems = []
    in_process = cfg.tune.trial_mode == "in_process"
    if in_process and cfg.scaling.max_workers > 1:
        problems.append(
            f"  tune.trial_mode: in_process trials train on one worker, but "
            f"scaling.num_workers is {cfg.scaling.num_workers}; use trial_mode train for DDP "
            "trials"
        )
    for path, param in cfg.tune.space.items():
        if in_process and path.startswith("scaling."):
            problems.append(
                f"  tune.space.{path}: in_process trials all reserve the base config's "
                "scaling; search it with trial_mode train"
            )
            continue
        if path.split(".")[0] in FIXED_FOR_TUNING:
            problems.append(
                f"  tune.space.{path}: cannot be searched; trials share "
                f"{', '.join(FIXED_FOR_TUNING)} (prepared once for the whole search)"
            )
            continue
        shared = FIXED_FOR_REINFORCEMENT_SEARCH
        if cfg.task.acts and any(
            path == f or path.startswith(f"{f}.") or f.startswith(f"{path}.") for f in shared
        ):
            problems.append(
                f"  tune.space.{path}: cannot be searched; a reinforcement search's trials "
                f"share {', '.join(shared)}"
            )
            continue
        for value in _candidates(param):
            trial = json.loads(json.dumps(base))
            try:
                ExperimentConfig.model_validate(set_path(trial, path.split("."), value))
            except ConfigError as exc:
                problems.append(f"  tune.space.{path}: {exc}")
                break
            except ValidationError as exc:
                item = exc.errors()[0]
                where = _field_path(item["loc"], trial)
                reason = "not a config field" if item["type"] == "extra_forbidden" else item["msg"]
                detail = reason if where == path else f"{where}: {reason}"
                problems.append(f"  tune.space.{path}: {detail} (got {value!r})")
                break
    if problems:
        raise ConfigError("\n".join([f"invalid config {source}:", *problems]))
