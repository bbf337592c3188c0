#!/usr/bin/env bash
# LoRA adapters on one GPU, side by side in one run, same built-in model, 512-token prompts,
# 128 output tokens, greedy:
#   mlx-cluster base model (no adapter row in the batch)            c=1, c=32
#   mlx-cluster adapter a1 (every row on one adapter)               c=1, c=32
#   mlx-cluster a1 and a2 at once (two benches of c=16 in parallel:  rows of two adapters share the batch)
#   mlx_lm.server --adapter-path a1                                   c=1, c=32
# The adapters are random rank-16 LoRAs on every projection (mlx-lm's tuner, tests/test_lora.py).
# Usage on a CUDA host with mlx[cuda13]:  bash benchmarks/lora_gpu.sh [PRESET] [OUT_DIR]
set -uo pipefail
preset=${1:-8b}
out=${2:-${OUT:-/tmp/lora-gpu}}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export PYTHONPATH=$(pwd):${PYTHONPATH:-}
model=/tmp/mlxc-$preset
py=python3
source "$(dirname "$0")/servers.sh"

bench() {  # name url model_id concurrency [output file suffix]
  $py -m mlx_cluster bench "$2" --model "$3" --json --no-progress --concurrency "$4" --temperature 0 \
    --num-requests $(($4 == 1 ? 8 : 3 * $4)) --input-len 512 --output-len 128 --warmup 2 \
    > "$out/$1-c$4.json" 2>>"$out/errors.txt"
  summary_line "$out/$1-c$4.json" "$1 c=$4" | tee -a "$out/summary.txt"
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/summary.txt"
[ -d "$model" ] || $py -m mlx_cluster make-model "$model" --preset "$preset" >/dev/null || exit 1
for a in 1 2; do
  [ -d "$out/a$a" ] || $py -c "
from pathlib import Path
from tests.test_lora import ALL_KEYS, make_adapter
make_adapter(Path('$model'), Path('$out/a$a'), $a, 16, 2.0, ALL_KEYS, 0.01)" || exit 1
done
cat > "$out/ours.yaml" <<YAML
cluster: {name: lora1, run_dir: $out/runs}
hosts: [{host: localhost, ranks: 1}]
model: {path: $model, name: m}
adapters: [{name: a1, path: $out/a1}, {name: a2, path: $out/a2}]
server: {port: 8111}
scheduler: {max_batch_size: 32}
cache: {ssd: {enabled: false}}
YAML
setsid $py -m mlx_cluster up "$out/ours.yaml" > "$out/ours.log" 2>&1 &
pid=$!
if wait_up http://127.0.0.1:8111 $pid; then
  for c in 1 32; do bench base http://127.0.0.1:8111 m $c; bench adapter-a1 http://127.0.0.1:8111 a1 $c; done
  bench mixed-a1 http://127.0.0.1:8111 a1 16 & bpid=$!
  bench mixed-a2 http://127.0.0.1:8111 a2 16; wait $bpid
else echo "mlx-cluster did not come up"; tail -20 "$out/ours.log"; fi
stop $pid

setsid $py -m mlx_lm.server --model "$model" --adapter-path "$out/a1" --port 8211 --decode-concurrency 32 \
  > "$out/anchor.log" 2>&1 &
pid=$!
if wait_up http://127.0.0.1:8211 $pid; then
  for c in 1 32; do bench mlx_lm.server-a1 http://127.0.0.1:8211 default_model $c; done
else echo "mlx_lm.server did not come up"; tail -5 "$out/anchor.log"; fi
stop $pid
