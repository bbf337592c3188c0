"""Chaos and soak: a seeded mixed workload against a multi-rank cluster while a seeded schedule
injects faults, judged by an oracle; or (--soak-minutes) steady load with resource sampling.

    python benchmarks/chaos.py --seed 1 --faults 12 --requests 300 --out benchmarks/results/chaos.json
    python benchmarks/chaos.py --soak-minutes 10 --out benchmarks/results/soak.json

The oracle: every request ends in exactly one of
  ok         a complete reply equal, token for token (completions: the logprobs tokens; other
             endpoints: the text / tool calls and finish reason), to a fault-free TP=1 reference
             run of the same request (speculation off, SSD tier off there);
  error      a clean error: an HTTP error envelope, or in a stream an error chunk then [DONE]
             (Responses: response.failed; Messages: an `error` event);
  retryable  429 or 503 with Retry-After;
  refused    nothing listened (the group, or its launcher, was down);
  lost       the connection broke mid-reply: allowed only inside a fault's window (rank 0 died);
  cancelled  the client hung up on purpose (what it had received must be a prefix of the
             reference);
and never: wrong (tokens differ), truncated (a reply that ended cleanly without its finish),
bad_error (an error without an envelope, or 429/503 without Retry-After), hang (past the
timeout), lost outside a fault window. Also checked: no process outlives `down`, no request is
left running at the end, and /readyz never says 200 while a probe request cannot be served
(outside the detection bound of the fault just injected).

Faults: sigkill (any rank, rank 0 included), sigstop (SIGSTOP, then SIGCONT after 1-2x
collective_timeout_s), launcher (SIGKILL `mlx-cluster up`; the harness checks the ranks follow
it, then starts it again), ssd_corrupt (random bytes over / truncation of SSD-tier files),
disk_full (the SSD dir is a small tmpfs; a filler file takes all its space for a while),
slow_link (a tbf qdisc on the private loopback: 256 kbit/s for a few seconds), partition
(`--kinds partition`: one rank on each of two SSH hosts in network namespaces, tests/netns.py's,
built inside the harness's private network namespace; host b's veth on the bridge is set down
for 0.5-2x collective_timeout_s, then up). As root the harness re-runs itself in private
network and mount namespaces (unshare), so the tmpfs, the qdisc and the namespaced hosts touch
nobody else. Not available on this kernel, so not exercised: tc netem (added latency, loss),
tc classifiers/actions (per-port drops) and iptables (not installed).

Layouts: `--pipeline 2` (cluster.parallel {tensor: 1, pipeline: 2}, micro-batches in flight by
default; no adapter or speculation, which that layout refuses or runs one pass at a time);
`--models 2` (`models:` builtin:tiny and "tiny2", builtin:tiny with its embedding rows rolled,
so a reply from the wrong model is a wrong token; requests alternate; tiny2 unloads after
`--idle-unload-s`; each model's reference is its own single-model TP=1 cluster);
`--target-ranks 1` (sigkill/sigstop hit only those ranks, e.g. the last stage).

    python benchmarks/chaos.py --seed 12 --faults 5 --requests 40 --duration-s 200 --pipeline 2 --kinds sigkill,sigstop --target-ranks 1
    python benchmarks/chaos.py --seed 21 --faults 5 --requests 40 --duration-s 200 --models 2 --idle-unload-s 4
    python benchmarks/chaos.py --seed 31 --faults 4 --requests 36 --duration-s 200 --kinds partition
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster import REPO, Cluster, _merge, free_port, pid_alive  # noqa: E402  (the same harness the tests use)

ALL_KINDS = ("sigkill", "sigstop", "launcher", "ssd_corrupt", "disk_full", "slow_link", "partition")
# partition needs its own layout (one rank on each of two namespaced hosts): asked for by name.
DEFAULT_KINDS = ALL_KINDS[:-1]
# 3 s tripped the watchdog without any fault on 2 cores shared with 5 other jobs (load 5.7):
# both ranks' steps stalled together. 10 s, as in production-like runs, keeps that noise out.
COLLECTIVE_TIMEOUT_S = 10.0
HEARTBEAT_S = 0.5
PROBE_TIMEOUT_S = 15.0
REQUEST_TIMEOUT_S = 60.0  # a request still open after this is a hang
MAX_REQUEST_BYTES = 262_144
WORDS = (
    "the",
    "cat",
    "sat",
    "on",
    "a",
    "mat",
    "while",
    "rain",
    "fell",
    "over",
    "quiet",
    "hills",
    "and",
    "old",
    "roads",
    "near",
    "rivers",
    "where",
    "people",
    "walked",
    "slowly",
    "talking",
    "about",
    "music",
    "books",
    "food",
    "time",
    "work",
    "home",
    "light",
    "water",
    "stone",
    "green",
    "blue",
    "red",
    "small",
    "large",
    "early",
    "late",
)
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 10}},
                "required": ["city"],
            },
        },
    }
]


# --------------------------------------------------------------------------- workload


@dataclass
class Spec:
    """One request of the workload: what to send and how to behave as a client."""

    id: int
    kind: str  # completion | chat | responses | messages | json | tools | adapter | spec | malformed | oversized | slow
    path: str
    body: dict | None
    stream: bool = False
    cancel_after: int | None = None  # chunks read before hanging up
    raw: bytes | None = None  # sent as is (malformed / oversized)
    at: float = 0.0  # seconds after the start of the run

    @property
    def checked(self) -> bool:
        return self.raw is None and self.kind != "slow"


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def make_workload(seed: int, n: int, duration_s: float, adapter: str | None, long_words: int = 150) -> list[Spec]:
    rng = random.Random(seed)
    # A few shared long prefixes, so the prefix cache (and its SSD tier) serves repeats.
    prefixes = [_text(random.Random(seed * 1000 + i), long_words) for i in range(3)]
    kinds = ["completion", "chat", "responses", "messages", "json", "tools", "spec", "long"]
    kinds += ["adapter"] if adapter else []
    specs = []
    for i in range(n):
        r = rng.random()
        if r < 0.04:
            kind = "malformed"
        elif r < 0.07:
            kind = "oversized"
        elif r < 0.09:
            kind = "slow"
        else:
            kind = rng.choice(kinds)
        short = _text(rng, rng.randint(3, 20))
        prompt = rng.choice(prefixes) + " " + short if kind == "long" or rng.random() < 0.25 else short
        max_tokens = rng.randint(4, 40)
        stream = rng.random() < 0.5
        cancel = rng.randint(1, 4) if stream and rng.random() < 0.15 else None
        base = {"temperature": 0, "max_tokens": max_tokens}
        if kind in ("completion", "long", "spec", "adapter"):
            if kind == "spec":  # repeats itself: n-gram speculation finds proposals
                prompt = " ".join([_text(rng, 6)] * 6)
            body = {"prompt": prompt, "logprobs": 0, **base}
            if kind == "adapter":
                body["model"] = adapter
            spec = Spec(i, kind, "/v1/completions", body)
        elif kind == "chat":
            spec = Spec(i, kind, "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}], **base})
        elif kind == "json":
            fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
            msgs = [{"role": "user", "content": prompt}]
            spec = Spec(
                i, kind, "/v1/chat/completions", {"messages": msgs, "response_format": fmt, **base, "max_tokens": 60}
            )
        elif kind == "tools":
            msgs = [{"role": "user", "content": prompt}]
            body = {"messages": msgs, "tools": TOOLS, "tool_choice": "required", **base, "max_tokens": 60}
            spec = Spec(i, kind, "/v1/chat/completions", body)
        elif kind == "responses":
            spec = Spec(i, kind, "/v1/responses", {"input": prompt, "temperature": 0, "max_output_tokens": max_tokens})
        elif kind == "messages":
            msgs = [{"role": "user", "content": prompt}]
            spec = Spec(i, kind, "/v1/messages", {"model": "builtin:tiny", "messages": msgs, **base})
        elif kind == "malformed":
            raw = rng.choice([b'{"prompt": "hi", "max_tokens": ', b'{"messages": "not a list"}', b"\xff\xfe not json"])
            path = "/v1/completions" if raw.startswith(b'{"prompt') else "/v1/chat/completions"
            spec, stream, cancel = Spec(i, kind, path, None, raw=raw), False, None
        elif kind == "oversized":
            raw = json.dumps({"prompt": "x " * MAX_REQUEST_BYTES, "max_tokens": 4}).encode()
            spec, stream, cancel = Spec(i, kind, "/v1/completions", None, raw=raw), False, None
        else:  # slow: a stream that is never read, held open for a while, then dropped
            body = {"prompt": short, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
            spec, stream, cancel = Spec(i, kind, "/v1/completions", body), True, None
        spec.stream, spec.cancel_after = stream, cancel
        if spec.body is not None and kind != "slow":
            spec.body["stream"] = stream
        spec.at = rng.uniform(0, duration_s)
        specs.append(spec)
    return sorted(specs, key=lambda s: s.at)


# --------------------------------------------------------------------------- one request


@dataclass
class Result:
    id: int
    kind: str
    outcome: str
    answer: object = None  # what is compared with the reference
    detail: str = ""
    start: float = 0.0
    end: float = 0.0
    status: int | None = None


def _is_envelope(obj) -> bool:
    if not isinstance(obj, dict):
        return False
    err = obj.get("error")
    return isinstance(err, dict) and bool(err.get("message"))


def _answer_from_body(path: str, body: dict):
    """(text or tokens, tool calls, finish) of a complete non-streamed reply, or None if incomplete."""
    if path == "/v1/completions":
        c = body["choices"][0]
        return (c["logprobs"]["tokens"], None, c["finish_reason"]) if c.get("finish_reason") else None
    if path == "/v1/chat/completions":
        c = body["choices"][0]
        calls = [(t["function"]["name"], t["function"]["arguments"]) for t in c["message"].get("tool_calls") or []]
        return (
            (c["message"].get("content") or "", calls or None, c["finish_reason"]) if c.get("finish_reason") else None
        )
    if path == "/v1/responses":
        if body.get("status") not in ("completed", "incomplete"):
            return None
        text = "".join(
            part.get("text", "")
            for item in body.get("output", [])
            if item.get("type") == "message"
            for part in item.get("content", [])
        )
        return (text, None, body["status"])
    # messages
    if not body.get("stop_reason"):
        return None
    text = "".join(b.get("text", "") for b in body.get("content", []) if b.get("type") == "text")
    return (text, None, body["stop_reason"])


class _Stream:
    """Accumulates one SSE stream and says how it ended."""

    def __init__(self, path: str):
        self.path, self.event, self.chunks = path, None, 0
        self.text, self.tokens, self.calls, self.finish = [], [], {}, None
        self.error = self.done = self.terminal = False

    def line(self, line: str) -> None:
        if line.startswith("event: "):
            self.event = line[7:].strip()
            return
        if not line.startswith("data: "):
            return
        data = line[6:]
        if data == "[DONE]":
            self.done = True
            return
        obj = json.loads(data)
        self.chunks += 1
        if self.path in ("/v1/completions", "/v1/chat/completions"):
            if "error" in obj:
                self.error = _is_envelope(obj) or "bad"
                return
            c = obj["choices"][0] if obj.get("choices") else None
            if c is None:
                return
            if self.path == "/v1/completions":
                self.text.append(c.get("text", ""))
                self.tokens += (c.get("logprobs") or {}).get("tokens") or []
            else:
                d = c.get("delta") or {}
                self.text.append(d.get("content") or "")
                for t in d.get("tool_calls") or []:
                    entry = self.calls.setdefault(t.get("index", 0), ["", ""])
                    entry[0] += (t.get("function") or {}).get("name") or ""
                    entry[1] += (t.get("function") or {}).get("arguments") or ""
            self.finish = c.get("finish_reason") or self.finish
        elif self.path == "/v1/responses":
            kind = obj.get("type")
            if kind == "response.output_text.delta":
                self.text.append(obj.get("delta", ""))
            elif kind in ("response.completed", "response.incomplete"):
                self.finish, self.terminal = obj["response"]["status"], True
            elif kind == "response.failed":
                self.error, self.terminal = bool((obj["response"].get("error") or {}).get("message")) or "bad", True
        else:  # messages
            kind = obj.get("type")
            if kind == "content_block_delta" and obj["delta"].get("type") == "text_delta":
                self.text.append(obj["delta"]["text"])
            elif kind == "message_delta":
                self.finish = obj["delta"].get("stop_reason")
            elif kind == "message_stop":
                self.terminal = True
            elif kind == "error":
                self.error, self.terminal = _is_envelope(obj) or "bad", True

    def ended_cleanly(self) -> bool:
        return self.terminal if self.path in ("/v1/responses", "/v1/messages") else self.done

    def answer(self):
        if self.path == "/v1/completions":
            return (self.tokens, None, self.finish)
        calls = [tuple(v) for _, v in sorted(self.calls.items())] or None
        return ("".join(self.text), calls, self.finish)


def run_request(url: str, spec: Spec, timeout_s: float = REQUEST_TIMEOUT_S) -> Result:
    res = Result(spec.id, spec.kind, "hang", start=time.monotonic())
    try:
        if spec.kind == "slow":
            _slow_client(url, spec)
            res.outcome = "slow_client"
        elif spec.raw is not None:
            r = httpx.post(
                url + spec.path, content=spec.raw, headers={"content-type": "application/json"}, timeout=timeout_s
            )
            res.status = r.status_code
            ok_env = r.status_code in (400, 413, 422) and _is_envelope(_json(r))
            res.outcome = "error" if ok_env else _error_outcome(r)
            if r.status_code == 200:
                res.outcome, res.detail = "bad_error", "malformed body accepted"
        elif spec.stream:
            _run_stream(url, spec, res, timeout_s)
        else:
            r = httpx.post(url + spec.path, json=spec.body, timeout=timeout_s)
            res.status = r.status_code
            if r.status_code == 200:
                ans = _answer_from_body(spec.path, r.json())
                res.outcome, res.answer = ("ok", ans) if ans is not None else ("truncated", None)
            else:
                res.outcome = _error_outcome(r)
                res.detail = r.text[:200]
    except httpx.ConnectError as e:
        res.outcome, res.detail = "refused", str(e)[:100]
    except httpx.TimeoutException as e:
        res.outcome, res.detail = "hang", f"timeout: {e}"[:200]
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as e:
        res.outcome, res.detail = "lost", repr(e)[:200]
    except Exception as e:  # anything else is a finding, not a crash of the harness
        res.outcome, res.detail = "harness_error", repr(e)[:300]
    res.end = time.monotonic()
    if res.end - res.start > timeout_s + 5 and res.outcome not in ("slow_client",):
        res.outcome = "hang"
    return res


def _json(r: httpx.Response):
    try:
        return r.json()
    except ValueError:
        return None


def _error_outcome(r: httpx.Response) -> str:
    body = _json(r)
    if not _is_envelope(body):
        return "bad_error"
    if r.status_code in (429, 503):
        return "retryable" if r.headers.get("retry-after") else "bad_error"
    return "error"


def _run_stream(url: str, spec: Spec, res: Result, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    st = _Stream(spec.path)
    with httpx.stream("POST", url + spec.path, json=spec.body, timeout=timeout_s) as r:
        res.status = r.status_code
        if r.status_code != 200:
            r.read()
            res.outcome, res.detail = _error_outcome(r), r.text[:200]
            return
        for line in r.iter_lines():
            st.line(line)
            if time.monotonic() > deadline:
                res.outcome, res.detail = "hang", "stream past its timeout"
                return
            if spec.cancel_after is not None and st.chunks >= spec.cancel_after and not st.error:
                res.outcome, res.answer = "cancelled", st.answer()
                return  # leaving the block closes the connection: a client hang-up
    if st.error:
        res.outcome = "error" if st.error is True and st.ended_cleanly() else "bad_error"
        res.detail = "error chunk" + ("" if st.ended_cleanly() else " without its end")
    elif st.ended_cleanly() and st.finish:
        res.outcome, res.answer = "ok", st.answer()
    else:
        res.outcome, res.detail = "truncated", f"done={st.done} terminal={st.terminal} finish={st.finish}"


def _slow_client(url: str, spec: Spec, hold_s: float = 6.0) -> None:
    """Send a streaming request and never read the reply; hang up after hold_s."""
    host, port = url.split("//")[1].split(":")
    payload = json.dumps(spec.body).encode()
    head = (
        f"POST {spec.path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port)), timeout=5) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(head + payload)
        time.sleep(hold_s)


# --------------------------------------------------------------------------- the cluster


def chaos_config(ssd_dir: Path, adapter_path: Path | None, speculative: bool = True) -> dict:
    cfg = {
        # A 512-token prefill chunk of builtin:tiny takes ~11 s on a loaded 2-core CPU: past the
        # watchdog's 10 s (a restart that no fault caused). 128-token chunks take ~2.5 s.
        "scheduler": {"max_batch_size": 8, "max_queue": 16, "prefill_chunk_tokens": 128, "prefill_batch_size": 2},
        "server": {"wedged_after_s": 2, "max_request_bytes": MAX_REQUEST_BYTES, "request_timeout_s": 45},
        "cache": {
            "block_size": 16,
            "ram_gb": 0.0005,  # a few blocks: the rest goes to (and comes back from) the SSD tier
            "ssd": {"dir": str(ssd_dir), "policy": "write_through", "max_gb": 0.016},
        },
        "supervisor": {
            "collective_timeout_s": COLLECTIVE_TIMEOUT_S,
            "heartbeat_s": HEARTBEAT_S,
            "backoff_s": 0.2,
            "max_restarts": 100,
            "restart_window_s": 5,
            "drain_timeout_s": 5,
        },
    }
    if speculative:
        cfg["speculative"] = {"method": "ngram", "num_tokens": 4}
    if adapter_path is not None:
        cfg["adapters"] = [{"name": "ad1", "path": str(adapter_path)}]
    return cfg


def layout_config(pipeline: int, ranks: int) -> dict:
    """cluster.parallel for `pipeline` stages over `ranks` (1: all tensor parallel, as before).
    Micro-batches take their default (P in flight on a pure pipeline without speculation)."""
    if pipeline <= 1:
        return {}
    if ranks % pipeline:
        raise ValueError(f"--pipeline {pipeline} must divide --ranks {ranks}")
    return {"cluster": {"parallel": {"tensor": ranks // pipeline, "pipeline": pipeline}}}


def make_adapter_dir(models_dir: Path, out: Path) -> Path | None:
    """A random LoRA adapter for builtin:tiny, made with mlx-lm's tuner (tests/test_lora.py)."""
    try:
        from mlx_cluster.models.builtin import resolve_model_path
        from tests.test_lora import ALL_KEYS, make_adapter

        return make_adapter(Path(resolve_model_path("builtin:tiny", str(models_dir))), out, 1, 4, 2.0, ALL_KEYS, 0.05)
    except Exception as e:  # adapters are one feature of the mix, not a reason to stop
        print(f"chaos: no adapter ({e!r}); the workload runs without one", file=sys.stderr)
        return None


