"""``onepeace serve``: the HTTP server of an index (embeddings, search, media, health, metrics, search page).

Needs ``pip install 'onepeace[serve]'`` (FastAPI, uvicorn, python-multipart); imported only when the command runs.
``python -m onepeace.cli_serve --index INDEX`` runs the same command on its own.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from typing import Any

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "ONEPEACE_API_KEY"


def _positive(kind: type) -> object:
    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    parse.__name__ = kind.__name__
    return parse


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (the server is then unreachable from other machines)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_from_args(args: argparse.Namespace) -> Any:
    """The :class:`ServeSettings` of parsed ``serve`` arguments (the API key falls back to $ONEPEACE_API_KEY)."""
    from onepeace.serve.app import ServeSettings

    return ServeSettings(
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        timeout_s=float(args.timeout_s),
        body_timeout_s=float(args.body_timeout_s),
        max_k=args.max_k,
        max_batch=args.max_batch,
        batch_wait_ms=float(args.batch_wait_ms),
        max_queue=args.max_queue,
        max_concurrency=args.max_concurrency,
        max_waiting=args.max_waiting,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        allowed_hosts=tuple(args.allowed_host) if args.allowed_host else None,
        cors_origins=tuple(args.cors_origin or ()),
        model=args.model,
    )


def _serve(args: argparse.Namespace) -> int:
    """Load the index and its model, then run uvicorn until interrupted."""
    from onepeace.errors import require

    require("fastapi", "serve")
    require("python_multipart", "serve")
    uvicorn = require("uvicorn", "serve")
    from onepeace.serve.app import create_app

    settings = settings_from_args(args)
    if not is_loopback(args.host) and not settings.api_key:
        print(
            f"onepeace: warning: listening on {args.host}: without --api-key (or ${API_KEY_ENV}) anyone who can "
            "reach this address can use the server",
            file=sys.stderr,
        )
    print(f"onepeace: loading the index {args.index} and its model", file=sys.stderr)
    app = create_app(args.index, settings=settings)
    state = app.state.serve
    print(
        f"onepeace: serving {state.size} items embedded with {state.model_name} on http://{args.host}:{args.port}/",
        file=sys.stderr,
        flush=True,
    )
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        timeout_keep_alive=5,
    )
    return 0


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    """Add the ``serve`` subcommand."""
    p = sub.add_parser(
        "serve",
        parents=parents,
        help="serve an index over HTTP: embeddings (OpenAI shape), search, media and a search page",
        description="Serve an index built with `onepeace index build`: POST /v1/embeddings (OpenAI embeddings "
        "shape, plus images and audio as base64 or multipart uploads), POST /v1/search (text, image, audio or a "
        "composed query), GET /v1/items/ID/media, GET /healthz, GET /metrics and a search page at /. "
        "Listens on the loopback interface unless --host says otherwise.",
    )
    _add_arguments(p)
    p.set_defaults(handler=_serve)


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, metavar="INDEX", help="the index folder to serve")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST}, loopback)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--model", help="model name or folder (default: the model the index was built with)")
    p.add_argument(
        "--max-body-mb", type=_positive(float), default=10.0, help="largest request body in MB; bigger gets 413 (10)"
    )
    p.add_argument(
        "--timeout-s", type=_positive(float), default=30.0, help="time to answer once the body is in; then 504 (30)"
    )
    p.add_argument(
        "--body-timeout-s", type=_positive(float), default=10.0, help="time for a request body to arrive; then 408 (10)"
    )
    p.add_argument("--max-k", type=_positive(int), default=100, help="largest k a search may ask for (100)")
    p.add_argument("--max-batch", type=_positive(int), default=32, help="most inputs per embedding batch (32)")
    p.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long to gather concurrent requests into a batch (5)"
    )
    p.add_argument(
        "--max-queue", type=_positive(int), default=256, help="most requests waiting for the model; then 503 (256)"
    )
    p.add_argument(
        "--max-concurrency", type=_positive(int), default=32, help="most requests running at once, bodies in (32)"
    )
    p.add_argument(
        "--max-waiting", type=_positive(int), default=64, help="most requests waiting for a running slot; then 503 (64)"
    )
    p.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on /v1/* and /metrics (${API_KEY_ENV})")
    p.add_argument(
        "--allowed-host", action="append", metavar="HOST",
        help="a Host header value to accept (repeatable; '*' for any; default: localhost names and the bound address)",
    )  # fmt: skip
    p.add_argument(
        "--cors-origin", action="append", metavar="ORIGIN",
        help="an origin (https://app.example) whose pages may call the API (repeatable; default: none)",
    )  # fmt: skip
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", dest="access_log", action="store_false", help="do not log every request")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m onepeace.cli_serve`` (the ``serve`` arguments on their own)."""
    parser = argparse.ArgumentParser(prog="onepeace serve", description="Serve an index over HTTP.")
    _add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m onepeace.cli_serve ARGS``: the ``serve`` command without the rest of the command line."""
    args = build_parser().parse_args(argv)
    try:
        return _serve(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, OSError, ImportError, KeyError) as exc:
        print(f"onepeace: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
