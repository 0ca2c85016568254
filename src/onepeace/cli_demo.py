"""``onepeace demo``: the command-line side of :mod:`onepeace.demo`."""

from __future__ import annotations

import argparse
from pathlib import Path

from onepeace.cli_data import existing_path


def _demo(args: argparse.Namespace) -> int:
    from onepeace.demo.run import DemoOptions, run_demo

    options = DemoOptions(
        model=args.model, out=args.out, corpus=args.corpus, fsdd=args.fsdd, limit=args.limit, top_k=args.top_k
    )
    run_demo(options)
    return 0


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        parents=parents,
        help="search the held-out demo corpus with the shipped model; HTML report and metrics",
        description="Build (or reuse) the held-out split of the demo corpus, load the model, index the gallery, run "
        "example queries of every kind (text->image, text->audio, audio->image, image+text composed), write an "
        "HTML report with thumbnails and audio players, and print the held-out retrieval metrics.",
    )
    p.add_argument("--model", default="onepeace-small", help="variant name or model folder (default onepeace-small)")
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="report folder (default out/demo)")
    p.add_argument("--corpus", type=Path, help="corpus folder (default: a cache folder)")
    p.add_argument("--fsdd", type=existing_path, help="FSDD recordings.tar.gz or folder (or $ONEPEACE_FSDD)")
    p.add_argument("--limit", type=int, help="at most this many held-out items per source")
    p.add_argument("--top-k", type=int, default=5, help="hits shown per query (default 5)")
    p.set_defaults(handler=_demo)
