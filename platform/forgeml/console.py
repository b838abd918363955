"""What a user reads on the console, and the run's log file that keeps the rest.

The console shows forgeml's own lines (and progress bars on a terminal) with Ray's
warnings and errors. Ray's info logs go to the run's log file (``forgeml.log`` in the
run or search folder) with everything else this process logs and every line Ray
forwards from its workers. ``--verbose`` or ``FORGEML_VERBOSE=1`` puts Ray's info logs
back on the console.

Ray's workers run in other processes: Ray forwards what they write to this driver's
console. Their Ray info logs are kept off that stream where they are made: Ray Train's
by its ``LoggingConfig`` (``ray_train_logging_config``), Ray Data's by
``configure_worker_logging`` in the training loop. Both still write them to Ray's session
log files (``/tmp/ray/session_latest/logs/train`` and ``.../ray-data``).

Importable without Ray: the training loop and the CLI import it before Ray starts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from forgeml.storage import Storage

logger = logging.getLogger(__name__)

#: Set to 1 (true, yes) for the same console as ``--verbose``. ``configure`` sets it in
#: this process, so the workers of an embedded Ray runtime inherit it; on a cluster,
#: pass it in the job's runtime environment.
VERBOSE_ENV = "FORGEML_VERBOSE"
#: The run's log file, in the run's folder (``<storage>/runs/<run>``) or the search's
#: (``<storage>/tune/<search>``).
LOG_FILE = "forgeml.log"
#: Lines held until the run's folder is known; a command that makes no run (``serve
#: run``) keeps no more than these in memory.
MAX_PENDING_LINES = 100_000
#: Ray's loggers whose console handlers ``route_ray_logs`` takes over on the driver
#: (Ray Serve's keep theirs: what a deployment says is for the console).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune")
#: Ray Data's notices that its own progress bars are off: forgeml turns them off on
#: purpose (it reports progress itself), so they go to log files only.
RAY_DATA_PROGRESS_LOGGER = "ray.data._internal.progress"

T = TypeVar("T")


def verbose_from_environment() -> bool:
    """Whether ``FORGEML_VERBOSE`` asks for Ray's info logs on the console."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _is_console(handler: logging.Handler) -> bool:
    """A handler that writes to the terminal (stderr or stdout), not to a file."""
    return isinstance(handler, logging.StreamHandler) and not isinstance(
        handler, logging.FileHandler
    )


class ConsoleHandler(logging.Handler):
    """forgeml's records from INFO up, other loggers' (Ray's) from WARNING up, or all from
    INFO up when verbose. Writes through ``tqdm.write`` so a live progress bar stays
    whole below the lines, and to the ``sys.stderr`` of the moment (pytest swaps it)."""

    def __init__(self, verbose: bool):
        super().__init__(logging.INFO)
        self.verbose = verbose
        self.plain = logging.Formatter("%(message)s")
        self.flagged = logging.Formatter("%(levelname)s: %(message)s")
        self.foreign = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbose:
            return True
        if record.name == RAY_DATA_PROGRESS_LOGGER:
            return False
        return _forgeml_or_warning(record)

    def format(self, record: logging.LogRecord) -> str:
        if self.verbose or not _is_forgeml(record):
            return self.foreign.format(record)
        return (self.plain if record.levelno == logging.INFO else self.flagged).format(record)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)


def _is_forgeml(record: logging.LogRecord) -> bool:
    return record.name == "forgeml" or record.name.startswith("forgeml.")


