"""``model.init_from``: the weights a model starts from, matched to it by name and shape.

Read once in the driver (a registered package's ``model.pt`` or a weights file, local or
on S3), matched against the model the config builds, and handed to every rank with the
loop's other ``initial_weights``. The names loaded are the run's pretrained parameters,
which ``train.freeze`` and ``train.optimizer.pretrained_lr_scale`` act on; the record of
what was loaded, skipped and missing goes into the run record (``metrics.json``).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import pyarrow.fs as pafs
import safetensors.torch
import torch

from forgeml.config import ExperimentConfig
from forgeml.data.pipeline import PreparedData
from forgeml.models import build_model
from forgeml.storage import ModelRegistry, Storage
from forgeml.tasks import build_task

logger = logging.getLogger(__name__)

#: What a weights file may be, by its name's ending.
WEIGHT_FILES = (".pt", ".pth", ".safetensors")


@dataclass(frozen=True)
class Pretrained:
    """The tensors of ``source`` that the model takes (``weights``), those whose shape
    differs from the model's (``skipped``: name to both shapes), the model's parameters
    and buffers the source lacks (``missing``) and the source's the model lacks
    (``unused``)."""

    source: str
    weights: dict[str, torch.Tensor]
    skipped: dict[str, dict[str, list[int]]]
    missing: list[str]
    unused: list[str]

    def record(self) -> dict:
        return {
            "source": self.source,
            "loaded": sorted(self.weights),
            "skipped": self.skipped,
            "missing": self.missing,
            "unused": self.unused,
        }

    def lines(self) -> list[str]:
        """What the console says of it."""
        lines = [
            f"init_from {self.source}: {len(self.weights)} tensors loaded, "
            f"{len(self.skipped)} skipped (shape), {len(self.missing)} missing, "
            f"{len(self.unused)} unused"
        ]
        lines += [
            f"  skipped {name}: {shapes['weights']} in the weights, {shapes['model']} in the model"
            for name, shapes in self.skipped.items()
        ]
        lines += [f"  missing {name}: starts from its initialisation" for name in self.missing]
        return lines


def load_pretrained(
    cfg: ExperimentConfig, storage: Storage, data: PreparedData
) -> Pretrained | None:
    """``model.init_from`` read and matched against the model the config builds for
    ``data``, and said on the console with what ``train.freeze`` freezes; None without
    init_from. ValueError naming the field when it cannot be read, nothing in it fits,
    or no parameter matches a freeze pattern: before any worker starts."""
    source = cfg.model.init_from
    if source is None and cfg.train.freeze is None:
        return None
    task = build_task(cfg.task, data.training_target(cfg.task))
    model = build_model(cfg.model, data.preprocessor.model_inputs, task.num_outputs)
    found = None
    if source is not None:
        found = match(source, _read_state(source, storage), model.state_dict())
        for line in found.lines():
            logger.info("%s", line)
    names = [name for name, _ in model.named_parameters()]
    frozen = frozen_names(cfg, names, found.weights if found else ())
    if frozen:
        until = (
            f"until epoch {cfg.train.freeze.epochs}" if cfg.train.freeze.epochs else "throughout"
        )
        logger.info("%d of %d parameter tensors frozen %s", len(frozen), len(names), until)
    return found


def frozen_names(
    cfg: ExperimentConfig, names: Iterable[str], pretrained: Iterable[str]
) -> list[str]:
    """The parameters (of ``names``) that ``train.freeze`` keeps as they start: the
    ``pretrained`` ones, or those its patterns match (ValueError naming the field when
    none does)."""
    freeze, names = cfg.train.freeze, list(names)
    if freeze is None:
        return []
    if freeze.params == "pretrained":
        loaded = set(pretrained)
        return [name for name in names if name in loaded]
    found = [name for name in names if any(fnmatchcase(name, p) for p in freeze.params)]
    if not found:
        raise ValueError(
            f"train.freeze.params: no parameter of the model matches {freeze.params}; its "
            f"parameters: {', '.join(names[:6])}{', ...' if len(names) > 6 else ''}"
        )
    return found


def match(source: str, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> Pretrained:
    """The tensors of ``state`` that fit a model whose state dict is ``own``."""
    weights, skipped = {}, {}
    for name, value in state.items():
        if name not in own:
            continue
        if tuple(value.shape) == tuple(own[name].shape):
            weights[name] = value.to(own[name].dtype)
        else:
            skipped[name] = {"weights": list(value.shape), "model": list(own[name].shape)}
    if not weights:
        raise ValueError(
            f"model.init_from: no tensor of {source} fits this model by name and shape "
            f"(its first names: {sorted(state)[:3]}; the model's: {sorted(own)[:3]})"
        )
    missing = sorted(set(own) - set(state))
    return Pretrained(source, weights, skipped, missing, sorted(set(state) - set(own)))


def _read_state(source: str, storage: Storage) -> dict[str, torch.Tensor]:
    """The tensors of a weights file or of a registered model's ``model.pt``."""
    if not source.lower().endswith(WEIGHT_FILES):
        registry = ModelRegistry(storage)
        try:
            version = registry.resolve(source)
        except KeyError as exc:
            raise ValueError(
                f"model.init_from: {source!r} is neither a weights file "
                f"({', '.join(WEIGHT_FILES)}) nor a registered model: {exc.args[0]}"
            ) from None
        return _state_dict(registry.read(version, "model.pt"), source)
    fs = storage.fs if source.startswith("s3://") else pafs.LocalFileSystem()
    path = source.removeprefix("s3://")
    try:
        with fs.open_input_stream(path) as stream:
            data = stream.read()
    except (FileNotFoundError, OSError) as exc:
        raise ValueError(f"model.init_from: cannot read {source!r}: {exc}") from None
    if source.lower().endswith(".safetensors"):
        try:
            return safetensors.torch.load(data)
        except Exception as exc:  # safetensors raises its own error type for a bad file
            raise ValueError(
                f"model.init_from: {source!r} is not a safetensors file: {exc}"
            ) from None
    return _state_dict(data, source)


def _state_dict(data: bytes, source: str) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pt`` file: a state dict, or a checkpoint holding one under
    ``state_dict`` or ``model`` (forgeml's model.pt and checkpoints are such)."""
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle and zip errors alike: not a torch file
        raise ValueError(
            f"model.init_from: {source!r} is not a PyTorch weights file: {exc}"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise ValueError(f"model.init_from: {source!r} holds no state dict of tensors")
    return loaded
