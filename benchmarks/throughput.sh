#!/usr/bin/env bash
# Issue-4 benchmark, one H200, one call: the recipe's original pipeline (TRL SFTTrainer + accelerate + ZeRO-3,
# ../shared/tools/trl_reference.py) and lit_sft (padding-free, token budget, varlen attention) on the same initial
# weights, rows, order, 16 rows per step, max_length 16384, ZeRO-3, bf16, grad ckpt, Liger; then GSM8K short rows.
# Prepare here: bash ../shared/tools/device-wheels.sh && bash ../shared/tools/device-data.sh
# Run there:    run(command="bash benchmarks/throughput.sh", carry=[".whl", ".device-data"])
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD TORCH_CUDA_ARCH_LIST=9.0 WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export SHARED_DATA=$PWD/.device-data/data
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/bench; rm -rf /tmp/bench/lit_sft_* /tmp/bench/*_steps.jsonl
python3 -c "import torch, inspect; from torch.nn.attention import varlen; print('torch', torch.__version__, 'varlen_attn', inspect.signature(varlen.varlen_attn))" || true
python3 - <<'PY' || true
# Probe: PyTorch's varlen attention (fwd + bwd) equals per-row causal SDPA on packed rows of random data.
import torch
from lit_sft.attention import varlen_attention_forward
torch.manual_seed(0)
lens = [700, 3000, 45, 1200]; n = sum(lens)
cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
q = torch.randn(1, 12, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(1, 2, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(1, 2, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
out, _ = varlen_attention_forward(None, q, k, v, None, scaling=128 ** -0.5, cu_seq_lens_q=cu, max_length_q=max(lens))
out.float().pow(2).sum().backward()
ref = []
for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
    kk, vv = (t[:, :, s:e].repeat_interleave(6, 1) for t in (k, v))
    ref.append(torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], kk, vv, is_causal=True).transpose(1, 2))
print("VARLEN_PROBE max|out-ref|", (out - torch.cat(ref, 1)).abs().max().item(), "grad finite", bool(q.grad.isfinite().all()))
PY
t0=$(date +%s)
if [ "${SKIP_TRL:-0}" != 1 ]; then
  SAVE_INIT=/tmp/bench/init STEPS=16 accelerate launch --config_file .device-data/tools/trl_reference_zero3_1gpu.yaml \
    .device-data/tools/trl_reference.py .device-data/data/r1_traces_mmlu_pro.jsonl /tmp/bench > "$OUT/trl.log" 2>&1
  cp /tmp/bench/trl_result.json "$OUT/trl_result.json"
fi
t1=$(date +%s); echo "TRL reference: $((t1-t0)) s"; grep RESULT "$OUT/trl.log" 2>/dev/null | cut -c1-400 || true
python3 - <<'PY'
import json
from datasets import Dataset
rows = [json.loads(l) for l in open(".device-data/data/r1_traces_mmlu_pro.jsonl")]
Dataset.from_list([{"messages": r["messages"]} for r in rows]).shuffle(seed=42).to_json("/tmp/bench/r1_shuffled.jsonl")
PY
CLI="python3 -m lit_sft.cli fit --config configs/qwen_zero3.yaml"
$CLI --config benchmarks/configs/throughput_r1.yaml ${LIT_ARGS:-} > "$OUT/lit_r1.log" 2>&1 || { tail -40 "$OUT/lit_r1.log"; exit 1; }
t2=$(date +%s); echo "lit_sft R1: $((t2-t1)) s"
$CLI --config benchmarks/configs/throughput_gsm8k.yaml > "$OUT/lit_gsm8k.log" 2>&1 || tail -20 "$OUT/lit_gsm8k.log"
t3=$(date +%s); echo "lit_sft GSM8K: $((t3-t2)) s"
cp /tmp/bench/lit_sft_r1_steps.jsonl /tmp/bench/lit_sft_gsm8k_steps.jsonl "$OUT/" 2>/dev/null || true
python3 benchmarks/summarize.py /tmp/bench/trl_result.json /tmp/bench/lit_sft_r1_steps.jsonl /tmp/bench/lit_sft_gsm8k_steps.jsonl | tee "$OUT/summary.txt"