def make_second_model(models_dir: Path, out: Path) -> Path:
    """builtin:tiny with its token embedding rows rolled by one: the same tokenizer and shapes,
    different greedy replies, so a request served by the wrong model is a wrong token."""
    import mlx.core as mx

    from mlx_cluster.models.builtin import resolve_model_path

    if (out / "config.json").exists():
        return out
    src = Path(resolve_model_path("builtin:tiny", str(models_dir)))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("mlx_cluster_builtin.json"))
    for f in sorted(tmp.glob("*.safetensors")):
        weights = mx.load(str(f))
        if "model.embed_tokens.weight" in weights:
            weights["model.embed_tokens.weight"] = mx.roll(weights["model.embed_tokens.weight"], 1, axis=0)
            mx.save_safetensors(str(f), weights, metadata={"format": "mlx"})
    tmp.rename(out)
    return out


def assign_models(specs: list[Spec], names: list[str]) -> None:
    """Every request with a body names a model, alternating, so loads and idle unloads happen
    all along the run (Messages' "builtin:tiny" too: under `models:` only the names exist)."""
    for spec in specs:
        if spec.body is not None:
            spec.body["model"] = names[spec.id % len(names)]


def models_config(names: dict[str, str], models_dir: Path, idle_unload_s: float) -> dict:
    """`models:` (name -> path) with the first preloaded and the rest loaded on first use."""
    entries = [{"name": n, "path": p, "builtin_dir": str(models_dir)} for n, p in names.items()]
    return {"models": entries, "idle_unload_s": idle_unload_s}


