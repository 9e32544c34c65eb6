"""Counters of a tiered store, and their split by phase of training.

Counts are of cache *decisions*, made in call order, so a trace-driven simulator with the same
policy reproduces them exactly; bytes are counted when a copy is queued (a copy that fails is
planned, and counted, again after the store recovers) and ``stall_seconds`` is measured.

The vocabulary, used by ``metrics.json``, README and notebooks alike:

- ``hbm_hit_rate``: accesses found in HBM, however they got there (a prefetched expert is a
  hit); ``StoreStats.hit_rate``;
- ``prefetch_precision``: prefetched experts used before leaving their tier, per prefetch
  decided (used or wasted);
- ``prefetch_coverage``: of the accesses that would have missed HBM without prefetching, the
  share a prefetch served;
- ``stall_seconds``: time ``get_experts`` spent copying or waiting for copies;
- ``bytes_<link>``: bytes per link (``LINKS``).

Every counter is also kept per *phase* (``PHASES``): what a training loop was doing when the
store was called, set with ``TieredExpertStore.in_phase``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

__all__ = ["StoreStats", "LINKS", "PHASES", "PhaseTally"]

# the physical links of the fetch path, in the order data moves up and back down
LINKS = ("file_to_dram", "dram_to_hbm", "hbm_to_dram", "dram_to_file")
# what a training loop is doing: acting, forward/backward of an update, the experts' optimizer
# step, evaluation; anything else (building, checkpointing) is "other"
PHASES = ("rollout", "update", "optimizer", "eval", "other")


@dataclass
class StoreStats:
    accesses: int = 0            # expert ids requested by get_experts (unique per call)
    hbm_hits: int = 0            # ... found in HBM
    dram_hits: int = 0           # ... missing from HBM, found in DRAM
    file_reads: int = 0          # ... missing from both, read from the file
    prefetch_hits: int = 0       # HBM hits on an expert a prefetch brought in, first use
    prefetches_issued: int = 0   # experts a prefetch started moving up a tier
    prefetches_used: int = 0     # ... accessed before leaving that tier
    prefetches_wasted: int = 0   # ... evicted from that tier before any access
    prefetches_dropped: int = 0  # prefetch requests with no evictable slot (not issued)
    hbm_evictions: int = 0
    dram_evictions: int = 0
    stall_seconds: float = 0.0   # time get_experts spent copying or waiting for copies
    bytes_moved: dict = field(default_factory=dict)  # link -> bytes (filled in by the store)

    @property
    def misses(self) -> int:
        return self.dram_hits + self.file_reads

    @property
    def hit_rate(self) -> float:
        return self.hbm_hits / self.accesses if self.accesses else 0.0

    def as_dict(self) -> dict:
        """The counters (a subclass's extra fields left out), bytes as ``bytes_<link>``."""
        d = {f.name: getattr(self, f.name) for f in fields(StoreStats)}
        d.pop("bytes_moved")
        d.update({f"bytes_{link}": n for link, n in self.bytes_moved.items()})
        return d


class PhaseTally:
    """Splits the running counters of a ``StoreStats`` by phase: at each phase change, what was
    counted since the last change is credited to the phase that ends."""

    def __init__(self, phase: str = "other") -> None:
        self.phase = check_phase(phase)
        self._mark: dict = {}
        self._done: dict[str, dict] = {}

    def switch(self, stats: StoreStats, phase: str) -> None:
        """Credit what ``stats`` counted since the last switch to the current phase, then
        make ``phase`` current."""
        phase = check_phase(phase)
        now = stats.as_dict()
        done = self._done.setdefault(self.phase, {})
        for key, value in now.items():
            done[key] = done.get(key, 0) + value - self._mark.get(key, 0)
        self._mark, self.phase = now, phase

    def by_phase(self, stats: StoreStats) -> dict[str, dict]:
        """``{phase: counters}`` (``StoreStats.as_dict`` keys) of every phase with any
        counts, the current one up to now."""
        self.switch(stats, self.phase)
        return {p: dict(c) for p, c in self._done.items() if any(c.values())}


def check_phase(phase: str) -> str:
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}: use one of {PHASES}")
    return phase
