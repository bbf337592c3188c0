#!/usr/bin/env bash
# One GPU, side by side in one run: single-stream greedy decoding with speculation off and on
# (n-gram, then a draft model), on the built-in model, repetitive and free-form continuations,
# through the engine's executor in process (benchmarks/speculative.py); JSON and a summary out.
# Usage on a CUDA host with mlx[cuda13]:  bash benchmarks/gpu_speculative.sh [PRESET] [OUT_DIR]
# The draft run uses the `small` preset as the draft (the small, 1b and 8b presets share one
# tokenizer). Random weights do not predict each other, so it shows the cost of a useless draft
# once dynamic K has backed off, not a speed-up. DRAFT_PRESET= (empty) skips it.
set -uo pipefail
preset=${1:-8b}
out=${2:-${OUT:-/tmp/gpu-speculative}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
export PYTHONPATH=$(pwd):${PYTHONPATH:-}
model=/tmp/mlxc-$preset
py=python3

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee -a "$out/summary.txt"
[ -d "$model" ] || $py -m mlx_cluster make-model "$model" --preset "$preset" >/dev/null || exit 1
for k in 4 8; do
  echo "== ngram, num_tokens $k" | tee -a "$out/summary.txt"
  $py benchmarks/speculative.py --model "$model" --method ngram --num-tokens $k --prompts 4 \
    --max-tokens 256 --repeats 2 --out "$out/ngram-k$k.json" 2>>"$out/errors.txt" | tee -a "$out/summary.txt"
done
draft_preset=${DRAFT_PRESET-small}
if [ -n "$draft_preset" ]; then
  draft=/tmp/mlxc-$draft_preset
  [ -d "$draft" ] || $py -m mlx_cluster make-model "$draft" --preset "$draft_preset" >/dev/null || exit 1
  echo "== draft $draft_preset, num_tokens 4" | tee -a "$out/summary.txt"
  $py benchmarks/speculative.py --model "$model" --method draft --draft-model "$draft" --num-tokens 4 \
    --prompts 4 --max-tokens 256 --repeats 2 --out "$out/draft.json" 2>>"$out/errors.txt" | tee -a "$out/summary.txt"
fi
