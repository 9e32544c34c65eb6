"""Moving records between the file, the DRAM slot pool and the HBM slot pool.

A *transfer* is a short list of moves (write a victim down, load a record up) decided by the
store. It runs either on the caller's thread (a demand fetch) or on one background worker (a
prefetch). Transfers that touch the same slot or the same expert are ordered by futures:
each resource remembers the last transfer that touched it, and a new transfer first waits for
those. So a demand fetch waits only for the prefetches it conflicts with, never for the queue.

On CUDA, copies run ``non_blocking`` between the pinned DRAM pool and the HBM pool on a
dedicated copy stream, ordered against the store's *compute stream* (bound when the store is
built) by events, never by waiting for everything queued so far:

- when an HBM slot leaves use (the next ``get_experts`` call, an ``unpin``), the store records
  a *release* event on the compute stream after the work queued on it; a copy that overwrites
  or reads that slot waits for that event only, so a prefetch into a free slot starts while
  unrelated kernels still run;
- each HBM slot keeps the event of its last copy, which the compute stream waits on before the
  slot is used;
- each DRAM slot keeps the event of the last asynchronous copy that reads or writes it; the
  host waits for it only when it is about to read the slot (write a record to the file) or
  overwrite it (load another record), so a write-down never blocks the caller by itself.

Without CUDA the same moves are plain synchronous copies: ``HostCopies`` and ``CudaCopies`` are
the only device-specific code, chosen once when the store is built.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from concurrent.futures import Future, wait
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .file_tier import ExpertFile
from .residency import TierMap

__all__ = ["Move", "TransferEngine", "HostCopies", "CudaCopies", "make_copies", "flush_moves"]


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


def flush_moves(tiers: TierMap) -> list[Move]:
    """The moves that bring every dirty record of ``tiers`` down to the file."""
    moves = [Move("write_down", e, tiers.hbm_of[e], tiers.dram_of[e])
             for e in sorted(tiers.hbm_dirty)]
    return moves + [Move("write_back", e, None, tiers.dram_of[e])
                    for e in sorted(tiers.dram_dirty | tiers.hbm_dirty)]


# bytes are counted per physical link; the drop moves copy nothing
LINKS = {"load": "file_to_dram", "promote": "dram_to_hbm", "write_down": "hbm_to_dram",
         "write_back": "dram_to_file"}


class HostCopies:
    """No accelerator: the 'HBM' pool is host memory and every copy completes at once."""

    def __init__(self, hbm_slots: int, dram_slots: int) -> None:
        """No per-slot state: nothing is ever in flight on the host."""

    def pin(self, pool: torch.Tensor) -> int:
        """Nothing to page-lock without a GPU; returns the bytes pinned (0)."""
        return 0

    def unpin(self, pool: torch.Tensor) -> None:
        """Nothing was pinned."""

    def on_compute(self):
        """Host code runs in order with itself."""
        return contextlib.nullcontext()

    def release(self, slots) -> None:
        """No compute stream whose work could still read the slots."""

    def fence(self, h: int):
        """No compute stream to order copies after."""
        return None

    def copy(self, h: int, d: int, dst: torch.Tensor, src: torch.Tensor, after) -> None:
        """Copy between HBM slot ``h`` and DRAM slot ``d`` (either way), at once."""
        dst.copy_(src)

    def before_host_access(self, d: int) -> None:
        """No asynchronous copy can still be using the slot."""

    def wait_ready(self, h: int) -> None:
        """Copies into the slot completed when they were made."""

    def synchronize(self) -> None:
        """Nothing to wait for."""


class CudaCopies:
    """CUDA: asynchronous copies on a dedicated stream, ordered by per-slot events."""

    def __init__(self, hbm_slots: int, dram_slots: int, device: torch.device,
                 compute_stream: torch.cuda.Stream) -> None:
        self.device, self.compute = device, compute_stream
        self.stream = torch.cuda.Stream(device)
        self.ready: list = [None] * hbm_slots      # HBM slot -> its last copy (in or out)
        self.released: list = [None] * hbm_slots   # HBM slot -> compute's last use of it
        self.dram_busy: list = [None] * dram_slots  # DRAM slot -> last async copy using it

    def pin(self, pool: torch.Tensor) -> int:
        """Page-lock ``pool`` where it lies (``cudaHostRegister``). Unlike
        ``pin_memory=True``, which goes through PyTorch's caching host allocator and rounds
        the request up to a power of two, this pins exactly the pool's bytes."""
        nbytes = pool.numel() * pool.element_size()
        with torch.cuda.device(self.device):     # the store's device, not GPU 0's context
            err = int(torch.cuda.cudart().cudaHostRegister(pool.data_ptr(), nbytes, 0))
        if err != 0:
            raise RuntimeError(f"cudaHostRegister of the {nbytes / 2**30:.2f} GiB DRAM pool "
                               f"failed (cudaError {err}): the system may limit page-locked "
                               "memory (ulimit -l); lower dram_capacity")
        return nbytes

    def unpin(self, pool: torch.Tensor) -> None:
        with torch.cuda.device(self.device):
            torch.cuda.cudart().cudaHostUnregister(pool.data_ptr())

    def on_compute(self):
        """A context in which the calling thread's work is queued on the compute stream."""
        return torch.cuda.stream(self.compute)

    def release(self, slots) -> None:
        """The HBM ``slots`` leave use: everything that reads or writes them is queued."""
        slots = list(slots)
        if slots:
            event = torch.cuda.Event()
            event.record(self.compute)
            for h in slots:
                self.released[h] = event

    def fence(self, h: int):
        """What a copy touching HBM slot ``h`` must wait for: the slot's last use."""
        return self.released[h]

    def copy(self, h: int, d: int, dst: torch.Tensor, src: torch.Tensor, after) -> None:
        """Queue a copy between HBM slot ``h`` and DRAM slot ``d`` (either way) on the copy
        stream, after the event ``after``; it becomes both slots' last copy."""
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.ready[h] = self.dram_busy[d] = done

    def before_host_access(self, d: int) -> None:
        """The host is about to read or overwrite DRAM slot ``d``: finish the copy using it."""
        event = self.dram_busy[d]
        if event is not None:
            event.synchronize()
            self.dram_busy[d] = None

    def wait_ready(self, h: int) -> None:
        """Make the compute stream wait until the last copy into or out of HBM slot h is done."""
        if self.ready[h] is not None:
            self.compute.wait_event(self.ready[h])

    def synchronize(self) -> None:
        """Wait for every copy queued on the copy stream."""
        self.stream.synchronize()


