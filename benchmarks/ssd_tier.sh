#!/usr/bin/env bash
# The prefix cache's tiers against no SSD tier, side by side in one run (issue: tiers that never
# make serving slower). One server after another on the same model and the same prompts:
#   off     cache.ssd.enabled: false             cold prompts (c=1 TTFT, c=32 throughput), then
#                                                the same c=1 prompts again (RAM hits)
#   ssd     SSD tier on, write_through         cold, writing every block as it is stored
#   warm    the same SSD directory, restarted    every prefix is an SSD hit (RAM empty)
#   long    SSD off, LONG-word prompts           cold, then the same prompts again (RAM hits)
# Usage (CPU or GPU):  bash benchmarks/ssd_tier.sh [PRESET] [OUT_DIR]
# Env: RANKS (1), INPUT (512), OUTPUT (128), N1 (8), N32 (96), LONG (8192), BACKEND (ring),
# SSD_GB (auto; give room for every prompt's blocks, or the warm run is partly cold),
# RUNS ("warmup off ssd warm long": a subset, in the order given; warm needs ssd before it),
# REPEATS (1): more rounds of REPEAT_RUNS ("off warm") after the first, files suffixed -r2, -r3 ..,
# so off and warm alternate (ABAB) and the summary gives every round's ratio and their median.
set -uo pipefail
preset=${1:-8b}
out=${2:-/tmp/ssd-tier}
ranks=${RANKS:-1} input=${INPUT:-512} output=${OUTPUT:-128} n1=${N1:-8} n32=${N32:-96} long=${LONG:-8192}
mkdir -p "$out" && rm -rf "$out/kv" "$out/summary.txt"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export PYTHONPATH=$(pwd):${PYTHONPATH:-}
py=python3
model=${MODEL_DIR:-/tmp/mlxc-$preset}
source "$(dirname "$0")/servers.sh"
[ -d "$model" ] || $py -m mlx_cluster make-model "$model" --preset "$preset" >/dev/null || exit 1

bench() {  # label concurrency num_requests seed input_len
  $py -m mlx_cluster bench http://127.0.0.1:8111 --model m --json --no-progress --concurrency "$2" \
    --num-requests "$3" --seed "$4" --input-len "$5" --output-len "$output" --warmup 0 \
    > "$out/$1.json" 2>>"$out/errors.txt"
  summary_line "$out/$1.json" "$1" | tee -a "$out/summary.txt"
}

serve() {  # name ssd_enabled max_prompt_tokens
  cat > "$out/$1.yaml" <<YAML
cluster: {name: ssd-bench, run_dir: $out/runs, backend: ${BACKEND:-ring}}
hosts: [{host: localhost, ranks: $ranks}]
model: {path: $model, name: m}
server: {port: 8111}
scheduler: {max_batch_size: 32, max_prompt_tokens: $3, max_kv_tokens: 600000}
cache: {ssd: {enabled: $2, dir: $out/kv, policy: write_through, max_gb: ${SSD_GB:-auto}}}
YAML
  setsid $py -m mlx_cluster up "$out/$1.yaml" > "$out/$1.log" 2>&1 &
  pid=$!
  wait_up http://127.0.0.1:8111 $pid || { echo "$1 did not come up"; tail -20 "$out/$1.log"; return 1; }
}

# A warm-up server run first, so page cache and compile caches favour no one (on CUDA the first
# batch of 32 a fresh machine runs stalled 10-12 s in two sessions, likely kernel compilation:
# the warm-up takes that too).
for round in $(seq 1 "${REPEATS:-1}"); do
  runs=${RUNS:-warmup off ssd warm long} r=""
  [ "$round" -gt 1 ] && runs=${REPEAT_RUNS:-off warm} r="-r$round"
  for run in $runs; do
    case $run in
      warmup) serve warmup false 8192 && { bench warmup-c1 1 2 99 "$input"; bench warmup-c32 32 32 98 "$input"; } ;;
      off) serve off$r false 8192 && { bench off-c1$r 1 "$n1" 1 "$input"; bench off-c32$r 32 "$n32" 2 "$input"; bench off-c1-ram$r 1 "$n1" 1 "$input"; } ;;
      ssd) serve ssd$r true 8192 && { bench ssd-c1$r 1 "$n1" 1 "$input"; bench ssd-c32$r 32 "$n32" 2 "$input"; } ;;
      warm) serve warm$r true 8192 && { bench warm-c1$r 1 "$n1" 1 "$input"; bench warm-c32$r 32 "$n32" 2 "$input"; } ;;
      long) serve long$r false $((2 * long + 1024)) && { bench long-cold$r 1 4 3 "$long"; bench long-ram$r 1 4 3 "$long"; } ;;
    esac
    curl -s http://127.0.0.1:8111/admin/cache > "$out/$run$r-cache.json"  # per-rank cost figures and tier stats
    stop $pid
  done
done
grep -h "prefix cache\|SSD KV" "$out"/warm.log | head -5 | tee -a "$out/summary.txt"
$py - "$out" <<'PY' | tee -a "$out/summary.txt"
import json, sys, pathlib, statistics
d = pathlib.Path(sys.argv[1])
def r(name):
    try: return json.loads((d / f"{name}.json").read_text())
    except Exception: return None
def one(a, b, key, sub):
    ra, rb = r(a), r(b)
    if not ra or not rb: return None
    va, vb = (ra[key][sub], rb[key][sub]) if sub else (ra[key], rb[key])
    return va / vb if vb else None
def ratio(a, b, key, sub=None):
    # Every round's ratio (round n's files end in -rn), then their median when there are several.
    rounds = [one(a, b, key, sub)] + [one(f"{a}-r{n}", f"{b}-r{n}", key, sub) for n in range(2, 50)]
    got = [x for x in rounds if x is not None]
    if not got: return "n/a"
    if len(got) == 1: return f"{got[0]:.3f}x"
    return f"median {statistics.median(got):.3f}x of " + ", ".join(f"{x:.3f}" for x in got)
print("warm SSD hits vs SSD off, c=1 TTFT p50:", ratio("warm-c1", "off-c1", "ttft_ms", "p50"), "(goal <= 1.05)")
print("warm SSD hits vs SSD off, c=32 tok/s:  ", ratio("warm-c32", "off-c32", "output_throughput_tok_s"), "(goal >= 0.97)")
print("SSD on (writing) vs off, c=32 TPOT p50:", ratio("ssd-c32", "off-c32", "tpot_ms", "p50"), "(goal <= 1.03)")
print("RAM hit vs cold, c=1 TTFT p50:         ", ratio("off-c1-ram", "off-c1", "ttft_ms", "p50"))
print("RAM hit vs cold, long prompts TTFT p50:", ratio("long-ram", "long-cold", "ttft_ms", "p50"), "(goal <= 0.3)")
PY
