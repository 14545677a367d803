#!/usr/bin/env bash
# Set up (first run only), lint, and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh
.venv/bin/ruff check .
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/pytest -q -p no:cacheprovider "$@"
