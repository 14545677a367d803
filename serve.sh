#!/usr/bin/env bash
# Set up (first run only) and start the server on the embedded default model at 127.0.0.1:8000.
# Extra arguments go to `magnus serve` (see `.venv/bin/magnus serve --help`).
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
exec .venv/bin/magnus serve "$@"
