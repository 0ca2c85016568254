"""HTTP server for an embedding index: ``onepeace serve --index INDEX`` (needs ``pip install 'onepeace[serve]'``).

``create_app(index_path, model=None, settings=ServeSettings())`` returns the FastAPI app. The API:

``POST /v1/embeddings`` (OpenAI embeddings shape)
    JSON ``{"input": "a text" | [...], "model": optional, "modality": "text"|"image"|"audio", "encoding_format":
    "float"|"base64"}``. Strings are texts, or base64 files when ``modality`` is ``image``/``audio``; list items
    may also be objects ``{"text": ...}``, ``{"image": "<base64>"}``, ``{"audio": "<base64>"}`` (a
    ``data:...;base64,`` prefix is accepted), so one request can mix modalities. Multipart: fields ``input``
    (texts), files ``image``/``audio`` (each repeatable), in part order. Answer: ``{"object": "list", "data":
    [{"object": "embedding", "index": i, "embedding": [...]}], "model": ..., "usage": {"prompt_tokens": n,
    "total_tokens": n}}`` (tokens: BPE ids of the texts, plus one per image or clip).
``POST /v1/search``
    JSON ``{"text": ..., "image": "<base64>", "audio": "<base64>", "k": 10, "modality": optional}`` or multipart
    (fields ``text``, ``k``, ``modality``; files ``image``, ``audio``). Several inputs form one composed query (the
    mean of their normalised embeddings, re-normalised, as ``OnePeace.compose``). Answer: ``{"object":
    "search.result", "model", "query": [modalities], "k", "modality", "hits": [{"rank", "item_id", "score",
    "modality", "source", "url"}], "took_ms"}``; ``url`` (``/v1/items/ID/media``) is null for texts.
``GET /v1/items/{id}`` and ``GET /v1/items/{id}/media``
    An item's record, and its indexed image or audio file with its content type (only files of the index).
``GET /healthz``, ``GET /metrics``, ``GET /`` (search page), ``/static/*``.

Errors are ``{"error": {"message": ..., "type": ...}}``: 400 (bad fields, bad or too deeply nested JSON, bad
media, a Host header not allowed), 401 (API key missing or wrong, when one is set), 403 (a POST from another
origin), 404, 405, 408 (the body did not arrive in time), 413 (body over the limit, refused from its
Content-Length before it is kept), 415 (not JSON or multipart), 503 (overloaded: queue full or too many requests
waiting for a slot), 504 (timeout). See :mod:`onepeace.serve.app` for limits, :mod:`onepeace.serve.guard` for the
checks before a route runs, :mod:`onepeace.serve.media` for media files and :mod:`onepeace.serve.batcher` for
batching.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    """``create_app`` and ``ServeSettings`` are imported on first use (FastAPI is an optional dependency)."""
    if name in __all__:
        from onepeace.errors import require

        require("fastapi", "serve")
        from onepeace.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'onepeace.serve' has no attribute {name!r}")