def reference_answers(
    workdir: Path, models_dir: Path, adapter: Path | None, specs: list[Spec], models: dict[str, str] | None = None
) -> dict[int, object]:
    """The fault-free TP=1 answers (speculation and the SSD tier off), four at a time. With
    `models` (name -> path), one single-model (`model:`) reference cluster per model, each
    answering the requests that name it: the reference does not go through `models:` at all."""
    if models:
        out = {}
        for name, path in models.items():
            todo = [s for s in specs if s.body is not None and s.body.get("model") == name]
            out.update(_reference(workdir / f"ref-{name}", models_dir, None, todo, {"path": path, "name": name}))
        return out
    return _reference(workdir, models_dir, adapter, specs)


def _reference(workdir: Path, models_dir: Path, adapter: Path | None, specs: list[Spec], model=None) -> dict:
    cfg = chaos_config(workdir / "ref-kv", adapter, speculative=False)
    cfg["cache"] = {"ssd": {"enabled": False}}
    cfg["supervisor"]["collective_timeout_s"] = 120  # no watchdog noise in the reference
    if model is not None:
        cfg["model"] = model
    out = {}
    todo = [s for s in specs if s.checked]

    def one(spec: Spec) -> None:
        r = run_request(ref.url, Spec(spec.id, spec.kind, spec.path, {**spec.body, "stream": False}))
        if r.outcome != "ok":
            raise RuntimeError(f"reference request {spec.id} ({spec.kind}) failed: {r.outcome} {r.detail}")
        out[spec.id] = r.answer

    # Four at a time: batching must not change a greedy reply (the chaos run batches too).
    with Cluster(workdir / "ref", ranks=1, models_dir=models_dir, config=cfg) as ref, ThreadPoolExecutor(4) as pool:
        list(pool.map(one, todo))
    return out


