"""What every HTTP request goes through, at the gateway or a model's own predict route:
a request id, a body-size limit, metrics, structured access logs, and a JSON error body
for every 4xx/5xx (no stack trace leaves the server)."""

import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from forgeml.serve.metrics import RequestMetrics

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"

#: Structured access logs: Serve writes one JSON line per request, request id included.
ACCESS_LOGS = {"encoding": "JSON", "enable_access_log": True}


def error_response(
    request: Request, code: int, message: str, headers: dict | None = None
) -> JSONResponse:
    """The JSON error body: its code, a message and the request id a client can quote."""
    request_id = getattr(request.state, "request_id", "")
    body = {"error": {"code": code, "message": message, "request_id": request_id}}
    # Serve's proxy already puts the request id into the X-Request-ID response header.
    return JSONResponse(body, status_code=code, headers=headers)


class PrefixAsRoot:
    """Pure ASGI middleware for an app that Serve mounts at one route's path: a request
    to that path itself (``/v1/models/<name>/predict``) reaches the app's ``/`` route.
    Without it Starlette answers 307 with the path and a slash: every client pays a
    second round trip, and one that does not follow redirects (curl without -L, httpx)
    gets the redirect as its answer."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == scope.get("root_path"):
            scope = {**scope, "path": scope["path"] + "/"}
        await self.app(scope, receive, send)


class RequestAccounting:
    """Pure ASGI middleware: request ids, metrics, and a hard limit on body size (413).

    Serve's proxy puts the request id into the X-Request-ID header of both the request
    and the response; error bodies repeat it so a client can quote it.

    It reads the body itself, up to ``max_body_bytes``, before the app sees it, so an
    oversize or unterminated body never reaches JSON parsing.
    """

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: RequestMetrics, route: str = ""):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics
        #: The route every request counts under in an app that Serve mounts at one
        #: route's path (its own routes see "/"); else the matched route's.
        self.route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        limit = self.max_body_bytes
        status = {"code": 500}
        headers = dict(scope.get("headers") or [])
        request_id = headers.get(REQUEST_ID_HEADER.lower().encode(), b"").decode()[:128]
        scope.setdefault("state", {})["request_id"] = request_id or uuid.uuid4().hex
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                response = error_response(
                    Request(scope), 413, f"request body exceeds {limit} bytes"
                )
                await response(scope, receive, send)
                self.metrics.record(scope["state"], self.route, 413, time.perf_counter() - started)
                return
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send_recording_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, replay, send_recording_status)
        finally:
            route = self.route or getattr(scope.get("route"), "path", "")
            self.metrics.record(
                scope["state"], route, status["code"], time.perf_counter() - started
            )


def limit_instances(count: int, limit: int) -> None:
    """A 413 when one request holds more than ``limit`` instances."""
    if count > limit:
        raise HTTPException(413, f"{count} instances exceed the limit of {limit}")


def answer_or_refuse(result: dict) -> dict:
    """A model's answer, or a 422 with the reason it refused the request's instances."""
    if "error" in result:
        raise HTTPException(422, result["error"])
    return result


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(item["type"] == "json_invalid" for item in errors):
        return error_response(request, 422, "request body is not valid JSON")
    problems = [
        f"{'.'.join(str(p) for p in item['loc'] if p != 'body') or 'body'}: {item['msg']}"
        for item in errors[:3]
    ]
    if len(errors) > 3:
        problems.append(f"and {len(errors) - 3} more problems")
    return error_response(request, 422, "; ".join(problems))


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return error_response(request, exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("request %s failed", getattr(request.state, "request_id", ""))
    return error_response(request, 500, "internal error; the request id identifies it in the logs")


def add_error_handlers(api: FastAPI) -> None:
    """Answer invalid bodies (422, at most three problems named), HTTP errors and any
    unexpected exception (500) with ``error_response``."""
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(HTTPException, _http_error)
    api.add_exception_handler(Exception, _unexpected_error)
