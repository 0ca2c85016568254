"""Request and response models of the HTTP API, and the error type every handler raises.

Requests are validated strictly (unknown keys and wrong JSON types are errors, ``"5"`` is not an integer) and every
failure becomes ``{"error": {"message": ..., "type": ...}}`` with a 4xx status.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ModalityName = Literal["text", "image", "audio"]
MEDIA_MODALITIES = ("image", "audio")
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects a JSON body may have (the API needs 3)."""
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


class ApiError(Exception):
    """An error answered as ``status`` with ``{"error": {"message": message, "type": type}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type}}


# ----------------------------------------------------------------------------------------------- requests
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class InputItem(_Strict):
    """One item of an embeddings ``input`` list given as an object: exactly one of ``text``, ``image``, ``audio``.

    ``image`` and ``audio`` are base64 strings of an encoded file (PNG, JPEG, ... / WAV, FLAC, Ogg, ...); a
    ``data:<type>;base64,`` prefix is accepted.
    """

    text: str | None = None
    image: str | None = None
    audio: str | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> InputItem:
        given = [name for name in ("text", "image", "audio") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"an input object needs exactly one of 'text', 'image', 'audio'; got {given or 'none'}")
        return self

    @property
    def modality(self) -> str:
        """The one key that is set."""
        return next(name for name in ("text", "image", "audio") if getattr(self, name) is not None)

    @property
    def value(self) -> str:
        """The text, or the base64 string of the media."""
        return getattr(self, self.modality)


class EmbeddingsRequest(_Strict):
    """``POST /v1/embeddings`` (OpenAI embeddings shape, extended to images and audio).

    ``input``: a string or a list of strings and/or :class:`InputItem` objects. Plain strings are texts unless
    ``modality`` is ``"image"`` or ``"audio"``, which makes them base64 files of that modality. ``model`` is
    accepted for compatibility and not used to choose a model (the response names the model that served).
    ``encoding_format="base64"`` returns each vector as base64 of little-endian float32 bytes, as OpenAI does.
    ``dimensions``, if given, must equal the model's embedding size.
    """

    input: Any
    model: str | None = None
    modality: ModalityName = "text"
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None

    def items(self) -> list[tuple[str, str, str]]:
        """``(modality, text or base64 string, label)`` per input; a 400 naming the first malformed input."""
        single = isinstance(self.input, str)
        raw = [self.input] if single else self.input
        if not isinstance(raw, list):
            raise ApiError(400, f"input must be a string or a list of strings and objects, got {_json_type(raw)}")
        out = []
        for i, item in enumerate(raw):
            label = "input" if single else f"input[{i}]"
            if isinstance(item, str):
                out.append((self.modality, item, label))
            elif isinstance(item, dict):
                try:
                    parsed = InputItem.model_validate(item, strict=True)
                except ValidationError as exc:
                    raise ApiError(400, f"{label}: {validation_message(exc)}") from None
                out.append((parsed.modality, parsed.value, label))
            elif isinstance(item, list):
                raise ApiError(400, f"{label} is an array (token ids are not accepted); send the text itself")
            else:
                raise ApiError(
                    400, f'{label} must be a string or an object like {{"image": "<base64>"}}, got {_json_type(item)}'
                )
        return out


class SearchRequest(_Strict):
    """``POST /v1/search``: one or several of ``text``, ``image`` (base64), ``audio`` (base64).

    Several inputs make one composed query: the mean of their L2-normalised embeddings, re-normalised.
    ``k`` is the number of hits (1 to the server's ``max_k``; default: the server's ``default_k``, 10);
    ``modality`` keeps only hits of that modality.
    """

    text: str | None = None
    image: str | None = None
    audio: str | None = None
    k: int | None = None
    modality: ModalityName | None = None


# ----------------------------------------------------------------------------------------------- responses
class EmbeddingObject(BaseModel):
    """One vector of an embeddings response."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    """Token counts: BPE tokens of the texts (with the end token) plus one per image or audio clip."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """``POST /v1/embeddings`` answer."""

    object: Literal["list"] = "list"
    data: list[EmbeddingObject]
    model: str
    usage: Usage


class SearchHit(BaseModel):
    """One ranked hit. ``url`` serves the indexed image or audio file; it is null for text items."""

    rank: int
    item_id: int
    score: float
    modality: str
    source: str
    url: str | None = None


class SearchResponse(BaseModel):
    """``POST /v1/search`` answer: hits best first."""

    object: Literal["search.result"] = "search.result"
    model: str
    query: list[str] = Field(description="modalities combined into the query, in text, image, audio order")
    k: int
    modality: str | None = None
    hits: list[SearchHit]
    took_ms: float


class Health(BaseModel):
    """``GET /healthz`` answer."""

    status: str
    model: str
    index_size: int
    dim: int
    uptime_s: float


# ----------------------------------------------------------------------------------------------- helpers
def validation_message(exc: ValidationError) -> str:
    """A short readable message for pydantic errors: ``"k: Input should be a valid integer; ..."``."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(x) for x in err.get("loc", ()) if not _is_union_tag(x))
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {loc!r}")
        elif err.get("type") == "missing":
            parts.append(f"missing field {loc!r}")
        else:
            msg = str(err.get("msg")).removeprefix("Value error, ")
            parts.append(f"{loc}: {msg}" if loc else msg)
    seen: list[str] = []
    for part in parts:  # a union reports one error per member: keep each message once
        if part not in seen:
            seen.append(part)
    return "; ".join(seen[:5]) or "invalid request"


