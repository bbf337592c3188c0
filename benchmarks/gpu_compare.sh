#!/usr/bin/env bash
# One GPU, side by side in one run: mlx-cluster (one rank) against mlx_lm.server on the same
# built-in model, 512-token prompts, 128 output tokens: greedy at concurrency 1 and 32, and
# sampled (temperature 0.7) at 32; JSON out. mlx-cluster runs with MLX_CLUSTER_TRACE on, so
# the per-step phase trace comes back too.
# Usage on a CUDA host with mlx[cuda13]:  bash benchmarks/gpu_compare.sh [PRESET] [OUT_DIR]
# Optional: OLD_TREE=DIR also runs the mlx-cluster checked out in DIR (an A/B of two commits);
# VARIANT_ENV="NAME=VALUE ..." also runs mlx-cluster with those environment variables.
set -uo pipefail
preset=${1:-8b}
out=${2:-${OUT:-/tmp/gpu-compare}}
mkdir -p "$out"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
export PYTHONPATH=$(pwd):${PYTHONPATH:-}
model=/tmp/mlxc-$preset
py=python3
source "$(dirname "$0")/servers.sh"

bench() {  # name url model_id
  for run in "1 0" "32 0" "32 0.7"; do
    set -- "$1" "$2" "$3" $run
    $py -m mlx_cluster bench "$2" --model "$3" --json --no-progress --concurrency $4 --temperature $5 \
      --num-requests $(($4 == 1 ? 8 : 96)) --input-len 512 --output-len 128 --warmup 2 \
      > "$out/$1-c$4-t$5.json" 2>>"$out/errors.txt"
    $py - "$out/$1-c$4-t$5.json" "$1" "$4" "$5" <<'PY' | tee -a "$out/summary.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    print(f"{sys.argv[2]:>18} c={sys.argv[3]:>2} T={sys.argv[4]:<3}: {r['output_throughput_tok_s']:8.1f} tok/s  "
          f"TTFT p50 {r['ttft_ms']['p50']:7.1f} ms  TPOT p50 {r['tpot_ms']['p50']:6.2f} ms  "
          f"out tokens {r['total_output_tokens']}  errors {r['errors']}")
except Exception as e:
    print(f"{sys.argv[2]:>18} c={sys.argv[3]} T={sys.argv[4]}: no result ({e})")
PY
  done
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/summary.txt"
[ -d "$model" ] || $py -m mlx_cluster make-model "$model" --preset "$preset" >/dev/null || exit 1
cat > "$out/ours.yaml" <<YAML
cluster: {name: gpu1, run_dir: $out/runs}
hosts: [{host: localhost, ranks: 1}]
model: {path: $model, name: m}
server: {port: 8101}
scheduler: {max_batch_size: 32}
cache: {ssd: {enabled: false}}
YAML
ours() {  # name, directory to run from (python -m imports mlx_cluster from there), env assignments
  name=$1 dir=$2; shift 2
  (cd "$dir" && exec env "$@" setsid $py -m mlx_cluster up "$out/ours.yaml") > "$out/$name.log" 2>&1 &
  pid=$!
  if wait_up http://127.0.0.1:8101 $pid; then bench "$name" http://127.0.0.1:8101 m
  else echo "$name did not come up"; tail -20 "$out/$name.log"; fi
  stop $pid
}
ours mlx-cluster . MLX_CLUSTER_TRACE=$out/trace
[ -n "${VARIANT_ENV:-}" ] && ours mlx-cluster-variant . $VARIANT_ENV
[ -n "${OLD_TREE:-}" ] && ours mlx-cluster-old "$OLD_TREE" PYTHONPATH=$OLD_TREE:${PYTHONPATH#$(pwd):}

setsid $py -m mlx_lm.server --model "$model" --port 8201 --decode-concurrency 32 > "$out/anchor.log" 2>&1 &
pid=$!
if wait_up http://127.0.0.1:8201 $pid; then bench mlx_lm.server http://127.0.0.1:8201 default_model
else echo "mlx_lm.server did not come up"; tail -5 "$out/anchor.log"; fi
stop $pid
