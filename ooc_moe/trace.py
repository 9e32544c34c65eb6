"""Routing traces and a trace-driven simulator of the tiered expert cache.

A ``RoutingTrace`` records what a run asked of its expert store: every ``get_experts``,
``prefetch``, ``expect`` and ``mark_dirty`` call and every change of phase
(``TieredExpertStore.in_phase``), in order (the *events*), and, per training step, the game
being played, the experts each MoE layer used and the prefetch set issued before the step (the
*steps*, for analysis). ``simulate`` replays the events with a replacement policy and slot
counts of your choice. With ``policy="lru"`` and the store's capacities it reproduces the
store's counters exactly (tests/test_trace.py checks this), the known futures that ``expect``
gave it included (``hints=False`` replays plain LRU instead); ``"lfu"`` and ``"belady"`` (evict
the expert whose next use is farthest: Belady, 1966) show what another policy, or an
oracle, would have done with the same accesses. Every result is also split by phase
(``SimResult.by_phase``), as the store splits its own counters.

The policy, as in ``TieredExpertStore``: tiers are inclusive (HBM experts keep a DRAM slot);
a ``get`` counts one access per distinct id, in order, and never evicts the ids of the same
call; a ``prefetch`` never evicts the ids of the last ``get`` or of itself, and is dropped
when no slot may be freed; DRAM never evicts an expert that is in HBM.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .store.residency import KnownFuture
from .store.stats import LINKS, PHASES, PhaseTally, StoreStats

__all__ = ["RoutingTrace", "LinkBandwidths", "SimResult", "simulate", "POLICIES"]

POLICIES = ("lru", "lfu", "belady")
_KINDS = ("get", "prefetch_hbm", "prefetch_dram", "dirty", "flush", "phase", "expect")


@dataclass
class RoutingTrace:
    """Store calls and per-step routing of one run (see the module docstring)."""

    events: list = field(default_factory=list)   # (kind, ids tuple, step index)
    games: list = field(default_factory=list)    # per step: game id
    layers: list = field(default_factory=list)   # per step: per layer, sorted expert ids
    prefetch: list = field(default_factory=list)  # per step: ids prefetched before it

    # -- recording (the store calls ``store_call``; a training loop calls the rest) -----------
    def begin_step(self, game: int) -> None:
        self.games.append(int(game))
        self.layers.append([])
        self.prefetch.append([])

    def record_layer(self, expert_ids: Iterable[int]) -> None:
        """The experts one MoE layer used in the current step (call once per layer)."""
        self._need_step().layers[-1].append(sorted({int(e) for e in expert_ids}))

    def record_prefetch(self, expert_ids: Iterable[int]) -> None:
        self._need_step().prefetch[-1].extend(int(e) for e in expert_ids)

    def store_call(self, kind: str, ids: Sequence[int]) -> None:
        assert kind in _KINDS, kind
        self.events.append((kind, tuple(ids), len(self.games) - 1))

    def _need_step(self) -> "RoutingTrace":
        if not self.games:
            raise RuntimeError("call trace.begin_step(game) before recording a step")
        return self

    @property
    def num_steps(self) -> int:
        return len(self.games)

    # -- saving and loading -----------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write the trace as a compressed ``.npz`` of flat integer arrays."""
        def ragged(rows):
            lengths = [len(r) for r in rows]
            flat = [e for r in rows for e in r]
            return np.asarray(lengths, np.int64), np.asarray(flat, np.int32)

        ev_len, ev_ids = ragged([ids for _, ids, _ in self.events])
        layer_counts = np.asarray([len(step) for step in self.layers], np.int64)
        ly_len, ly_ids = ragged([ids for step in self.layers for ids in step])
        pf_len, pf_ids = ragged(self.prefetch)
        np.savez_compressed(
            path, event_kind=np.asarray([_KINDS.index(k) for k, _, _ in self.events], np.int8),
            event_step=np.asarray([s for _, _, s in self.events], np.int64),
            event_len=ev_len, event_ids=ev_ids, games=np.asarray(self.games, np.int64),
            layer_counts=layer_counts, layer_len=ly_len, layer_ids=ly_ids,
            prefetch_len=pf_len, prefetch_ids=pf_ids)

    @classmethod
    def load(cls, path: str | Path) -> "RoutingTrace":
        with np.load(path) as z:
            def split(lengths, flat):
                return [tuple(int(e) for e in chunk)
                        for chunk in np.split(flat, np.cumsum(lengths)[:-1])] if len(lengths) \
                    else []

            ids = split(z["event_len"], z["event_ids"])
            events = [(_KINDS[k], i, int(s)) for k, i, s in
                      zip(z["event_kind"], ids, z["event_step"])]
            per_layer = [list(x) for x in split(z["layer_len"], z["layer_ids"])]
            bounds = np.cumsum(z["layer_counts"])
            layers = [per_layer[a:b] for a, b in zip(np.r_[0, bounds[:-1]], bounds)]
            prefetch = [list(x) for x in split(z["prefetch_len"], z["prefetch_ids"])]
            return cls(events, [int(g) for g in z["games"]], layers, prefetch)


