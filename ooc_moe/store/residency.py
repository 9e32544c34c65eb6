"""Which expert occupies which slot of each fast tier, and which copies are dirty.

The store keeps two of these maps. The *plan* is updated when a fetch or prefetch is decided
(under the API lock, so cache decisions are a deterministic function of the calls). The
*data* map is updated only when a copy has actually completed. They agree whenever no
transfer is in flight; if a transfer fails, the plan is reset to the data map, which by
construction never claims a copy that was not made. The file always holds every record, so
an expert absent from both tiers is (cleanly) in the file.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

__all__ = ["TierMap", "KnownFuture"]


@dataclass
class TierMap:
    hbm_slots: int
    dram_slots: int
    hbm: list = field(init=False)          # slot -> expert id or None
    dram: list = field(init=False)
    hbm_of: dict = field(default_factory=dict)   # expert id -> slot
    dram_of: dict = field(default_factory=dict)
    hbm_dirty: set = field(default_factory=set)   # HBM copy newer than the DRAM copy
    dram_dirty: set = field(default_factory=set)  # DRAM copy newer than the file

    def __post_init__(self) -> None:
        self.hbm = [None] * self.hbm_slots
        self.dram = [None] * self.dram_slots

    # -- transitions, one per kind of move (each asserts that it loses nothing) ---------------
    def write_down(self, e: int) -> None:
        """e's HBM copy was copied to its DRAM slot: DRAM is now newer than the file."""
        assert e in self.hbm_of and e in self.dram_of, f"expert {e} must be in HBM and DRAM"
        self.hbm_dirty.discard(e)
        self.dram_dirty.add(e)

    def write_back(self, e: int) -> None:
        """e's DRAM copy was written to the file."""
        assert e in self.dram_of and e not in self.hbm_dirty, f"expert {e}: stale DRAM copy"
        self.dram_dirty.discard(e)

    def drop_hbm(self, e: int) -> None:
        assert e not in self.hbm_dirty, f"dropping dirty HBM copy of expert {e} loses updates"
        self.hbm[self.hbm_of.pop(e)] = None

    def drop_dram(self, e: int) -> None:
        assert e not in self.hbm_of, f"expert {e} is in HBM; the hierarchy is inclusive"
        assert e not in self.dram_dirty, f"dropping dirty DRAM copy of expert {e} loses updates"
        self.dram[self.dram_of.pop(e)] = None

    def load(self, e: int, slot: int) -> None:
        """e was read from the file into a free DRAM slot."""
        assert self.dram[slot] is None and e not in self.dram_of, f"cannot load {e} to {slot}"
        self.dram[slot], self.dram_of[e] = e, slot

    def promote(self, e: int, slot: int) -> None:
        """e was copied from its DRAM slot into a free HBM slot."""
        assert e in self.dram_of, f"expert {e} must be in DRAM before HBM (inclusive)"
        assert self.hbm[slot] is None and e not in self.hbm_of, f"cannot promote {e} to {slot}"
        self.hbm[slot], self.hbm_of[e] = e, slot

    def copy(self) -> "TierMap":
        other = TierMap(self.hbm_slots, self.dram_slots)
        other.hbm, other.dram = list(self.hbm), list(self.dram)
        other.hbm_of, other.dram_of = dict(self.hbm_of), dict(self.dram_of)
        other.hbm_dirty, other.dram_dirty = set(self.hbm_dirty), set(self.dram_dirty)
        return other

    def check(self) -> None:
        """Assert the invariants (used by tests after every operation)."""
        for tier, of in ((self.hbm, self.hbm_of), (self.dram, self.dram_of)):
            assert {e: s for s, e in enumerate(tier) if e is not None} == of
        assert set(self.hbm_of) <= set(self.dram_of), "inclusive: HBM experts have DRAM slots"
        assert self.hbm_dirty <= set(self.hbm_of) and self.dram_dirty <= set(self.dram_of)


class KnownFuture:
    """The ``get_experts`` calls a caller declared to come next (``TieredExpertStore.expect``),
    soonest first; the store and the trace simulator keep one each. Falsy when empty."""

    def __init__(self) -> None:
        self._calls: deque[frozenset[int]] = deque()

    def __bool__(self) -> bool:
        return bool(self._calls)

    def expect(self, calls: Iterable[Iterable[int]]) -> None:
        """``calls`` come next, in this order, before any calls expected earlier."""
        for call in reversed(list(calls)):
            self._calls.appendleft(frozenset(call))

    def follow(self, ids: Iterable[int]) -> None:
        """A ``get_experts(ids)`` call consumes the expected call it matches, or drops the
        whole future if it matches none (it was wrong, or the caller changed course)."""
        if self._calls:
            if self._calls[0] == frozenset(ids):
                self._calls.popleft()
            else:
                self._calls.clear()

    def victim(self, candidates: list[int]) -> int | None:
        """The candidate whose next use is farthest, one never used first; ties go to the
        earliest candidate (pass them least recently used first). None if there is none."""
        if not candidates:
            return None
        future = self._calls
        next_use = dict.fromkeys(candidates, len(future))
        for i in range(len(future) - 1, -1, -1):        # the earliest use wins
            for v in future[i] & next_use.keys():
                next_use[v] = i
        return max(candidates, key=next_use.__getitem__)
