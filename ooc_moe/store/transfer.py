"""Moving records between the file, the DRAM slot pool and the HBM slot pool.

A *transfer* is a short list of moves (write a victim down, load a record up) decided by the
store. It runs either on the caller's thread (a demand fetch) or on one background worker (a
prefetch). Transfers that touch the same slot or the same expert are ordered by futures:
each resource remembers the last transfer that touched it, and a new transfer first waits for
those. So a demand fetch waits only for the prefetches it conflicts with, never for the queue.

On CUDA, host-to-device copies are ``non_blocking`` from pinned slots on a dedicated copy
stream; each HBM slot keeps the event of its last copy, which the compute stream waits on
before using the slot. Device-to-host write-backs wait for the compute work enqueued before
they were planned, and complete before the record goes on to the file. Without CUDA the same
moves are plain synchronous copies: ``HostCopies`` and ``CudaCopies`` are the only
device-specific code, chosen once when the store is built.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .file_tier import ExpertFile
from .residency import TierMap

__all__ = ["Move", "TransferEngine", "HostCopies", "CudaCopies", "make_copies"]


class Move(NamedTuple):
    """One step of a transfer; ``kind`` names the ``TierMap`` transition it performs."""

    kind: str              # write_down | drop_hbm | write_back | drop_dram | load | promote
    expert: int
    hbm_slot: int | None
    dram_slot: int | None

    def resources(self) -> tuple:
        """What the move must be ordered on: its slots, and its expert (two moves of one
        expert, such as a drop from one DRAM slot and a reload into another, stay in order)."""
        h, d, e = ("hbm", self.hbm_slot), ("dram", self.dram_slot), ("expert", self.expert)
        return {"write_down": (e, h, d), "drop_hbm": (e, h), "write_back": (e, d),
                "drop_dram": (e, d), "load": (e, d), "promote": (e, d, h)}[self.kind]

    def apply(self, tiers: TierMap) -> None:
        """Record in ``tiers`` that this move has happened."""
        if self.kind == "load":
            tiers.load(self.expert, self.dram_slot)
        elif self.kind == "promote":
            tiers.promote(self.expert, self.hbm_slot)
        else:
            getattr(tiers, self.kind)(self.expert)


# bytes are counted per physical link; the drop moves copy nothing
LINKS = {"load": "file_to_dram", "promote": "dram_to_hbm", "write_down": "hbm_to_dram",
         "write_back": "dram_to_file"}


class HostCopies:
    """No accelerator: the 'HBM' pool is host memory and every copy completes at once."""

    pin_memory = False

    def __init__(self, hbm_slots: int) -> None:
        """No per-slot state: nothing is ever in flight on the host."""

    def compute_marker(self):
        """No compute stream to order copies after."""
        return None

    def to_device(self, h: int, d: int, dst: torch.Tensor, src: torch.Tensor, after) -> None:
        dst.copy_(src)

    def to_host(self, dst: torch.Tensor, src: torch.Tensor, after) -> None:
        dst.copy_(src)

    def before_host_write(self, d: int) -> None:
        """No asynchronous copy can still be reading the slot."""

    def wait_ready(self, h: int) -> None:
        """Copies into the slot completed when they were made."""

    def synchronize(self) -> None:
        """Nothing to wait for."""


class CudaCopies:
    """CUDA: asynchronous copies on a dedicated stream, one ready-event per HBM slot."""

    pin_memory = True

    def __init__(self, hbm_slots: int, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.ready: list = [None] * hbm_slots      # event: last copy into HBM slot done
        self.reading: dict[int, torch.cuda.Event] = {}  # DRAM slot -> last H2D that reads it

    def compute_marker(self) -> torch.cuda.Event:
        """An event after the compute work enqueued so far (slot reuse must wait for it)."""
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def to_device(self, h: int, d: int, dst: torch.Tensor, src: torch.Tensor, after) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.ready[h] = self.reading[d] = done

    def to_host(self, dst: torch.Tensor, src: torch.Tensor, after) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()  # the record goes on to the file next: it must be complete

    def before_host_write(self, d: int) -> None:
        """The host is about to overwrite DRAM slot d: finish any copy still reading it."""
        event = self.reading.pop(d, None)
        if event is not None:
            event.synchronize()

    def wait_ready(self, h: int) -> None:
        """Make the compute stream wait until HBM slot h holds its record."""
        if self.ready[h] is not None:
            torch.cuda.current_stream(self.device).wait_event(self.ready[h])

    def synchronize(self) -> None:
        self.stream.synchronize()


def make_copies(device: torch.device, hbm_slots: int):
    return CudaCopies(hbm_slots, device) if device.type == "cuda" else HostCopies(hbm_slots)


@dataclass
class _Transfer:
    moves: list
    deps: list
    future: Future
    after: object   # compute marker taken when the transfer was planned


class TransferEngine:
    """Executes transfers in dependency order, on the caller's thread or the worker's."""

    def __init__(self, hbm_pool: torch.Tensor, dram_pool: torch.Tensor, file: ExpertFile,
                 copies, data: TierMap) -> None:
        self.hbm_pool, self.dram_pool, self.file, self.copies = hbm_pool, dram_pool, file, copies
        self.data = data                      # what the slots really hold (see residency.py)
        self.data_lock = threading.Lock()
        self.bytes_moved = dict.fromkeys(LINKS.values(), 0)
        self._record_bytes = dram_pool[0].numel() * dram_pool.element_size()
        self._last: dict[tuple, Future] = {}  # resource -> last transfer that touched it
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: set[Future] = set()
        self.error: BaseException | None = None
        self._worker = threading.Thread(target=self._work, name="ooc-moe-transfers",
                                        daemon=True)
        self._worker.start()

    # -- planning side (called under the store's lock) ---------------------------------------
    def submit(self, moves: list, *, background: bool) -> Future:
        """Order ``moves`` after every earlier transfer on the same resources and run them:
        now on this thread (and raise on failure), or later on the worker."""
        resources = {r for move in moves for r in move.resources()}
        deps = {self._last[r] for r in resources if r in self._last}
        future: Future = Future()
        for r in resources:
            self._last[r] = future
        transfer = _Transfer(moves, [d for d in deps if not d.done() or d.exception()],
                             future, self.copies.compute_marker())
        if background:
            self._pending.add(future)
            future.add_done_callback(self._pending.discard)
            self._queue.put(transfer)
        else:
            self._run(transfer)
            future.result()
        return future

    def pending_for(self, resources) -> list[Future]:
        return [f for r in resources if (f := self._last.get(r)) is not None and not f.done()]

    def drain(self) -> None:
        """Wait until every submitted transfer has finished (successfully or not: a failure
        is kept in ``self.error`` for the store to raise)."""
        wait(list(self._pending))

    def forget_history(self) -> None:
        """After a drain: no transfer is in flight, so nothing needs to be waited for."""
        self._last.clear()

    def close(self) -> None:
        self.drain()
        self._queue.put(None)
        self._worker.join()
        self.copies.synchronize()

    # -- execution side ------------------------------------------------------------------------
    def _work(self) -> None:
        while (transfer := self._queue.get()) is not None:
            self._run(transfer)

    def _run(self, t: _Transfer) -> None:
        try:
            for dep in t.deps:
                dep.result()  # an earlier transfer on our resources failed: do not touch them
            for move in t.moves:
                self._execute(move, t.after)
        except BaseException as err:  # noqa: BLE001 - reported through the future
            if self.error is None:
                self.error = err
            t.future.set_exception(err)
        else:
            t.future.set_result(None)

    def _execute(self, move: Move, after) -> None:
        e, h, d = move.expert, move.hbm_slot, move.dram_slot
        if move.kind == "write_down":
            self.copies.to_host(self.dram_pool[d], self.hbm_pool[h], after)
        elif move.kind == "write_back":
            self.file.write_from(e, self.dram_pool[d])
        elif move.kind == "load":
            self.copies.before_host_write(d)
            self.file.read_into(e, self.dram_pool[d])
        elif move.kind == "promote":
            self.copies.to_device(h, d, self.hbm_pool[h], self.dram_pool[d], after)
        with self.data_lock:
            move.apply(self.data)
            if move.kind in LINKS:
                self.bytes_moved[LINKS[move.kind]] += self._record_bytes
