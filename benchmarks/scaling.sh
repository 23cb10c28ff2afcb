#!/usr/bin/env bash
# Issue-11 scaling benchmark: lit_sft (configs/qwen_zero3.yaml as shipped + benchmarks/configs/scaling_r1.yaml) on 1, 2
# and 4 GPUs of one machine, GPUs chosen with CUDA_VISIBLE_DEVICES. Every run starts from one seeded random init of
# the Qwen2.5-1.5B architecture and trains the R1 traces in the planner's seed-42 order, so runs with the same rows
# per optimizer step train identical rows in every step, whatever the GPU count (ENVIRONMENT.md: compare GPU counts on
# identical work, since tokens/s depends on the length mix).
#   (a) weak scaling, 16 rows per device: w1 (1 GPU), w2 (2 GPUs, 32 rows/step), w4 (4 GPUs, 64 rows/step), each
#       against a 1-GPU run of the same rows (w2ref: 32 rows/step, w4ref: 64 rows/step, by gradient accumulation);
#   (b) strong scaling at the recipe's 128 rows per step: s1 (1 GPU x 8 accumulation), s2 (2 x 4), s4 (4 x 2).
# Single-GPU runs share the machine (one run per GPU), multi-GPU runs of 2 GPUs run side by side on 4 GPUs, 4-GPU runs
# alone. Prints the table of benchmarks/scaling_summary.py last (tokens/s, per GPU, MFU, step-time breakdown, rank
# imbalance, per-GPU peak memory, scaling ratios, per-step loss differences).
# The 413 R1 rows are used twice (826 rows) so that 6 steps of 128 rows stay inside one epoch (no loader restart).
# Env: STEPS (weak, default 8), STRONG_STEPS (default 6), VARIANTS="tag:cli args;..." extra 1-GPU runs at 16 rows/step,
#      SHARED_DATA (default .device-data/data), WHL_DIR (default .whl).
# Run there (device tool):
#   run(command="bash benchmarks/scaling.sh", carry=[".whl", ".device-data"], kind="nvidia-h200-x4")
set -uo pipefail
if ! python3 -c "import deepspeed, liger_kernel" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHL_DIR:-.whl}/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export TORCH_CUDA_ARCH_LIST=9.0 WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
DATA=${SHARED_DATA:-.device-data/data}
OUT=${OUT:-/tmp/out}; W=/tmp/scale; mkdir -p "$OUT" "$W"; rm -rf "$W"/[wsv]* "$OUT"/records.jsonl
STEPS=${STEPS:-8}; STRONG_STEPS=${STRONG_STEPS:-6}
T0=$(date +%s)
NGPU=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader

cat $DATA/r1_traces_mmlu_pro.jsonl $DATA/r1_traces_mmlu_pro.jsonl > $W/r1x2.jsonl
[ -f $W/init/model.safetensors ] || CUDA_VISIBLE_DEVICES=0 python3 benchmarks/make_init.py $DATA/qwen2.5-1.5b-instruct-config $W/init > $W/init.log 2>&1 &
python3 - <<PY > $W/tokenize.log 2>&1 &
from lit_sft.data.datamodule import SFTDataModule
SFTDataModule("$W/r1x2.jsonl", tokenizer_name_or_path="$DATA/qwen2.5-tokenizer", dataset_num_proc=8).setup("fit")
PY
wait
echo "setup: $(( $(date +%s) - T0 )) s"

run() {  # run TAG GPUS ROWS_PER_DEVICE ACCUMULATION STEPS [extra CLI args...]
  local tag=$1 gpus=$2 rows=$3 accum=$4 steps=$5; shift 5
  local n=$(( $(echo "$gpus" | tr -cd , | wc -c) + 1 ))
  local port=$(( 20000 + $(echo "$tag" | cksum | cut -d' ' -f1) % 20000 ))  # unique per run: runs go side by side
  echo $n > $W/$tag.gpus
  CUDA_VISIBLE_DEVICES=$gpus MASTER_PORT=$port timeout ${RUN_TIMEOUT:-300} python3 -m lit_sft.cli fit \
    --config configs/qwen_zero3.yaml --config benchmarks/configs/scaling_r1.yaml --run.output_dir $W/$tag \
    --data.dataset_name $W/r1x2.jsonl --data.tokenizer_name_or_path $DATA/qwen2.5-tokenizer \
    --trainer.devices $n --trainer.max_steps $steps --data.per_device_train_batch_size $rows \
    --data.gradient_accumulation_steps $accum "$@" > $W/$tag.log 2>&1
  echo "$tag: $n GPU(s) x $rows rows x $accum accumulation, rc=$? at $(( $(date +%s) - T0 )) s"
}
# Run "TAG GPUS ROWS ACCUM STEPS [args]" jobs of one GPU each, $NGPU at a time (GPU field ignored: assigned here).
batch1() {
  local i=0 job
  for job in "$@"; do
    set -- $job
    run $1 $((i % NGPU)) $3 $4 $5 "${@:6}" &
    i=$((i + 1)); [ $((i % NGPU)) -eq 0 ] && wait
  done
  wait
}

jobs=("w1 - 16 1 $STEPS" "w2ref - 16 2 $STEPS" "s1 - 16 8 $STRONG_STEPS")
[ $NGPU -ge 4 ] && jobs+=("w4ref - 16 4 $STEPS")
IFS=';' read -ra variants <<< "${VARIANTS:-}"
for v in "${variants[@]}"; do [ -n "$v" ] && jobs+=("${v%%:*} - 16 1 $STEPS ${v#*:}"); done
batch1 "${jobs[@]}"
if [ $NGPU -ge 4 ]; then
  run w2 0,1 16 1 $STEPS & run s2 2,3 16 4 $STRONG_STEPS & wait
  run w4 0,1,2,3 16 1 $STEPS
  run s4 0,1,2,3 16 2 $STRONG_STEPS
elif [ $NGPU -ge 2 ]; then
  run w2 0,1 16 1 $STEPS
  run s2 0,1 16 4 $STRONG_STEPS
fi

python3 - <<PY
import glob, json, os
with open("$OUT/records.jsonl", "w") as out:
    for d in sorted(glob.glob("$W/*/")):
        tag = os.path.basename(d.rstrip("/"))
        if not os.path.exists(f"$W/{tag}.gpus"):
            continue
        gpus = int(open(f"$W/{tag}.gpus").read())
        for path in [d + "steps.jsonl"] + sorted(glob.glob(d + "timing_rank*.jsonl")):
            if os.path.exists(path):
                for line in open(path):
                    out.write(json.dumps({"run": tag, "gpus": gpus, "file": "steps" if "steps" in path else "timing",
                                          **json.loads(line)}) + "\n")
PY
for f in $W/*.log; do echo "=== $f"; grep -E "Traceback|Error|ZeRO|Batches|gradient_checkpointing_layers|resum" $f | tail -12; done > "$OUT/logs.txt" 2>&1
python3 benchmarks/scaling_summary.py "$OUT/records.jsonl" | tee "$OUT/summary.txt"
echo "total: $(( $(date +%s) - T0 )) s"
