#!/usr/bin/env bash
# Several GPUs, one rank per GPU over NCCL (issue 14): does tensor parallelism pay, and is its
# text the one-GPU text? For the dense `8b` and the MoE `30b-a3b` presets, each served through
# `mlx-cluster up`: TP=1 against TP=2 (and 4 where the host has 4 GPUs) at c=1, 8, 32
# (benchmarks/tp_scaling.py, alternating layouts), then token identity TP=1 vs TP=N, greedy and
# seeded (benchmarks/tp_identity.py). JSON and a summary land in OUT_DIR.
# Usage on a CUDA host with 2+ GPUs and mlx[cuda13]:  bash benchmarks/gpu_tp.sh [OUT_DIR] [PRESETS...]
# 30b-a3b needs 60 GB of disk for its weights (MODELS_DIR, default /tmp) and one GPU's worth of
# memory at TP=1. Every (layout, concurrency) starts its own cluster, and 30b-a3b loads in ~50 s
# on an H200, so with REPEATS=1 (the default) expect ~10 min for it and ~5 for 8b: run it in the
# background across calls (benchmarks/background_job.sh).
set -uo pipefail
out=${1:-${OUT:-/tmp/gpu-tp}}
shift || true
presets=${*:-8b 30b-a3b}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1  # NVLink multicast stays off (shared/gpu/README.md)
export PYTHONPATH=$(pwd):${PYTHONPATH:-}
models=${MODELS_DIR:-/tmp}
gpus=$(nvidia-smi -L | wc -l)
ranks=2; [ "$gpus" -ge 4 ] && ranks="2 4"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/summary.txt"
for preset in $presets; do
  model=$models/mlxc-$preset
  echo "== $(date +%T) make-model $preset" | tee -a "$out/summary.txt"
  python3 -m mlx_cluster make-model "$model" --preset "$preset" >/dev/null || exit 1
  echo "== $(date +%T) $preset: TP=1 vs TP=$ranks, c=1 8 32" | tee -a "$out/summary.txt"
  python3 benchmarks/tp_scaling.py --preset "$preset" --model "$model" --ranks $ranks --backend nccl \
    --concurrency 1 8 32 --repeats "${REPEATS:-1}" --input-len 512 --output-len 128 --out "$out/tp-$preset.json" \
    2>>"$out/errors.txt" | tail -60 | tee -a "$out/summary.txt"
  echo "== $(date +%T) $preset: token identity" | tee -a "$out/summary.txt"
  python3 benchmarks/tp_identity.py --model "$model" --ranks $ranks --backend nccl --max-tokens 64 \
    --out "$out/identity-$preset.json" 2>>"$out/errors.txt" | tee -a "$out/summary.txt"
done
