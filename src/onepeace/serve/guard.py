"""What every request passes before a route runs: host, API key, origin and body-size checks; and request slots.

:class:`Gate` is ASGI middleware. In order it refuses a ``Host`` header that is not allowed (400, against DNS
rebinding; default: ``localhost``, ``127.0.0.1``, ``::1`` and the address the connection came in on), answers CORS
preflights, refuses ``/v1/*`` and ``/metrics`` without the API key when one is set (401; ``/healthz``, the page and
``/static`` stay open), refuses POSTs from another origin unless it is in the CORS allow-list (403), and refuses a
body whose ``Content-Length`` is over the limit (413). It takes no slot: a client still sending its body costs no
capacity. When an answer goes out before the request body has been read (a 413, a 415, a refusal), up to
``drain_bytes`` of the body are read and dropped first, so that a client writing its whole body before reading
gets the answer instead of a connection reset.

:class:`Slots` bounds the requests that use the model: a request takes one only once its body is in, and
waits for one (holding its body) while ``max_waiting`` others wait; beyond that it gets 503.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse
from starlette.routing import Match

from onepeace.serve.schemas import ApiError

if TYPE_CHECKING:
    from onepeace.serve.app import ServerState

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
PROTECTED_PREFIXES = ("/v1/", "/metrics")
SAFE_METHODS = ("GET", "HEAD")
CORS_HEADERS = "Authorization, Content-Type"


class Slots:
    """At most ``capacity`` requests past their body at once; ``max_waiting`` more may wait for a slot."""

    def __init__(self, capacity: int, max_waiting: int) -> None:
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.busy = 0
        self.waiting = 0
        self._free: asyncio.Semaphore | None = None

    def reset(self) -> None:
        """Forget the semaphore (call from the event loop that serves, at start-up)."""
        self._free = asyncio.Semaphore(self.capacity)

    @asynccontextmanager
    async def hold(self, timeout: float) -> AsyncIterator[None]:
        """Hold one slot for the ``async with`` block; 503 when too many wait or none frees within ``timeout``."""
        if self._free is None:
            self.reset()
        free = self._free
        assert free is not None
        if self.busy + self.waiting >= self.capacity + self.max_waiting:
            raise ApiError(503, "the server is busy; retry shortly", "overloaded", headers={"Retry-After": "1"})
        self.waiting += 1
        try:
            await asyncio.wait_for(free.acquire(), timeout)
        except TimeoutError:
            raise ApiError(
                503, f"no request slot freed within {timeout:g} s; retry shortly", "overloaded",
                headers={"Retry-After": "1"},
            ) from None  # fmt: skip
        finally:
            self.waiting -= 1
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1
            free.release()


def host_name(value: str) -> str:
    """The host of a ``Host`` header or an origin's netloc, lower-case, without port, brackets or final dot."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.split(":")[0]
    return value.rstrip(".")


def _route_name(app: Any, scope: dict) -> str:
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return f"{scope['method']} {getattr(route, 'path', '?')}"
    return "other"


class Gate:
    """ASGI middleware: the checks above, body draining before early answers, and request counting."""

    def __init__(self, app: Any, fastapi_app: Any) -> None:
        self.app = app
        self.fastapi_app = fastapi_app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state: ServerState = self.fastapi_app.state.serve
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        started, status = time.monotonic(), [500]
        body = _BodyTracker(receive, headers, state.settings.drain_bytes, state.settings.body_timeout_s)
        cors = _cors_headers(headers, state)

        async def guarded_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                if status[0] != 408:
                    await body.drain()
                if cors:
                    message = {**message, "headers": [*message.get("headers", []), *cors]}
            await send(message)

        try:
            refusal = _refusal(scope, headers, state)
            if refusal is None:
                await self.app(scope, body.receive, guarded_send)
            elif isinstance(refusal, ApiError):
                response = JSONResponse(refusal.body(), refusal.status, headers=refusal.headers)
                await response(scope, body.receive, guarded_send)
            else:
                await refusal(scope, body.receive, guarded_send)
        finally:
            state.metrics.record(_route_name(self.fastapi_app, scope), status[0], time.monotonic() - started)