def make_copies(device: torch.device, hbm_slots: int, dram_slots: int,
                compute_stream=None):
    """The copy strategy for ``device`` (``compute_stream`` only on CUDA)."""
    if device.type == "cuda":
        return CudaCopies(hbm_slots, dram_slots, device, compute_stream)
    return HostCopies(hbm_slots, dram_slots)


@dataclass
class _Transfer:
    moves: list
    deps: list
    future: Future
    after: dict     # HBM slot -> the release event its copies wait for, taken when planned


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
        after = {m.hbm_slot: self.copies.fence(m.hbm_slot) for m in moves
                 if m.kind in ("write_down", "promote")}
        transfer = _Transfer(moves, [d for d in deps if not d.done() or d.exception()],
                             future, after)
        for move in moves:      # counted when queued, so in the phase that decided the copy
            if move.kind in LINKS:
                self.bytes_moved[LINKS[move.kind]] += self._record_bytes
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

    def close(self, flush: bool) -> None:
        """Finish every transfer; with ``flush``, write every dirty record to the file (made
        durable); then stop the worker, wait for the copy stream and unpin the DRAM pool.
        The engine holds no pool afterwards, so their memory goes with the last view."""
        try:
            self.drain()
            if flush and self.error is None:
                self.forget_history()
                self.copies.release(range(len(self.hbm_pool)))  # all compute is queued
                self.submit(flush_moves(self.data), background=False)
                self.file.sync()
        finally:
            self._queue.put(None)
            self._worker.join()
            self.copies.synchronize()
            self.copies.unpin(self.dram_pool)
            self.hbm_pool = self.dram_pool = None

    # -- execution side ------------------------------------------------------------------------
    def _work(self) -> None:
        if self.hbm_pool.device.type == "cuda":
            torch.cuda.set_device(self.hbm_pool.device)  # else a context appears on GPU 0
        while (transfer := self._queue.get()) is not None:
            self._run(transfer)

    def _run(self, t: _Transfer) -> None:
        try:
            for dep in t.deps:
                dep.result()  # an earlier transfer on our resources failed: do not touch them
            for move in t.moves:
                self._execute(move, t.after.get(move.hbm_slot))
        except BaseException as err:  # noqa: BLE001 - reported through the future
            if self.error is None:
                self.error = err
            t.future.set_exception(err)
        else:
            t.future.set_result(None)

    def _execute(self, move: Move, after) -> None:
        e, h, d = move.expert, move.hbm_slot, move.dram_slot
        if move.kind == "write_down":
            self.copies.copy(h, d, self.dram_pool[d], self.hbm_pool[h], after)
        elif move.kind == "write_back":
            self.copies.before_host_access(d)
            self.file.write_from(e, self.dram_pool[d])
        elif move.kind == "load":
            self.copies.before_host_access(d)
            self.file.read_into(e, self.dram_pool[d])
        elif move.kind == "promote":
            self.copies.copy(h, d, self.hbm_pool[h], self.dram_pool[d], after)
        with self.data_lock:
            move.apply(self.data)