class RunLogHandler(logging.Handler):
    """Every record of this process from INFO up, and the lines Ray forwards from its
    workers, as text: held in memory until ``attach`` names the run's folder, then
    written there. A local folder gets the lines as they come; an S3 one, at ``close``."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        self.pending: list[str] = []
        self.file = None
        self.upload: tuple[Storage, str] | None = None
        self.local_path: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.write_line(self.format(record))
        except Exception:
            self.handleError(record)

    @property
    def attached(self) -> bool:
        return self.file is not None

    def write_line(self, line: str) -> None:
        with self.lock:
            if self.file is not None:
                self.file.write(line + "\n")
                self.file.flush()
            elif len(self.pending) < MAX_PENDING_LINES:
                self.pending.append(line)

    def attach(self, storage: Storage, folder: str) -> None:
        """Write the log to ``folder/forgeml.log`` on ``storage`` from now on, after the
        lines held so far; a resumed run's log grows on."""
        path = f"{folder}/{LOG_FILE}"
        with self.lock:
            self._close_file()
            if storage.is_local:
                os.makedirs(folder, exist_ok=True)
                self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close)
                self.local_path = path
            else:
                fd, local = tempfile.mkstemp(prefix="forgeml-", suffix=".log")
                self.file = os.fdopen(fd, "w", encoding="utf-8")
                self.local_path, self.upload = local, (storage, path)
            self.file.write("".join(line + "\n" for line in self.pending))
            self.file.flush()
            self.pending = []

    def _close_file(self) -> None:
        if self.file is None:
            return
        self.file.close()
        self.file = None
        if self.upload is not None:
            storage, path = self.upload
            self.upload = None
            with open(self.local_path, "rb") as written:
                text = written.read()
            earlier = b""
            if storage.exists(path):  # a resumed run's log grows on
                with storage.fs.open_input_stream(path) as stream:
                    earlier = stream.read()
            storage.write_bytes(path, earlier + text)
            os.unlink(self.local_path)

    def close(self) -> None:
        with self.lock:
            try:
                self._close_file()
            except OSError as exc:
                print(f"forgeml: could not write {LOG_FILE}: {exc}", file=sys.stderr)
        super().close()


def _installed(kind: type[logging.Handler]) -> logging.Handler | None:
    return next((h for h in logging.getLogger().handlers if isinstance(h, kind)), None)


def configure(verbose: bool) -> None:
    """Set up this (driver) process's console and start holding the run's log.

    Called once per command; calling it again replaces what an earlier call set up.
    """
    if verbose:
        os.environ[VERBOSE_ENV] = "1"
    else:
        os.environ.pop(VERBOSE_ENV, None)
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, (ConsoleHandler, RunLogHandler))]:
        root.removeHandler(handler)
        handler.close()
    root.setLevel(logging.INFO)
    root.addHandler(ConsoleHandler(verbose))
    root.addHandler(RunLogHandler())


def keep_run_log(storage: Storage, folder: str) -> None:
    """Write this command's log to ``folder/forgeml.log`` on ``storage`` (the run's or
    the search's folder), from its first line on. Does nothing outside the CLI."""
    handler = _installed(RunLogHandler)
    if handler is not None:
        handler.attach(storage, folder)
        where = folder if storage.is_local else f"s3://{folder}"
        logger.info("full log: %s/%s", where, LOG_FILE)


def close_run_log() -> None:
    """Finish the run's log file (an S3 run folder gets it now)."""
    handler = _installed(RunLogHandler)
    if handler is not None:
        logging.getLogger().removeHandler(handler)
        handler.close()


def route_ray_logs() -> bool:
    """Send the records of Ray's loggers in this process through forgeml's handlers:
    Ray's info logs into the run's log file, its warnings and errors to the console too.
    Returns False, changing nothing, where ``configure`` has not set the console up
    (forgeml used as a library).

    Ray gives its loggers console handlers of their own (``import ray`` the ``ray`` logger,
    ``import ray.data`` ``ray.data``); those are removed, their file handlers kept. Ray
    Data is imported first so that its set-up cannot come later and undo this.
    """
    if _installed(ConsoleHandler) is None:
        return False
    import ray.data  # noqa: F401

    for name in RAY_LOGGERS:
        ray_logger = logging.getLogger(name)
        for handler in [h for h in ray_logger.handlers if _is_console(h)]:
            ray_logger.removeHandler(handler)
        ray_logger.propagate = True
    logging.getLogger("ray").setLevel(logging.INFO)
    return True


