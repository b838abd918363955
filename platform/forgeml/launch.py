"""What training and tuning do before Ray Train starts, in one order: name the run, open
the source and check a judge, join the cluster, check that the workers fit it, keep the
run's log in its folder, open tracking and prepare the data; a bad config or cluster
fails here, before any worker starts and before the run has a folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone

from forgeml import console, runtime
from forgeml.config import ExperimentConfig
from forgeml.data.pipeline import PreparedData, prepare_data
from forgeml.data.sources import open_source
from forgeml.registration import load_judge
from forgeml.storage import Storage
from forgeml.tracking import open_tracking
from forgeml.train.placement import plan_placement


def resolve_run_name(storage: Storage, folder: str, prefix: str, resume: bool | str) -> str:
    """A fresh ``<prefix>-<UTC time>`` name under ``<storage>/<folder>``, or the one to
    continue for ``--resume [NAME]``: the latest, or NAME if it exists there."""
    if resume is False:
        return f"{prefix}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    pattern = re.compile(rf"^{re.escape(prefix)}-\d{{8}}-\d{{6}}$")
    names = sorted(n for n in storage.list_dirs(storage.path(folder)) if pattern.match(n))
    if resume is True:
        if not names:
            raise FileNotFoundError(
                f"--resume: no earlier run of {prefix!r} under {storage.uri(folder)}"
            )
        return names[-1]
    if resume not in names:
        raise FileNotFoundError(f"--resume: no {resume!r} under {storage.uri(folder)}")
    return resume


@dataclass
class Launch:
    """A run about to start: its name and folder, its prepared data, its tracking store."""

    storage: Storage
    name: str
    path: str
    data: PreparedData
    tracking: dict


def prepare_launch(
    cfg: ExperimentConfig,
    folder: str,
    prefix: str,
    resume: bool | str,
    world_sizes: set[int] | None = None,
    check_placement: bool = True,
) -> Launch:
    """Everything before a run's workers start, for a run under ``<storage>/<folder>``
    named by ``prefix`` (``resolve_run_name``). ``world_sizes``: the worker counts the
    data is dealt for (default the config's); ``check_placement``: whether the cluster
    must hold the config's worker group (a search sizes its own trials)."""
    storage = Storage(cfg.storage)
    name = resolve_run_name(storage, folder, prefix, resume)
    path = storage.path(folder, name)
    source = open_source(cfg, storage)
    load_judge(cfg, storage, source.features)
    runtime.connect()
    runtime.require_shared_storage(cfg.storage)
    if check_placement:
        plan_placement(cfg.scaling, streams_data=not cfg.data.cache)
    # Only a run that may start gets a folder; until then its log lines are held.
    console.keep_run_log(storage, path)
    tracking = open_tracking(cfg, storage)
    data = prepare_data(cfg, source, f"{path}/rejected", storage.fs, world_sizes)
    return Launch(storage, name, path, data, tracking)
