#!/usr/bin/env bash
# Creates .venv with lit_sft and its test dependencies on a fresh CPU machine.
# torch is pinned to the local CPU build first (an unpinned `torch` would pull a ~5.5 GB CUDA build here).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q "torch==${TORCH_VERSION:-2.13.0}"
pip install -q -e ".[test]"
python -c "import lit_sft, torch, lightning, transformers, deepspeed; print('lit_sft', lit_sft.__version__, 'torch', torch.__version__, 'lightning', lightning.__version__, 'transformers', transformers.__version__, 'deepspeed', deepspeed.__version__)"
