"""Command line: ``onepeace embed | convert | info | pretrain | finetune | checkpoint | data | demo | evaluate | index |
serve | download | export``.

Parsing and ``--help`` import nothing heavy; torch and the model are imported by the command that needs them.
Errors end the run with one line ``onepeace: error: <message>`` on stderr and exit code 2 (``--debug`` shows
the traceback); ``embed`` exits with 1 when nothing could be embedded; an interrupt exits with 130.
Warnings of this package (:class:`onepeace.errors.OnePeaceWarning`) are printed as one line
``onepeace: warning: <message>``; those of libraries (torch, PIL, numpy, ...) are not printed, so they add no lines to
the output (``--debug`` shows them all).
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings

from onepeace import (
    cli_checkpoint,
    cli_data,
    cli_demo,
    cli_download,
    cli_embed,
    cli_evaluate,
    cli_export,
    cli_finetune,
    cli_index,
    cli_serve,
)
from onepeace.errors import OnePeaceError, OnePeaceWarning

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130
_HANDLED = (OnePeaceError, ValueError, TypeError, OSError, KeyError)


def _convert(args: argparse.Namespace) -> int:
    """The ``convert`` command: official ``.pt`` -> native directory; prints the files and parameter count."""
    import onepeace
    from onepeace.info import describe

    out = onepeace.convert(args.checkpoint, args.out_dir, dtype=args.dtype)
    info = describe(str(out))
    print(f"converted {args.checkpoint} -> {out}")
    for name, size in info["files"].items():
        print(f"  wrote {out / name} ({size:,} bytes)")
    dtypes = ", ".join(info["dtypes"])
    print(f"parameters: {info['parameters']['total']:,} ({dtypes}, {info['bytes']:,} bytes)")
    return 0


def _info(args: argparse.Namespace) -> int:
    """The ``info`` command: config, parameter counts by part and branch, dtypes and sizes."""
    from onepeace.info import describe, format_info

    info = describe(args.target)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    """The ``pretrain`` command: run or resume a recipe (launch under ``torchrun`` for several processes)."""
    from onepeace.data.pretrain import PretrainDataConfig
    from onepeace.train.config import load_recipe
    from onepeace.train.loop import pretrain

    cfg = load_recipe(args.config, args.overrides, data_config_type=PretrainDataConfig)
    result = pretrain(cfg, resume=args.resume)
    if result.model_dir is not None:
        print(f"finished at update {result.step}: checkpoint {result.checkpoint}, model {result.model_dir}")
    return 0


def _add_pretrain(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "pretrain",
        parents=parents,
        help="pretrain (stage 1 image-text or stage 2 audio-text) from a recipe",
        description="Run a pretraining recipe (configs/*.yaml). Several processes: "
        "torchrun --nproc_per_node N -m onepeace pretrain --config RECIPE.yaml",
    )
    p.add_argument("--config", required=True, metavar="RECIPE.yaml", help="the recipe")
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue from the latest complete checkpoint in RUN_DIR (a fresh start when it has none)",
    )
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides, e.g. optim.lr=1e-4")
    p.set_defaults(handler=_pretrain)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with its subcommands."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks of errors")
    parser = argparse.ArgumentParser(
        prog="onepeace",
        parents=[debug],
        description="ONE-PEACE: one embedding space for images, audio and text.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    cli_embed.add_parser(sub, [debug])
    cli_evaluate.add_parser(sub, [debug])
    p = sub.add_parser(
        "convert",
        parents=[debug],
        help="convert an official .pt checkpoint (or re-cast a model folder) to a model folder",
        description="Convert an official ONE-PEACE .pt checkpoint into a folder with "
        "model.safetensors and config.json (loads without pickle); --dtype bf16 halves the size.",
    )
    p.add_argument("checkpoint", metavar="SOURCE", help="official fairseq .pt checkpoint, or a model folder")
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if missing)")
    p.add_argument("--dtype", help="store the weights in this dtype, e.g. bf16 (default: as read)")
    p.set_defaults(handler=_convert)
    p = sub.add_parser(
        "info",
        parents=[debug],
        help="describe a variant or checkpoint without loading it",
        description="Show the config, parameter counts (total, per branch and per part), dtypes "
        "and sizes of a variant name, a converted folder or an official .pt checkpoint.",
    )
    p.add_argument("target", metavar="VARIANT_OR_PATH", help="variant name, model folder or official .pt")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_info)
    _add_pretrain(sub, [debug])
    cli_finetune.add_finetune_parser(sub, [debug])
    cli_checkpoint.add_parser(sub, [debug])
    cli_data.add_parser(sub, [debug])
    cli_demo.add_parser(sub, [debug])
    cli_index.add_parser(sub, [debug])
    cli_serve.add_parser(sub, [debug])
    cli_download.add_parser(sub, [debug])
    cli_export.add_parser(sub, [debug])
    return parser


def _show_warning(message: Warning | str, category: type[Warning], *_: object) -> None:
    """Print the package's own warnings (:class:`OnePeaceWarning`) as one line; hide those of libraries."""
    if issubclass(category, OnePeaceWarning):
        print(f"onepeace: warning: {' '.join(str(message).split())}", file=sys.stderr)


def _message(exc: BaseException) -> str:
    """One line describing ``exc`` (a ``KeyError`` without its quotes)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(text.split()) or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run the command line with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    args.debug = getattr(args, "debug", False)
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.showwarning = _show_warning
            return args.handler(args)
    except KeyboardInterrupt:
        print("onepeace: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _HANDLED as exc:
        if args.debug:
            traceback.print_exc()
        print(f"onepeace: error: {_message(exc)}", file=sys.stderr)
        return EXIT_ERROR
