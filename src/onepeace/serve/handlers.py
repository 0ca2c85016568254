"""Request handling of ``POST /v1/embeddings`` and ``POST /v1/search``: body, parsing, decoding, embedding, search.

Each request's media are decoded on a worker thread first (a corrupt file is a 400 before it reaches the model),
then handed to the batcher as one job per modality, and the vectors come back in input order.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.requests import ClientDisconnect, Request

from onepeace.errors import InputError, MissingDependencyError
from onepeace.serve.batcher import BatcherStopped, QueueFull
from onepeace.serve.schemas import (
    ApiError,
    EmbeddingsRequest,
    SearchRequest,
    check_text,
    decode_base64,
    parse_model,
)

if TYPE_CHECKING:
    from onepeace.serve.app import ServerState

TEXT_PAD_ID = 1
MAX_FORM_PARTS = 64
_INT = re.compile(r"^\s*[+-]?\d{1,12}\s*$")
_BUFFER_REPR = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")

Part = tuple[str, Any, str]
"""``(modality, text or encoded file bytes, label for error messages)``."""


@dataclass
class Call:
    """One request being handled; ``body`` is set once the whole body is in."""

    state: ServerState
    request: Request
    body: bytes | None = None
    started: float = field(default_factory=time.monotonic)


# ----------------------------------------------------------------------------------------------- body
def content_kind(request: Request) -> str:
    """``"json"`` or ``"multipart"`` from the Content-Type, else 415 (checked before the body is read)."""
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if mime == "application/json" or (mime.startswith("application/") and mime.endswith("+json")):
        return "json"
    if mime == "multipart/form-data":
        return "multipart"
    raise ApiError(
        415, f"unsupported Content-Type {mime or '(none)'!r}; send application/json or multipart/form-data",
        "unsupported_media_type",
    )  # fmt: skip


async def read_body(call: Call) -> bytes:
    """The whole body, refused with 413 as soon as it passes the limit (for bodies sent without a length)."""
    if call.body is not None:
        return call.body
    limit = call.state.settings.max_body_bytes
    chunks, size = [], 0
    try:
        async for chunk in call.request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(
                    413,
                    f"the request body is larger than the limit of {limit:,} bytes",
                    "request_too_large",
                    headers={"Connection": "close"},
                )
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(400, "the client closed the connection before the body was complete") from None
    call.body = b"".join(chunks)
    return call.body


async def _read_form(call: Call, body: bytes) -> list[tuple[str, str | bytes, bool]]:
    """Multipart parts in order as ``(name, value, is_file)``; a file part without a file name and data is skipped."""
    from python_multipart.multipart import parse_options_header

    _, params = parse_options_header(call.request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise ApiError(400, "multipart/form-data without a boundary parameter")
    if not body.rstrip(b"\r\n").endswith(b"--" + boundary + b"--"):
        raise ApiError(400, "the multipart body is truncated: its closing boundary is missing")
    delivered = False

    async def replay() -> dict:
        nonlocal delivered
        if delivered:
            return {"type": "http.disconnect"}
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {k: v for k, v in call.request.scope.items() if k != "app"}  # without "app": parse errors are raised
    try:
        form = await Request(scope, replay).form(max_files=MAX_FORM_PARTS, max_fields=MAX_FORM_PARTS)
    except Exception as exc:
        raise ApiError(400, f"malformed multipart body: {getattr(exc, 'message', exc)}") from None
    parts: list[tuple[str, str | bytes, bool]] = []
    try:
        for name, value in form.multi_items():
            if isinstance(value, str):
                parts.append((name, value, False))
                continue
            data = await value.read()
            if data or value.filename:
                parts.append((name, data, True))
    finally:
        await form.close()
    return parts


def _form_text(value: str | bytes, is_file: bool, name: str) -> str:
    if is_file:
        raise ApiError(400, f"form field {name!r} must be a plain field, not a file")
    return str(value)


def _form_file(value: str | bytes, is_file: bool, name: str) -> bytes:
    if not is_file:
        raise ApiError(400, f"form field {name!r} must be a file upload")
    if not value:
        raise ApiError(400, f"{name}: the uploaded file is empty", "invalid_media")
    return bytes(value)


# ----------------------------------------------------------------------------------------------- embedding
def _decode(state: ServerState, parts: list[Part]) -> tuple[list[tuple[str, Any]], int]:
    """Decoded inputs ``(modality, value)`` and the usage count; 400 for undecodable media."""
    from onepeace.data.audio import load_audio
    from onepeace.data.image import load_image

    audio_cfg, settings = state.model.cfg.audio, state.settings
    out: list[tuple[str, Any]] = []
    tokens, pixels, samples = 0, 0, 0
    try:
        texts = [raw for modality, raw, _ in parts if modality == "text"]
        if texts:
            tokens += int((state.model.tokenize(texts) != TEXT_PAD_ID).sum())
        for modality, raw, label in parts:
            if modality == "text":
                out.append((modality, raw))
                continue
            tokens += 1
            if modality == "image":
                width, height = _image_size(raw, label)
                pixels += width * height
                if pixels > settings.max_image_pixels:
                    raise InputError(
                        f"{label}: {width}x{height} pixels is more than the server accepts "
                        f"({settings.max_image_pixels:,} pixels per request)"
                    )
                out.append((modality, load_image(raw, name=label)))
            else:
                samples += _check_audio_size(raw, label, settings, samples)
                out.append((modality, load_audio(raw, target_rate=audio_cfg.sample_rate, name=label)))
    except MissingDependencyError as exc:
        raise ApiError(501, str(exc), "not_implemented") from None
    except InputError as exc:
        raise ApiError(400, _media_message(exc), "invalid_media") from None
    return out, tokens


def _media_message(exc: Exception) -> str:
    """The decoder's message without the in-memory file object's repr it sometimes quotes."""
    return _BUFFER_REPR.sub("the uploaded data", " ".join(str(exc).split()))


def _image_size(raw: bytes, label: str) -> tuple[int, int]:
    """Width and height from the image header, without decoding the pixels."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as probe:
            return probe.size
    except Exception as exc:  # any failure to identify user bytes is an input problem
        raise InputError(
            f"{label}: not a readable image (unknown or unsupported format: {type(exc).__name__})"
        ) from None


