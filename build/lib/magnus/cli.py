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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magnus", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    service_cli.register(sub)
    predictor_cli.register(sub)
    bench_cli.register(sub)
    sim_cli.register_simulate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
