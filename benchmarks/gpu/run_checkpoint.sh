#!/bin/bash
# Checkpointing on one CUDA GPU: the 356M-parameter case (snapshot stall vs torch.save and DCP
# async_save, per-step snapshot overhead) and the erasure codec on the GPU (Triton kernel vs torch path).
# Run from the repo root on the GPU machine with the packages it lacks carried in .gpu/ (see run_moe.sh):
#   bash benchmarks/gpu/run_checkpoint.sh        (log in $OUT/checkpoint_gpu.log)
source benchmarks/gpu/setup.sh
LOG=$OUT/checkpoint_gpu.log
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; date -u; nproc; free -g | head -2
  df -h /dev/shm /tmp | cat; echo "ulimit -l: $(ulimit -l)"; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } 2>&1 | tee "$LOG"
# The keeper's three slots of ~4.3 GB live in /dev/shm when it has room, else in a folder on /tmp.
avail=$(df -B1 --output=avail /dev/shm 2>/dev/null | tail -1)
keeper=""
if [ -z "$avail" ] || [ "$avail" -lt $((20 * 1024 * 1024 * 1024)) ]; then keeper="--keeper-dir /tmp/phalanx-keeper"; fi
echo "keeper dir: ${keeper:-/dev/shm (default)}" | tee -a "$LOG"
timeout 480 python3 benchmarks/checkpoint.py --device cuda --d-model 1024 --layers 28 --heads 16 --kv-heads 16 \
  --seq 1024 --batch 16 --micro 16 --dtype bf16 --reps 2 --blocks 8 --steps 6 --gpu-codec-mib 1024 $keeper 2>&1 \
  | grep -v "UserWarning\|warnings.warn" | tee -a "$LOG"