def _check_audio_size(raw: bytes, label: str, settings: Any, earlier: int) -> int:
    """Samples (frames x channels) of a clip from its header, refused past the seconds or samples limit.

    ``earlier`` is the samples of the request's clips before this one (the limit is per request). Nothing is
    decoded; a format that does not tell its length counts as 0.
    """
    from onepeace.errors import require

    soundfile = require("soundfile", "audio")
    try:
        info = soundfile.info(io.BytesIO(raw))
    except Exception as exc:  # libsndfile reports unreadable data with several exception types
        raise InputError(f"{label}: cannot decode audio (unreadable data or unsupported format: {exc})") from None
    frames, rate, channels = max(0, info.frames), max(0, info.samplerate), max(1, info.channels)
    if rate and frames / rate > settings.max_audio_seconds:
        raise InputError(
            f"{label}: {frames / rate:.1f} s of audio is more than the server accepts "
            f"({settings.max_audio_seconds:g} s per clip)"
        )
    samples = frames * channels
    if earlier + samples > settings.max_audio_samples:
        raise InputError(
            f"{label}: {frames:,} frames x {channels} channels at {rate:,} Hz ({samples:,} samples) is more audio "
            f"than the server decodes ({settings.max_audio_samples:,} samples per request over all clips)"
        )
    return samples


async def embed_parts(call: Call, parts: list[Part]) -> tuple[np.ndarray, int]:
    """``([len(parts), D] float32 unit rows in order, usage tokens)`` through the batcher."""
    state = call.state
    for modality, _, label in parts:
        if modality not in state.modalities:
            raise ApiError(400, f"{label}: this model does not embed {modality}")
    decoded, tokens = await asyncio.to_thread(_decode, state, parts)
    groups: dict[str, list[int]] = {}
    for i, (modality, _) in enumerate(decoded):
        groups.setdefault(modality, []).append(i)
    futures = []
    try:
        for modality, positions in groups.items():
            futures.append(state.batcher.submit(modality, [decoded[i][1] for i in positions]))
    except (QueueFull, BatcherStopped) as exc:
        for fut in futures:
            fut.cancel()
        raise ApiError(503, f"{exc}; retry shortly", "overloaded", headers={"Retry-After": "1"}) from None
    try:
        results = await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
    except InputError as exc:
        raise ApiError(400, _media_message(exc), "invalid_media") from None
    out = np.empty((len(parts), state.dim), dtype=np.float32)
    for positions, rows in zip(groups.values(), results):
        out[positions] = rows
    return out, tokens


