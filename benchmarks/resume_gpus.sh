#!/usr/bin/env bash
# Issue-11 item 4 on GPUs: a checkpoint written on 2 GPUs resumes on 1 (configs/qwen_zero3.yaml as shipped +
# benchmarks/configs/scaling_r1.yaml, the seeded 1.5B init, 32 rows per optimizer step on both: 2 GPUs x 16 rows, then
# 1 GPU x 16 rows x 2 accumulation). Run A trains 4 steps uninterrupted and checkpoints after step 2; run B resumes
# A's step-2 checkpoint on 1 GPU through the CLI (DeepSpeed's ds_to_universal conversion, then its universal loader)
# and trains steps 3-4. Prints both loss trajectories, the LRs and the conversion time.
# Run there: run(command="bash benchmarks/resume_gpus.sh", carry=[".whl", ".device-data"], kind="nvidia-h200-x2")
set -uo pipefail
if ! python3 -c "import deepspeed, liger_kernel" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ${WHL_DIR:-.whl}/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export TORCH_CUDA_ARCH_LIST=9.0 WANDB_MODE=offline HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
DATA=${SHARED_DATA:-.device-data/data}
OUT=${OUT:-/tmp/out}; W=/tmp/scale; mkdir -p "$OUT" "$W"; rm -rf $W/resume_a $W/resume_b
T0=$(date +%s)
cat $DATA/r1_traces_mmlu_pro.jsonl $DATA/r1_traces_mmlu_pro.jsonl > $W/r1x2.jsonl
[ -f $W/init/model.safetensors ] || CUDA_VISIBLE_DEVICES=0 python3 benchmarks/make_init.py $DATA/qwen2.5-1.5b-instruct-config $W/init > $W/init.log 2>&1
CLI="python3 -m lit_sft.cli fit --config configs/qwen_zero3.yaml --config benchmarks/configs/scaling_r1.yaml
  --data.dataset_name $W/r1x2.jsonl --data.tokenizer_name_or_path $DATA/qwen2.5-tokenizer --trainer.max_steps 4
  --data.per_device_train_batch_size 16 --run.save_strategy steps --run.save_steps 2 --run.save_total_limit null"
CUDA_VISIBLE_DEVICES=0,1 MASTER_PORT=29711 timeout 300 $CLI --run.output_dir $W/resume_a --trainer.devices 2 \
  --data.gradient_accumulation_steps 1 > $OUT/resume_a.log 2>&1
echo "A (2 GPUs, steps 1-4, checkpoint after 2): rc=$? at $(( $(date +%s) - T0 )) s"; du -sh $W/resume_a/checkpoints/*
T1=$(date +%s)
CUDA_VISIBLE_DEVICES=0 MASTER_PORT=29712 timeout 400 $CLI --run.output_dir $W/resume_b --trainer.devices 1 \
  --data.gradient_accumulation_steps 2 --ckpt_path $W/resume_a/checkpoints/step-000002.ckpt > $OUT/resume_b.log 2>&1
echo "B (1 GPU, resumed at step 2): rc=$? in $(( $(date +%s) - T1 )) s"
grep -hE "data-parallel|ZeRO|resuming|Restored|Traceback|Error" $OUT/resume_b.log | cut -c1-300 | head -12
python3 - <<PY
import json
a = {r["step"]: r for r in map(json.loads, open("$W/resume_a/steps.jsonl"))}
b = {r["step"]: r for r in map(json.loads, open("$W/resume_b/steps.jsonl"))} if __import__("os").path.exists("$W/resume_b/steps.jsonl") else {}
print("step  loss_2gpu  loss_resumed_1gpu  rel_diff  lr_2gpu  lr_1gpu  tokens")
for s in sorted(a):
    r = b.get(s)
    print(f"{s:4d}  {a[s]['train/loss']:9.4f}  {r['train/loss'] if r else float('nan'):17.4f}  "
          f"{abs(r['train/loss'] - a[s]['train/loss']) / a[s]['train/loss'] if r else float('nan'):8.1e}  "
          f"{a[s]['train/learning_rate']:.3e}  {r['train/learning_rate'] if r else float('nan'):.3e}  "
          f"{int(a[s]['train/step_tokens'])} {int(r['train/step_tokens']) if r else ''}")
PY
echo "total: $(( $(date +%s) - T0 )) s"
