"""The ``dinolabel`` command line: ``serve`` now; more subcommands grow with the project."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from backend.config import get_settings
    from backend.main import create_app

    settings = get_settings()
    if args.host:
        settings.host = args.host
    if args.port:
        settings.port = args.port
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dinolabel", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the Label Studio ML backend (port 9090 by default)")
    serve.add_argument("--host", help="bind address (DINOLABEL_HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (DINOLABEL_PORT, default 9090)")
    serve.set_defaults(run=_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
