"""The engine loop with fake parts: lock-step digest check, the plan link, stop strings."""

import errno
import socket
import threading
import time

import pytest

from mlx_cluster.engine.engine import DivergenceError, Engine
from mlx_cluster.engine.executor import TokenOutput
from mlx_cluster.engine.plan import FLAG_IDLE, NewSequence, SamplingParams, StepPlan
from mlx_cluster.runtime.bus import KIND_PLAN, BusError, ControlBus, PlanLink


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


STRANGERS = [
    (b"GET / HTTP/1.1\r\n\r\n", True),
    (b"\x01\x00\x00\x00wrong-token!", True),
    (b"\x01\x00", True),  # a short hello, then EOF
]
SILENT_STRANGER = (b"\x01\x00", False)  # a short hello, then silence: rank 0's handshake times out (2 s)


def _linked_pair(world_size=2, strangers=STRANGERS):
    """Rank 0's and rank 1's ends of a plan link on loopback, after strangers tried to join."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rank0 = PlanLink(0, world_size, "127.0.0.1", port, "secret-token", timeout_s=10)
    worker = PlanLink(1, world_size, "127.0.0.1", port, "secret-token", timeout_s=10)
    t = threading.Thread(target=rank0.connect)
    t.start()

    def dial() -> socket.socket:
        """Connect once rank 0 listens (it starts in a thread: refusals before that are expected)."""
        deadline = time.monotonic() + 10
        while True:
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=2)
            except ConnectionRefusedError:
                assert time.monotonic() < deadline, "rank 0's plan link never listened"
                time.sleep(0.01)

    # Strangers while rank 0 waits for its worker: each must be read, rejected and hung up on
    # (an empty read or a reset), never left waiting: a recv timeout fails the test.
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
    assert list(rank0.peers) == [1]
    return rank0, worker


def test_plan_link_rejects_strangers_and_carries_plans_acks_and_agreements():
    rank0, worker = _linked_pair(strangers=[*STRANGERS, SILENT_STRANGER])
    bus0, bus1 = ControlBus(rank0, silence_timeout_s=5), ControlBus(worker, silence_timeout_s=5)
    busy = StepPlan(step=1, new=(), drop=(3, 4), digest=7)
    assert bus0.exchange(busy) == busy
    assert bus1.exchange(None) == busy

    # An idle plan is acknowledged: rank 0 blocks until the worker has read it.
    idle = StepPlan(step=2, flags=FLAG_IDLE)
    t = threading.Thread(target=lambda: bus1.exchange(None))
    t.start()
    assert bus0.exchange(idle) == idle
    t.join(5)

    got = {}
    t = threading.Thread(target=lambda: got.setdefault(1, bus1.agree_min([5, 1, 9])))
    t.start()
    assert bus0.agree_min([3, 4, 9]) == [3, 1, 9]
    t.join(5)
    assert got[1] == [3, 1, 9]
    assert bus0.stats.device_syncs == bus1.stats.device_syncs == 0

    with pytest.raises(BusError, match="sent nothing"):
        worker.recv(KIND_PLAN, 0.2)  # rank 0 silent past the timeout
    rank0.close()
    with pytest.raises(BusError, match="gone"):
        worker.recv(KIND_PLAN, 2)  # rank 0 hung up
    worker.close()


def test_every_rank_runs_the_plan_on_the_wire_not_rank0s_object():
    """Regression: the codec packs floats as float32. When rank 0 ran its in-memory plan and the
    workers the decoded one, repetition_penalty=5e-324 was on for rank 0 and 0.0 (off) for the
    workers: different tokens at step ~150 of the seeded schemathesis run."""
    odd = SamplingParams(max_tokens=3, seed=1, temperature=1e-46, top_p=5e-324, repetition_penalty=5e-324)
    plan = StepPlan(step=4, new=(NewSequence(seq_id=9, prompt=(1, 2), params=odd),))
    rank0, worker = _linked_pair()
    at_rank0 = ControlBus(rank0, silence_timeout_s=5).exchange(plan)
    at_worker = ControlBus(worker, silence_timeout_s=5).exchange(None)
    assert at_rank0 == at_worker
    assert at_rank0.new[0].params.repetition_penalty == 0.0
    rank0.close()
    worker.close()
    # One rank has no wire, but runs the same round trip, so TP=1 and TP=2 agree too.
    alone = PlanLink(0, 1, "127.0.0.1", 0, "t", timeout_s=1)
    assert ControlBus(alone, silence_timeout_s=5).exchange(plan) == at_worker


def test_rank0_notices_a_silent_worker_on_an_idle_plan():
    rank0, worker = _linked_pair()
    with pytest.raises(BusError, match="rank 1 sent nothing"):
        ControlBus(rank0, silence_timeout_s=0.3).exchange(StepPlan(step=0, flags=FLAG_IDLE))
    rank0.close()
    worker.close()


def test_a_corrupt_frame_is_refused():
    rank0, worker = _linked_pair()
    frame = bytearray(b"MXCB" + bytes([KIND_PLAN]) + (4).to_bytes(4, "little") + (0).to_bytes(4, "little") + b"abcd")
    rank0.peers[1].sendall(frame)
    with pytest.raises(BusError, match="checksum"):
        worker.recv(KIND_PLAN, 2)
    rank0.close()
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
