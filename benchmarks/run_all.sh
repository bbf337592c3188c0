#!/usr/bin/env bash
# Every CPU number in docs/benchmarks.md, in one run (about 20 minutes on a 2-core machine).
set -x
cd "$(dirname "$0")/.."
out=benchmarks/results
mkdir -p $out
python3 benchmarks/compare.py --preset tiny --ranks 1 --concurrency 1 8 --repeats 3 --out $out/tiny-1rank.json
python3 benchmarks/compare.py --preset tiny --ranks 2 --concurrency 1 8 --repeats 3 --out $out/tiny-2rank.json
python3 benchmarks/compare.py --preset small --ranks 1 --concurrency 1 8 --repeats 1 --num-requests 8 \
  --input-len 32 --output-len 32 --out $out/small-1rank.json
python3 benchmarks/idle_cpu.py --ranks 2 --seconds 20 > $out/idle-2rank.json
python3 benchmarks/prefix_cache.py --ranks 2 --system-tokens 2000 --repeats 2 --turns 5 --out $out/prefix-2rank.json
