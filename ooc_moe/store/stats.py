"""Counters of a tiered store. Counts are of cache *decisions*, made in call order, so a
trace-driven simulator with the same policy reproduces them exactly; bytes and seconds are
measured when the copies really run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["StoreStats", "LINKS"]

# the physical links of the fetch path, in the order data moves up and back down
LINKS = ("file_to_dram", "dram_to_hbm", "hbm_to_dram", "dram_to_file")


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
    seconds_blocked: float = 0.0  # time get_experts spent copying or waiting for copies
    bytes_moved: dict = field(default_factory=dict)  # link -> bytes (filled in by the store)

    @property
    def misses(self) -> int:
        return self.dram_hits + self.file_reads

    @property
    def hit_rate(self) -> float:
        return self.hbm_hits / self.accesses if self.accesses else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("bytes_moved")
        d.update({f"bytes_{link}": n for link, n in self.bytes_moved.items()})
        return d
