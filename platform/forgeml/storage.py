"""One filesystem for local folders and S3 (pyarrow.fs), atomic writes, and the model registry.

Layout under the storage root::

    datasets/<name>/<fingerprint>/part-*.parquet   generated or ingested data
    runs/<run_name>/                               Ray Train storage: checkpoints, state
    models/<model>/v<N>/                           model packages
    models/<model>/latest                          text file naming the newest version
                                                   (for people: names resolve from the
                                                   complete versions themselves)

A version directory becomes visible to readers only when its ``_COMPLETE`` marker is
written, after every file of the package and its ``MANIFEST.json`` (each file's size and
sha256); ``latest`` moves after that. A crash mid-write therefore leaves an invisible,
incomplete directory, never a broken model, and every read of a package file checks it
against the manifest, so a file truncated or altered since is refused by name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from forgeml.config import StorageConfig

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "_COMPLETE"
MANIFEST_FILE = "MANIFEST.json"
#: Created first, exclusively, in a version directory: whoever creates it owns the number.
CLAIM_FILE = "_CLAIM"
#: Version numbers a registration tries before giving up (each taken by another writer).
MAX_CLAIM_ATTEMPTS = 1000
CONDITIONAL_WRITE_RETRIES = 8
_VERSION_DIR = re.compile(r"^v(\d+)$")


#: The errors of a device with no room left, or a quota spent.
FULL_DEVICE = (errno.ENOSPC, errno.EDQUOT)


class StorageFailure(OSError):
    """The storage root failed under a command: its device is full, or its S3 endpoint
    did not answer within ``storage.max_attempts`` tries. ``run`` names the run it
    stopped, which ``--resume`` continues."""

    def __init__(self, message: str, run: str | None = None):
        super().__init__(message)
        self.run = run


class Storage:
    """Paths under a storage root on the local disk or S3, with one API for both."""

    def __init__(self, cfg: StorageConfig):
        self.cfg = cfg
        self._client = None
        if cfg.root.startswith("s3://"):
            self.scheme = "s3"
            self.fs = _s3_filesystem(cfg)
            self.base = cfg.root[len("s3://") :].rstrip("/")
        elif "://" in cfg.root:
            raise ValueError(f"storage.root must be a local path or s3:// URI (got {cfg.root!r})")
        else:
            self.scheme = "file"
            self.fs = pafs.LocalFileSystem()
            self.base = str(Path(cfg.root).expanduser().resolve())

    @property
    def is_local(self) -> bool:
        return self.scheme == "file"

    def path(self, *parts: str) -> str:
        """A path for ``self.fs`` (no scheme) under the root."""
        return "/".join([self.base, *parts])

    def uri(self, *parts: str) -> str:
        """A user-facing location: a local path, or an s3:// URI."""
        path = self.path(*parts)
        return path if self.is_local else f"s3://{path}"

    def exists(self, path: str) -> bool:
        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def list_dirs(self, path: str) -> list[str]:
        """Names of the sub-directories of ``path`` (empty if it does not exist)."""
        if not self.exists(path):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=False))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)

    def list_files(self, path: str, suffix: str = "") -> list[str]:
        if not self.exists(path):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=False))
        return sorted(
            i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix)
        )

    def read_bytes(self, path: str) -> bytes:
        with self.fs.open_input_stream(path) as stream:
            return stream.read()

    def read_text(self, path: str) -> str:
        return self.read_bytes(path).decode()

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a whole file so that readers see the old content or the new, never a part.

        Local files go through a temporary file and ``os.replace``; an S3 PUT is atomic.
        """
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.is_local:
            fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException as exc:
                Path(tmp).unlink(missing_ok=True)
                if isinstance(exc, OSError) and exc.errno in FULL_DEVICE:
                    raise StorageFailure(no_room(path, len(data))) from exc
                raise
        else:
            with self.fs.open_output_stream(path) as stream:
                stream.write(data)

    def write_text(self, path: str, text: str) -> None:
        self.write_bytes(path, text.encode())

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Write ``path`` only if nothing is there yet: True if this call created it.

        Local files are opened with ``O_EXCL``; S3 takes a PUT with ``If-None-Match: *``,
        which it refuses (412) when the key exists, and answers 409 while another
        conditional write of the key is in flight (tried again). A PUT whose answer was
        lost is sent again and refused: the key then holds ``data``, which must be unique
        to this writer, and the call still owns it.
        """
        if self.is_local:
            os.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        from botocore.exceptions import ClientError

        bucket, key = path.split("/", 1)
        for attempt in range(CONDITIONAL_WRITE_RETRIES):
            try:
                self._s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code")
                if code == "PreconditionFailed":
                    return self.read_bytes(path) == data
                if code != "ConditionalRequestConflict":
                    raise
                time.sleep(0.05 * 2**attempt)
        raise OSError(f"{self.uri(path)}: conditional writes kept conflicting")

    def _s3_client(self):
        """boto3's S3 client (pyarrow's file system sends no conditional headers)."""
        if self._client is None:
            import boto3
            from botocore.config import Config

            retries = {"mode": "standard", "total_max_attempts": self.cfg.max_attempts}
            self._client = boto3.client(
                "s3",
                endpoint_url=_s3_endpoint(self.cfg),
                region_name=self.cfg.region,
                config=Config(retries=retries),
            )
        return self._client

    def delete_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)

    @contextlib.contextmanager
    def failures_named(self, run: str) -> Iterator[None]:
        """Within it, an error with a storage failure behind it is raised as that
        StorageFailure, naming ``run``."""
        try:
            yield
        except Exception as exc:
            failure = self.failure(exc, run)
            if failure is None:
                raise
            raise failure from exc

    def failure(self, error: BaseException, run: str | None = None) -> StorageFailure | None:
        """The storage failure within ``error`` (itself, a cause, or what failed in a Ray
        task or in Ray Train's controller or workers), said with this root and what it
        lacks; None if there is none. ``run``: the run it stopped."""
        for inner in _errors_within(error):
            if isinstance(inner, StorageFailure):
                return StorageFailure(str(inner), run)
            if isinstance(inner, OSError) and inner.errno in FULL_DEVICE:
                free = shutil.disk_usage(self.base).free if self.is_local else "?"
                return StorageFailure(f"{self.uri()} is full ({free} bytes free): {inner}", run)
            if _unanswered_s3_request(inner):
                tries = f"storage.max_attempts: {self.cfg.max_attempts}"
                return StorageFailure(f"{self.uri()} did not answer ({tries}): {inner}", run)
        return None