def _is_union_tag(x: Any) -> bool:
    """pydantic puts a union member's type name into ``loc`` (``str``, ``int``, ``function-...``)."""
    return isinstance(x, str) and (x in {"str", "int"} or x.startswith(("list[", "function-")))


def _json_type(value: Any) -> str:
    """The JSON name of a parsed value's type."""
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", dict: "an object"}
    return "null" if value is None else "an array" if isinstance(value, list) else names.get(type(value), "a value")


def json_depth(raw: bytes) -> int:
    """Deepest nesting of ``[`` and ``{`` in a JSON text (brackets inside strings do not count); O(len) in C."""
    import numpy as np

    if raw.count(b"[") + raw.count(b"{") <= MAX_JSON_DEPTH:
        return raw.count(b"[") + raw.count(b"{")
    bare = np.frombuffer(_JSON_STRING.sub(b'""', raw), dtype=np.uint8)
    steps = np.isin(bare, (ord("["), ord("{"))).astype(np.int64) - np.isin(bare, (ord("]"), ord("}")))
    return int(np.cumsum(steps).max(initial=0))


def parse_model(model: type[BaseModel], raw: bytes) -> Any:
    """Validate a JSON body into ``model``: 400 ``invalid_json`` for bad JSON, 400 for wrong fields."""
    import json

    depth = json_depth(raw)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(
            400, f"the JSON body is nested deeper than {MAX_JSON_DEPTH} levels ({depth})", "invalid_json"
        )  # fmt: skip
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ApiError(400, f"malformed JSON body: {exc}", "invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the JSON body must be an object, got {type(data).__name__}", "invalid_json")
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        raise ApiError(400, validation_message(exc)) from None


def decode_base64(value: str, label: str) -> bytes:
    """Bytes of a base64 string (standard or URL-safe alphabet, optional ``data:...;base64,`` prefix)."""
    text = value.strip()
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise ApiError(400, f"{label}: a data URL must look like data:<type>;base64,<data>", "invalid_media")
    text = "".join(text.split())
    if not text:
        raise ApiError(400, f"{label}: the base64 string is empty", "invalid_media")
    if "-" in text or "_" in text:
        text = text.replace("-", "+").replace("_", "/")
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{label}: not valid base64", "invalid_media") from None
    if not data:
        raise ApiError(400, f"{label}: the decoded file is empty", "invalid_media")
    return data


def check_text(value: str, label: str) -> str:
    """The text itself, or a 400 for an empty or blank one."""
    if not value.strip():
        raise ApiError(400, f"{label} is empty; give some words", "invalid_request_error")
    return value
