#!/usr/bin/env bash
# Create .venv and install microdistill with its embedded teachers and test tools.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
# The CPU build of torch first: a bare `torch` requirement could pull a multi-GB CUDA build.
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ".[train,teachers,students,test]"
echo "microdistill installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