def _unanswered_s3_request(error: BaseException) -> bool:
    """An S3 request that failed for good: pyarrow's (the AWS SDK's error in an OSError)
    or boto3's (no connection, or no answer in time)."""
    from botocore.exceptions import ConnectionError, HTTPClientError

    if isinstance(error, ConnectionError | HTTPClientError):
        return True
    return isinstance(error, OSError) and "AWS Error" in str(error)


def no_room(target: str, needed: int, what: str = "") -> str:
    """What a write of ``needed`` bytes to the local ``target`` that found its device
    full says; ``what``: the kind of write, if not a file."""
    folder = Path(target)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    return f"{target}: no room for {what}{needed} bytes on its device ({free} bytes free)"


def _errors_within(error: BaseException) -> Iterator[BaseException]:
    """``error`` and every error behind it: causes, the ``cause`` a Ray task error
    wraps, and Ray Train's ``controller_failure`` and ``worker_failures``."""
    seen, pending = set(), [error]
    while pending:
        inner = pending.pop()
        if inner is None or id(inner) in seen:
            continue
        seen.add(id(inner))
        yield inner
        pending += [inner.__cause__, getattr(inner, "cause", None)]
        pending += [getattr(inner, "controller_failure", None)]
        pending += list(getattr(inner, "worker_failures", {}).values())


def _s3_endpoint(cfg: StorageConfig) -> str | None:
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")


