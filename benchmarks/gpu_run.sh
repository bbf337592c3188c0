#!/usr/bin/env bash
# NVIDIA run: one GPU vs two GPUs (NCCL, tensor parallel) for mlx-cluster, and mlx_lm.server
# on one GPU and under `mlx.launch --backend nccl -n 2`, on the same built-in model: each server
# once, one after the other (not alternating); the JSON of each bench run lands in OUT_DIR.
# Usage on a 2-GPU Linux host with mlx[cuda13] installed:  bash benchmarks/gpu_run.sh [PRESET] [OUT_DIR]
set -uo pipefail
preset=${1:-1b}
out=${2:-${OUT:-/tmp/gpu-bench}}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export PYTHONPATH=$(pwd):${PYTHONPATH:-}
model=/tmp/mlxc-$preset
py=python3
source "$(dirname "$0")/servers.sh"

log() { echo "== $(date +%T) $*" | tee -a "$out/summary.txt"; }
bench() {  # name url model_id
  for c in 1 8; do
    $py -m mlx_cluster bench "$2" --model "$3" --json --no-progress --concurrency $c \
      --num-requests $((c == 1 ? 8 : 32)) --input-len 512 --output-len 128 --warmup 2 --no-ignore-eos \
      > "$out/$1-c$c.json" 2>>"$out/errors.txt"
    $py - "$out/$1-c$c.json" "$1" "$c" <<'EOF' | tee -a "$out/summary.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    print(f"{sys.argv[2]:>22} c={sys.argv[3]}: {r['output_throughput_tok_s']:8.1f} tok/s  "
          f"TTFT p50 {r['ttft_ms']['p50']:7.1f} ms  TPOT p50 {r['tpot_ms']['p50']:6.2f} ms  "
          f"{r['total_output_tokens']} output tokens  errors {r['errors']}")
except Exception as e:
    print(f"{sys.argv[2]:>22} c={sys.argv[3]}: no result ({e})")
EOF
  done
}

nvidia-smi --query-gpu=name,memory.total --format=csv | tee -a "$out/summary.txt"
log "make-model $preset"
$py -m mlx_cluster make-model "$model" --preset "$preset" >/dev/null || exit 1

cfg() {  # ranks port
  cat > "$out/gpu$1.yaml" <<EOF
cluster: {name: gpu$1, backend: nccl, base_port: $((6000 + $1 * 10)), run_dir: $out/runs}
hosts: [{host: localhost, ranks: $1, ips: [127.0.0.1]}]
model: {path: $model, name: m}
server: {port: $2}
scheduler: {max_batch_size: 16}
EOF
}

for ranks in 1 2; do
  port=$((8100 + ranks)); cfg $ranks $port
  log "mlx-cluster up: $ranks GPU(s), nccl"
  setsid $py -m mlx_cluster up "$out/gpu$ranks.yaml" > "$out/ours-$ranks.log" 2>&1 &
  pid=$!
  if wait_up "http://127.0.0.1:$port" $pid; then bench "mlx-cluster-${ranks}gpu" "http://127.0.0.1:$port" m
  else log "mlx-cluster with $ranks GPU(s) did not come up"; tail -20 "$out/ours-$ranks.log" | tee -a "$out/summary.txt"; fi
  stop $pid
done

log "mlx_lm.server: 1 GPU"
setsid $py -m mlx_lm.server --model "$model" --port 8201 > "$out/anchor-1.log" 2>&1 &
pid=$!
if wait_up http://127.0.0.1:8201 $pid; then bench "mlx_lm.server-1gpu" http://127.0.0.1:8201 default_model
else log "mlx_lm.server did not come up"; fi
stop $pid

log "mlx_lm.server: 2 GPUs under mlx.launch --backend nccl"
setsid $py -m mlx._distributed_utils.launch --backend nccl --hosts 127.0.0.1 -n 2 --nccl-port 6100 -- \
  $py -m mlx_lm.server --model "$model" --port 8202 > "$out/anchor-2.log" 2>&1 &
pid=$!
if timeout 120 bash -c "$(declare -f wait_up); wait_up http://127.0.0.1:8202 $pid"; then
  bench "mlx_lm.server-2gpu" http://127.0.0.1:8202 default_model
else log "mlx_lm.server under mlx.launch -n 2 (nccl) did not come up:"; grep -m3 -i "error\|stream" "$out/anchor-2.log" | tee -a "$out/summary.txt"; fi
stop $pid
log done