class Tracker:
    """Every pid the group ever had, and a probe of /readyz cross-checked with a request."""

    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        self.pids: set[int] = set()
        self.launchers: set[int] = set()
        self.events: list[tuple[float, int | None, str | None]] = []  # (t, readyz, probe outcome)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.note_pids()
            code = self.cluster.readyz()
            probe = None
            if code == 200:
                body = {"prompt": "probe", "max_tokens": 2, "temperature": 0, "logprobs": 0}
                # 15 s: on a loaded 2-core machine a step can take seconds; slower is "cannot serve".
                r = run_request(self.cluster.url, Spec(-1, "probe", "/v1/completions", body), timeout_s=PROBE_TIMEOUT_S)
                probe = r.outcome if r.outcome != "retryable" else f"retryable {r.status}"
            self.events.append((time.monotonic(), code, probe))
            self.stop.wait(0.3)

    def note_pids(self) -> None:
        self.pids.update(self.cluster.rank_pids())
        if self.cluster.proc is not None:
            self.launchers.add(self.cluster.proc.pid)

    def first_ok_after(self, t: float, timeout_s: float = 120) -> float | None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for et, _, probe in list(self.events):
                if et > t and probe == "ok":
                    return et
            time.sleep(0.1)
        return None


# --------------------------------------------------------------------------- faults


@dataclass
class Fault:
    kind: str
    t: float
    detail: str = ""
    recovered_at: float | None = None
    grace_s: float = 0.0  # how long /readyz may still say 200 (detection bound)
    findings: list = field(default_factory=list)

    @property
    def recovery_s(self) -> float | None:
        return None if self.recovered_at is None else self.recovered_at - self.t


