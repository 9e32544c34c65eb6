"""Synthetic expert-access patterns, and replaying them through a real ``TieredExpertStore``.

Whether an expert cache pays off depends on *temporal locality*. An agent trained on a sequence
of games plays one game for thousands of steps; if each game's router prefers its own subset of
experts, the working set is stable within a game and changes only at game boundaries. Three
patterns let a notebook or benchmark see the difference:

- ``sequential_games``: the steps form ``num_games`` consecutive blocks; each game draws from
  its own small set of favourite experts (Zipf-weighted), so a game reuses a working set larger
  than one step but much smaller than the whole layer;
- ``random``: every step draws uniformly: no locality at all, the worst case for a cache;
- ``zipf``: one global Zipf popularity (exponent 1.1) with no temporal structure.

A pattern is a list of steps; a step is the list of distinct expert ids one MoE layer needs.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .store import TieredExpertStore
from .store.stats import LINKS

__all__ = ["KINDS", "access_pattern", "game_blocks", "working_set_size", "replay",
           "replay_pattern"]

KINDS = ("sequential_games", "random", "zipf")
ZIPF_EXPONENT = 1.1


def _check_int(name: str, value: int, low: int, high: int | None = None, hint: str = "") -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bounds}, got {value}{hint}")


def _zipf_weights(n: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** ZIPF_EXPONENT
    return weights / weights.sum()


def game_blocks(num_steps: int, num_games: int) -> list[range]:
    """The consecutive step ranges of the games (lengths differ by at most one)."""
    edges = np.linspace(0, num_steps, num_games + 1).round().astype(int)
    return [range(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def working_set_size(num_experts: int, experts_per_step: int, num_games: int) -> int:
    """How many favourite experts each game has in ``sequential_games``."""
    return min(num_experts, max(2 * experts_per_step, num_experts // num_games))


def access_pattern(kind: str, num_experts: int, num_steps: int, experts_per_step: int, *,
                   num_games: int = 4, seed: int = 0) -> list[list[int]]:
    """``num_steps`` steps of ``experts_per_step`` distinct expert ids, drawn as ``kind`` says."""
    if kind not in KINDS:
        raise ValueError(f"unknown access pattern {kind!r}; choose one of {KINDS}")
    _check_int("num_experts", num_experts, 1)
    _check_int("num_steps", num_steps, 1)
    _check_int("experts_per_step", experts_per_step, 1, num_experts,
               " (a step cannot use more distinct experts than exist)")
    rng = np.random.default_rng(seed)
    k = experts_per_step
    if kind == "random":
        return [rng.choice(num_experts, k, replace=False).tolist() for _ in range(num_steps)]
    if kind == "zipf":
        ranked = rng.permutation(num_experts)  # which expert is most popular is arbitrary
        p = _zipf_weights(num_experts)
        return [ranked[rng.choice(num_experts, k, replace=False, p=p)].tolist()
                for _ in range(num_steps)]
    _check_int("num_games", num_games, 1, num_steps, " (every game needs at least one step)")
    size = working_set_size(num_experts, k, num_games)
    p = _zipf_weights(size)
    steps = []
    for block in game_blocks(num_steps, num_games):
        favourites = rng.choice(num_experts, size, replace=False)  # most preferred first
        steps += [favourites[rng.choice(size, k, replace=False, p=p)].tolist() for _ in block]
    return steps


def _record(t: int, start: dict, before: dict, now: dict) -> dict:
    step = {key: now[key] - before[key] for key in ("accesses", "hbm_hits", "dram_hits",
                                                     "file_reads")}
    accesses = now["accesses"] - start["accesses"]
    return {"step": t, **step,
            "hit_rate": step["hbm_hits"] / step["accesses"] if step["accesses"] else float("nan"),
            "cumulative_hit_rate": ((now["hbm_hits"] - start["hbm_hits"]) / accesses
                                    if accesses else float("nan")),
            **{f"bytes_{link}": now[f"bytes_{link}"] - start[f"bytes_{link}"] for link in LINKS}}


def replay(store: TieredExpertStore, steps: Sequence[Sequence[int]], *,
           prefetch_next: bool = False, mark_dirty: bool = False) -> list[dict]:
    """Run ``steps`` through ``store.get_experts`` and return one record per step.

    A record holds the step's accesses and HBM/DRAM/file counts, its HBM ``hit_rate``, the
    ``cumulative_hit_rate`` since the replay began and ``bytes_<link>`` moved so far. With
    ``prefetch_next``, step t+1's experts are prefetched right after step t (an *oracle*
    prefetcher: an upper bound on what a predictor can do); there is no compute to overlap
    with here, so the replay waits for the prefetch. ``mark_dirty`` marks every used expert
    changed, as a training step would, so evictions cost write-backs.
    """
    start = before = store.get_stats_summary()
    records = []
    for t, ids in enumerate(steps):
        store.get_experts(ids)
        if mark_dirty:
            store.mark_dirty(ids)
        if prefetch_next and t + 1 < len(steps):
            store.prefetch(steps[t + 1])
            store.synchronize()
        now = store.get_stats_summary()
        records.append(_record(t, start, before, now))
        before = now
    return records


def replay_pattern(kind: str, hbm_capacity: int, dram_capacity: int, *, num_experts: int = 64,
                   num_steps: int = 400, experts_per_step: int = 4, prefetch_next: bool = False,
                   mark_dirty: bool = False, num_games: int = 4, seed: int = 0,
                   expert_dim: int = 16, hidden_dim: int = 32) -> tuple[list[dict], dict]:
    """Replay a pattern through a small throw-away store; return (records, final summary).

    The summary is ``get_stats_summary()`` plus ``record_bytes``. Experts are tiny so that
    this takes milliseconds; the counts do not depend on the expert size.
    """
    steps = access_pattern(kind, num_experts, num_steps, experts_per_step,
                           num_games=num_games, seed=seed)
    with TieredExpertStore(num_experts, expert_dim, hidden_dim, hbm_capacity, dram_capacity,
                           device="cpu", seed=seed) as store:
        records = replay(store, steps, prefetch_next=prefetch_next, mark_dirty=mark_dirty)
        summary = {**store.get_stats_summary(), "record_bytes": store.record_bytes}
    return records, summary
