"""The `magnus` command: serve, predictor, bench, simulate."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from functools import partial

from service.settings import add_arguments, from_args


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import create_app
    from service.shutdown import GracefulServer, drain

    settings = from_args(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=30)
    GracefulServer(config, drain=partial(drain, app.state.magnus, settings.shutdown_timeout_s)).run()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magnus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the OpenAI-compatible server",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(serve)
    serve.set_defaults(func=_serve)
    # tool packages register their own subcommands
    for mod, fn in (("predictor.cli", "register"), ("bench.cli", "register"), ("bench.simulate", "register_simulate")):
        getattr(importlib.import_module(mod), fn)(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
