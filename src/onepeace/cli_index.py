"""``onepeace index build | search``: a persistent index of embeddings (faiss + SQLite) and queries against it.

Heavy modules (faiss, torch, the model) are imported only when a command runs. ``build`` adds to an existing
index only the content it does not hold yet, so it also resumes an interrupted build. ``search`` embeds its query
with the model recorded in the index; several ``--text``/``--image``/``--audio`` values form one composed query
(``OnePeace.compose``: the mean of the normalised embeddings, re-normalised).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from onepeace.cli_embed import DEFAULT_MODEL, MODALITY_ORDER, _positive, add_long_audio_argument, warn

DEFAULT_COMMIT_EVERY = 256


def _stored_model(index: Path) -> str | None:
    """The model name recorded in the index at ``index``, or ``None`` when there is no index there yet."""
    from onepeace.search.index import META_FILE, EmbeddingIndex

    if not (index / META_FILE).exists():
        return None
    with EmbeddingIndex.open(index) as opened:
        return opened.model_name


# ----------------------------------------------------------------------------------------------- build
def run_build(args: argparse.Namespace) -> int:
    """The ``index build`` command; returns 1 when the index ends up empty."""
    from onepeace import cli_embed
    from onepeace.search.build import build_index, collect_inputs, model_label

    out = Path(args.out)
    stored = _stored_model(out)
    requested = None if args.model is None else model_label(args.model)
    if stored is not None and requested is not None and requested != stored:
        raise ValueError(f"the index {out} holds embeddings of {stored}; build it with that model or use a new --out")
    name = stored or requested or DEFAULT_MODEL
    found = collect_inputs(args.input)
    if not found.candidates and not found.skipped:
        raise ValueError(
            f"no images, audio clips or texts found in {', '.join(args.input)} "
            f"({found.ignored} file(s) of unsupported types ignored)"
        )
    model = cli_embed.load_model(name, args.device, args.dtype, None)
    model.long_audio = args.long_audio
    report = build_index(
        model,
        found,
        out,
        batch_size=args.batch_size,
        commit_every=args.commit_every,
        progress=not args.quiet,
        model_name=name,
    )
    if args.json:
        print(json.dumps(_report_dict(report, out, name), indent=2, ensure_ascii=False))
    else:
        _print_report(report, out)
    return 0 if report.size else 1


def _report_dict(report: Any, out: Path, name: str) -> dict[str, Any]:
    return {
        "index": str(out),
        "model": name,
        "added": report.added,
        "already_present": report.already_present,
        "skipped": [{"source": s.source, "reason": s.reason} for s in report.skipped],
        "duplicates": report.duplicates,
        "ignored": report.ignored,
        "total": report.total,
        "size": report.size,
        "repaired": {"dropped_vectors": report.repair.dropped_vectors},
    }


def _print_report(report: Any, out: Path) -> None:
    for skipped in report.skipped:
        warn(f"skipped {skipped.source}: {skipped.reason}")
    if report.repair.dropped_vectors:
        print(f"repaired an interrupted build: dropped {report.repair.dropped_vectors} uncommitted vector(s)")
    print(
        f"added {report.added}; already present {report.already_present}; skipped {len(report.skipped)}; "
        f"duplicates {report.duplicates}; ignored {report.ignored} unsupported file(s); "
        f"the index {out} holds {report.size} item(s)"
    )


# ----------------------------------------------------------------------------------------------- search
def run_search(args: argparse.Namespace) -> int:
    """The ``index search`` command: one (composed) query, ranked hits as a table or JSON."""
    from onepeace import cli_embed
    from onepeace.search.build import model_dim, model_label
    from onepeace.search.index import EmbeddingIndex

    texts, images, clips = args.text or [], args.image or [], args.audio or []
    if not (texts or images or clips):
        raise ValueError("give a query: --text, --image and/or --audio (several values form one composed query)")
    for text in texts:
        if not text.strip():
            raise ValueError("--text values must not be empty")
    for file in images + clips:
        if not Path(file).is_file():
            raise FileNotFoundError(f"no such query file: {file}")
    with EmbeddingIndex.open(args.index) as index:
        name = index.model_name
        if args.model is not None and model_label(args.model) != name:
            warn(
                f"the index holds embeddings of {name}; scores from {args.model} mean something only if it "
                "embeds into the same space"
            )
            name = args.model
        model = cli_embed.load_model(name, args.device, args.dtype, None)
        if model_dim(model) != index.dim:
            raise ValueError(f"{name} makes {model_dim(model)}-d embeddings but the index holds {index.dim}-d ones")
        query = model.compose(text=texts or None, image=images or None, audio=clips or None)
        hits = index.search(query, k=args.k, modality=args.modality)
    if args.json:
        record = {
            "index": str(args.index),
            "model": name,
            "query": {"text": texts, "image": images, "audio": clips},
            "hits": [{"rank": r, **_hit_dict(hit)} for r, hit in enumerate(hits, start=1)],
        }
        print(json.dumps(record, indent=2, ensure_ascii=False))
    else:
        print(format_hits(hits))
    return 0


def _hit_dict(hit: Any) -> dict[str, Any]:
    return {"item_id": hit.item_id, "score": hit.score, "modality": hit.modality, "source": hit.source}


def format_hits(hits: list[Any]) -> str:
    """A table with one line per hit: rank, score, modality, source (a text on one line)."""
    if not hits:
        return "no hits (the index holds nothing of the requested modality)"
    lines = [f"{'rank':>4}  {'score':>7}  {'modality':<8}  source"]
    for rank, hit in enumerate(hits, start=1):
        lines.append(f"{rank:>4}  {hit.score:>7.4f}  {hit.modality:<8}  {' '.join(hit.source.split())}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- parsers
def _add_build(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "build",
        parents=parents,
        help="embed folders or manifests into an index (adds only new content; resumes)",
        description="Embed the images, audio clips and texts of folders (walked recursively; .txt files give one "
        "text per non-empty line), manifests (.jsonl with text/path/image/audio fields, or .lst/.list with one "
        "path per line) or single files into the index folder OUT (faiss vectors + SQLite metadata). Content the "
        "index already holds (same sha256) is not embedded again, so running build again adds only new items and "
        "resumes an interrupted build. Unreadable files are skipped and reported (and tried again by the next build); "
        "the exit code is 1 when the index ends up empty.",
    )
    p.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="DIR_OR_MANIFEST",
        help="folder, manifest or file (repeatable)",
    )
    p.add_argument("--out", required=True, metavar="INDEX", help="the index folder (created if missing)")
    p.add_argument(
        "--model",
        metavar="PATH_OR_VARIANT",
        help=f"model for a new index (default: {DEFAULT_MODEL}); an existing index keeps the model it was built with",
    )
    p.add_argument("--batch-size", type=_positive, default=16, metavar="N", help="items per batch (default: 16)")
    add_long_audio_argument(p)
    p.add_argument(
        "--commit-every",
        type=_positive,
        default=DEFAULT_COMMIT_EVERY,
        metavar="N",
        help=f"items per commit; an interruption loses at most N embeddings (default: {DEFAULT_COMMIT_EVERY})",
    )
    _add_model_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--json", action="store_true", help="print the build report as JSON")
    p.set_defaults(handler=run_build)


def _add_search(sub: Any, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "search",
        parents=parents,
        help="rank the items of an index against a text, image and/or audio query",
        description="Embed the query with the index's model and print the best items (score = cosine "
        "similarity). Several --text/--image/--audio values form one composed query: the mean of their "
        "normalised embeddings, re-normalised.",
    )
    p.add_argument("index", metavar="INDEX", help="an index folder made by onepeace index build")
    p.add_argument("--text", action="append", metavar="STR", help="a text query (repeatable)")
    p.add_argument("--image", action="append", metavar="PATH", help="an image query (repeatable)")
    p.add_argument("--audio", action="append", metavar="PATH", help="an audio query (repeatable)")
    p.add_argument("--k", type=_positive, default=10, help="number of hits (default: 10)")
    p.add_argument("--modality", choices=MODALITY_ORDER, help="return only items of this modality")
    p.add_argument(
        "--model",
        metavar="PATH_OR_VARIANT",
        help="embed the query with this model instead of the index's (warns: it must share the embedding space)",
    )
    _add_model_options(p)
    p.add_argument("--json", action="store_true", help="print the hits as JSON")
    p.set_defaults(handler=run_search)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cpu)")
    p.add_argument("--dtype", help="parameter dtype: float32, bfloat16, float16 or int8 (CPU only; default: as stored)")


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register ``index`` with its actions ``build`` and ``search``."""
    p = subparsers.add_parser(
        "index",
        parents=parents,
        help="build a persistent search index of embeddings, and search it",
        description="A persistent index of image, audio and text embeddings (faiss + SQLite in one folder).",
    )
    actions = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)
    _add_build(actions, parents)
    _add_search(actions, parents)