def _s3_filesystem(cfg: StorageConfig) -> pafs.S3FileSystem:
    endpoint = _s3_endpoint(cfg)
    kwargs: dict = {"region": cfg.region} if cfg.region else {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return RetryingS3FileSystem(cfg.max_attempts, **kwargs)


class RetryingS3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 file system trying each request ``max_attempts`` times (the AWS SDK's
    default strategy: connection failures, throttling and 5xx, waits doubling from 50 ms).

    pyarrow pickles an S3 file system without its retry strategy, so the copies Ray
    Train and Ray Data send to their workers would fail after 3 s of connection retries;
    this one pickles as its constructor's arguments.
    """

    def __init__(self, max_attempts: int, **options):
        strategy = pafs.AwsDefaultS3RetryStrategy(max_attempts=max_attempts)
        super().__init__(retry_strategy=strategy, **options)
        self._arguments = (max_attempts, options)

    def __reduce__(self):
        return _retrying_s3_filesystem, self._arguments


def _retrying_s3_filesystem(max_attempts: int, options: dict) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(max_attempts, **options)


class PackageIntegrityError(ValueError):
    """A package file that is missing, or truncated or altered since registration."""


def file_digest(data: bytes) -> dict:
    """What a manifest states about one file."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def package_manifest(files: dict[str, bytes]) -> dict[str, dict]:
    return {name: file_digest(data) for name, data in sorted(files.items())}


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    uri: str
    path: str

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"


class ModelRegistry:
    """Versions of named model packages under ``<root>/models``."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self._manifests: dict[str, dict[str, dict]] = {}

    def _model_dir(self, name: str) -> str:
        return self.storage.path("models", name)

    def _version_numbers(self, name: str, complete_only: bool) -> list[int]:
        numbers = []
        for entry in self.storage.list_dirs(self._model_dir(name)):
            match = _VERSION_DIR.match(entry)
            if not match:
                continue
            marker = f"{self._model_dir(name)}/{entry}/{COMPLETE_MARKER}"
            if complete_only and not self.storage.exists(marker):
                continue
            numbers.append(int(match.group(1)))
        return sorted(numbers)

    def models(self) -> list[str]:
        return [m for m in self.storage.list_dirs(self.storage.path("models")) if self.versions(m)]

    def versions(self, name: str) -> list[int]:
        """Complete versions of ``name``, oldest first."""
        return self._version_numbers(name, complete_only=True)

    def _version(self, name: str, version: int) -> ModelVersion:
        return ModelVersion(
            name,
            version,
            self.storage.uri("models", name, f"v{version}"),
            self.storage.path("models", name, f"v{version}"),
        )

    def resolve(self, ref: str) -> ModelVersion:
        """``name``, ``name:latest`` (the newest complete version) or ``name:vN`` to a
        complete version; KeyError if absent."""
        name, _, tag = ref.partition(":")
        versions = self.versions(name)
        if not versions:
            raise KeyError(f"no registered model named {name!r} under {self.storage.uri('models')}")
        if tag in ("", "latest"):
            return self._version(name, versions[-1])
        match = _VERSION_DIR.match(tag)
        if not match or int(match.group(1)) not in versions:
            raise KeyError(f"model {name!r} has no version {tag!r}; versions: {versions}")
        return self._version(name, int(match.group(1)))

    def register(self, name: str, files: dict[str, bytes]) -> ModelVersion:
        """Write a new version holding ``files`` and its manifest, and point ``latest`` at it.

        The version number is one past every existing directory, complete or not, so a
        crashed write is never reused, and it is taken by creating its claim file
        exclusively: of registrations racing for a number (threads, processes or hosts,
        on a local disk or S3) one wins and the others try the next.
        """
        reserved = {MANIFEST_FILE, COMPLETE_MARKER, CLAIM_FILE} & set(files)
        if reserved:
            raise ValueError(f"a package cannot hold a file named {sorted(reserved)[0]}")
        version = self._claim_version(name)
        try:
            for filename, data in files.items():
                self.storage.write_bytes(f"{version.path}/{filename}", data)
            self._write_manifest(version, package_manifest(files))
            self.storage.write_text(f"{version.path}/{COMPLETE_MARKER}", uuid.uuid4().hex)
        except BaseException:
            self.storage.delete_dir(version.path)
            raise
        newest = max([version.version, *self.versions(name)])  # a racing one may be newer
        self.storage.write_text(f"{self._model_dir(name)}/latest", f"v{newest}\n")
        logger.info("registered %s at %s", version.ref, version.uri)
        return version

    def _claim_version(self, name: str) -> ModelVersion:
        existing = self._version_numbers(name, complete_only=False)
        number = (existing[-1] if existing else 0) + 1
        writer = uuid.uuid4().hex.encode()
        for _ in range(MAX_CLAIM_ATTEMPTS):
            version = self._version(name, number)
            if self.storage.create_exclusive(f"{version.path}/{CLAIM_FILE}", writer):
                return version
            number += 1
        raise RuntimeError(f"{self.storage.uri('models', name)}: no free version number found")

    def _write_manifest(self, version: ModelVersion, manifest: dict[str, dict]) -> None:
        text = json.dumps({"files": manifest}, indent=2, sort_keys=True)
        self.storage.write_text(f"{version.path}/{MANIFEST_FILE}", text)
        self._manifests[version.path] = manifest

    def manifest(self, version: ModelVersion) -> dict[str, dict]:
        """Each package file's size and sha256, as registered."""
        if version.path not in self._manifests:
            path = f"{version.path}/{MANIFEST_FILE}"
            if not self.storage.exists(path):
                raise PackageIntegrityError(
                    f"{version.uri} has no {MANIFEST_FILE}: it was damaged, or registered "
                    "by a forgeml without package manifests; register it again"
                )
            try:
                self._manifests[version.path] = json.loads(self.storage.read_text(path))["files"]
            except (ValueError, KeyError, TypeError):
                message = f"{version.uri}/{MANIFEST_FILE} is not a manifest"
                raise PackageIntegrityError(message) from None
        return self._manifests[version.path]

    def read(self, version: ModelVersion, filename: str) -> bytes:
        """A package file, refused unless its size and sha256 are those registered."""
        expected = self.manifest(version).get(filename)
        if expected is None:
            raise PackageIntegrityError(f"{version.uri}/{filename} is not in the package")
        path = f"{version.path}/{filename}"
        if not self.storage.exists(path):
            raise PackageIntegrityError(f"{version.uri}/{filename} is missing")
        data = self.storage.read_bytes(path)
        problem = _mismatch(file_digest(data), expected)
        if problem:
            raise PackageIntegrityError(f"{version.uri}/{filename} {problem}")
        return data

    def read_package(self, version: ModelVersion) -> dict[str, bytes]:
        """Every file of a package, each checked (what ``register`` takes: a copy)."""
        return {filename: self.read(version, filename) for filename in self.manifest(version)}

    def has_file(self, version: ModelVersion, filename: str) -> bool:
        return filename in self.manifest(version)

    def replace_file(self, version: ModelVersion, filename: str, data: bytes) -> None:
        """Rewrite one file of a registered package (a regenerated report) and its
        manifest entry. A crash between the two leaves the file refused until it is
        written again."""
        manifest = {**self.manifest(version), filename: file_digest(data)}
        self.storage.write_bytes(f"{version.path}/{filename}", data)
        self._write_manifest(version, manifest)

    def verify(self, version: ModelVersion) -> list[str]:
        """Every way the package differs from its manifest (empty: intact)."""
        try:
            manifest = self.manifest(version)
        except PackageIntegrityError as exc:
            return [str(exc)]
        problems = []
        for filename in manifest:
            try:
                self.read(version, filename)
            except PackageIntegrityError as exc:
                problems.append(str(exc))
        listed = {*manifest, MANIFEST_FILE, COMPLETE_MARKER, CLAIM_FILE}
        for path in self.storage.list_files(version.path):
            filename = path.rsplit("/", 1)[1]
            if filename not in listed:
                problems.append(f"{version.uri}/{filename} is not in the manifest")
        return problems


def _mismatch(actual: dict, expected: dict) -> str | None:
    if actual["bytes"] != expected["bytes"]:
        registered = expected["bytes"]
        return f"has {actual['bytes']} bytes, registered with {registered} (truncated or altered)"
    if actual["sha256"] != expected["sha256"]:
        return "does not match its registered sha256 (altered)"
    return None