@dataclass(frozen=True)
class LinkBandwidths:
    """Bytes per second of each link, for modelled transfer time. The defaults are the raw
    copies ``python -m ooc_moe bench store`` measured on this project's 2-core CPU machine
    (cold file reads, memcpy); on a GPU use e.g. PCIe Gen5 pinned copies (~51 GB/s on H100)."""

    file_to_dram: float = 3.1e9
    dram_to_hbm: float = 20.9e9
    hbm_to_dram: float = 20.9e9
    dram_to_file: float = 3.1e9


@dataclass
class SimResult(StoreStats):
    """The store's counters as the simulated policy would have produced them, plus moves per
    link, the HBM hit rate of each step and modelled transfer seconds."""

    moves: dict = field(default_factory=lambda: dict.fromkeys(LINKS, 0))
    by_phase: dict = field(default_factory=dict)  # phase -> counters, as the store's
    hit_rate_per_step: list = field(default_factory=list)
    transfer_seconds: float = 0.0

    @property
    def hits(self) -> int:
        return self.hbm_hits

    @property
    def dram_hit_rate(self) -> float:
        """Of the HBM misses, the share DRAM served."""
        return self.dram_hits / self.misses if self.misses else 0.0

    @property
    def prefetch_precision(self) -> float:
        """Of the prefetches whose fate is decided (used, or evicted unused), the share used."""
        done = self.prefetches_used + self.prefetches_wasted
        return self.prefetches_used / done if done else 0.0

    @property
    def prefetch_coverage(self) -> float:
        """HBM misses avoided by prefetching: prefetch hits / (prefetch hits + misses)."""
        would_miss = self.prefetch_hits + self.misses
        return self.prefetch_hits / would_miss if would_miss else 0.0


class _Tier:
    """One tier's residents and its replacement policy."""

    def __init__(self, capacity: int, policy: str, next_use) -> None:
        self.capacity, self.policy = capacity, policy
        self.order: OrderedDict[int, None] = OrderedDict()  # least recently used first
        self.count: dict[int, int] = {}                      # uses, for LFU
        self.next_use = next_use                             # expert -> next access index

    def touch(self, e: int) -> None:
        self.order.move_to_end(e)
        if self.policy == "lfu":
            self.count[e] = self.count.get(e, 0) + 1

    def victim(self, evictable, future: KnownFuture) -> int | None:
        candidates = (e for e in self.order if evictable(e))
        if self.policy == "lru":   # the store's policy: LRU, or the known future's farthest
            return future.victim(list(candidates)) if future else next(candidates, None)
        pool = list(candidates)
        if not pool:
            return None
        if self.policy == "lfu":  # fewest uses; ties go to the least recently used
            return min(pool, key=lambda e: self.count.get(e, 0))
        return max(pool, key=self.next_use)


