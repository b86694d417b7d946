#!/bin/bash
# MoE on one CUDA GPU: correctness checks, then phalanx's MoE layer against DeepSpeed's, then a short
# bf16 training run of configs/tiny_moe.yaml. Run from the repo root on the GPU machine with the
# packages it lacks carried in .gpu/ (site/: deepspeed, hjson, omegaconf copied from the venv;
# whl/: pydantic and its cp312 needs):  bash benchmarks/gpu/run_moe.sh   (log in $OUT/moe_gpu.log)
source benchmarks/gpu/setup.sh
LOG=$OUT/moe_gpu.log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$LOG"
date -u | tee -a "$LOG"
timeout 150 python3 benchmarks/gpu/moe_check.py cuda 2>&1 | tee -a "$LOG"
kernel=loop
grep -q '"grouped_mm_ok": true' "$LOG" && kernel=grouped_mm
echo "== benchmark, phalanx kernel $kernel" | tee -a "$LOG"
timeout 200 python3 benchmarks/moe.py --device cuda --iters 20 --kernel $kernel 2>&1 | grep -v WARNING | tee -a "$LOG"
if [ $kernel = grouped_mm ]; then
  echo "== benchmark, phalanx kernel loop (what grouped_mm buys)" | tee -a "$LOG"
  timeout 150 python3 benchmarks/moe.py --device cuda --iters 20 --kernel loop 2>&1 | grep -v WARNING | tee -a "$LOG"
fi
echo "== train configs/tiny_moe.yaml, bf16" | tee -a "$LOG"
timeout 150 python3 -m phalanx train configs/tiny_moe.yaml train.steps=60 train.dtype=bf16 log.wandb=disabled \
  log.every=10 train.eval_every=0 checkpoint.persist_every=0 run.dir=/tmp/runs 2>&1 | tail -8 | tee -a "$LOG"
