"""The HTTP server: embeddings (OpenAI shape), search over an :class:`EmbeddingIndex`, media, health, metrics, web page.

``create_app(index_path)`` loads the index (and the model it was built with), starts the batching worker and
returns a FastAPI app. Routes: ``POST /v1/embeddings``, ``POST /v1/search``, ``GET /v1/items/{id}`` and
``GET /v1/items/{id}/media``, ``GET /healthz``, ``GET /metrics``, ``GET /`` (the search page) and ``/static/*``.

Limits: a body larger than ``max_body_bytes`` is refused with 413 from its ``Content-Length`` before any of it is
kept (a body without a length is counted while it streams in); a body must arrive within ``body_timeout_s``, else
408. Only then does the request take one of ``max_concurrency`` slots (``/healthz``, ``/metrics``, items, media and
the page take none), waiting for one while at most ``max_waiting`` others wait, else 503; a full batching queue
also gives 503, and a request not answered within ``timeout_s`` of getting its slot gives 504. Memory stays
bounded: at most ``max_concurrency + max_waiting`` requests hold a complete body (``max_body_bytes``), only the
``max_concurrency`` running ones their decoded media (``max_image_pixels`` RGB pixels, clips of
``max_audio_seconds`` and ``max_audio_samples`` samples over all channels, checked from the file headers before
decoding), and texts are cut before tokenisation; the batching queue only holds jobs of running requests. A
request still sending its body holds what has arrived (at most ``max_body_bytes``) and no slot. See
:mod:`onepeace.serve.guard` for the host, API key and origin checks. Errors are
``{"error": {"message": ..., "type": ...}}``.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from onepeace.serve import handlers
from onepeace.serve.batcher import Batcher
from onepeace.serve.guard import Gate, Slots
from onepeace.serve.media import MEDIA_TYPES, MediaChecker
from onepeace.serve.schemas import ApiError, Health

log = logging.getLogger("onepeace.serve")
STATIC_DIR = Path(__file__).parent / "static"
ITEM_ID = re.compile(r"[0-9]{1,18}")
PAGE_CSP = "default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; object-src 'none'"


@dataclass(frozen=True)
class ServeSettings:
    """Server limits and batching parameters (all have defaults fit for a small CPU server)."""

    max_body_bytes: int = 10 * 1024 * 1024
    timeout_s: float = 30.0
    """Longest a request may run once its body is in and it has a slot; then 504."""
    body_timeout_s: float = 10.0
    """Longest a request body may take to arrive; then 408 (slow senders hold no slot meanwhile)."""
    drain_bytes: int = 64 * 1024 * 1024
    """Most body bytes read and dropped before an early answer (413, 415, ...), so that the client reads it."""
    max_k: int = 100
    default_k: int = 10
    max_image_pixels: int = 16_000_000
    """Most image pixels one request may decode (all its images together)."""
    max_audio_seconds: float = 120.0
    """Longest clip accepted, read from the file header before decoding (the model uses the first 15 s)."""
    max_audio_samples: int = 48_000 * 2 * 120
    """Most audio samples (frames x channels, all clips of a request) decoded: 120 s of 48 kHz stereo."""
    max_inputs: int = 256
    max_batch: int = 32
    batch_wait_ms: float = 5.0
    max_queue: int = 256
    max_concurrency: int = 32
    """Most requests running at once (their body in); each holds one body and its decoded media."""
    max_waiting: int = 64
    """Most requests with a complete body waiting for a slot; beyond that, 503."""
    api_key: str | None = None
    """If set, ``/v1/*`` and ``/metrics`` need ``Authorization: Bearer API_KEY``."""
    allowed_hosts: tuple[str, ...] | None = None
    """Host header values accepted (``"*"``: any); default localhost names and the address the client reached."""
    cors_origins: tuple[str, ...] = ()
    """Origins (``https://app.example``) allowed to call the API from a browser page; others cannot POST."""
    model: str | None = None
    """Model name or path to load when ``create_app`` gets none (default: the model the index was built with)."""


class Metrics:
    """Request counters by route and status, latencies, and errors (single event loop: no lock needed)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.by_route: dict[str, dict[str, int]] = {}
        self.seconds: dict[str, float] = {}

    def record(self, route: str, status: int, seconds: float) -> None:
        counts = self.by_route.setdefault(route, {})
        counts[str(status)] = counts.get(str(status), 0) + 1
        self.seconds[route] = self.seconds.get(route, 0.0) + seconds

    def snapshot(self) -> dict[str, Any]:
        total = {route: sum(c.values()) for route, c in self.by_route.items()}
        client = sum(n for c in self.by_route.values() for s, n in c.items() if s.startswith("4"))
        server = sum(n for c in self.by_route.values() for s, n in c.items() if s.startswith("5"))
        return {
            "uptime_s": round(time.monotonic() - self.started, 3),
            "requests_total": sum(total.values()),
            "requests": {route: dict(sorted(c.items())) for route, c in sorted(self.by_route.items())},
            "mean_latency_ms": {r: round(1000 * self.seconds[r] / n, 3) for r, n in sorted(total.items()) if n},
            "errors": {"client_4xx": client, "server_5xx": server},
        }


class ServerState:
    """What the handlers share: index (used from one thread), model, batcher, settings, metrics."""

    def __init__(self, index_path: Any, model: Any, settings: ServeSettings) -> None:
        self.settings = settings
        self.index_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="onepeace-index")
        opened = self.index_thread.submit(_open_index, index_path).result()
        self.index, self.index_dir, index_model, self.dim, self.size = opened
        self.model_name = str(settings.model or index_model)
        if model is None:
            import onepeace

            model = onepeace.load(self.model_name)
        self.model = model
        self.modalities = {getattr(m, "value", str(m)) for m in model.modalities}
        self.batcher = Batcher(
            self.embed_batch, max_batch=settings.max_batch, max_wait_ms=settings.batch_wait_ms,
            max_queue=settings.max_queue,
        )  # fmt: skip
        self.metrics = Metrics()
        self.slots = Slots(settings.max_concurrency, settings.max_waiting)
        self.media = MediaChecker()
        got = self.embed_batch("text", ["a photo"]).shape[-1]  # warm-up, and the dimension check
        if got != self.dim:
            raise ValueError(f"the model gives {got}-d embeddings but the index holds {self.dim}-d vectors")

    def embed_batch(self, modality: str, inputs: list[Any]) -> np.ndarray:
        """Worker-thread call: float32 ``[len(inputs), D]`` unit rows (re-normalised after low precision)."""
        import torch
        import torch.nn.functional as F

        out = getattr(self.model.embed(**{modality: inputs}, batch_size=max(1, len(inputs))), modality)
        if out.dtype != torch.float32:
            out = F.normalize(out.float(), dim=-1)
        return out.detach().cpu().numpy()

    async def on_index(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` on the index thread (the index may hold a connection tied to its thread)."""
        return await asyncio.wrap_future(self.index_thread.submit(fn, *args))

    async def media_path(self, info: Any) -> Path | None:
        """The indexed file of an image/audio item, if it is still the file that was indexed (see ``media``)."""
        source = Path(_field(info, "source"))
        candidates = [source] if source.is_absolute() else [self.index_dir / source, Path.cwd() / source]
        digest = str(_field(info, "content_hash"))
        for path in candidates:
            if await asyncio.to_thread(self.media.is_indexed_file, path, digest):
                return path
        return None


def _field(info: Any, name: str) -> Any:
    return info[name] if isinstance(info, dict) else getattr(info, name)


def _open_index(index_path: Any) -> tuple[Any, Path, str, int, int]:
    """``(index, folder for relative sources, model name, dim, size)``; ``index_path`` may be an open index.

    Runs on the index thread: the index's SQLite connection may only be used from the thread that opened it.
    """
    if hasattr(index_path, "search"):
        index, folder = index_path, Path(getattr(index_path, "path", Path.cwd()))
    else:
        from onepeace.search.index import EmbeddingIndex

        folder = Path(index_path)
        index = EmbeddingIndex.open(folder)
    return index, folder if folder.is_dir() else folder.parent, str(index.model_name), int(index.dim), len(index)


def _error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return _error_response(exc)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        kinds = {404: "not_found", 405: "method_not_allowed"}
        err = ApiError(exc.status_code, str(exc.detail), kinds.get(exc.status_code, "http_error"), exc.headers)
        return _error_response(err)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(ApiError(400, f"invalid request: {exc}"))

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _error_response(ApiError(500, f"internal error ({type(exc).__name__})", "internal_error"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, internal_error)


async def _with_deadline(state: ServerState, request: Request, work: Callable[[handlers.Call], Awaitable[Any]]) -> Any:
    """Read the body (408 past ``body_timeout_s``), then run ``work`` holding a slot (504 past ``timeout_s``)."""
    call = handlers.Call(state, request)
    handlers.content_kind(request)
    settings = state.settings
    try:
        await asyncio.wait_for(handlers.read_body(call), settings.body_timeout_s)
    except TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {settings.body_timeout_s:g} s", "timeout",
            headers={"Connection": "close"},
        ) from None  # fmt: skip
    async with state.slots.hold(settings.timeout_s):
        try:
            return await asyncio.wait_for(work(call), settings.timeout_s)
        except TimeoutError:
            raise ApiError(504, f"the request took longer than {settings.timeout_s:g} s", "timeout") from None


def create_app(index_path: Any, model: Any = None, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving ``index_path`` (an index folder/file, or an open index) with ``model``.

    ``model`` defaults to ``onepeace.load(settings.model or index.model_name)``.
    """
    settings = settings or ServeSettings()
    state = ServerState(index_path, model, settings)
    state.batcher.start()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.slots.reset()
        state.batcher.start()
        try:
            yield
        finally:
            state.batcher.stop()

    app = FastAPI(title="onepeace", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.serve = state
    app.add_middleware(Gate, fastapi_app=app)
    _install_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        headers = {"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-cache"}
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=headers)

    @app.get("/healthz")
    async def healthz() -> Health:
        uptime = round(time.monotonic() - state.metrics.started, 3)
        status = "ok" if state.batcher.running else "stopped"
        return Health(status=status, model=state.model_name, index_size=state.size, dim=state.dim, uptime_s=uptime)

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        slots = {"in_flight": state.slots.busy, "waiting_for_slot": state.slots.waiting}
        return {**state.metrics.snapshot(), **slots, "batching": state.batcher.stats()}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> JSONResponse:
        return JSONResponse(await _with_deadline(state, request, handlers.embeddings))

    @app.post("/v1/search")
    async def search(request: Request) -> JSONResponse:
        return JSONResponse(await _with_deadline(state, request, handlers.search))

    @app.get("/v1/items/{item_id}")
    async def item(item_id: str) -> dict[str, Any]:
        info = await _item(state, item_id)
        out = {"item_id": int(item_id), "modality": _field(info, "modality"), "source": _field(info, "source")}
        out["url"] = f"/v1/items/{int(item_id)}/media" if out["modality"] != "text" else None
        return out

    @app.api_route("/v1/items/{item_id}/media", methods=["GET", "HEAD"])
    async def media(item_id: str) -> FileResponse:
        info = await _item(state, item_id)
        if _field(info, "modality") == "text":
            raise ApiError(404, f"item {item_id} is a text; it has no media file", "not_found")
        path = await state.media_path(info)
        if path is None:
            raise ApiError(404, f"the file of item {item_id} is no longer the one indexed", "not_found")
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"}
        return FileResponse(path, media_type=MEDIA_TYPES[path.suffix.lower()], headers=headers)

    return app


async def _item(state: ServerState, item_id: str) -> Any:
    """The index's info about ``item_id``, or 404."""
    if not ITEM_ID.fullmatch(item_id):
        raise ApiError(404, f"no item with id {item_id!r}", "not_found")
    try:
        return await state.on_index(state.index.item, int(item_id))
    except KeyError:
        raise ApiError(404, f"no item with id {item_id}", "not_found") from None
