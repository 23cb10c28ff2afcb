#!/usr/bin/env bash
# Issue-2 acceptance on one H200: configs/qwen_zero3.yaml with devices=1 (overlay benchmarks/configs/recipe_1gpu.yaml):
# 20 optimizer steps of 16 rows at max_length 16384 on the R1 traces; the first run is killed right after its
# step-10 checkpoint, the rerun resumes from it automatically and finishes; the HF export is reloaded with plain
# transformers and its logits compared with the trained model's.
# Prepare here: bash ../shared/tools/device-wheels.sh && bash ../shared/tools/device-data.sh
# Run there:    run(command="bash benchmarks/recipe_1gpu.sh", carry=[".whl", ".device-data"])
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; rm -rf /tmp/lit_sft_recipe
CLI="python3 -m lit_sft.cli fit --config configs/qwen_zero3.yaml --config benchmarks/configs/recipe_1gpu.yaml"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
$CLI --trainer.callbacks+=benchmarks.probe.KillAfterStep --trainer.callbacks.step=10 > "$OUT/run1.log" 2>&1 || true
t1=$(date +%s); echo "run1 (killed after step 10): $((t1-t0)) s; checkpoints: $(ls /tmp/lit_sft_recipe/checkpoints)"
$CLI > "$OUT/run2.log" 2>&1
t2=$(date +%s); echo "run2 (resumed to step 20): $((t2-t1)) s"
grep -h "resuming" "$OUT/run2.log" | head -2
cp /tmp/lit_sft_recipe/steps.jsonl "$OUT/steps.jsonl"
python3 benchmarks/check_export.py /tmp/lit_sft_recipe /tmp/lit_sft_recipe/probe.pt | tee "$OUT/export.json"
cp /tmp/lit_sft_recipe/README.md "$OUT/model_card.md"
python3 - <<'PY'
import json
rows = [json.loads(l) for l in open("/tmp/lit_sft_recipe/steps.jsonl")]
for r in rows:
    print(f"step {r['step']:3d} loss {r['train/loss']:.4f} tokens {int(r['train/step_tokens']):6d} "
          f"tok/s {r['train/tokens_per_s']:8.0f} lr {r['train/learning_rate']:.3e} peak {r.get('peak_mem_gib', 0):.1f} GiB")
timed = [r for r in rows if r["step"] > 3 and r["step"] not in (11,)]  # skip warm-up and the first step after resume
tps = sum(r["train/step_tokens"] for r in timed) / sum(r["train/step_tokens"] / r["train/tokens_per_s"] for r in timed)
print("SUMMARY", json.dumps({"steps": rows[-1]["step"], "tokens_per_s": tps,
                             "peak_mem_gib": max(r.get("peak_mem_gib", 0) for r in rows)}))
PY
