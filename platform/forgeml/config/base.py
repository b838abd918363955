"""What every config section shares, and how a section's variants are looked up."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A config that cannot be loaded; the message names the field path and the reason."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def variants(union: Any) -> dict[str, type[Section]]:
    """The sections of a discriminated union (``Annotated[A | B, Field(discriminator=...)]``)
    by their ``kind``: the registry of that section's variants, in declaration order."""
    members = get_args(get_args(union)[0])
    return {member.model_fields["kind"].default: member for member in members}