def _events(trace, prefetch) -> list:
    """Normalise the inputs of ``simulate`` to a list of (kind, ids, step) events."""
    if isinstance(trace, RoutingTrace):
        events = list(trace.events)
        if prefetch is False:
            events = [ev for ev in events if not ev[0].startswith("prefetch")]
    else:
        events = [("get", tuple(dict.fromkeys(int(e) for e in step)), t)
                  for t, step in enumerate(trace)]
    if prefetch not in (None, False):
        sets = list(prefetch)
        events = [ev for ev in events if not ev[0].startswith("prefetch")]
        out, seen = [], set()
        for ev in events:
            t = ev[2]
            if ev[0] == "get" and t not in seen and t < len(sets):
                seen.add(t)
                if sets[t]:
                    out.append(("prefetch_hbm", tuple(int(e) for e in sets[t]), t))
            out.append(ev)
        events = out
    return events


def simulate(trace: RoutingTrace | Sequence[Sequence[int]], hbm_capacity: int,
             dram_capacity: int | None = None, policy: str = "lru",
             prefetch: bool | Sequence[Sequence[int]] | None = None, *, hints: bool = True,
             record_bytes: int = 0, bandwidths: LinkBandwidths = LinkBandwidths()) -> SimResult:
    """Replay ``trace`` through a simulated two-tier cache; return the counters.

    ``trace``: a ``RoutingTrace`` (its recorded store calls) or a sequence of steps, each a
    sequence of expert ids (one ``get`` per step). ``dram_capacity=None``: DRAM holds every
    expert. ``prefetch``: None replays recorded prefetches, False drops them, or a sequence
    giving, per step, the ids to prefetch to HBM before that step's first ``get``.
    ``hints``: the LRU policy follows the recorded known futures (``expect``), as the store
    does; False ignores them (other policies always do).
    ``record_bytes`` turns move counts into bytes and modelled transfer seconds.
    """
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    events = _events(trace, prefetch)
    if dram_capacity is None:
        dram_capacity = max([hbm_capacity] + [e + 1 for _, ids, _ in events for e in ids])
    if not 1 <= hbm_capacity <= dram_capacity:
        raise ValueError(f"need 1 <= hbm_capacity ({hbm_capacity}) <= dram_capacity "
                         f"({dram_capacity}): the tiers are inclusive")
    too_big = next((ids for kind, ids, _ in events if kind == "get" and
                    len(ids) > hbm_capacity), None)
    if too_big is not None:
        raise ValueError(f"a step uses {len(too_big)} experts but hbm_capacity is "
                         f"{hbm_capacity}: a step's experts must fit in HBM at once")
    r = SimResult()
    positions = _access_positions(events) if policy == "belady" else {}
    access_index = 0

    def next_use(e: int) -> float:
        """Index of e's next access at or after the current one (Belady's key)."""
        uses = positions.get(e, ())
        i = bisect_left(uses, access_index)
        return uses[i] if i < len(uses) else float("inf")

    hbm, dram = _Tier(hbm_capacity, policy, next_use), _Tier(dram_capacity, policy, next_use)
    hbm_dirty, dram_dirty, prefetched = set(), set(), {"hbm": set(), "dram": set()}
    future = KnownFuture()             # the store's (expect), soonest first
    in_use: tuple = ()
    moves = r.moves
    step_hits = step_accesses = 0
    current_step = None
    phases = PhaseTally()

    def settle() -> None:
        """Bring the counters kept implicitly in the loop up to date."""
        r.hbm_hits = r.accesses - r.dram_hits - r.file_reads
        r.bytes_moved = {link: n * record_bytes for link, n in moves.items()}

    def evict_hbm(protected) -> bool:
        victim = hbm.victim(lambda v: v not in protected, future)
        if victim is None:
            return False
        if victim in hbm_dirty:
            hbm_dirty.discard(victim)
            dram_dirty.add(victim)
            moves["hbm_to_dram"] += 1
        del hbm.order[victim]
        r.hbm_evictions += 1
        if victim in prefetched["hbm"]:
            prefetched["hbm"].discard(victim)
            r.prefetches_wasted += 1
        return True

    def load_dram(e) -> bool:
        if len(dram.order) >= dram.capacity:
            victim = dram.victim(lambda v: v not in hbm.order, future)
            if victim is None:
                return False
            if victim in dram_dirty:
                dram_dirty.discard(victim)
                moves["dram_to_file"] += 1
            del dram.order[victim]
            r.dram_evictions += 1
            if victim in prefetched["dram"]:
                prefetched["dram"].discard(victim)
                r.prefetches_wasted += 1
        dram.order[e] = None
        moves["file_to_dram"] += 1
        return True

    def promote(e, protected) -> bool:
        if len(hbm.order) >= hbm.capacity and not evict_hbm(protected):
            return False
        if e not in dram.order:
            assert load_dram(e)  # a slot was just freed in HBM, and DRAM >= HBM
        hbm.order[e] = None
        moves["dram_to_hbm"] += 1
        return True

    for kind, ids, step in events:
        if step != current_step:
            if current_step is not None and step_accesses:
                r.hit_rate_per_step.append(step_hits / step_accesses)
            current_step, step_hits, step_accesses = step, 0, 0
        if kind == "get":
            future.follow(ids)
            protected = set(ids)
            in_use = ()
            for e in ids:  # the hot loop: keep it lean
                access_index += 1
                if e in hbm.order:
                    step_hits += 1
                    if e in prefetched["hbm"]:
                        r.prefetch_hits += 1
                else:
                    if e in dram.order:
                        r.dram_hits += 1
                    else:
                        r.file_reads += 1
                    promote(e, protected)
                if prefetched["hbm"] or prefetched["dram"]:
                    for tier in ("hbm", "dram"):
                        if e in prefetched[tier]:
                            prefetched[tier].discard(e)
                            r.prefetches_used += 1
                hbm.touch(e)
                dram.touch(e)
            r.accesses += len(ids)
            step_accesses += len(ids)
            in_use = ids
        elif kind == "dirty":
            hbm_dirty.update(ids)
        elif kind == "expect":
            if hints:                  # the store records one event per call, last first
                future.expect([ids])
        elif kind == "phase":
            settle()
            phases.switch(r, PHASES[ids[0]])
        elif kind == "flush":
            moves["hbm_to_dram"] += len(hbm_dirty)
            moves["dram_to_file"] += len(hbm_dirty | dram_dirty)
            hbm_dirty.clear()
            dram_dirty.clear()
        else:
            tier = "hbm" if kind == "prefetch_hbm" else "dram"
            protected = set(ids) | set(in_use)
            for e in ids:
                if e in (hbm.order if tier == "hbm" else dram.order):
                    if tier == "hbm":
                        hbm.order.move_to_end(e)
                    dram.order.move_to_end(e)
                    continue
                done = promote(e, protected) if tier == "hbm" else load_dram(e)
                if not done:
                    r.prefetches_dropped += 1
                    continue
                if tier == "hbm":
                    hbm.order.move_to_end(e)
                dram.order.move_to_end(e)
                prefetched[tier].add(e)
                r.prefetches_issued += 1
    if step_accesses:
        r.hit_rate_per_step.append(step_hits / step_accesses)
    settle()
    r.by_phase = phases.by_phase(r)
    r.transfer_seconds = sum(b / getattr(bandwidths, link) for link, b in r.bytes_moved.items())
    return r


def _access_positions(events) -> dict[int, list[int]]:
    """Expert -> the (1-based, ascending) indices of its accesses in the trace."""
    positions: dict[int, list[int]] = {}
    i = 0
    for kind, ids, _ in events:
        if kind == "get":
            for e in ids:
                i += 1
                positions.setdefault(e, []).append(i)
    return positions
