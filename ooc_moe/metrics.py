"""Metrics of the expert cache and of expert specialisation.

- hit rate and prefetch precision / coverage, from a store's counters (or a ``SimResult``),
  and ``cache_figures``: the figures a run reports, in the vocabulary defined in
  ``ooc_moe.store.stats`` (``hbm_hit_rate``, ``prefetch_precision``, ``prefetch_coverage``,
  ``stall_seconds``, bytes per link);
- normalised mutual information between the game being played and the experts chosen, as in
  Mod-Squad's ``TaskMoE`` (Chen et al., 2023): from a ``[games, experts]`` table of routing
  counts (or accumulated router probabilities),
  ``MI = sum P(t,e) log(P(t,e) / (P(t) P(e)))``, normalised by ``H(T)`` (the game entropy):
  1 when the expert choice determines the game, 0 when it says nothing about it;
- experts per game, ``exp(H(E | game = g))``: the effective number of experts the tokens of
  game ``g`` are routed to (k when they spread evenly over k experts), averaged over the games
  that were played; from the same ``[games, experts]`` table;
- router entropy, normalised by ``log(E)``: 1 for a uniform router, 0 for a one-hot one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["hit_rate", "prefetch_precision", "prefetch_coverage", "cache_figures",
           "prefetch_scores",
           "game_expert_counts",
           "mutual_information", "normalized_mutual_information", "experts_per_game",
           "router_entropy"]


def hit_rate(stats: dict) -> float:
    """HBM hits per access."""
    return stats["hbm_hits"] / stats["accesses"] if stats["accesses"] else 0.0


def prefetch_precision(stats: dict) -> float:
    """Prefetched experts used before eviction, per prefetch that has been decided."""
    done = stats["prefetches_used"] + stats["prefetches_wasted"]
    return stats["prefetches_used"] / done if done else 0.0


def prefetch_coverage(stats: dict) -> float:
    """Share of would-be HBM misses that prefetching turned into hits."""
    would_miss = stats["prefetch_hits"] + stats["dram_hits"] + stats["file_reads"]
    return stats["prefetch_hits"] / would_miss if would_miss else 0.0


def cache_figures(counters: dict) -> dict:
    """A run's figures from store counters (``StoreStats.as_dict``, or one phase of
    ``stats_by_phase``): accesses, ``hbm_hit_rate``, ``prefetch_precision``,
    ``prefetch_coverage``, ``stall_seconds`` and ``bytes_<link>``."""
    return {"accesses": counters["accesses"], "hbm_hit_rate": hit_rate(counters),
            "prefetch_precision": prefetch_precision(counters),
            "prefetch_coverage": prefetch_coverage(counters),
            "stall_seconds": counters.get("stall_seconds", 0.0),
            **{k: v for k, v in counters.items() if k.startswith("bytes_")}}


def prefetch_scores(planned: Sequence[Sequence[int]], used: Sequence[Sequence[int]]) -> dict:
    """Precision (planned experts that were used / planned) and coverage (used experts that
    had been planned / used), summed over steps as ``PrefetchPlanner`` does; nan when nothing
    was planned (precision) or used (coverage). Also the mean sizes of both sets."""
    assert len(planned) == len(used), f"{len(planned)} plans for {len(used)} steps"
    hits = sum(len(set(p) & set(u)) for p, u in zip(planned, used))
    n_planned, n_used = sum(len(set(p)) for p in planned), sum(len(set(u)) for u in used)
    return {"precision": hits / n_planned if n_planned else float("nan"),
            "coverage": hits / n_used if n_used else float("nan"),
            "planned_per_step": n_planned / max(len(used), 1),
            "used_per_step": n_used / max(len(used), 1)}


def game_expert_counts(games, expert_ids, num_games: int, num_experts: int) -> np.ndarray:
    """``[games, experts]`` routing counts from per-sample game ids and per-sample expert ids
    (``expert_ids[i]`` lists the experts sample ``i`` was routed to)."""
    table = np.zeros((num_games, num_experts), dtype=np.float64)
    for game, ids in zip(games, expert_ids):
        np.add.at(table[int(game)], np.asarray(ids, dtype=np.int64).reshape(-1), 1.0)
    return table


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def mutual_information(table) -> float:
    """Mutual information (nats) between the row and column variables of a count table."""
    joint = np.asarray(table, dtype=np.float64)
    if joint.ndim != 2 or (joint < 0).any():
        raise ValueError("expected a 2-d table of non-negative counts [games, experts]")
    total = joint.sum()
    if total == 0:
        return 0.0
    joint = joint / total
    pt, pe = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
    nz = joint > 0
    return float((joint[nz] * np.log(joint[nz] / (pt @ pe)[nz])).sum())


def normalized_mutual_information(table) -> float:
    """``MI(game; expert) / H(game)``, in [0, 1]; 0 when only one game was played."""
    joint = np.asarray(table, dtype=np.float64)
    h_games = _entropy(joint.sum(1) / joint.sum()) if joint.sum() else 0.0
    return mutual_information(joint) / h_games if h_games > 0 else 0.0


def experts_per_game(table) -> float:
    """Mean over the games with any tokens of ``exp(H(E | game))``, from a ``[games, experts]``
    table of routing counts: the effective number of experts a game's tokens use."""
    counts = np.asarray(table, dtype=np.float64)
    if counts.ndim != 2 or (counts < 0).any():
        raise ValueError("expected a 2-d table of non-negative counts [games, experts]")
    played = counts[counts.sum(1) > 0]
    if not len(played):
        return 0.0
    return float(np.mean([np.exp(_entropy(row / row.sum())) for row in played]))


def router_entropy(router_logits: torch.Tensor) -> float:
    """Mean entropy of the router's softmax over experts, divided by ``log(E)`` (logits of
    ``-inf``, experts outside a cohort, count as probability 0)."""
    num_experts = router_logits.shape[-1]
    if num_experts < 2:
        return 0.0
    p = torch.softmax(router_logits.detach().double(), dim=-1)
    entropy = torch.special.entr(p).sum(-1).mean().item()
    return entropy / float(np.log(num_experts))