class Injector:
    def __init__(
        self,
        cluster: Cluster,
        tracker: Tracker,
        ssd_dir: Path,
        rng: random.Random,
        tmpfs: bool,
        tc: bool,
        target_ranks: tuple[int, ...] | None = None,
        hosts=None,
    ):
        self.cluster, self.tracker, self.ssd_dir, self.rng = cluster, tracker, ssd_dir, rng
        self.tmpfs, self.tc = tmpfs, tc
        self.target_ranks = target_ranks  # sigkill / sigstop pick among these (None: any rank)
        self.hosts = hosts  # NetnsHosts for `partition`

    def inject(self, kind: str) -> Fault:
        fault = Fault(kind, time.monotonic())
        getattr(self, "_" + kind)(fault)
        return fault

    def _pick_rank(self) -> tuple[int, int]:
        pids = self.cluster.rank_pids()
        choices = [r for r in (self.target_ranks or range(len(pids))) if r < len(pids)] or list(range(len(pids)))
        rank = self.rng.choice(choices)
        return rank, pids[rank]

    def _sigkill(self, f: Fault) -> None:
        rank, pid = self._pick_rank()
        f.detail, f.grace_s = f"rank {rank}", HEARTBEAT_S + 2.5
        os.kill(pid, signal.SIGKILL)

    def _sigstop(self, f: Fault) -> None:
        rank, pid = self._pick_rank()
        hold = self.rng.uniform(1.0, 1.5 * COLLECTIVE_TIMEOUT_S)
        # Until SIGCONT or the watchdog, whichever is first, a probe may wait on the stopped rank.
        f.detail = f"rank {rank} for {hold:.1f} s"
        f.grace_s = min(hold, COLLECTIVE_TIMEOUT_S + HEARTBEAT_S + 1.25) + 2.5
        os.kill(pid, signal.SIGSTOP)
        time.sleep(hold)
        if pid_alive(pid):
            os.kill(pid, signal.SIGCONT)

    def _launcher(self, f: Fault) -> None:
        pids = self.cluster.rank_pids()
        self.tracker.note_pids()
        self.cluster.proc.kill()
        self.cluster.proc.wait()
        f.grace_s = 5.0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
            time.sleep(0.05)
        left = [p for p in pids if pid_alive(p)]
        if left:
            f.findings.append(f"ranks {left} outlived their SIGKILLed launcher by 10 s")
            for p in left:
                os.kill(p, signal.SIGKILL)
        self.cluster._log.close()
        self.cluster.start(wait=False)
        f.detail = f"restarted as pid {self.cluster.proc.pid}"

    def _ssd_files(self) -> list[Path]:
        return [p for p in self.ssd_dir.rglob("*") if p.is_file() and p.name != "filler"]

    def _ssd_corrupt(self, f: Fault) -> None:
        files = self._ssd_files()
        victims = self.rng.sample(files, min(len(files), max(1, len(files) // 3))) if files else []
        for p in victims:
            try:
                size = p.stat().st_size
                if self.rng.random() < 0.5:
                    os.truncate(p, self.rng.randrange(max(1, size)))
                else:
                    with open(p, "r+b") as fh:
                        fh.seek(self.rng.randrange(max(1, size)))
                        fh.write(os.urandom(64))
            except OSError:
                pass
        f.detail = f"{len(victims)} of {len(files)} files"

    def _disk_full(self, f: Fault) -> None:
        filler = self.ssd_dir / "filler"
        free = shutil.disk_usage(self.ssd_dir).free
        try:
            with open(filler, "wb") as fh:
                while True:
                    fh.write(b"\0" * (1 << 20))
        except OSError:
            pass
        hold = self.rng.uniform(3, 8)
        f.detail = f"{free // 1024} KiB filled for {hold:.1f} s" + ("" if self.tmpfs else " (no tmpfs: real disk!)")
        time.sleep(hold)
        filler.unlink(missing_ok=True)

    def _partition(self, f: Fault) -> None:
        """Cut host b (rank 1) off the bridge for a while: the ring, the control links and the
        launcher's SSH session to it all go silent; rank 0 stays reachable by the clients."""
        hold = self.rng.uniform(0.5, 2.0) * COLLECTIVE_TIMEOUT_S
        veth = self.hosts.bridge_port(1)
        r = subprocess.run(["ip", "link", "set", veth, "down"], capture_output=True, text=True)
        f.detail = f"host b cut off for {hold:.1f} s" + (f" (ip failed: {r.stderr.strip()})" if r.returncode else "")
        # Like a stopped rank: until the link returns or the watchdog fires, a probe may wait;
        # TCP's retransmission backoff can add a few seconds after the link returns.
        f.grace_s = min(hold + 3.0, COLLECTIVE_TIMEOUT_S + HEARTBEAT_S + 1.25) + 2.5
        time.sleep(hold)
        subprocess.run(["ip", "link", "set", veth, "up"], capture_output=True)

    def _slow_link(self, f: Fault) -> None:
        hold = self.rng.uniform(2, 5)
        cmd = [
            "tc",
            "qdisc",
            "add",
            "dev",
            "lo",
            "root",
            "tbf",
            "rate",
            "256kbit",
            "burst",
            "32kbit",
            "latency",
            "200ms",
        ]
        r = subprocess.run(cmd, capture_output=True, text=True)
        f.detail = f"tbf 256kbit for {hold:.1f} s" + (f" (tc failed: {r.stderr.strip()})" if r.returncode else "")
        time.sleep(hold)
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)


# --------------------------------------------------------------------------- two namespaced hosts


@dataclass
class NetnsHosts:
    """tests/netns.py's two SSH hosts, built inside this process's private network namespace
    (the harness runs under `unshare --net --mount`): other names, no machine-wide lock, and
    nothing another run's clean-up could mistake for its own leftovers."""

    ssh: object  # tests.netns.SshHosts
    procs: list

    def bridge_port(self, index: int) -> str:
        return f"mlxcv{os.getpid()}{'ab'[index]}"  # tests/netns.py's name for host index's veth

    def close(self) -> None:
        from tests.netns import _kill_namespace_processes, _run

        for proc in self.procs:
            proc.kill()
            proc.wait()
        for ns in self.ssh.namespaces:
            _kill_namespace_processes(ns)
            _run("ip", "netns", "del", ns, check=False)
        shutil.rmtree(self.ssh.tmp, ignore_errors=True)


def netns_hosts() -> NetnsHosts:
    from tests import netns

    sshd = netns._find_sshd()
    if sshd is None or netns.netns_unavailable_reason():
        raise RuntimeError(f"partition needs two namespaced SSH hosts: {netns.netns_unavailable_reason() or 'no sshd'}")
    tmp = Path(tempfile.mkdtemp(prefix="chaos-netns-"))
    ssh = netns.SshHosts(
        namespaces=[f"chaos-{os.getpid()}-{x}" for x in netns.SUFFIXES],
        ips=list(netns.HOST_IPS),
        key_file=tmp / "client.key",
        known_hosts=tmp / "known_hosts",
        tmp=tmp,
    )
    hosts = NetnsHosts(ssh, [])
    try:
        netns._create_network(ssh)
        netns._write_keys(ssh)
        hosts.procs = [netns._start_sshd(ssh, i, sshd) for i in range(2)]
        for i, proc in enumerate(hosts.procs):
            netns._wait_for_sshd(ssh, i, proc)
        netns._check_between_namespaces(ssh)
    except BaseException:
        hosts.close()
        raise
    return hosts


def multihost_config(hosts: NetnsHosts, workdir: Path, port: int) -> dict:
    """One rank on each namespaced host, started over SSH, rank 0 serving on host a's address."""
    python = workdir / "python"  # the remote ranks run this checkout (SSH drops PYTHONPATH)
    python.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} "$@"\n')
    python.chmod(0o755)
    return {
        "cluster": {"python": str(python), "cwd": str(REPO)},
        "hosts": [{"host": ip, "ips": [ip]} for ip in hosts.ssh.ips],
        "ssh": hosts.ssh.ssh_section().model_dump(),
        "server": {"host": hosts.ssh.ips[0], "port": port, "allow_insecure": True},
    }


# --------------------------------------------------------------------------- the run


def setup_dirs(workdir: Path, isolated: bool, tmpfs_mb: int) -> tuple[Path, bool]:
    """The SSD-tier dir: a small tmpfs when this process has a private mount namespace."""
    ssd = workdir / "kv"
    ssd.mkdir(parents=True, exist_ok=True)
    if isolated:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={tmpfs_mb}m", "tmpfs", str(ssd)], capture_output=True)
        return ssd, r.returncode == 0
    return ssd, False


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 3)


def judge(results: list[Result], refs: dict, faults: list[Fault]) -> dict:
    """Apply the oracle: outcome counts and the violations, each with what it was."""
    windows = [(f.t, (f.recovered_at or f.t + 120) + 2.0) for f in faults]
    violations = []
    counts: dict[str, int] = {}
    wrong = 0
    for r in results:
        if r.outcome == "ok":
            if r.answer != refs.get(r.id):
                r.outcome, wrong = "wrong", wrong + 1
                r.detail = f"got {r.answer!r:.300} want {refs.get(r.id)!r:.300}"
        elif r.outcome == "cancelled":
            # What arrived before the hang-up (text, or completions' tokens) starts the reference.
            got, want = r.answer[0], refs[r.id][0]
            if want[: len(got)] != got:
                r.outcome, wrong = "wrong", wrong + 1
                r.detail = f"cancelled prefix {got!r:.200} not a prefix of {want!r:.200}"
        elif r.outcome in ("lost", "refused") and not any(a <= r.end and r.start <= b for a, b in windows):
            r.outcome = "unexplained_" + r.outcome
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
        if r.outcome in (
            "wrong",
            "truncated",
            "bad_error",
            "hang",
            "harness_error",
            "unexplained_lost",
            "unexplained_refused",
        ):
            violations.append(
                {"id": r.id, "kind": r.kind, "outcome": r.outcome, "status": r.status, "detail": r.detail}
            )
    return {"outcomes": counts, "wrong_tokens": wrong, "violations": violations}