class _BodyTracker:
    """Passes ``receive`` through, noting whether the body is complete; :meth:`drain` reads and drops the rest."""

    def __init__(self, receive: Callable, headers: dict[str, str], drain_bytes: int, drain_s: float) -> None:
        self._receive = receive
        self.complete = "content-length" not in headers and "transfer-encoding" not in headers
        self._asks_to_continue = headers.get("expect", "").lower() == "100-continue"
        self._started = False
        length = headers.get("content-length", "")
        self._length = int(length) if length.strip().isdigit() else None
        self._received = 0
        self._drain_bytes, self._drain_s = drain_bytes, drain_s

    async def receive(self) -> dict:
        message = await self._receive()
        self._started = True
        if message["type"] == "http.request":
            self._received += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True
        return message

    async def drain(self) -> None:
        """Read and drop the unread body (up to ``drain_bytes``, for at most ``drain_s``)."""
        if self.complete or (self._asks_to_continue and not self._started):
            return  # nothing left, or the client waits for a 100 Continue it will not get
        if self._length is not None and self._length - self._received > self._drain_bytes:
            return  # too much to read: the connection is closed instead
        deadline = time.monotonic() + self._drain_s
        budget = self._drain_bytes
        try:
            while not self.complete and budget > 0:
                before = self._received
                await asyncio.wait_for(self.receive(), max(0.0, deadline - time.monotonic()))
                budget -= self._received - before
        except TimeoutError:
            return


def _refusal(scope: dict, headers: dict[str, str], state: ServerState) -> ApiError | JSONResponse | None:
    """The answer to give without running the request, or None."""
    settings = state.settings
    allowed = settings.allowed_hosts
    if allowed is None:
        server = scope.get("server") or ("",)
        allowed = (*LOCAL_HOSTS, str(server[0]))
    host = host_name(headers.get("host", ""))
    if "*" not in allowed and host not in {host_name(h) for h in allowed}:
        return ApiError(400, f"the Host header {headers.get('host', '')[:80]!r} is not allowed here", "invalid_host")
    origin = headers.get("origin")
    # same origin: the page's own address, which the browser also sent as the Host header
    cross = origin is not None and origin.partition("://")[2].lower() != headers.get("host", "").lower()
    if scope["method"] == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
        if origin not in settings.cors_origins:
            return ApiError(403, f"cross-origin requests from {origin[:80]!r} are not allowed", "cross_origin")
        preflight = {"Access-Control-Allow-Methods": "GET, HEAD, POST", "Access-Control-Allow-Headers": CORS_HEADERS,
                     "Access-Control-Max-Age": "600"}  # fmt: skip
        return JSONResponse(None, 204, headers=preflight)
    if settings.api_key and scope["path"].startswith(PROTECTED_PREFIXES):
        given = headers.get("authorization", "")
        scheme, _, key = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), settings.api_key.encode()):
            what = "is missing" if not given else "is not the server's key"
            return ApiError(401, f"an API key is needed (Authorization: Bearer KEY); the one given {what}",
                            "unauthorized", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    if cross and scope["method"] not in SAFE_METHODS and origin not in settings.cors_origins:
        return ApiError(403, f"cross-origin requests from {origin[:80]!r} are not allowed", "cross_origin")
    length = headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            return ApiError(400, "Content-Length is not a number", "invalid_request_error")
        if int(length) > settings.max_body_bytes:
            return ApiError(
                413, f"the request body ({int(length):,} bytes) is larger than the limit of "
                f"{settings.max_body_bytes:,} bytes", "request_too_large", headers={"Connection": "close"},
            )  # fmt: skip
    return None


def _cors_headers(headers: dict[str, str], state: ServerState) -> list[tuple[bytes, bytes]]:
    """``Access-Control-Allow-Origin`` for an origin of the allow-list, else nothing."""
    origin = headers.get("origin")
    if origin is None or origin not in state.settings.cors_origins:
        return []
    return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
