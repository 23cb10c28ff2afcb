#!/usr/bin/env bash
# The wheel check: build lit_sft's wheel, install it in a clean virtual environment (torch pinned to the local CPU
# build first, as scripts/setup.sh does), and train the embedded default from the installed package in a folder
# outside the repository (the config and the tiny data come from the wheel: pkg://lit_sft/...).
#   bash scripts/check_wheel.sh                                   # the whole embedded default
#   EXTRA="--trainer.max_steps 4" bash scripts/check_wheel.sh     # a shorter run
# Network: package registries only (build's setuptools, lit_sft's dependencies). Work folder: $WORK (a temp dir).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${WORK:-$(mktemp -d)}"
PY="${PYTHON:-python3}"
echo "work folder: $WORK"

"$PY" -m venv "$WORK/build-env"
"$WORK/build-env/bin/pip" install -q build
"$WORK/build-env/bin/python" -m build --wheel --outdir "$WORK/dist" "$REPO"
rm -rf "$REPO/build"  # setuptools' build folder (the wheel is in $WORK/dist)
WHEEL="$(ls "$WORK"/dist/lit_sft-*.whl)"
echo "built: $WHEEL"

"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --upgrade pip
"$WORK/venv/bin/pip" install -q "torch==${TORCH_VERSION:-2.13.0}"
"$WORK/venv/bin/pip" install -q "${WHEEL}[tiny]"

mkdir -p "$WORK/run"
cd "$WORK/run"  # outside the repository: nothing of the checkout is on the path
"$WORK/venv/bin/python" - <<'PY'
import importlib.metadata

import lit_sft

assert "site-packages" in lit_sft.__file__, lit_sft.__file__  # the installed wheel, not the checkout
print("lit_sft", importlib.metadata.version("lit_sft"), "from", lit_sft.__file__)
PY
T0=$(date +%s)
# shellcheck disable=SC2086
"$WORK/venv/bin/lit_sft" fit --config pkg://lit_sft/configs/tiny_cpu.yaml ${EXTRA:-}
echo "trained in $(( $(date +%s) - T0 )) s"
test -f outputs/tiny_cpu/model.safetensors
test -f outputs/tiny_cpu/logs/metrics.csv
"$WORK/venv/bin/python" - <<'PY'
import csv
rows = [r for r in csv.DictReader(open("outputs/tiny_cpu/logs/metrics.csv")) if r.get("train/loss")]
print(f"wheel check passed: {len(rows)} logged steps, train/loss {float(rows[0]['train/loss']):.4f} -> "
      f"{float(rows[-1]['train/loss']):.4f}")
PY
