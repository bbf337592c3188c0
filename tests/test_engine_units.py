"""The engine loop with fake parts: lock-step digest check, idle/doorbell protocol, stop strings."""

import errno
import socket
import threading
import time

import pytest

from mlx_cluster.engine.engine import DivergenceError, Engine
from mlx_cluster.engine.executor import TokenOutput
from mlx_cluster.engine.plan import StepPlan
from mlx_cluster.runtime.bus import BusError, Doorbell


class FakeExecutor:
    def __init__(self, digest=0):
        self.digest = digest
        self.applied = []
        self.outputs = []

    def apply(self, plan):
        self.applied.append(plan)

    def step(self):
        out, self.outputs = self.outputs, []
        return out


class EchoBus:
    """Returns a fixed plan, as a worker would receive it from rank 0."""

    def __init__(self, plan):
        self.plan = plan

    def exchange(self, plan):
        return self.plan


def test_worker_with_a_different_digest_fails_loudly():
    engine = Engine(FakeExecutor(digest=0x1234), EchoBus(StepPlan(step=7, digest=0x9999)), None, heartbeat_s=1)
    with pytest.raises(DivergenceError, match="step 7"):
        engine.step()


def test_worker_in_step_executes_the_plan_and_clears_the_timer():
    plan = StepPlan(step=3, digest=0)
    ex = FakeExecutor()
    engine = Engine(ex, EchoBus(plan), None, heartbeat_s=1)
    assert engine.step() is plan
    assert ex.applied == [plan]
    assert engine.timer.busy_since == 0.0 and engine.step_index == 4


def test_doorbell_rejects_strangers_and_wakes_workers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rank0 = Doorbell(0, 2, "127.0.0.1", port, "secret-token", timeout_s=10)
    worker = Doorbell(1, 2, "127.0.0.1", port, "secret-token", timeout_s=10)
    t = threading.Thread(target=rank0.connect)
    t.start()

    def dial() -> socket.socket:
        """Connect once rank 0 listens (it starts in a thread: refusals before that are expected)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=2)
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "rank 0's doorbell never listened"
                time.sleep(0.01)

    # Strangers while rank 0 waits for its worker: each must be read, rejected and hung up on
    # (an empty read or a reset), never left waiting: a recv timeout fails the test.
    strangers = [
        (b"GET / HTTP/1.1\r\n\r\n", True),
        (b"\x01\x00\x00\x00wrong-token!", True),
        (b"\x01\x00", True),  # a short hello, then EOF
        (b"\x01\x00", False),  # a short hello, then silence: rank 0's handshake times out (2 s)
    ]
    for payload, hang_up in strangers:
        with dial() as c:
            try:
                c.sendall(payload)
                if hang_up:
                    c.shutdown(socket.SHUT_WR)
                c.settimeout(5)
                assert c.recv(10) == b""  # closed without a word
            except (ConnectionResetError, BrokenPipeError):
                pass  # closed with our bytes unread: a reset is a hang-up too
            except OSError as e:  # TimeoutError is an OSError too: it must fail the test
                if isinstance(e, TimeoutError) or e.errno != errno.ENOTCONN:
                    raise  # ENOTCONN: the reset came before our shutdown
    worker.connect()
    t.join(10)
    assert len(rank0.peers) == 1
    rank0.ring()
    worker.wait(2)
    with pytest.raises(BusError, match="no heartbeat"):
        worker.wait(0.2)
    rank0.close()
    with pytest.raises(BusError, match="gone"):
        worker.wait(2)
    worker.close()


def test_frontend_stop_strings_drop_the_sequence_next_step():
    from mlx_cluster.engine.frontend import DoneEvent, Frontend, GenerationRequest, TokenEvent
    from mlx_cluster.engine.plan import SamplingParams

    class Tok:
        eos_token_ids = {0}
        all_special_ids = [0]

        class _Detok:
            def __init__(self):
                self.text, self.offset = "", 0

            def add_token(self, t):
                self.text += {1: "ab", 2: "c", 3: "STO", 4: "P", 5: "z"}[t]

            def finalize(self):
                pass

            @property
            def last_segment(self):
                seg, self.offset = self.text[self.offset :], len(self.text)
                return seg

        @property
        def detokenizer(self):
            return self._Detok()

    events = []
    fe = Frontend(Tok(), max_batch_size=4, max_new_per_step=4, max_queue=4)
    req = GenerationRequest("r1", [1, 2], SamplingParams(max_tokens=10, seed=1), events.append, stop=["STOP"])
    assert fe.submit(req)
    plan = fe.next_plan(step=0, digest=0)
    seq_id = plan.new[0].seq_id
    for tok in (1, 2, 3, 4, 5):
        fe.emit([TokenOutput(seq_id, tok, None)])
    text = "".join(e.text for e in events if isinstance(e, TokenEvent))
    assert text == "abc"
    finishes = [e.finish_reason for e in events if isinstance(e, TokenEvent) and e.finish_reason]
    assert finishes == ["stop"]
    assert isinstance(events[-1], DoneEvent) and events[-1].completion_tokens == 4
    assert fe.next_plan(step=1, digest=0).drop == (seq_id,)
    assert not fe.has_work_threadsafe()
