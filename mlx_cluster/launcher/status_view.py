"""Per-rank figures in the terminal: the rank table of `mlx-cluster status` and `mlx-cluster top`.

Both read rank 0's `GET /admin/status` (server/status.py), with the API key from
MLX_CLUSTER_API_KEY or `server.api_key_file` like any client. `top` redraws a full-screen view
with rich every interval until Ctrl-C or `q`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import sys
import time
import urllib.error
import urllib.request

from mlx_cluster.config import ClusterConfig
from mlx_cluster.launcher.rundir import RunDir, pid_alive


def api_key(config: ClusterConfig) -> str | None:
    from mlx_cluster.server.auth import load_api_keys

    try:
        keys = load_api_keys(config.server.api_key_file)
    except ValueError:
        return None
    return keys[0] if keys else None


def fetch_status(url: str, key: str | None, timeout_s: float = 3.0) -> tuple[dict | None, str]:
    """(the /admin/status document, "") or (None, why not)."""
    request = urllib.request.Request(url + "/admin/status")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as r:
            return json.loads(r.read()), ""
    except urllib.error.HTTPError as e:
        if e.code == 401:
            return None, "the API key was refused (set MLX_CLUSTER_API_KEY)"
        return None, f"http {e.code}"
    except (OSError, ValueError) as e:
        return None, f"unreachable ({e})"


def _bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _ms(s) -> str:
    return "-" if s is None else f"{s * 1000:.1f} ms"


def _pct(f) -> str:
    return "-" if f is None else f"{f * 100:.1f}%"


RANK_COLUMNS = ("rank", "host", "pid", "state", "memory", "peak", "step", "bus wait", "tok/s", "ssd", "age")


def rank_rows(status: dict) -> list[tuple[str, ...]]:
    rows = []
    for r in status["ranks"]:
        state = "up" if r["up"] else r.get("state", "unknown")
        if r["up"] and r.get("state"):
            state += f" ({r['state']})"
        ssd = (r.get("cache") or {}).get("ssd")
        rows.append(
            (
                str(r["rank"]),
                str(r.get("host", "-")),
                str(r.get("pid", "-")),
                state,
                _bytes(r.get("mem_active")),
                _bytes(r.get("mem_peak")),
                _ms(r.get("step_s")),
                _pct(r.get("bus_frac")),
                f"{r.get('tok_s', 0.0):.1f}",
                _bytes(ssd.get("bytes")) if isinstance(ssd, dict) else "off",
                "-" if r.get("age_s") is None else f"{r['age_s']:.1f}s",
            )
        )
    return rows


def print_rank_table(status: dict, out=sys.stdout) -> None:
    rows = [RANK_COLUMNS, *rank_rows(status)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(RANK_COLUMNS))]
    for row in rows:
        print(
            "  ".join(
                cell.rjust(w) if i not in (1, 3) else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))
            ),
            file=out,
        )


# ---- top --------------------------------------------------------------------------------------
def render(config: ClusterConfig, status: dict | None, why: str):
    """The whole screen as one rich renderable."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    title = f"mlx-cluster top: {config.cluster.name}   (q or Ctrl-C quits)"
    if status is None:
        return Panel(Text(f"rank 0: {why}", style="bold red"), title=title)
    c, h = status["cluster"], status["health"]
    last = status["history"][-1] if status["history"] else {}
    head = Text.assemble(
        ("state ", "dim"),
        (f"{c['state']} / {h['status']}", "bold"),
        ("   model ", "dim"),
        c["model"],
        ("   backend ", "dim"),
        f"{c['backend']} x{c['world_size']}",
        ("   restarts ", "dim"),
        str(c["restarts"]),
        ("   uptime ", "dim"),
        f"{c['uptime_s']:.0f}s",
        ("\nthroughput ", "dim"),
        f"{last.get('gen_tok_s', 0.0):.1f} tok/s",
        ("   prompt ", "dim"),
        f"{last.get('prompt_tok_s', 0.0):.1f} tok/s",
        ("   TTFT ", "dim"),
        _ms(last.get("ttft_s")),
        ("   TPOT ", "dim"),
        _ms(last.get("tpot_s")),
        ("   running ", "dim"),
        str(h["running_requests"]),
        ("   waiting ", "dim"),
        str(h["queue_depth"]),
    )
    ranks = Table(expand=True, title="ranks")
    for name in RANK_COLUMNS:
        ranks.add_column(name, justify="left" if name in ("host", "state") else "right")
    for row in rank_rows(status):
        style = "green" if row[3].startswith("up") else "bold red"
        ranks.add_row(*row, style=style)
    requests = Table(expand=True, title="requests")
    for name in ("id", "state", "prompt", "generated", "tok/s", "age"):
        requests.add_column(name, justify="left" if name in ("id", "state") else "right")
    for q in status["requests"][:20]:
        requests.add_row(
            q["id"],
            q["state"],
            str(q["prompt_tokens"]),
            str(q["generated_tokens"]),
            f"{q['tok_s']:.1f}",
            f"{q['age_s']:.1f}s",
        )
    return Panel(Group(head, ranks, requests), title=title)


@contextlib.contextmanager
def _keys():
    """Yields a function returning the keys typed since the last call (none when not a terminal)."""
    if not sys.stdin.isatty():
        yield lambda: ""
        return
    import termios
    import tty

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read() -> str:
        typed = ""
        while select.select([fd], [], [], 0)[0]:
            typed += os.read(fd, 32).decode(errors="replace")
        return typed

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def top(config: ClusterConfig, interval_s: float = 1.0) -> int:
    from rich.console import Console
    from rich.live import Live

    state = RunDir.for_cluster(config).read_state()
    if state is None or not pid_alive(state.get("launcher_pid")):
        print(f"cluster {config.cluster.name!r} is not running", file=sys.stderr)
        return 3
    url, key = state["http"], api_key(config)
    console = Console()
    try:
        with _keys() as typed, Live(console=console, screen=True, auto_refresh=False) as live:
            while True:
                status, why = fetch_status(url, key)
                live.update(render(config, status, why), refresh=True)
                deadline = time.monotonic() + interval_s
                while time.monotonic() < deadline:
                    if "q" in typed().lower():
                        return 0
                    time.sleep(0.05)
    except KeyboardInterrupt:
        return 0