def readyz_lies(events, faults: list[Fault]) -> list[dict]:
    """/readyz said 200, the probe right after it was refused (503, no listener, connection
    lost, an error), and no fault injected in the last grace_s (its detection bound) explains
    it. A probe that only took long (a loaded machine, a full batch) or met a full queue (429)
    is not a lie: the group was serving, just busy (the probe counts are in the report)."""
    lies = []
    for t, code, probe in events:
        if code != 200 or probe is None or probe in ("ok", "hang", "retryable 429"):
            continue
        # + PROBE_TIMEOUT_S: the probe (logged when it ends) may have started just within the bound.
        recent = [f for f in faults if f.t <= t <= f.t + f.grace_s + PROBE_TIMEOUT_S]
        if not recent:
            lies.append({"t": round(t, 2), "probe": probe})
    return lies


def orphans(tracker: Tracker, marker: str) -> list[int]:
    left = [p for p in tracker.pids | tracker.launchers if pid_alive(p)]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                # Ranks carry the cluster's config (with its run_dir) in their environment.
                seen = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
                if marker.encode() in seen:
                    left.append(int(entry.name))
            except OSError:
                pass
    return sorted(set(p for p in left if pid_alive(p)))


def run_chaos(
    seed: int = 1,
    n_faults: int = 6,
    n_requests: int = 120,
    duration_s: float = 120.0,
    kinds: tuple[str, ...] = DEFAULT_KINDS,
    ranks: int = 2,
    workdir: Path | None = None,
    isolated: bool = False,
    models_dir: Path | None = None,
    long_words: int = 150,
    in_order: bool = False,
    pipeline: int = 1,
    n_models: int = 1,
    idle_unload_s: float = 4.0,
    target_ranks: tuple[int, ...] | None = None,
    hosts: NetnsHosts | None = None,
    log=print,
) -> dict:
    """`pipeline` > 1: that many pipeline stages (cluster.parallel), no adapter and no
    speculation (neither runs with micro-batches). `n_models` 2: `models:` builtin:tiny and a
    second model (make_second_model), requests alternating between them, the second unloaded
    after `idle_unload_s` idle (`models:` takes no adapter, speculation or pipeline). `hosts`:
    one rank on each of two namespaced SSH hosts (needed by the `partition` fault)."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="chaos-"))
    from mlx_cluster.models.builtin import resolve_model_path

    models_dir = Path(models_dir or workdir / "models")
    resolve_model_path("builtin:tiny", str(models_dir))
    plain = pipeline > 1 or n_models > 1  # layouts that refuse adapters and speculation
    use_adapter = os.environ.get("CHAOS_NO_ADAPTER") is None and not plain
    adapter = make_adapter_dir(models_dir, workdir / "adapter") if use_adapter else None
    specs = make_workload(seed, n_requests, duration_s, "ad1" if adapter else None, long_words)
    models = None
    if n_models > 1:
        if n_models != 2:
            raise ValueError("n_models: 1 or 2")
        models = {"tiny": "builtin:tiny", "tiny2": str(make_second_model(models_dir, workdir / "tiny2"))}
        assign_models(specs, list(models))
    t0 = time.monotonic()
    log(f"chaos: reference run of {sum(s.checked for s in specs)} requests on one rank")
    refs = reference_answers(workdir, models_dir, adapter, specs, models)
    log(f"chaos: reference done in {time.monotonic() - t0:.0f} s")
    ssd_dir, tmpfs = setup_dirs(workdir, isolated, 48)  # each rank's budget (16 MB) fits twice
    tc = isolated and shutil.which("tc") is not None
    kinds = tuple(
        k
        for k in kinds
        if (k != "slow_link" or tc) and (k != "disk_full" or tmpfs) and (k != "partition" or hosts is not None)
    )
    rng = random.Random(seed + 7)
    fault_plan = sorted(rng.uniform(0.1, 0.85) * duration_s for _ in range(n_faults))
    if in_order:  # the kinds as given, round robin (the short test wants each one once)
        fault_kinds = [kinds[i % len(kinds)] for i in range(len(fault_plan))] if kinds else []
    else:
        fault_kinds = [rng.choice(kinds) for _ in fault_plan] if kinds else []

    cfg = chaos_config(ssd_dir, adapter, speculative=not plain)
    _merge(cfg, layout_config(pipeline, ranks))
    if models:
        cfg.update(models_config(models, models_dir, idle_unload_s))
    port = free_port()
    if hosts is not None:
        ranks = 2
        (workdir / "chaos").mkdir(parents=True, exist_ok=True)
        _merge(cfg, multihost_config(hosts, workdir / "chaos", port))
    cluster = Cluster(workdir / "chaos", ranks=ranks, models_dir=models_dir, config=cfg)
    if models:
        del cluster.config["model"]  # models: replaces model:
    if hosts is not None:
        cluster.url = f"http://{hosts.ssh.ips[0]}:{port}"
    cluster.config_path.write_text(yaml.safe_dump(cluster.config))
    cluster.start()
    tracker = Tracker(cluster)
    tracker.thread.start()
    injector = Injector(cluster, tracker, ssd_dir, random.Random(seed + 13), tmpfs, tc, target_ranks, hosts)
    results: list[Result] = []
    lock = threading.Lock()
    faults: list[Fault] = []
    findings: list[str] = []
    start = time.monotonic()

    def client(spec: Spec) -> None:
        delay = start + spec.at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        r = run_request(cluster.url, spec)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=client, args=(s,), daemon=True) for s in specs]
    for t in threads:
        t.start()
    try:
        for at, kind in zip(fault_plan, fault_kinds):
            delay = start + at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            # One fault at a time: the group must be serving before the next one.
            if tracker.first_ok_after(time.monotonic() - 0.5, 120) is None:
                findings.append(f"not serving 120 s before the {kind} fault")
                break
            fault = injector.inject(kind)
            faults.append(fault)
            fault.recovered_at = tracker.first_ok_after(fault.t + (0 if kind in ("ssd_corrupt",) else 0.05))
            findings += fault.findings
            log(f"chaos: {kind} ({fault.detail}) recovered in {fault.recovery_s}")
        deadline = start + duration_s + REQUEST_TIMEOUT_S + 30
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))
        hung = [s.id for s, t in zip(specs, threads) if t.is_alive()]
        # No request left behind once every client has its answer.
        # (An abort reaches the engine at its next step: a few seconds on a loaded machine.)
        health = None
        for _ in range(30):
            try:
                health = httpx.get(cluster.url + "/health", timeout=5).json()
            except httpx.HTTPError as e:
                health = {"error": repr(e)}
            if not (health.get("running_requests") or health.get("queue_depth") or "error" in health):
                break
            time.sleep(1)
        else:
            findings.append(f"requests still held 30 s after the workload: {health}")
    finally:
        tracker.stop.set()
        tracker.thread.join(10)
        tracker.note_pids()
        # `down` waits for the launcher to exit; it is our child, so reap it meanwhile (a zombie
        # looks alive to `down`, which would then wait out its whole timeout).
        down = subprocess.Popen(
            [sys.executable, "-m", "mlx_cluster", "down", str(cluster.config_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            env=cluster.env,
        )
        try:
            cluster.proc.wait(60)
        except subprocess.TimeoutExpired:
            findings.append("the launcher outlived `down` by 60 s")
        down_out, down_err = down.communicate(timeout=120)
        left = orphans(tracker, str(cluster.workdir / "runs"))
        cluster.stop(10)
        if isolated and tmpfs:
            subprocess.run(["umount", "-l", str(ssd_dir)], capture_output=True)
    if down.returncode != 0:
        findings.append(f"`down` exited {down.returncode}: {down_err[-300:]}")
    verdict = judge(results, refs, faults)
    hangs = verdict["outcomes"].get("hang", 0) + len(hung)
    lies = [{**lie, "t": round(lie["t"] - start, 2)} for lie in readyz_lies(tracker.events, faults)]
    by_kind: dict[str, list[Fault]] = {}
    for f in faults:
        by_kind.setdefault(f.kind, []).append(f)
    report = {
        "seed": seed,
        "ranks": ranks,
        "duration_s": duration_s,
        "requests": len(specs),
        "workload": _count(s.kind + ("/stream" if s.stream else "") for s in specs),
        "adapter": adapter is not None,
        "speculative": not plain,
        "parallel": cluster.config["cluster"].get("parallel"),
        "models": list(models) if models else None,
        "model_loads": _model_loads(cluster) if models else None,
        "hosts": "two namespaced SSH hosts" if hosts is not None else "localhost",
        "ssd_tmpfs": tmpfs,
        "faults": {k: len(v) for k, v in by_kind.items()},
        "fault_log": [
            {"kind": f.kind, "at_s": _round(f.t - start), "detail": f.detail, "recovery_s": _round(f.recovery_s)}
            for f in faults
        ],
        "recovery_s": {
            k: {
                "p50": percentile([f.recovery_s for f in v if f.recovery_s is not None], 0.5),
                "p99": percentile([f.recovery_s for f in v if f.recovery_s is not None], 0.99),
                "unrecovered": sum(f.recovery_s is None for f in v),
            }
            for k, v in by_kind.items()
        },
        "outcomes": verdict["outcomes"],
        "wrong_tokens": verdict["wrong_tokens"],
        "hangs": hangs,
        "violations": verdict["violations"],
        "readyz_lies": lies,
        "probes": _count(str(p) for _, code, p in tracker.events if code == 200),
        "results": [
            {
                "id": r.id,
                "kind": r.kind,
                "outcome": r.outcome,
                "status": r.status,
                "at_s": round(r.start - start, 1),
                "took_s": round(r.end - r.start, 2),
                "detail": r.detail[:160],
            }
            for r in sorted(results, key=lambda r: r.id)
        ],
        "orphans": left,
        "findings": findings,
        "restarts": _restarts(cluster),
        "wall_s": round(time.monotonic() - t0, 1),
    }
    report["oracle_holds"] = not (
        verdict["violations"] or hangs or lies or left or findings or any(f.recovery_s is None for f in faults)
    )
    return report


def _count(items) -> dict:
    out: dict[str, int] = {}
    for i in items:
        out[i] = out.get(i, 0) + 1
    return dict(sorted(out.items()))


def _round(x):
    return None if x is None else round(x, 2)


def _restarts(cluster: Cluster) -> int:
    return cluster.output().count("restarting the group in")


def _model_loads(cluster: Cluster) -> dict:
    """How often each model was loaded and unloaded: rank 0's lines in the launchers' output
    (one file across launcher restarts; the run dir keeps only one earlier generation of rank logs)."""
    out = "\n".join(line for line in cluster.output().splitlines() if line.startswith("[rank 0 "))
    return {
        "loaded": _count(re.findall(r"\bloaded model (\S+) in", out)),
        "unloaded": _count(re.findall(r"unloaded model (\S+)", out)),
    }


# --------------------------------------------------------------------------- soak


def _proc_stats(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    out = {
        "rss_kb": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }
    # RSS split: anonymous memory (heaps, arrays: where a leak shows) and file pages (library
    # code paged in the first time a path runs: it grows for a while on a fresh process, bounded
    # by the libraries' size; a 15-minute soak saw libmlx.so's +800 KB of it on both ranks).
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in rollup.splitlines()[1:])}
        out["anon_kb"] = kb["Anonymous"]
        out["file_kb"] = kb["Rss"] - kb["Anonymous"]
    except (OSError, KeyError, ValueError):
        pass
    return out


def _dir_bytes(path: Path) -> int:
    """Bytes of the files under path; a file the SSD tier evicts while we walk counts as gone."""
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except FileNotFoundError:
            pass
    return total


def run_soak(
    minutes: float, seed: int = 1, concurrency: int = 4, sample_s: float = 60.0, workdir=None, log=print
) -> dict:
    """Steady mixed load (no faults, no malformed bodies) on two ranks; one sample per sample_s.

    Growth is measured between two idle points, load paused until nothing runs: one after
    warm-up (the larger of one sample and a fifth of the run, by when the SSD budget is full) and
    one at the end. Under load, MLX's active memory is whatever the batch holds at that instant
    (+-25% between samples here), which says nothing about leaks; the loaded samples are kept
    for the latency drift and as a series."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="soak-"))
    from mlx_cluster.models.builtin import resolve_model_path

    models_dir = workdir / "models"
    resolve_model_path("builtin:tiny", str(models_dir))
    adapter = make_adapter_dir(models_dir, workdir / "adapter")
    specs = [
        s
        for s in make_workload(seed, 4000, 1.0, "ad1" if adapter else None)
        if s.checked and s.cancel_after is None and s.kind != "long"
    ]
    # Long prompts repeat three prefixes: keep a few so the cache (and its SSD tier) works.
    specs += [
        s for s in make_workload(seed + 1, 400, 1.0, None) if s.kind == "long" and s.checked and not s.cancel_after
    ]
    random.Random(seed).shuffle(specs)
    ssd_dir = workdir / "kv"
    cfg = chaos_config(ssd_dir, adapter)
    cfg["cache"]["ssd"]["max_gb"] = 0.01  # 10 MB a rank: full within warm-up, then it must stay flat
    # Bounded caches fill within the warm-up, so growth after it measures leaks: at the default
    # 1,000 the Responses store (one request in eight) was still filling an hour in.
    cfg["server"]["responses_store_max"] = 50
    cluster = Cluster(workdir / "soak", ranks=2, models_dir=models_dir, config=cfg)
    samples, latencies, outcomes, errors = [], [], {}, {}
    stop, paused = threading.Event(), threading.Event()
    lock = threading.Lock()
    nxt = [0]

    def worker() -> None:
        while not stop.is_set():
            if paused.is_set():
                time.sleep(0.2)
                continue
            with lock:
                spec = specs[nxt[0] % len(specs)]
                nxt[0] += 1
            r = run_request(cluster.url, spec)
            with lock:
                outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
                latencies.append((r.end, r.end - r.start, spec.kind))
                if r.outcome != "ok":
                    key = f"{r.status} {r.detail[:120]}"
                    errors[key] = errors.get(key, 0) + 1

    def stats(pids: dict) -> dict:
        out = {name: _proc_stats(pid) for name, pid in pids.items()}
        try:
            st = httpx.get(cluster.url + "/admin/status", timeout=10).json()
            for rk in st.get("ranks", []):
                out[f"rank{rk.get('rank')}"]["mlx_active"] = rk.get("mem_active")
                out[f"rank{rk.get('rank')}"]["mlx_cache"] = rk.get("mem_cache")
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        out["ssd_bytes"] = _dir_bytes(ssd_dir)
        return out

    def idle_point(pids: dict) -> dict:
        paused.set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            h = httpx.get(cluster.url + "/health", timeout=10).json()
            if not h["running_requests"] and not h["queue_depth"]:
                break
            time.sleep(0.5)
        time.sleep(2)  # the last request's blocks reach the SSD tier
        point = {"t_s": round(time.monotonic() - t0, 1), **stats(pids)}
        with lock:
            point["requests"] = sum(outcomes.values())
        paused.clear()
        log(f"soak idle: {json.dumps(point)}")
        return point

    with cluster:
        pids = {"launcher": cluster.proc.pid, **{f"rank{i}": p for i, p in enumerate(cluster.rank_pids())}}
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        n_samples = max(2, int(round(minutes * 60 / sample_s)))
        warm_after = max(1, int(round(n_samples / 5)))
        idle = []
        for i in range(n_samples):
            time.sleep(max(0.0, t0 + (i + 1) * sample_s - time.monotonic()))
            sample = {"t_s": round(time.monotonic() - t0, 1), **stats(pids)}
            with lock:
                window = [d for end, d, _ in latencies if end > time.monotonic() - sample_s]
                sample["requests"] = sum(outcomes.values())
            sample["latency_p50_s"] = percentile(window, 0.5)
            sample["latency_p99_s"] = percentile(window, 0.99)
            samples.append(sample)
            log(f"soak: {json.dumps(sample)}")
            if i + 1 == warm_after:
                idle.append(idle_point(pids))
        stop.set()
        for t in threads:
            t.join(REQUEST_TIMEOUT_S + 5)
        idle.append(idle_point(pids))
        restarts = _restarts(cluster)
    warm, last = idle[0], idle[-1]
    growth = {}
    for name in pids:
        for key in ("rss_kb", "anon_kb", "file_kb", "threads", "fds", "mlx_active", "mlx_cache"):
            a, b = warm.get(name, {}).get(key), last.get(name, {}).get(key)
            if a:
                growth[f"{name}.{key}"] = round((b - a) / a * 100, 2)
    if warm["ssd_bytes"]:
        growth["ssd_bytes"] = round((last["ssd_bytes"] - warm["ssd_bytes"]) / warm["ssd_bytes"] * 100, 2)
    first, end = samples[warm_after - 1], samples[-1]
    return {
        "minutes": minutes,
        "concurrency": concurrency,
        "outcomes": outcomes,
        "not_ok": errors,
        "restarts": restarts,
        "growth_pct_after_warmup": growth,
        "idle_points": idle,
        "latency_drift": {
            "p50_first_s": first["latency_p50_s"],
            "p50_last_s": end["latency_p50_s"],
            "p99_first_s": first["latency_p99_s"],
            "p99_last_s": end["latency_p99_s"],
        },
        "samples": samples,
    }


