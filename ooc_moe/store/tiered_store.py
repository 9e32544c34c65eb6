"""``TieredExpertStore``: MoE experts kept across HBM, pinned DRAM and a file on disk.

Every expert is one record (see ``layout.py``) in a real file, the authoritative copy. Two
fixed slot pools cache records: ``dram_capacity`` rows of host memory (pinned when CUDA is
present) and ``hbm_capacity`` rows on the compute device (on the CPU when there is no GPU, so
every code path runs everywhere). The hierarchy is *inclusive*: an expert in HBM also has a
DRAM slot, so ``dram_capacity >= hbm_capacity`` is required. Each tier evicts its least
recently used expert that may leave it (not in use, and for DRAM not in HBM); dirty copies are
written down on eviction, clean ones just lose their slot.

A caller that knows its next ``get_experts`` calls says so with ``expect`` (a MoE layer does,
for its waves and for the backward pass that will fetch them again). While such a *known
future* is pending, each tier evicts instead the expert whose next use in it is farthest,
an expert not in it first (Belady's rule within the known horizon; ties and the experts
beyond it by LRU). A call that does not match the next expected one drops the future.

``get_experts`` returns views of HBM slots; ``prefetch`` plans the same moves and hands them to
a background worker (see ``transfer.py``), returning at once. Which expert goes where is
decided at call time under one lock, so the counters are a deterministic function of the calls.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time
import warnings
import weakref
from collections import Counter, OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch

from .file_tier import ExpertFile, FileMeta, dtype_name
from .layout import Expert, RecordLayout
from .residency import KnownFuture, TierMap
from .stats import PHASES, PhaseTally, StoreStats
from .transfer import Move, TransferEngine, flush_moves, make_copies

__all__ = ["TieredExpertStore", "TransferError", "DiskFullError"]


class TransferError(RuntimeError):
    """A background transfer failed. No record was lost; the store has recovered."""


class DiskFullError(OSError):
    """The file system of the expert file ran out of space while records were written back.
    No record was lost: the dirty copies stay in DRAM or HBM, and a retry writes them."""


def _check_capacities(num_experts: int, hbm_capacity: int, dram_capacity: int) -> None:
    for name, value in (("hbm_capacity", hbm_capacity), ("dram_capacity", dram_capacity)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if value > num_experts:
            raise ValueError(f"{name}={value} is larger than num_experts={num_experts}; "
                             f"use at most {num_experts} slots")
    if dram_capacity < hbm_capacity:
        raise ValueError(f"dram_capacity={dram_capacity} < hbm_capacity={hbm_capacity}: the "
                         "hierarchy is inclusive (every HBM expert keeps a DRAM slot), so DRAM "
                         "must hold at least as many experts as HBM; raise dram_capacity")


class TieredExpertStore:
    """A three-tier (HBM / DRAM / file) store of ``num_experts`` FFN experts.

    Args:
        num_experts, expert_dim, hidden_dim: expert count and FFN shape
            (``w1 [hidden, dim], b1 [hidden], w2 [dim, hidden], b2 [dim]``).
        hbm_capacity, dram_capacity: slots in the device and host pools.
        device: compute device; None = CUDA if available, else CPU.
        path: directory for ``experts.bin``/``experts.json``; None = a temporary directory,
            removed by ``shutdown()``. Point it at an NVMe disk for real out-of-core runs.
        dtype: record dtype. seed: initialisation seed (weights N(0, 0.02^2), biases 0).
        init_ids: the ids the records are initialised as, in a pool of ``max(init_ids) + 1``
            experts drawn from ``seed`` (default ``range(num_experts)``): a shard of a larger
            pool (``ooc_moe.distributed``) starts with the same experts as the whole pool.
        optimizer_state: records also carry a gradient accumulator and Adam moments, so
            that ``ExpertOptimizer`` can train them (the record is 4x larger).
        overwrite: replace an expert file already in ``path`` (otherwise an error).
        file_backend: how the file tier does its I/O: ``"pread"`` (positioned system calls
            through the page cache), ``"memmap"`` (a memory map of the file) or ``"direct"``
            (``O_DIRECT``, bypassing the page cache); the file format is the same for all.
        stream: CUDA only: the compute stream whose kernels use the experts (default: the
            stream current when the store is built). Copies are ordered against it, whichever
            thread calls the store.

    A store that is never shut down is closed when it is garbage-collected (or at exit): its
    dirty records are written to the file, its worker stops and its pools are freed.
    """

    def __init__(self, num_experts: int, expert_dim: int, hidden_dim: int,
                 hbm_capacity: int = 32, dram_capacity: int = 128,
                 device: str | torch.device | None = None, *, path: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32, seed: int = 0,
                 optimizer_state: bool = False, overwrite: bool = False,
                 file_backend: str = "pread", stream: "torch.cuda.Stream | None" = None,
                 init_ids: Iterable[int] | None = None) -> None:
        for name, value in (("num_experts", num_experts), ("expert_dim", expert_dim),
                            ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        _check_capacities(num_experts, hbm_capacity, dram_capacity)
        init_ids = list(range(num_experts) if init_ids is None else init_ids)
        if len(init_ids) != num_experts or len(set(init_ids)) != num_experts or min(init_ids) < 0:
            raise ValueError(f"init_ids must be {num_experts} distinct ids >= 0, got {init_ids}")
        if optimizer_state and dtype not in (torch.float32, torch.float64):
            raise ValueError(f"optimizer_state needs float32 or float64 records, not {dtype}: "
                             "Adam moments and step counts lose too much in low precision "
                             "(a bfloat16 step count stops at 256)")
        layout = RecordLayout(expert_dim, hidden_dim, optimizer_state)
        meta = FileMeta(num_experts, expert_dim, hidden_dim, dtype_name(dtype), layout.numel,
                        optimizer_state)
        tmpdir = tempfile.TemporaryDirectory(prefix="ooc-moe-") if path is None else None
        file = None
        try:
            file = ExpertFile.create(tmpdir.name if tmpdir else path, meta,
                                     overwrite=overwrite, backend=file_backend)
            _write_initial_records(file, layout, dtype, seed, init_ids)
            self._setup(file, hbm_capacity, dram_capacity, device, tmpdir, stream)
        except BaseException:           # a bad backend, a full disk, a bad stream, ...
            if file is not None:
                file.close()
            if tmpdir is not None:
                tmpdir.cleanup()
            raise

    @classmethod
    def open(cls, path: str | os.PathLike, device: str | torch.device | None = None, *,
             hbm_capacity: int | None = None, dram_capacity: int | None = None,
             num_experts: int | None = None, expert_dim: int | None = None,
             hidden_dim: int | None = None, dtype: torch.dtype | None = None,
             file_backend: str = "pread", stream: "torch.cuda.Stream | None" = None,
             ) -> "TieredExpertStore":
        """Reopen the store saved in ``path``. Capacities default to the constructor's
        (32, 128), capped at the file's expert count. Shape/dtype arguments, when given, must
        match the file (a mismatch raises ValueError naming both)."""
        file = ExpertFile.open(path, backend=file_backend)
        meta = file.meta
        hbm_capacity = hbm_capacity or min(32, meta.num_experts)
        dram_capacity = dram_capacity or min(128, meta.num_experts)
        expected = {"num_experts": num_experts, "expert_dim": expert_dim,
                    "hidden_dim": hidden_dim, "dtype": dtype and dtype_name(dtype)}
        for name, want in expected.items():
            if want is not None and getattr(meta, name) != want:
                file.close()
                raise ValueError(f"{Path(path)} holds {name}={getattr(meta, name)}, not {want}; "
                                 "open it with matching arguments or create a new store")
        layout = RecordLayout(meta.expert_dim, meta.hidden_dim, meta.optimizer_state)
        if meta.record_numel != layout.numel:
            file.close()
            raise ValueError(f"{path}: records of {meta.record_numel} elements do not match "
                             "this version's expert layout")
        try:
            _check_capacities(meta.num_experts, hbm_capacity, dram_capacity)
        except ValueError:
            file.close()
            raise
        store = cls.__new__(cls)
        try:
            store._setup(file, hbm_capacity, dram_capacity, device, None, stream)
        except BaseException:
            file.close()
            raise
        return store

    def _setup(self, file: ExpertFile, hbm_capacity: int, dram_capacity: int,
               device, tmpdir, stream) -> None:
        meta = file.meta
        self.num_experts, self.expert_dim, self.hidden_dim = (
            meta.num_experts, meta.expert_dim, meta.hidden_dim)
        self.hbm_capacity, self.dram_capacity = hbm_capacity, dram_capacity
        self.dtype = meta.torch_dtype
        self.device = torch.device(device if device is not None else
                                   ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.path = file.directory
        self.layout = RecordLayout(meta.expert_dim, meta.hidden_dim, meta.optimizer_state)
        self.record_bytes = meta.record_bytes
        self.compute_stream = _compute_stream(self.device, stream)
        copies = make_copies(self.device, hbm_capacity, dram_capacity, self.compute_stream)
        # one allocation per pool: pinning per record (or per copy) is much slower
        dram_pool = torch.empty(dram_capacity, self.layout.numel, dtype=self.dtype)
        # HBM rows start 64 bytes apart or a multiple of that: the experts compute from their
        # slot, and matmul kernels round differently at other alignments, so an expert's
        # result would depend on which slot it landed in (on what the cache held before)
        align = max(64 // dram_pool.element_size(), 1)
        stride = -(-self.layout.numel // align) * align
        hbm_pool = torch.empty(hbm_capacity, stride, dtype=self.dtype,
                               device=self.device)[:, :self.layout.numel]
        # touch every page now, so no fetch pays the first-touch page faults of a host pool
        dram_pool.zero_()
        hbm_pool.zero_()
        self.pinned_bytes = copies.pin(dram_pool)  # exactly the pool: 0 without CUDA
        self._copies = copies
        self._slot_views = [self.layout.views(row) for row in hbm_pool]  # built once
        self._file, self._tmpdir = file, tmpdir
        self._plan = TierMap(hbm_capacity, dram_capacity)
        self._engine = TransferEngine(hbm_pool, dram_pool, file, copies,
                                      TierMap(hbm_capacity, dram_capacity))
        # closes the store if it is dropped without shutdown(); holds no reference to it
        self._finalizer = weakref.finalize(self, _close, self._engine, file, tmpdir)
        self._hbm_lru: OrderedDict[int, None] = OrderedDict()
        self._dram_lru: OrderedDict[int, None] = OrderedDict()
        self._pins: Counter[int] = Counter()
        self._in_use: tuple[int, ...] = ()        # last get_experts result, kept resident
        self._prefetched = {"hbm": set(), "dram": set()}  # prefetched, not yet accessed
        self._future = KnownFuture()               # the next get_experts calls (expect)
        self._lock = threading.RLock()
        self._closed = False
        self.stats = StoreStats(bytes_moved=self._engine.bytes_moved)
        self._phases = PhaseTally()
        # experts whose record holds a gradient not yet applied (MoE backward adds to it,
        # ExpertOptimizer.step consumes it)
        self.experts_with_grad: set[int] = set()
        # set to an ooc_moe.trace.RoutingTrace to record every call, for the simulator
        self.trace = None

    # -- the public API -------------------------------------------------------------------
    def get_experts(self, expert_ids: Iterable[int]) -> dict[int, Expert]:
        """Make the experts resident in HBM and return ``{id: Expert}`` (views of HBM slots).

        They stay resident at least until the next ``get_experts`` call (or while pinned).
        Raises ValueError if more experts are needed at once than HBM holds.
        """
        ids = self._check_ids(expert_ids)
        with self._lock:
            self._check_usable()
            needed = set(ids) | set(self._pins)
            if len(needed) > self.hbm_capacity:
                raise ValueError(
                    f"this call needs {len(needed)} HBM slots ({len(ids)} requested, "
                    f"{len(needed) - len(ids)} more pinned) but hbm_capacity is "
                    f"{self.hbm_capacity}: request fewer experts at once (stream them in "
                    "waves), unpin some, or raise hbm_capacity")
            if self.trace is not None:
                self.trace.store_call("get", ids)
            self._future.follow(ids)
            self._leave_use()
            moves: list[Move] = []
            for e in ids:
                self._count_access(e)
                if e not in self._plan.hbm_of:
                    moves += self._plan_into_hbm(e, protected=needed)
                self._touch(e)
            started = time.perf_counter()
            self._run(moves, wait_for=[self._plan.hbm_of[e] for e in ids])
            self.stats.stall_seconds += time.perf_counter() - started
            self._in_use = ids
            return {e: self._expert(e) for e in ids}

    def prefetch(self, expert_ids: Iterable[int], tier: str = "hbm") -> list[int]:
        """Start moving experts up to ``tier`` ("hbm" or "dram") in the background; return now.

        Never evicts experts in use (the last ``get_experts`` result, pinned ones) or the
        experts of this same call; requests that find no such slot are dropped and counted.
        Returns the ids that are (or will shortly be) in ``tier``: the request less the drops.
        """
        if tier not in ("hbm", "dram"):
            raise ValueError(f"tier must be 'hbm' or 'dram', got {tier!r}")
        ids = self._check_ids(expert_ids)
        with self._lock:
            self._check_usable()
            if self.trace is not None:
                self.trace.store_call(f"prefetch_{tier}", ids)
            protected = set(ids) | set(self._in_use) | set(self._pins)
            accepted = []
            for e in ids:
                resident = self._plan.hbm_of if tier == "hbm" else self._plan.dram_of
                if e in resident:
                    self._touch(e, hbm=tier == "hbm")
                    accepted.append(e)
                    continue
                moves = (self._plan_into_hbm(e, protected) if tier == "hbm"
                         else self._plan_into_dram(e))
                if moves is None:
                    self.stats.prefetches_dropped += 1
                    continue
                self._touch(e, hbm=tier == "hbm")
                self._prefetched[tier].add(e)
                self.stats.prefetches_issued += 1
                self._engine.submit(moves, background=True)
                accepted.append(e)
            return accepted

    def expect(self, calls: Iterable[Iterable[int]]) -> None:
        """Declare that the next ``get_experts`` calls will ask for ``calls``, in this order,
        before any calls expected earlier. Until then evictions keep the experts needed
        soonest (the module docstring); a call that does not match drops the expectation.
        Changes only which copies are made, never what ``get_experts`` returns."""
        future = [self._check_ids(call) for call in calls]
        with self._lock:
            self._check_usable()
            if self.trace is not None:       # one event per call, replayed the same way
                for call in reversed(future):
                    self.trace.store_call("expect", call)
            self._future.expect(future)

    def mark_dirty(self, expert_ids: Iterable[int]) -> None:
        """Declare that the HBM copies of these experts were changed in place."""
        ids = self._check_ids(expert_ids)
        with self._lock:
            self._check_usable()
            missing = [e for e in ids if e not in self._plan.hbm_of]
            if missing:
                raise ValueError(f"experts {missing} are not in HBM; mark_dirty applies to "
                                 "experts returned by get_experts (and still resident)")
            self._run([], wait_for=[self._plan.hbm_of[e] for e in ids])
            if self.trace is not None:
                self.trace.store_call("dirty", ids)
            with self._engine.data_lock:
                for e in ids:
                    self._plan.hbm_dirty.add(e)
                    self._engine.data.hbm_dirty.add(e)

    def flush(self) -> None:
        """Write every dirty record down to the file and make it durable (fsync)."""
        with self._lock:
            self._check_usable()
            self._settle()
            if self.trace is not None:
                self.trace.store_call("flush", ())
            plan = self._plan
            # the write-downs read slots that may still be in use: after the work queued so far
            self._copies.release(plan.hbm_of[e] for e in plan.hbm_dirty)
            moves = flush_moves(plan)
            for move in moves:
                move.apply(plan)
            self._run(moves, wait_for=[])
            self._file.sync()

    def synchronize(self) -> None:
        """Wait until every transfer issued so far has completed, its device copies included
        (on CUDA, the copy stream is synchronised too)."""
        with self._lock:
            self._check_usable()
            self._settle()
            self._copies.synchronize()

    def read_expert(self, expert_id: int) -> dict[str, torch.Tensor]:
        """The latest value of one expert as CPU tensors (a copy), wherever it lives."""
        (e,) = self._check_ids([expert_id])
        with self._lock:
            self._check_usable()
            self._settle()
            plan = self._plan
            if e in plan.hbm_of:
                h = plan.hbm_of[e]
                with self._copies.on_compute():  # after the kernels that wrote the slot
                    self._copies.wait_ready(h)
                    row = self._engine.hbm_pool[h].to("cpu", copy=True)
            elif e in plan.dram_of:
                self._copies.before_host_access(plan.dram_of[e])
                row = self._engine.dram_pool[plan.dram_of[e]].clone()
            else:
                row = torch.empty(self.layout.numel, dtype=self.dtype)
                self._file.read_into(e, row)
            return self.layout.views(row)

    def pin(self, expert_ids: Iterable[int]) -> dict[int, Expert]:
        """``get_experts`` and keep the experts resident until ``unpin``."""
        experts = self.get_experts(expert_ids)
        with self._lock:
            self._pins.update(list(experts))
        return experts

    def unpin(self, expert_ids: Iterable[int]) -> None:
        ids = self._check_ids(expert_ids)
        with self._lock:
            unknown = [e for e in ids if not self._pins[e]]
            if unknown:
                raise ValueError(f"experts {unknown} are not pinned")
            self._pins.subtract(ids)
            self._pins = +self._pins
            self._copies.release(self._plan.hbm_of[e] for e in ids
                                 if not self._pins[e] and e not in self._in_use)

    @contextmanager
    def pinned(self, expert_ids: Iterable[int]) -> Iterator[dict[int, Expert]]:
        """``with store.pinned(ids) as experts:`` keeps ``experts`` resident in the block."""
        experts = self.pin(expert_ids)
        try:
            yield experts
        finally:
            self.unpin(list(experts))

    @property
    def available_slots(self) -> int:
        """HBM slots that are not pinned: the most experts one get_experts call may ask for."""
        return self.hbm_capacity - len(self._pins)

    @property
    def prefetch_slots(self) -> int:
        """HBM slots a prefetch may fill now: neither pinned nor holding the experts of the
        last ``get_experts`` call."""
        return self.room_for_prefetch()

    def room_for_prefetch(self, keep: Iterable[int] = ()) -> int:
        """HBM slots a prefetch may fill without evicting pinned experts, the last
        ``get_experts`` result or the experts of ``keep`` that are in HBM (pass them in the
        same ``prefetch`` call, which then protects them)."""
        keep = self._check_ids(keep)
        with self._lock:
            kept = {e for e in keep if e in self._plan.hbm_of}
            return self.hbm_capacity - len(set(self._pins) | set(self._in_use) | kept)

    def where(self, expert_id: int) -> str:
        """The fastest tier the expert is in, or being copied to: "hbm", "dram" or "file"."""
        (e,) = self._check_ids([expert_id])
        with self._lock:
            self._check_usable()
            plan = self._plan
            return "hbm" if e in plan.hbm_of else "dram" if e in plan.dram_of else "file"

    def is_dirty(self, expert_id: int) -> bool:
        """Whether the expert holds changes that have not yet reached the file."""
        (e,) = self._check_ids([expert_id])
        with self._lock:
            self._check_usable()
            return e in self._plan.hbm_dirty or e in self._plan.dram_dirty

    @property
    def phase(self) -> str:
        """What the caller is doing (one of ``PHASES``), set with ``in_phase``."""
        return self._phases.phase

    @contextmanager
    def in_phase(self, phase: str) -> Iterator[None]:
        """Count the calls made inside the block under ``phase`` (``rollout``, ``update``,
        ``optimizer``, ``eval`` or ``other``); the previous phase is restored after it. A
        trace being recorded gets the phase changes as events."""
        previous = self.phase
        self._set_phase(phase)
        try:
            yield
        finally:
            self._set_phase(previous)

    def stats_by_phase(self) -> dict[str, dict]:
        """``{phase: counters}`` (the keys of ``StoreStats.as_dict``) of every phase the store
        has been called in since it was built (or ``reset_stats``)."""
        with self._lock, self._engine.data_lock:
            return self._phases.by_phase(self.stats)

    def get_stats_summary(self) -> dict:
        """The prototype's keys (hit_rate, total_hits, ...) plus per-tier figures."""
        s = self.stats
        return {"hit_rate": s.hit_rate, "total_hits": s.hbm_hits, "total_misses": s.misses,
                "evictions": s.hbm_evictions,
                "hbm_occupancy": len(self._plan.hbm_of) / self.hbm_capacity,
                "dram_occupancy": len(self._plan.dram_of) / self.dram_capacity,
                "pinned_bytes": self.pinned_bytes, **s.as_dict()}

    def reset_stats(self) -> None:
        with self._lock, self._engine.data_lock:
            for link in self._engine.bytes_moved:
                self._engine.bytes_moved[link] = 0
            self.stats = StoreStats(bytes_moved=self._engine.bytes_moved)
            self._phases = PhaseTally(self._phases.phase)

    def shutdown(self) -> None:
        """Flush dirty records, stop the worker, free the pools and close the file
        (idempotent). If the flush fails (a full disk), the store stays open and loses
        nothing: free space and call ``flush()`` or ``shutdown()`` again."""
        with self._lock:
            if self._closed:
                return
            if self._tmpdir is None:
                self.flush()
            self._closed = True
            self._slot_views = []       # views of the HBM pool: let it go with the engine
            self._in_use = ()
            self._finalizer()

    def __enter__(self) -> "TieredExpertStore":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def __repr__(self) -> str:
        return (f"TieredExpertStore(num_experts={self.num_experts}, expert_dim="
                f"{self.expert_dim}, hidden_dim={self.hidden_dim}, hbm_capacity="
                f"{self.hbm_capacity}, dram_capacity={self.dram_capacity}, device="
                f"'{self.device}', path='{self.path}')")

    def _set_phase(self, phase: str) -> None:
        with self._lock, self._engine.data_lock:
            if phase == self._phases.phase:
                return
            self._phases.switch(self.stats, phase)     # raises on an unknown phase
            if self.trace is not None:
                self.trace.store_call("phase", (PHASES.index(phase),))

    # -- planning (under the lock) ------------------------------------------------------------
    def _plan_into_hbm(self, e: int, protected: set) -> list[Move] | None:
        """Moves bringing ``e`` into HBM (through DRAM), or None if every slot is protected."""
        plan, moves = self._plan, []
        if len(plan.hbm_of) < self.hbm_capacity:
            h = plan.hbm.index(None)
        else:
            victim = self._victim(self._hbm_lru, lambda v: v not in protected)
            if victim is None:
                return None
            h = plan.hbm_of[victim]
            if victim in plan.hbm_dirty:
                moves.append(Move("write_down", victim, h, plan.dram_of[victim]))
            moves.append(Move("drop_hbm", victim, h, None))
            self._evicted(victim, "hbm")
        for move in moves:
            move.apply(plan)
        if e not in plan.dram_of:
            moves += self._plan_into_dram(e)
        promote = Move("promote", e, h, plan.dram_of[e])
        promote.apply(plan)
        self._hbm_lru[e] = None
        return moves + [promote]

    def _plan_into_dram(self, e: int) -> list[Move] | None:
        """Moves loading ``e`` from the file into DRAM, or None if every DRAM expert is also
        in HBM. (Never None on the way to HBM: a slot was just freed there, and
        dram_capacity >= hbm_capacity.)"""
        plan, moves = self._plan, []
        if len(plan.dram_of) < self.dram_capacity:
            d = plan.dram.index(None)
        else:
            victim = self._victim(self._dram_lru, lambda v: v not in plan.hbm_of)
            if victim is None:
                return None
            d = plan.dram_of[victim]
            if victim in plan.dram_dirty:
                moves.append(Move("write_back", victim, None, d))
            moves.append(Move("drop_dram", victim, None, d))
            self._evicted(victim, "dram")
        moves.append(Move("load", e, None, d))
        for move in moves:
            move.apply(plan)
        self._dram_lru[e] = None
        return moves

    def _victim(self, lru: OrderedDict, evictable) -> int | None:
        """The expert of ``lru`` (a tier's residents, least recently used first) to evict:
        the least recently used evictable one, or with a known future, the one used farthest
        ahead in it (never, first)."""
        if not self._future:
            return next((v for v in lru if evictable(v)), None)
        return self._future.victim([v for v in lru if evictable(v)])

    def _evicted(self, e: int, tier: str) -> None:
        (self._hbm_lru if tier == "hbm" else self._dram_lru).pop(e)
        if tier == "hbm":
            self.stats.hbm_evictions += 1
        else:
            self.stats.dram_evictions += 1
        if e in self._prefetched[tier]:
            self._prefetched[tier].discard(e)
            self.stats.prefetches_wasted += 1

    def _count_access(self, e: int) -> None:
        s, plan = self.stats, self._plan
        s.accesses += 1
        if e in plan.hbm_of:
            s.hbm_hits += 1
            if e in self._prefetched["hbm"]:
                s.prefetch_hits += 1
        elif e in plan.dram_of:
            s.dram_hits += 1
        else:
            s.file_reads += 1
        for tier in ("hbm", "dram"):
            if e in self._prefetched[tier]:
                self._prefetched[tier].discard(e)
                s.prefetches_used += 1

    def _touch(self, e: int, hbm: bool = True) -> None:
        """Mark ``e`` most recently used in the tiers that hold it."""
        if hbm and e in self._hbm_lru:
            self._hbm_lru.move_to_end(e)
        if e in self._dram_lru:
            self._dram_lru.move_to_end(e)

    # -- running transfers and recovering from failed ones --------------------------------
    def _leave_use(self) -> None:
        """The experts of the last ``get_experts`` call leave use (their kernels are queued)."""
        self._copies.release(self._plan.hbm_of[e] for e in self._in_use
                             if e in self._plan.hbm_of)
        self._in_use = ()

    def _run(self, moves: list, wait_for: list[int]) -> None:
        """Run ``moves`` on this thread, then wait for in-flight transfers into the HBM slots
        ``wait_for`` (and make the compute stream wait for their copies)."""
        try:
            if moves:
                self._engine.submit(moves, background=False)
            for future in self._engine.pending_for([("hbm", h) for h in wait_for]):
                future.result()
        except OSError as err:
            self._recover()
            if err.errno == errno.ENOSPC:
                raise self._disk_full(err) from err
            raise
        except BaseException:
            self._recover()
            raise
        for slot in wait_for:
            self._copies.wait_ready(slot)

    def _disk_full(self, err: OSError) -> DiskFullError:
        dirty = len(self._plan.hbm_dirty | self._plan.dram_dirty)
        free = shutil.disk_usage(self.path).free
        return DiskFullError(
            errno.ENOSPC, f"no space left to write expert records to {self._file.directory} "
            f"({free} bytes free, {dirty} dirty records of {self.record_bytes} bytes = "
            f"{dirty * self.record_bytes} bytes to write). Nothing was lost: the dirty records "
            "stay in DRAM/HBM and the file keeps its last flushed contents. Free space on that "
            "disk and call flush() again (or reopen the store on a larger disk after a "
            "flush)")

    def _settle(self) -> None:
        """Wait for every transfer; surface (after recovering from) a background failure."""
        self._engine.drain()
        if self._engine.error is not None:
            error = self._engine.error
            self._recover()
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                raise self._disk_full(error) from error
            raise TransferError(f"a background transfer failed ({error!r}); no record was "
                                "lost and the store recovered: retry the call") from error
        self._engine.forget_history()

    def _recover(self) -> None:
        """Reset the plan to what the slots really hold after a failed transfer."""
        engine = self._engine
        engine.drain()
        engine.forget_history()
        engine.error = None
        with engine.data_lock:
            self._plan = engine.data.copy()
        for lru, resident in ((self._hbm_lru, self._plan.hbm_of),
                              (self._dram_lru, self._plan.dram_of)):
            order = [e for e in resident if e not in lru] + [e for e in lru if e in resident]
            lru.clear()
            lru.update(dict.fromkeys(order))
        for tier, resident in (("hbm", self._plan.hbm_of), ("dram", self._plan.dram_of)):
            self._prefetched[tier] &= set(resident)
        self._leave_use()

    def _check_usable(self) -> None:
        if self._closed:
            raise RuntimeError("this TieredExpertStore is shut down; reopen its file with "
                               f"TieredExpertStore.open('{self.path}')")
        if self._engine.error is not None:
            self._settle()

    def _check_ids(self, expert_ids: Iterable[int]) -> tuple[int, ...]:
        if isinstance(expert_ids, torch.Tensor):
            expert_ids = expert_ids.reshape(-1).tolist()
        elif isinstance(expert_ids, int):
            raise TypeError("expert ids must be a sequence of ints, e.g. [3], not a bare int")
        ids = []
        for e in expert_ids:
            if isinstance(e, bool) or not hasattr(e, "__index__"):
                raise TypeError(f"expert ids must be ints, got {e!r} ({type(e).__name__})")
            e = int(e)
            if not 0 <= e < self.num_experts:
                raise ValueError(f"expert id {e} is out of range: this store has "
                                 f"{self.num_experts} experts (ids 0..{self.num_experts - 1})")
            ids.append(e)
        return tuple(dict.fromkeys(ids))

    def _expert(self, e: int) -> Expert:
        h = self._plan.hbm_of[e]
        return Expert(e, self._engine.hbm_pool[h], self._slot_views[h])


