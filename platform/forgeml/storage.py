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

import hashlib
import json
import logging
import os
import re
import tempfile
import time
import uuid
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
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
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
        conditional write of the key is in flight (tried again).
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
                    return False
                if code != "ConditionalRequestConflict":
                    raise
                time.sleep(0.05 * 2**attempt)
        raise OSError(f"{self.uri(path)}: conditional writes kept conflicting")

    def _s3_client(self):
        """boto3's S3 client (pyarrow's file system sends no conditional headers)."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3", endpoint_url=_s3_endpoint(self.cfg), region_name=self.cfg.region
            )
        return self._client

    def delete_dir(self, path: str) -> None:
        if self.exists(path):
            self.fs.delete_dir(path)


def _s3_endpoint(cfg: StorageConfig) -> str | None:
    return cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL")


def _s3_filesystem(cfg: StorageConfig) -> pafs.S3FileSystem:
    endpoint = _s3_endpoint(cfg)
    kwargs: dict = {"region": cfg.region} if cfg.region else {}
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    return pafs.S3FileSystem(**kwargs)


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
