"""The ``storage`` section: where datasets, runs and models live."""

from __future__ import annotations

from pydantic import Field

from forgeml.config.base import Section


class StorageConfig(Section):
    root: str = Field(
        "~/forgeml",
        description="Local folder or s3://bucket/prefix holding datasets, runs and models.",
    )
    endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, moto, ...); null uses AWS or AWS_ENDPOINT_URL."
    )
    region: str | None = Field(None, description="S3 region; null uses the AWS default chain.")
    max_attempts: int = Field(
        12,
        ge=1,
        le=16,
        description="Tries of each S3 request before it fails, the waits between them "
        "doubling from 50 ms: 12 ride out an endpoint that is unreachable or failing for "
        "about 100 s (10 for 25 s, 14 for 7 min); a run then goes on where it was.",
    )
    shared: bool = Field(
        False,
        description="A local root that every Ray node mounts at the same path (NFS, a "
        "shared Kubernetes volume). Without it a local root is refused on a cluster of "
        "several nodes, whose checkpoints would land on whichever node wrote them.",
    )
