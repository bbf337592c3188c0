# Shell helpers shared by the GPU benchmark scripts (source it).

wait_up() {  # url pid: until the server answers a completion (mlx_lm.server has no readiness probe)
  for _ in $(seq 1 900); do
    kill -0 "$2" 2>/dev/null || return 1
    curl -sf "$1/v1/models" >/dev/null && curl -sf "$1/v1/completions" -H 'Content-Type: application/json' \
      -d '{"prompt":"hi","max_tokens":2}' >/dev/null && return 0
    sleep 0.5
  done
  return 1
}

stop() {  # pid of a process-group leader: SIGTERM the group, SIGKILL after 20 s
  kill -TERM -"$1" 2>/dev/null
  for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || return; sleep 0.2; done
  kill -KILL -"$1" 2>/dev/null
}

summary_line() {  # bench-json label: one line of a `mlx-cluster bench --json` report
  python3 - "$1" "$2" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
    print(f"{sys.argv[2]:>22}: {r['output_throughput_tok_s']:8.1f} tok/s  TTFT p50 {r['ttft_ms']['p50']:8.1f} ms  "
          f"TPOT p50 {r['tpot_ms']['p50']:6.2f} ms  errors {r['errors']}")
except Exception as e:
    print(f"{sys.argv[2]:>22}: no result ({e})")
PY
}
