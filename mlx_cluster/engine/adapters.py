"""LoRA adapters in the engine: rank 0's registry of served names, and every rank's plan step.

Rank 0 owns the names (`AdapterRegistry`): which adapter each served name runs, in which slot.
A load or unload travels in the step plan (`AdapterOp`), so every rank changes its slots at
the same step, between the step's drops and its new sequences. Each rank reads its part of the
adapter itself; one agreement over the control bus then tells every rank whether all of them
could, and either every rank installs it or none does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from mlx_cluster.engine.plan import AdapterOp
from mlx_cluster.models.lora import AdapterError, AdapterSet

log = logging.getLogger(__name__)


@dataclass
class ServedAdapter:
    name: str
    path: str
    slot: int
    created: float
    state: str = "ready"  # loading | ready | unloading


@dataclass
class AdapterRegistry:
    """Served adapter names on rank 0. The engine thread writes; the HTTP thread reads."""

    max_adapters: int
    default_slot: int = 0  # the slot requests for the base model's name run with (model.adapter_path)
    by_name: dict[str, ServedAdapter] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def slot_of(self, name: str) -> int | None:
        """The slot of a ready adapter, or None."""
        adapter = self.by_name.get(name)
        return adapter.slot if adapter is not None and adapter.state == "ready" else None

    def ready(self) -> list[ServedAdapter]:
        return [a for a in list(self.by_name.values()) if a.state == "ready"]

    def free_slot(self) -> int | None:
        used = {a.slot for a in self.by_name.values()} | {self.default_slot}
        return next((s for s in range(1, self.max_adapters + 1) if s not in used), None)


@dataclass
class AdapterRequest:
    """A load or unload waiting in rank 0's frontend for its plan; `done(error)` answers it."""

    name: str
    path: str  # "" to unload
    done: Callable[[str | None], None]


def apply_ops(adapters: AdapterSet | None, ops: tuple[AdapterOp, ...], agree, prefix_cache) -> dict[int, str | None]:
    """Run a plan's adapter operations on this rank; returns slot -> error (None when done)."""
    results: dict[int, str | None] = {}
    for op in ops:
        if adapters is None:
            results[op.slot] = "this model cannot serve LoRA adapters"
            continue
        if not op.path:
            adapters.remove(op.slot)
            if prefix_cache is not None:
                prefix_cache.set_adapter(op.slot, None)
            log.info("unloaded the LoRA adapter of slot %d", op.slot)
            results[op.slot] = None
            continue
        error, weights = None, None
        try:
            weights = adapters.read(op.path)
        except AdapterError as e:
            error = str(e)
        except Exception as e:  # a broken file must not take the rank down
            error = f"cannot read the adapter at {op.path}: {type(e).__name__}: {e}"
        # Every rank must come to the same decision: install only if every rank could read it.
        [everywhere] = agree([0 if error else 1])
        if error is None and not everywhere:
            error = f"the adapter at {op.path} could not be read on every rank (see the other ranks' logs)"
        if error is not None:
            log.error("LoRA adapter for slot %d not loaded: %s", op.slot, error)
            results[op.slot] = error
            continue
        adapters.install(op.slot, weights)
        if prefix_cache is not None:
            prefix_cache.set_adapter(op.slot, weights.fingerprint)
        log.info(
            "loaded LoRA adapter %s into slot %d (rank %d, %d layers)",
            op.path,
            op.slot,
            weights.rank,
            len(weights.layers),
        )
        results[op.slot] = None
    return results


class AdapterScheduler:
    """Rank 0's side of loads and unloads (engine thread): which operations the next plan carries.

    A load gets a free slot and goes out in the next plan; its name serves once every rank has
    installed it. An unload takes the name off at once (new requests for it get 404) and goes
    out once no queued or running sequence uses its slot, so nothing is cut off.
    """

    def __init__(self, registry: AdapterRegistry):
        self.registry = registry
        self._pending: list[AdapterRequest] = []
        self._published: dict[int, tuple[AdapterRequest, ServedAdapter]] = {}  # slot -> request, entry

    def add(self, request: AdapterRequest) -> None:
        reg = self.registry
        current = reg.by_name.get(request.name)
        if request.path:
            if current is not None:
                request.done(f"a LoRA adapter named {request.name!r} is already {current.state}")
                return
            slot = reg.free_slot()
            if slot is None:
                request.done(f"all {reg.max_adapters} adapter slots are in use (model.max_adapters); unload one first")
                return
            with reg.lock:
                reg.by_name[request.name] = ServedAdapter(request.name, request.path, slot, time.time(), "loading")
        else:
            if current is None or current.state == "loading":
                request.done(f"no LoRA adapter named {request.name!r} is loaded")
                return
            if current.state == "unloading":
                request.done(f"the LoRA adapter {request.name!r} is already being unloaded")
                return
            current.state = "unloading"
        self._pending.append(request)

    def next_ops(self, slots_in_use: set[int]) -> tuple[AdapterOp, ...]:
        """The operations to publish now; unloads whose slot still runs wait."""
        ops, waiting = [], []
        for request in self._pending:
            entry = self.registry.by_name[request.name]
            if not request.path and entry.slot in slots_in_use:
                waiting.append(request)
                continue
            ops.append(AdapterOp(entry.slot, request.path))
            self._published[entry.slot] = (request, entry)
        self._pending = waiting
        return tuple(ops)

    def fail_all(self, message: str) -> None:
        """The engine stopped: answer every load or unload still waiting."""
        for request in [*self._pending, *(r for r, _ in self._published.values())]:
            request.done(message)
        self._pending, self._published = [], {}

    def applied(self, results: dict[int, str | None]) -> None:
        """Rank 0 ran the published operations: answer their requests."""
        reg = self.registry
        for slot, error in results.items():
            request, entry = self._published.pop(slot, (None, None))
            if request is None:
                continue
            if request.path and error is None:
                entry.state = "ready"
            else:
                with reg.lock:
                    reg.by_name.pop(entry.name, None)
            request.done(error)


def startup_adapters(model_cfg, adapters_cfg) -> list[tuple[str | None, str, int]]:
    """(name, path, slot) of the adapters configured at start: model.adapter_path first (name
    None: it serves under the model's own name), then `adapters:` in order."""
    out: list[tuple[str | None, str, int]] = []
    if model_cfg.adapter_path is not None:
        out.append((None, model_cfg.adapter_path, 1))
    for entry in adapters_cfg:
        out.append((entry.name, entry.path, len(out) + 1))
    return out


def attach_adapters(executor, model, layouts, group, config, prefix_cache) -> AdapterRegistry | None:
    """Give the executor an AdapterSet with the configured adapters installed (every rank, at
    start: a bad adapter stops the cluster with its message); rank 0's registry of their names."""
    max_adapters = config.model.max_adapters
    if max_adapters == 0:
        return None
    adapters = AdapterSet(model, layouts, group, max_adapters)
    registry = AdapterRegistry(max_adapters)
    for name, path, slot in startup_adapters(config.model, config.adapters):
        try:
            weights = adapters.read(path)
        except AdapterError as e:
            raise AdapterError(f"{'model.adapter_path' if name is None else f'adapters: {name}'}: {e}") from None
        adapters.install(slot, weights)
        if prefix_cache is not None:
            prefix_cache.set_adapter(slot, weights.fingerprint)
        log.info("loaded LoRA adapter %s (rank %d) into slot %d", path, weights.rank, slot)
        if name is None:
            registry.default_slot = slot
        else:
            registry.by_name[name] = ServedAdapter(name, path, slot, time.time())
    executor.adapters = adapters
    return registry