def _compute_stream(device: torch.device, stream):
    """The stream the store orders its copies against (None without CUDA)."""
    if device.type != "cuda":
        if stream is not None:
            raise ValueError(f"stream= applies to CUDA stores; this store is on {device}")
        return None
    stream = stream if stream is not None else torch.cuda.current_stream(device)
    if stream.device != device:
        raise ValueError(f"the compute stream is on {stream.device} but the store on {device}: "
                         "pass a stream of the store's device")
    return stream


def _close(engine: TransferEngine, file: ExpertFile, tmpdir) -> None:
    """Release what a store holds; ``shutdown()`` calls it, and so does the garbage collector
    (or the interpreter's exit) for a store that was never shut down. Dirty records are
    written to the file first, unless the file is a temporary one."""
    try:
        engine.close(flush=tmpdir is None)
    except Exception as err:  # noqa: BLE001 - a finaliser cannot raise to anyone
        warnings.warn(f"closing the expert store in {file.directory}: dirty records could not "
                      f"be written ({err!r}); the file holds its last flushed contents",
                      RuntimeWarning, stacklevel=2)
    finally:
        file.close()
        if tmpdir is not None:
            tmpdir.cleanup()


def _write_initial_records(file: ExpertFile, layout: RecordLayout, dtype: torch.dtype,
                           seed: int, init_ids: list[int]) -> None:
    """Draw the initial records of a pool of ``max(init_ids) + 1`` experts from ``seed``, in
    order; record ``i`` of the file gets the pool's expert ``init_ids[i]``."""
    generator = torch.Generator().manual_seed(seed)
    row32 = torch.empty(layout.numel, dtype=torch.float32)
    row = row32 if dtype == torch.float32 else torch.empty(layout.numel, dtype=dtype)
    local = {g: i for i, g in enumerate(init_ids)}
    for g in range(max(init_ids) + 1):
        layout.init_row(row32, generator)
        if g in local:
            if row is not row32:
                row.copy_(row32)
            file.write_from(local[g], row)
