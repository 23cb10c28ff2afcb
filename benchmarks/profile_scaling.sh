#!/usr/bin/env bash
# Issue-11 profiling on one nvidia-h200-x4 machine: where an optimizer step's time goes on 1, 2 and 4 GPUs.
# All runs train the same 16 rows per optimizer step (R1 traces, seed-42 plan, one seeded random init), so GPU counts
# compare on identical work: 1 GPU x 16 rows, 2 GPUs x 8 rows/device, 4 GPUs x 4 rows/device (the strong-scaling
# case where fixed per-step costs show most). The code paths before issue 11 (partitioned ZeRO-3, full recomputation;
# "base", profiled with torch.profiler over steps 6-7) run beside ZeRO-3 with every parameter persistent, ZeRO-2, and
# the new defaults with a 32768-token budget. Also runs the issue-8 packed-rows probe.
# Single-GPU runs share the machine (one run per GPU at a time); 4-GPU runs run alone.
# Run there (device tool), after preparing .whl and .device-data (benchmarks/RESULTS.md):
#   run(command="bash benchmarks/profile_scaling.sh", carry=[".whl", ".device-data"], kind="nvidia-h200-x4")
set -uo pipefail
if ! python3 -c "import deepspeed, liger_kernel" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHL_DIR:-.whl}/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export TORCH_CUDA_ARCH_LIST=9.0 WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
DATA=${SHARED_DATA:-.device-data/data}
OUT=${OUT:-/tmp/out}; W=/tmp/scale; mkdir -p "$OUT" "$W"; rm -rf "$W"/g* "$W"/records.jsonl
STEPS=${STEPS:-8}
T0=$(date +%s)
nvidia-smi --query-gpu=index,name,memory.total,clocks.sm,clocks.max.sm --format=csv,noheader
nvidia-smi topo -m 2>/dev/null | head -8
env | grep -E "^NCCL_|MULTICAST|NVSHMEM" | sort

# Phase 0: seeded init (GPU 0), packed-rows probe (GPU 1), tokenization cache (CPU), in parallel.
[ -f $W/init/model.safetensors ] || CUDA_VISIBLE_DEVICES=0 python3 benchmarks/make_init.py $DATA/qwen2.5-1.5b-instruct-config $W/init > $W/init.log 2>&1 &
CUDA_VISIBLE_DEVICES=1 python3 benchmarks/probe_packed.py cuda > "$OUT/probe.txt" 2>&1 &
python3 - <<PY > $W/tokenize.log 2>&1 &
from lit_sft.data.datamodule import SFTDataModule
SFTDataModule("$DATA/r1_traces_mmlu_pro.jsonl", tokenizer_name_or_path="$DATA/qwen2.5-tokenizer", dataset_num_proc=8).setup("fit")
PY
wait
cat $W/init.log; grep PROBE "$OUT/probe.txt" || tail -5 "$OUT/probe.txt"
echo "phase 0: $(( $(date +%s) - T0 )) s"

run() {  # run TAG GPUS(CUDA_VISIBLE_DEVICES) ROWS_PER_DEVICE [extra CLI args...]
  local tag=$1 gpus=$2 rows=$3; shift 3
  local n=$(( $(echo "$gpus" | tr -cd , | wc -c) + 1 ))
  local port=$(( 20000 + $(echo "$tag" | cksum | cut -d' ' -f1) % 20000 ))  # unique per run: runs go side by side
  CUDA_VISIBLE_DEVICES=$gpus MASTER_PORT=$port timeout ${RUN_TIMEOUT:-240} python3 -m lit_sft.cli fit \
    --config configs/qwen_zero3.yaml --config benchmarks/configs/scaling_r1.yaml --run.output_dir $W/$tag \
    --data.dataset_name $DATA/r1_traces_mmlu_pro.jsonl --data.tokenizer_name_or_path $DATA/qwen2.5-tokenizer \
    --trainer.devices $n --trainer.max_steps $STEPS --data.per_device_train_batch_size $rows "$@" > $W/$tag.log 2>&1
  echo "$tag ($n GPUs, $rows rows/device): rc=$? $(( $(date +%s) - T0 )) s"
  echo $n > $W/$tag.gpus
}
# The code paths before issue 11: partitioned ZeRO-3 parameters, full recomputation.
OLD="--trainer.strategy.init_args.zero3_partition_parameters true --model.gradient_checkpointing_layers all"
PERSIST="$OLD --trainer.strategy.init_args.stage3_param_persistence_threshold 1000000000"

