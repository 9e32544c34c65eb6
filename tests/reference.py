"""Independent references for the store tests: the expert file read with numpy, and the cache
policy written again with plain lists (no shared code with ooc_moe.store)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def read_file_records(directory) -> np.ndarray:
    """All records of an expert file, read with numpy (not through the store); the zero
    padding after the last record, up to a multiple of 4096 bytes, is not read."""
    meta = json.loads((Path(directory) / "experts.json").read_text())
    data = np.fromfile(Path(directory) / "experts.bin", dtype=meta["dtype"],
                       count=meta["num_experts"] * meta["record_numel"])
    return data.reshape(meta["num_experts"], meta["record_numel"])


class ListLRU:
    """Two inclusive LRU tiers as lists (least recent first), counting like StoreStats.

    With a known future (``expect``: a list of the next calls' ids), a tier evicts instead
    the candidate whose first use in it comes last (never used: before all), the least
    recent among equals; a ``get`` that is not the next expected call forgets the future."""

    def __init__(self, hbm: int, dram: int) -> None:
        self.cap = {"hbm": hbm, "dram": dram}
        self.hbm: list[int] = []
        self.dram: list[int] = []
        self.in_use: list[int] = []
        self.future: list[list[int]] = []
        self.counts = dict(accesses=0, hbm_hits=0, dram_hits=0, file_reads=0,
                           hbm_evictions=0, dram_evictions=0, prefetches_issued=0,
                           prefetches_dropped=0)

    def _pick(self, free: list[int]) -> int:
        def first_use(v):
            uses = [i for i, call in enumerate(self.future) if v in call]
            return uses[0] if uses else len(self.future)
        latest = max(first_use(v) for v in free)
        return [v for v in free if first_use(v) == latest][0]

    def expect(self, calls) -> None:
        self.future = [list(c) for c in calls] + self.future

    def _to_dram(self, e: int) -> bool:
        if len(self.dram) == self.cap["dram"]:
            free = [v for v in self.dram if v not in self.hbm]
            if not free:
                return False
            self.dram.remove(self._pick(free))
            self.counts["dram_evictions"] += 1
        self.dram.append(e)
        return True

    def _to_hbm(self, e: int, protected) -> bool:
        if len(self.hbm) == self.cap["hbm"]:
            free = [v for v in self.hbm if v not in protected]
            if not free:
                return False
            self.hbm.remove(self._pick(free))
            self.counts["hbm_evictions"] += 1
        if e not in self.dram:
            assert self._to_dram(e)
        self.hbm.append(e)
        return True

    def _touch(self, e: int, hbm: bool = True) -> None:
        for tier in ([self.hbm] if hbm else []) + [self.dram]:
            if e in tier:
                tier.remove(e)
                tier.append(e)

    def get(self, ids) -> None:
        ids = list(dict.fromkeys(ids))
        if self.future:
            self.future = self.future[1:] if set(self.future[0]) == set(ids) else []
        for e in ids:
            self.counts["accesses"] += 1
            key = "hbm_hits" if e in self.hbm else "dram_hits" if e in self.dram else "file_reads"
            self.counts[key] += 1
            if e not in self.hbm:
                assert self._to_hbm(e, set(ids))
            self._touch(e)
        self.in_use = ids

    def prefetch(self, ids, tier: str) -> None:
        ids = list(dict.fromkeys(ids))
        for e in ids:
            if e in (self.hbm if tier == "hbm" else self.dram):
                self._touch(e, hbm=tier == "hbm")
                continue
            moved = (self._to_hbm(e, set(ids) | set(self.in_use)) if tier == "hbm"
                     else self._to_dram(e))
            if not moved:
                self.counts["prefetches_dropped"] += 1
                continue
            self._touch(e, hbm=tier == "hbm")
            self.counts["prefetches_issued"] += 1