# --------------------------------------------------------------------------- CLI


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--faults", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--duration-s", type=float, default=180, help="the workload's arrivals spread over this")
    ap.add_argument("--kinds", default=",".join(DEFAULT_KINDS), help="fault kinds, comma separated")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--long-words", type=int, default=150, help="words in the shared long-prompt prefixes")
    ap.add_argument(
        "--pipeline", type=int, default=1, help="pipeline stages (cluster.parallel); no adapter/speculation"
    )
    ap.add_argument("--models", type=int, default=1, help="2: models: tiny + tiny2, requests alternating")
    ap.add_argument("--idle-unload-s", type=float, default=4.0, help="with --models 2: idle_unload_s")
    ap.add_argument("--target-ranks", default=None, help="sigkill/sigstop only these ranks, comma separated")
    ap.add_argument("--soak-minutes", type=float, default=None, help="soak mode: steady load, no faults")
    ap.add_argument("--concurrency", type=int, default=4, help="soak clients")
    ap.add_argument("--no-isolate", action="store_true", help="as root: do not re-run in private namespaces")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    isolated = os.environ.get("CHAOS_ISOLATED") == "1"
    if args.soak_minutes is None and not isolated and not args.no_isolate and _can_isolate():
        # Private network and mount namespaces: a tmpfs for the SSD dir and a qdisc on a
        # loopback of our own. The child sets the loopback up and runs this again.
        env = {**os.environ, "CHAOS_ISOLATED": "1"}
        inner = f"ip link set lo up && exec {sys.executable} {' '.join(map(_quote, sys.argv))}"
        cmd = ["unshare", "--net", "--mount", "--propagation", "private", "sh", "-c", inner]
        return subprocess.call(cmd, env=env)
    if args.soak_minutes is not None:
        report = run_soak(args.soak_minutes, args.seed, args.concurrency, workdir=args.workdir)
    else:
        kinds = tuple(k for k in args.kinds.split(",") if k)
        bad = [k for k in kinds if k not in ALL_KINDS]
        if bad:
            ap.error(f"--kinds: unknown {bad}; known: {', '.join(ALL_KINDS)}")
        hosts = None
        if "partition" in kinds:
            if not isolated:
                ap.error("--kinds partition: run as root without --no-isolate (it builds namespaced hosts)")
            hosts = netns_hosts()
        try:
            report = run_chaos(
                args.seed,
                args.faults,
                args.requests,
                args.duration_s,
                kinds,
                args.ranks,
                args.workdir,
                isolated,
                long_words=args.long_words,
                pipeline=args.pipeline,
                n_models=args.models,
                idle_unload_s=args.idle_unload_s,
                target_ranks=tuple(int(r) for r in args.target_ranks.split(",")) if args.target_ranks else None,
                hosts=hosts,
            )
        finally:
            if hosts is not None:
                hosts.close()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if report.get("oracle_holds", True) else 1


def _quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


def _can_isolate() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True)
    return r.returncode == 0


if __name__ == "__main__":
    sys.exit(main())
