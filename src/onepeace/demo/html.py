"""The demo's HTML report: one self-contained page (media embedded as data URIs) with every query and its hits."""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from pathlib import Path

from onepeace.demo.gallery import Hit
from onepeace.demo.queries import Query

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".flac": "audio/flac", ".wav": "audio/wav"}
_MIME.update({".ogg": "audio/ogg"})

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
section { margin-bottom: 2em; border-top: 1px solid #ccc; padding-top: 1em; }
.hits { display: flex; flex-wrap: wrap; gap: 1em; }
.hit { width: 170px; font-size: 0.85em; }
.hit img, .query img { width: 128px; height: 128px; object-fit: contain; border: 1px solid #ddd; }
.right { color: #06702b; font-weight: 600; }
audio { width: 165px; }
pre { background: #f6f6f6; padding: 1em; }
"""


def data_uri(path: Path) -> str:
    """``data:`` URI of a media file (the page then needs no other file)."""
    mime = _MIME.get(path.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def _media(path: Path | None) -> str:
    if path is None:
        return ""
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        return f'<img src="{data_uri(path)}" alt="{html.escape(path.name)}">'
    return f'<audio controls preload="none" src="{data_uri(path)}"></audio>'


def _query_html(query: Query, hits: Sequence[Hit]) -> str:
    inputs = [f"<p>text: <q>{html.escape(query.text)}</q></p>" if query.text else ""]
    inputs += [_media(query.image), _media(query.audio)]
    cards = []
    for rank, hit in enumerate(hits, 1):
        mark = '<span class="right">&#10003; right</span>' if query.is_right(hit.entry) else ""
        body = _media(hit.entry.path) if hit.entry.path else ""
        cards.append(
            f'<div class="hit">#{rank} score {hit.score:.3f} {mark}<br>{body}<br>{html.escape(hit.entry.text)}</div>'
        )
    return (
        f"<section><h2>{html.escape(query.kind)}</h2><div class='query'>{''.join(inputs)}</div>"
        f"<div class='hits'>{''.join(cards)}</div></section>"
    )


def write_report(
    path: Path, title: str, intro: str, results: Sequence[tuple[Query, Sequence[Hit]]], metrics: str = ""
) -> Path:
    """Write the page: ``results`` are (query, hits) pairs; ``metrics`` is a plain-text table shown as is."""
    sections = "".join(_query_html(q, hits) for q, hits in results)
    metric_html = f"<section><h2>Held-out metrics</h2><pre>{html.escape(metrics)}</pre></section>" if metrics else ""
    page = (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"
        f"{sections}{metric_html}</body></html>"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
