"""``magnus serve``: the server's command (the top-level ``magnus`` CLI mounts it)."""

from __future__ import annotations

import argparse
import logging
from functools import partial

from service.settings import add_arguments, from_args


def serve(args: argparse.Namespace) -> int:
    """Run the OpenAI-compatible server until SIGTERM/SIGINT (then drain and exit)."""
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``serve`` to the ``magnus`` subcommands."""
    p = sub.add_parser("serve", help="run the OpenAI-compatible server",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=serve)
