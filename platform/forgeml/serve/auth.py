"""Bearer-token authentication and authorisation of the ``/v1`` routes (the gateway's,
and each model's own predict route).

Tokens come from the environment (``FORGEML_SERVE_TOKEN``: one token that may do
everything) or a mounted secret file (``FORGEML_SERVE_TOKEN_FILE``): the same single
token, or a YAML list of scoped tokens, each with the model names (shell-style patterns)
and the actions it may use::

    tokens:
      - token: 0f3c...            # team A: its models' predictions only
        models: ["team-a-*"]
        actions: [predict]
      - token: 9b1d...            # operations: every model, and the model list
        models: ["*"]
        actions: [predict, explain, act, list]

The CLI reads them before starting anything so a missing or malformed file fails
early. Each server keeps only each token's sha256 and compares a request's against every
one in constant time: an unknown token is a 401, a known one outside its scope a 403.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import yaml
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

TOKEN_ENV = "FORGEML_SERVE_TOKEN"
TOKEN_FILE_ENV = "FORGEML_SERVE_TOKEN_FILE"
Action = Literal["predict", "explain", "act", "list"]
ACTIONS: tuple[Action, ...] = get_args(Action)
#: Shorter tokens are refused: they could be guessed.
MIN_TOKEN_LENGTH = 16

#: The ``Authorization: Bearer`` credentials of a request, or None; routes check them
#: themselves (``Access.check``) so an invalid body is still a 422 first.
bearer_credentials = HTTPBearer(auto_error=False)


class ScopedToken(BaseModel):
    model_config = ConfigDict(extra="forbid")
    token: str = Field(min_length=MIN_TOKEN_LENGTH, description="The bearer token.")
    models: list[str] = Field(
        min_length=1, description="Model names it may use: names or shell-style patterns."
    )
    actions: list[Action] = Field(min_length=1, description="What it may do with them.")


class TokenFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: list[ScopedToken] = Field(min_length=1)


@dataclass(frozen=True)
class Grant:
    """What one token may do, known by its sha256 only."""

    token_sha256: bytes
    models: tuple[str, ...]
    actions: frozenset[str]

    def allows(self, action: str, model: str | None) -> bool:
        matches = model is None or any(fnmatch.fnmatchcase(model, p) for p in self.models)
        return action in self.actions and matches


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Access:
    """The tokens a server accepts (None instead of an Access: no authentication)."""

    grants: tuple[Grant, ...]

    @classmethod
    def single(cls, token: str) -> Access:
        return cls((Grant(_digest(token), ("*",), frozenset(ACTIONS)),))

    @classmethod
    def scoped(cls, tokens: list[ScopedToken]) -> Access:
        digests = [_digest(t.token) for t in tokens]
        if len(set(digests)) != len(digests):
            raise ValueError(f"{TOKEN_FILE_ENV}: a token is listed twice")
        return cls(
            tuple(
                Grant(digest, tuple(t.models), frozenset(t.actions))
                for digest, t in zip(digests, tokens, strict=True)
            )
        )

    @property
    def fingerprint(self) -> str:
        """Changes when any token or scope does (part of the servers' deployment versions)."""
        parts = sorted(
            f"{g.token_sha256.hex()}{sorted(g.models)}{sorted(g.actions)}" for g in self.grants
        )
        return hashlib.sha256("".join(parts).encode()).hexdigest()

    def check(
        self, credentials: HTTPAuthorizationCredentials | None, action: str, model: str | None
    ) -> Grant:
        """The grant of the request's token; 401 without a known token, 403 when the
        token may not do ``action`` (with ``model``, when one is named)."""
        if credentials is None or credentials.scheme.lower() != "bearer":
            raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        presented = _digest(credentials.credentials)
        found = None
        for grant in self.grants:  # every one compared: the time tells nothing
            if secrets.compare_digest(presented, grant.token_sha256):
                found = grant
        if found is None:
            raise HTTPException(401, "invalid bearer token", {"WWW-Authenticate": "Bearer"})
        if not found.allows(action, model):
            target = f" model {model!r}" if model else " models"
            raise HTTPException(403, f"this token may not {action}{target}")
        return found


def authorise(
    access: Access | None,
    credentials: HTTPAuthorizationCredentials | None,
    action: str,
    model: str | None,
) -> Grant | None:
    """The request's grant (None: no authentication); a 401 or 403 otherwise."""
    return None if access is None else access.check(credentials, action, model)


def read_access(auth: bool) -> Access | None:
    """The tokens of FORGEML_SERVE_TOKEN or the file FORGEML_SERVE_TOKEN_FILE names."""
    if not auth:
        return None
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token and os.environ.get(TOKEN_FILE_ENV):
        return _read_token_file(Path(os.environ[TOKEN_FILE_ENV]))
    if not token:
        raise ValueError(
            f"serving needs a bearer token: set {TOKEN_ENV} or {TOKEN_FILE_ENV} "
            "(or serve without authentication with --no-auth)"
        )
    return Access.single(token)


def _read_token_file(path: Path) -> Access:
    if not path.is_file():
        raise ValueError(f"{TOKEN_FILE_ENV} names {path}, which is not a file")
    text = path.read_text()
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        parsed = None
    if not isinstance(parsed, dict):  # one token, as the variable holds it
        if not text.strip():
            raise ValueError(f"{TOKEN_FILE_ENV}: {path} is empty")
        return Access.single(text.strip())
    try:
        return Access.scoped(TokenFile.model_validate(parsed).tokens)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"{TOKEN_FILE_ENV}: {path}: {problems}") from None