# ----------------------------------------------------------------------------------------------- routes
async def embeddings(call: Call) -> dict[str, Any]:
    """``POST /v1/embeddings``: OpenAI-shaped list of vectors, in input order."""
    kind = content_kind(call.request)
    body = await read_body(call)
    encoding = "float"
    if kind == "json":
        req: EmbeddingsRequest = await asyncio.to_thread(parse_model, EmbeddingsRequest, body)
        encoding = req.encoding_format
        if req.dimensions is not None and req.dimensions != call.state.dim:
            raise ApiError(400, f"dimensions must be {call.state.dim} for this model, got {req.dimensions}")
        items = req.items()
        _check_count(call, len(items))
        parts: list[Part] = []
        for modality, value, label in items:
            raw = check_text(value, label) if modality == "text" else decode_base64(value, label)
            parts.append((modality, raw, label))
    else:
        parts = []
        for name, value, is_file in await _read_form(call, body):
            label = f"input[{len(parts)}] ({name})"
            if name in ("input", "text"):
                parts.append(("text", check_text(_form_text(value, is_file, name), label), label))
            elif name in ("image", "audio"):
                parts.append((name, _form_file(value, is_file, label), label))
            elif name == "encoding_format":
                encoding = _form_text(value, is_file, name)
                if encoding not in ("float", "base64"):
                    raise ApiError(400, f"encoding_format must be float or base64, got {encoding[:40]!r}")
            elif name != "model":
                raise ApiError(400, f"unknown form field {name!r}; use input (or text), image, audio")
    _check_count(call, len(parts))
    vectors, tokens = await embed_parts(call, parts)
    data = [{"object": "embedding", "index": i, "embedding": _encode(vec, encoding)} for i, vec in enumerate(vectors)]
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {"object": "list", "data": data, "model": call.state.model_name, "usage": usage}


def _check_count(call: Call, count: int) -> None:
    if not count:
        raise ApiError(400, "input is empty: give at least one text, image or audio")
    if count > call.state.settings.max_inputs:
        raise ApiError(400, f"too many inputs ({count}); at most {call.state.settings.max_inputs} per request")


def _encode(vec: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return vec.tolist()


async def _search_query(call: Call) -> tuple[list[Part], int, str | None]:
    """``(query parts in text/image/audio order, k, modality filter)`` from a JSON or multipart body."""
    kind = content_kind(call.request)
    body = await read_body(call)
    if kind == "json":
        req: SearchRequest = await asyncio.to_thread(parse_model, SearchRequest, body)
        parts = [("text", check_text(req.text, "text"), "text")] if req.text is not None else []
        for modality in ("image", "audio"):
            value = getattr(req, modality)
            if value is not None:
                parts.append((modality, decode_base64(value, modality), modality))
        return parts, call.state.settings.default_k if req.k is None else req.k, req.modality
    fields: dict[str, tuple[str | bytes, bool]] = {}
    for name, value, is_file in await _read_form(call, body):
        if name not in ("text", "image", "audio", "k", "modality"):
            raise ApiError(400, f"unknown form field {name!r}; use text, image, audio, k, modality")
        if name in fields:
            raise ApiError(400, f"form field {name!r} is given more than once")
        fields[name] = (value, is_file)
    parts = []
    if "text" in fields:
        parts.append(("text", check_text(_form_text(*fields["text"], "text"), "text"), "text"))
    for modality in ("image", "audio"):
        if modality in fields:
            parts.append((modality, _form_file(*fields[modality], modality), modality))
    k = call.state.settings.default_k
    if "k" in fields:
        raw_k = _form_text(*fields["k"], "k")
        if not _INT.match(raw_k):
            raise ApiError(400, f"k: must be an integer, got {raw_k[:40]!r}")
        k = int(raw_k)
    modality_filter = None
    if "modality" in fields:
        modality_filter = _form_text(*fields["modality"], "modality").strip() or None
    if modality_filter not in (None, "text", "image", "audio"):
        raise ApiError(400, f"modality must be text, image or audio, got {modality_filter[:40]!r}")
    return parts, k, modality_filter


async def search(call: Call) -> dict[str, Any]:
    """``POST /v1/search``: hits of the (composed) query, best first."""
    state = call.state
    parts, k, modality = await _search_query(call)
    if not parts:
        raise ApiError(400, "give at least one of text, image, audio to search with")
    if not 1 <= k <= state.settings.max_k:
        raise ApiError(400, f"k must be between 1 and {state.settings.max_k}, got {k}")
    vectors, _ = await embed_parts(call, parts)
    query = vectors.mean(axis=0)
    query = (query / max(float(np.linalg.norm(query)), 1e-12)).astype(np.float32)
    found = await state.on_index(state.index.search, query, min(k, state.size), modality) if state.size else []
    hits = []
    for rank, hit in enumerate(found, start=1):
        url = f"/v1/items/{hit.item_id}/media" if hit.modality in ("image", "audio") else None
        hits.append(
            {"rank": rank, "item_id": int(hit.item_id), "score": float(hit.score), "modality": hit.modality,
             "source": hit.source, "url": url}
        )  # fmt: skip
    took = round(1000 * (time.monotonic() - call.started), 3)
    query_modalities = [m for m, _, _ in parts]
    return {"object": "search.result", "model": state.model_name, "query": query_modalities, "k": k,
            "modality": modality, "hits": hits, "took_ms": took}  # fmt: skip
