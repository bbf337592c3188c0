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
