"""``onepeace data build-demo`` and ``onepeace data index-shards``: the command-line side of :mod:`onepeace.corpus`
and of the shard manifest (:mod:`onepeace.data.shard_manifest`)."""

from __future__ import annotations

import argparse
from pathlib import Path

SOURCE_NAMES = ("tuxpaint", "emoji", "numerals", "fsdd", "espeak", "instruments")


def _sources(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = sorted(set(names) - set(SOURCE_NAMES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown source(s) {', '.join(unknown) or '(none)'}; known: {SOURCE_NAMES}")
    return names


def existing_path(value: str) -> Path:
    """An argparse type for a file or folder the user names: it must exist (a typo is not a skipped source)."""
    path = Path(value)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{value} does not exist")
    return path


def build_demo(args: argparse.Namespace) -> int:
    """Build the demo corpus and print what each source gave."""
    from onepeace.corpus.build import BuildOptions, build_demo_corpus
    from onepeace.corpus.sources import all_sources

    options = BuildOptions(
        heldout_fraction=args.heldout_fraction,
        splits=("heldout",) if args.heldout_only else ("train", "heldout"),
        limit=args.limit,
        max_seconds=args.max_seconds,
    )
    sources = [s for s in all_sources(fsdd=args.fsdd, npm_dir=args.npm_dir) if s.name in args.sources]
    reports = build_demo_corpus(args.out, sources, options)
    for r in reports:
        counts = f"{r.items['train']} train / {r.items['heldout']} held-out items, {r.images} images, {r.clips} clips"
        print(f"{r.name:12s} {counts}" if r.status == "ok" else f"{r.name:12s} {r.status}")
    print(f"corpus written to {args.out} (sources and licences: {Path(args.out) / 'SOURCES.md'})")
    return 0


def index_shards(args: argparse.Namespace) -> int:
    """Write the sample-count manifest of a shard directory and print its totals."""
    from onepeace.data.shard_manifest import MANIFEST, index_shards

    entries = index_shards(args.directory)
    samples = sum(e["samples"] for e in entries.values())
    print(f"{len(entries)} shards, {samples} samples: {Path(args.directory) / MANIFEST}")
    return 0


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Add ``data`` with its ``build-demo`` and ``index-shards`` subcommands."""
    data = sub.add_parser("data", parents=parents, help="build datasets", description="Build datasets.")
    data_sub = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", required=True)
    p = data_sub.add_parser(
        "build-demo",
        parents=parents,
        help="assemble the offline demo corpus (image-text, audio-text, triples)",
        description="Assemble image-text and audio-text pairs from offline-installable sources (Tux Paint "
        "stamps, emoji, FSDD spoken digits, espeak-ng speech, fluidsynth instrument notes) into the pretraining "
        "TSV format with a train / held-out split by item. Idempotent; unavailable sources are skipped with a "
        "message. See docs/demo_corpus.md.",
    )
    p.add_argument("out", type=Path, metavar="OUT", help="corpus folder (created or brought up to date)")
    p.add_argument(
        "--fsdd", type=existing_path, help="FSDD recordings.tar.gz or its recordings folder (or $ONEPEACE_FSDD)"
    )
    p.add_argument("--npm-dir", type=Path, help="folder whose node_modules holds the emoji packages")
    p.add_argument("--limit", type=int, help="at most this many items per source and split")
    p.add_argument("--heldout-only", action="store_true", help="write only the held-out split")
    p.add_argument("--heldout-fraction", type=float, default=0.15, help="share of items held out (default 0.15)")
    p.add_argument("--max-seconds", type=float, default=4.0, help="clips are cut to this length (default 4)")
    p.add_argument(
        "--sources", type=_sources, default=SOURCE_NAMES, help=f"comma-separated subset of {','.join(SOURCE_NAMES)}"
    )
    p.set_defaults(handler=build_demo)
    q = data_sub.add_parser(
        "index-shards",
        parents=parents,
        help="write the sample counts of a directory of tar shards (read once instead of by every rank)",
        description="Count the samples of every tar shard (*.tar, *.tar.gz, *.tgz) of DIR from its headers and "
        "write DIR/onepeace-shards.json (name, size, modification time, samples per shard). Pretraining loaders "
        "read the counts from it instead of opening every shard; entries of unchanged shards are reused.",
    )
    q.add_argument("directory", type=Path, metavar="DIR", help="the directory holding the shards")
    q.set_defaults(handler=index_shards)