def record_worker_output() -> None:
    """Copy every line Ray forwards from its workers into the run's log file, with the
    ``(ActorName pid=…)`` prefix Ray prints; Ray still prints them on the console.

    Uses Ray's dispatcher of forwarded output (``ray._private``, no public hook exists);
    without it the run's log lacks the workers' lines and nothing else changes.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher
    except ImportError:
        logger.debug("Ray has no log dispatcher here; worker lines stay out of %s", LOG_FILE)
        return
    global_worker_stdstream_dispatcher.remove_handler("forgeml_run_log")
    global_worker_stdstream_dispatcher.add_handler("forgeml_run_log", _record_forwarded)


def _record_forwarded(data: dict[str, Any]) -> None:
    """Write forwarded lines to the run's log once it has a folder: a command without a
    run (``serve run``) would only pile them up in memory."""
    handler = _installed(RunLogHandler)
    if handler is None or not handler.attached:
        return
    who = data.get("actor_name") or data.get("task_name")
    ip = data.get("ip")
    where = "" if ip == data.get("localhost") else f", ip={ip}"
    prefix = f"({f'{who} ' if who else ''}pid={data.get('pid')}{where})"
    lines = data.get("lines", [])
    if data.get("pid") == "autoscaler":  # its status dumps; Ray prints only the events
        from ray._private.worker import filter_autoscaler_events

        lines = filter_autoscaler_events(lines)
    for line in lines:
        if "__ray_tqdm_magic_token__" not in line:
            handler.write_line(f"{prefix} {line}")


def configure_worker_logging() -> None:
    """Set up logging in a training worker: forgeml's lines as plain messages on stderr,
    which Ray forwards to the driver's console, and, unless verbose, other loggers' only
    from WARNING up there. Ray's log files keep the rest: Ray Train's handlers on the
    root logger (some Ray Train modules log under their file's path, not ``ray.train``)
    and Ray Data's stay."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if _is_console(h)]:
        root.removeHandler(handler)
    forwarded = logging.StreamHandler()
    forwarded.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(forwarded)
    root.setLevel(logging.INFO)
    if verbose_from_environment():
        return
    forwarded.addFilter(_forgeml_or_warning)
    ray_data = logging.getLogger("ray.data")
    for handler in ray_data.handlers:
        if _is_console(handler):
            handler.setLevel(logging.WARNING)
    progress = logging.getLogger(RAY_DATA_PROGRESS_LOGGER)
    progress.handlers = [h for h in ray_data.handlers if not _is_console(h)]
    progress.propagate = False


def _forgeml_or_warning(record: logging.LogRecord) -> bool:
    return _is_forgeml(record) or record.levelno >= logging.WARNING


def worker_runtime_env() -> dict | None:
    """The runtime environment that carries ``FORGEML_VERBOSE=1`` to every worker of
    this job on a cluster (an embedded runtime's processes inherit this one's
    environment), or None when not verbose or when the job's own runtime environment
    (``ray job submit --runtime-env-json``) sets it already: Ray refuses a driver's
    variable that the job's sets too."""
    if not verbose_from_environment():
        return None
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}"))
    if VERBOSE_ENV in ((job.get("runtime_env") or {}).get("env_vars") or {}):
        return None
    return {"env_vars": {VERBOSE_ENV: "1"}}


def ray_train_logging_config():
    """Ray Train's ``LoggingConfig``: its info logs (worker group started, every report
    with its checkpoint) on the console only when verbose; its log files keep them."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose_from_environment() else "WARNING")


def format_seconds(seconds: float) -> str:
    """A duration as the console shows it: 42s, 3m05s."""
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def progress(items: Iterable[T], description: str, total: int | None = None) -> Iterable[T]:
    """``items`` with a live progress bar (rate, ETA) on a terminal; on anything else (CI,
    ``ray job logs``, a file) no bar, just the items."""
    return _bar(description, total, items)


def _bar(description: str, total: int | None, items: Iterable | None = None):
    """A tqdm bar on stderr (over ``items``, if given), drawn only on a terminal and from
    the main thread."""
    from tqdm import tqdm

    shown = sys.stderr.isatty() and threading.current_thread() is threading.main_thread()
    return tqdm(
        items,
        desc=description,
        total=total,
        disable=not shown,
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )


class Steps:
    """A progress bar over the named steps of one piece of work: ``start(name)`` shows the
    step under way, and the bar advances as each one starts after the first."""

    def __init__(self, description: str, names: list[str]):
        self.names = names
        self.bar = _bar(description, len(names))
        self.started = 0

    def start(self, name: str) -> None:
        if self.started:
            self.bar.update(1)
        self.started += 1
        self.bar.set_postfix_str(name)

    def close(self) -> None:
        self.bar.update(len(self.names) - self.bar.n)
        self.bar.close()
