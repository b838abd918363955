"""The console's routing of log records and the run's log file, and the CLI's parser."""

from __future__ import annotations

import json
import logging

import pytest
from forgeml import console
from forgeml.cli import COMMANDS, build_parser
from forgeml.config import StorageConfig
from forgeml.storage import Storage


def _record(name: str, level: int, message: str = "text") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_the_console_shows_forgeml_info_and_only_rays_warnings():
    quiet = console.ConsoleHandler(verbose=False)
    assert quiet.filter(_record("forgeml.train", logging.INFO))
    assert not quiet.filter(_record("ray.data._internal.execution", logging.INFO))
    assert quiet.filter(_record("ray.train", logging.WARNING))
    assert quiet.filter(_record("ray", logging.ERROR))
    # forgeml turns Ray Data's progress bars off on purpose: Ray's notice of it is noise
    assert not quiet.filter(_record(console.RAY_DATA_PROGRESS_LOGGER, logging.WARNING))
    assert quiet.format(_record("forgeml.data", logging.INFO, "data: train 6")) == "data: train 6"
    assert quiet.format(_record("forgeml.data", logging.WARNING, "odd")) == "WARNING: odd"

    verbose = console.ConsoleHandler(verbose=True)
    assert verbose.filter(_record("ray.data._internal.execution", logging.INFO))
    assert verbose.filter(_record(console.RAY_DATA_PROGRESS_LOGGER, logging.WARNING))


def test_the_run_log_holds_lines_until_its_folder_is_known_then_appends(tmp_path):
    storage = Storage(StorageConfig(root=str(tmp_path)))
    folder = storage.path("runs", "tiny-20260101-000000")
    handler = console.RunLogHandler()
    handler.handle(_record("ray.data", logging.INFO, "Execution plan of Dataset d_0"))
    handler.attach(storage, folder)
    handler.write_line("(RayTrainWorker pid=7) epoch 1/2")
    handler.close()
    again = console.RunLogHandler()
    again.attach(storage, folder)
    again.write_line("resumed")
    again.close()

    lines = (tmp_path / "runs" / "tiny-20260101-000000" / console.LOG_FILE).read_text()
    lines = lines.splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("INFO ray.data: Execution plan of Dataset d_0")
    assert lines[1:] == ["(RayTrainWorker pid=7) epoch 1/2", "resumed"]


@pytest.mark.parametrize(
    ("value", "verbose"), [("1", True), ("yes", True), ("0", False), ("", False)]
)
def test_the_environment_variable_asks_for_verbose(monkeypatch, value, verbose):
    monkeypatch.setenv(console.VERBOSE_ENV, value)
    assert console.verbose_from_environment() is verbose


def test_verbosity_reaches_workers_unless_the_jobs_runtime_env_sets_it(monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    assert console.worker_runtime_env() is None
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    assert console.worker_runtime_env() == {"env_vars": {console.VERBOSE_ENV: "1"}}
    job = {"runtime_env": {"env_vars": {console.VERBOSE_ENV: "1"}}}
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(job))
    assert console.worker_runtime_env() is None  # Ray refuses the same variable twice


def test_every_command_has_a_parser_and_takes_verbose_before_or_after_its_name():
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if a.dest == "command"]
    assert list(subparsers.choices) == list(COMMANDS)
    train = ["train", "--config", "c.yaml"]
    assert parser.parse_args(train).verbose is False
    assert parser.parse_args(["--verbose", *train]).verbose is True
    assert parser.parse_args([*train, "--verbose"]).verbose is True
    assert parser.parse_args(["serve", "run", "--model", "m", "--verbose"]).verbose is True


def test_a_worker_forwards_forgeml_lines_and_warnings_and_keeps_ray_files(monkeypatch):
    monkeypatch.delenv(console.VERBOSE_ENV, raising=False)
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    ray_file = logging.NullHandler()  # stands for Ray Train's log file on the root logger
    root.handlers = [logging.StreamHandler(), ray_file]
    try:
        console.configure_worker_logging()
        (forwarded,) = [h for h in root.handlers if console._is_console(h)]
        assert ray_file in root.handlers
    finally:
        root.handlers, root.level = saved, level
    assert forwarded.filter(_record("forgeml.train", logging.INFO, "epoch 1/2"))
    assert not forwarded.filter(_record("/ray/train/v2/context.py", logging.INFO, "Reporting"))
    assert forwarded.filter(_record("ray.train", logging.WARNING))


def test_forwarded_worker_lines_go_to_the_run_log_with_rays_prefix(tmp_path):
    storage = Storage(StorageConfig(root=str(tmp_path)))
    root = logging.getLogger()
    handler = console.RunLogHandler()
    root.addHandler(handler)
    try:
        console._record_forwarded({"pid": 9, "lines": ["before the run's folder"]})
        handler.attach(storage, storage.path("runs", "r"))
        console._record_forwarded(
            {
                "pid": 7,
                "actor_name": "RayTrainWorker",
                "ip": "a",
                "localhost": "a",
                "lines": ["epoch 1/2", "__ray_tqdm_magic_token__ {}"],
            }
        )
        console._record_forwarded({"pid": 8, "ip": "b", "localhost": "a", "lines": ["x"]})
    finally:
        root.removeHandler(handler)
        handler.close()
    lines = (tmp_path / "runs" / "r" / console.LOG_FILE).read_text().splitlines()
    assert lines == ["(RayTrainWorker pid=7) epoch 1/2", "(pid=8, ip=b) x"]
