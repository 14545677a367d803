"""The `magnus` command: serve, predictor, bench, simulate.

Each package registers its own subcommands; this module only assembles them, so the service
depends on none of the tools (heavy modules are imported inside the commands)."""

from __future__ import annotations

import argparse
import sys

from bench import cli as bench_cli
from bench.sim import cli as sim_cli
from predictor import cli as predictor_cli
from service import cli as service_cli


def _served_model_dir(spec: str) -> str:
    """A served-model spec (``default``, a hub id, a GGUF or a directory) as a transformers directory."""
    from service.settings import Settings
    from worker.loader import materialize, resolve

    return materialize(resolve(spec), Settings().cache_dir)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magnus", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    service_cli.register(sub)
    predictor_cli.register(sub, resolve_model=_served_model_dir)
    bench_cli.register(sub)
    sim_cli.register_simulate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