NGPU=$(nvidia-smi -L | wc -l)
# Phase A: four single-GPU runs, side by side on as many GPUs as there are.
BENCH_PROFILE_STEPS=6,7 run g1_base 0 16 $OLD &
[ $NGPU -ge 2 ] || wait
run g1_persist $((1 % NGPU)) 16 $PERSIST &
[ $NGPU -ge 4 ] || wait
run g1_zero2 $((2 % NGPU)) 16 --trainer.strategy.init_args.zero_stage 2 --model.gradient_checkpointing_layers all &
[ $NGPU -ge 2 ] || wait
run g1_nockpt $((3 % NGPU)) 16 --data.max_tokens_per_micro_batch 32768 &
wait
# Phase B: 2-GPU runs (side by side on 4 GPUs).
if [ $NGPU -ge 4 ]; then
  BENCH_PROFILE_STEPS=6,7 run g2_base 0,1 8 $OLD &
  run g2_persist 2,3 8 $PERSIST &
  wait
elif [ $NGPU -ge 2 ]; then
  BENCH_PROFILE_STEPS=6,7 run g2_base 0,1 8 $OLD
  run g2_persist 0,1 8 $PERSIST
  [ $(( $(date +%s) - T0 )) -lt 470 ] && run g2_zero2 0,1 8 --trainer.strategy.init_args.zero_stage 2 --model.gradient_checkpointing_layers all
fi
# Phase C: 4-GPU runs, one at a time.
if [ $NGPU -ge 4 ]; then
  BENCH_PROFILE_STEPS=6,7 run g4_base 0,1,2,3 4 $OLD
  run g4_persist 0,1,2,3 4 $PERSIST
  [ $(( $(date +%s) - T0 )) -lt 430 ] && run g4_zero2 0,1,2,3 4 --trainer.strategy.init_args.zero_stage 2 --model.gradient_checkpointing_layers all
fi

# Collect: one records file, profiles, traces, log tails; then the table.
python3 - <<PY
import glob, json, os
with open("$OUT/records.jsonl", "w") as out:
    for d in sorted(glob.glob("$W/g*/")):
        tag = os.path.basename(d.rstrip("/"))
        gpus = int(open(f"$W/{tag}.gpus").read()) if os.path.exists(f"$W/{tag}.gpus") else 1
        for name in ["steps.jsonl"] + sorted(glob.glob(d + "timing_rank*.jsonl")):
            path = name if name.startswith("/") else d + name
            if os.path.exists(path):
                for line in open(path):
                    out.write(json.dumps({"run": tag, "gpus": gpus, "file": "steps" if "steps" in path else "timing",
                                          **json.loads(line)}) + "\n")
PY
for d in $W/g*/; do tag=$(basename $d)
  for p in $d/profile_rank*.txt; do [ -f $p ] && { echo "=== $tag $(basename $p)"; cat $p; }; done
  [ -f $d/trace.json.gz ] && cp $d/trace.json.gz "$OUT/trace_$tag.json.gz"
done > "$OUT/profiles.txt"
for f in $W/g*.log; do echo "=== $f"; grep -E "Error|error|Traceback|WARN|warn|lit_sft|Batches|path" $f | grep -v "^\s*$" | tail -25; done > "$OUT/logs.txt" 2>&1
python3 benchmarks/scaling_summary.py "$OUT/records.jsonl" | tee "$OUT/summary.txt"
echo "total: $(( $(date +%s) - T0 )) s"
