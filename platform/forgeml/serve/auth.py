"""Bearer-token authentication of the gateway's ``/v1`` routes.

The token comes from the environment (``FORGEML_SERVE_TOKEN``) or a mounted secret file
(``FORGEML_SERVE_TOKEN_FILE``); the CLI reads it before starting anything so a missing
token fails early, and the gateway compares it in constant time.
"""

import os
import secrets
from pathlib import Path

from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException

TOKEN_ENV = "FORGEML_SERVE_TOKEN"
TOKEN_FILE_ENV = "FORGEML_SERVE_TOKEN_FILE"

#: The ``Authorization: Bearer`` credentials of a request, or None; routes check them
#: themselves (``check_bearer_token``) so an invalid body is still a 422 first.
bearer_credentials = HTTPBearer(auto_error=False)


def read_token(auth: bool) -> str | None:
    """The bearer token from FORGEML_SERVE_TOKEN or the file FORGEML_SERVE_TOKEN_FILE names."""
    if not auth:
        return None
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token and os.environ.get(TOKEN_FILE_ENV):
        token = Path(os.environ[TOKEN_FILE_ENV]).read_text().strip()
    if not token:
        raise ValueError(
            f"serving needs a bearer token: set {TOKEN_ENV} or {TOKEN_FILE_ENV} "
            "(or serve without authentication with --no-auth)"
        )
    return token


def check_bearer_token(
    expected: str | None, credentials: HTTPAuthorizationCredentials | None
) -> None:
    """Raise a 401 unless ``credentials`` carry the ``expected`` token (None: no auth)."""
    if expected is None:
        return
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
    if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(401, "invalid bearer token", {"WWW-Authenticate": "Bearer"})
