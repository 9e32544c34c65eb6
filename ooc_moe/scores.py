"""Scores of a sequential (continual) run: retention matrix, forgetting, human-normalised scores.

A run trains on games ``g1..gN`` one after another and, after each stage, evaluates every game:
``retention[s][g]`` is the score on game ``g`` after stage ``s`` (raw game score). From it
(Continual World, Wolczyk et al., 2021):

- forgetting of game ``g`` = score at the end of its own stage minus at the end of the
  sequence, ``R[g][g] - R[N-1][g]`` (positive = forgotten; the last game has none);
- average final score = mean over games of the last row, in human-normalised units so that
  games of different score ranges can be averaged.

Human-normalised score = ``100 * (score - random) / (human - random)`` with the random and human
scores of the table used since Badia et al. (2020, Agent57), ``HUMAN_SCORES`` below. The
package's synthetic games (``synthetic-N``, ``ooc_moe.envs.synthetic``) have no human score:
their optimum takes its place (every step rewarded: ``EPISODE_STEPS``), so 100 means played
perfectly; other games get ``nan``. The table's scores are of whole games; an evaluation capped at fewer steps
scores differently even when it plays randomly (a capped Pong game loses fewer points), so a
run passes ``random_score``: uniformly random actions evaluated under its own protocol (same
cap, same seeds, ``train.evaluate.evaluate_random``), which replaces the table's random score
in the numerator (the table's human - random span stays the unit). An untrained agent then
scores about 0. Aggregates over runs x games: ``aggregate_scores``, the interquartile mean
and the mean with stratified-bootstrap 95% intervals from ``rliable`` (Agarwal et al., 2021,
*Deep RL at the edge of the statistical precipice*), as the field reports them.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .envs.synthetic import EPISODE_STEPS, NUM_ACTIONS, is_synthetic

__all__ = ["HUMAN_SCORES", "reference_scores", "human_normalized", "forgetting",
           "average_final_score", "aggregate_scores", "run_kind"]

# game: (random, human), the table of Badia et al. (2020), Agent57, appendix H
HUMAN_SCORES: dict[str, tuple[float, float]] = {
    "pong": (-20.7, 14.6), "breakout": (1.7, 30.5), "boxing": (0.1, 12.1),
    "freeway": (0.0, 29.6), "beam_rider": (363.9, 16926.5), "qbert": (163.9, 13455.0),
    "phoenix": (761.4, 7242.6), "name_this_game": (2292.3, 8049.0),
    "battle_zone": (2360.0, 37187.5), "double_dunk": (-18.6, -16.4),
    "space_invaders": (148.0, 1668.7), "seaquest": (68.4, 42054.7), "enduro": (0.0, 860.5),
    "ms_pacman": (307.3, 6951.6), "road_runner": (11.5, 7845.0),
    "kung_fu_master": (258.5, 22736.3), "demon_attack": (152.1, 1971.0),
    "crazy_climber": (10780.5, 35829.4),
}


def run_kind(name: str) -> str:
    """The kind of a run from its directory's name, the seeds of one agent grouped:
    ``dense-cleanrl-seed2`` -> ``dense-cleanrl`` (the name before ``-seed``)."""
    return name.rsplit("-seed", 1)[0]


def reference_scores(game: str) -> tuple[float, float] | None:
    """``(random, human)`` of ``game``: the table's, or for a synthetic game random play's
    expected return and the optimum (``EPISODE_STEPS``); None for a game with neither."""
    if game in HUMAN_SCORES:
        return HUMAN_SCORES[game]
    if is_synthetic(game):
        return EPISODE_STEPS / NUM_ACTIONS, float(EPISODE_STEPS)
    return None


def human_normalized(game: str, score: float, random_score: float | None = None) -> float:
    """``100 * (score - random) / (human - random)``, ``random`` being ``random_score`` where
    given (random play under the same protocol); nan for a game without reference scores
    (``reference_scores``)."""
    reference = reference_scores(game)
    if reference is None:
        return math.nan
    random, human = reference
    baseline = random if random_score is None else random_score
    return 100.0 * (score - baseline) / (human - random)


def _square(retention) -> np.ndarray:
    r = np.asarray(retention, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        raise ValueError(f"a retention matrix is [stages, games] with one stage per game, "
                         f"got shape {r.shape}")
    return r


def forgetting(retention) -> np.ndarray:
    """Per game: ``R[g][g] - R[-1][g]`` (score lost by the end of the sequence)."""
    r = _square(retention)
    return np.diag(r) - r[-1]


def average_final_score(retention, games: Sequence[str],
                        random_scores: Sequence[float] | None = None) -> float:
    """Mean human-normalised score of the last row (games outside the table left out),
    against ``random_scores`` (one per game, ``human_normalized``) where given."""
    r = _square(retention)
    if len(games) != r.shape[1]:
        raise ValueError(f"{len(games)} game names for {r.shape[1]} columns")
    randoms = [None] * len(games) if random_scores is None else random_scores
    scores = [human_normalized(g, s, b) for g, s, b in zip(games, r[-1], randoms)]
    known = [s for s in scores if not math.isnan(s)]
    return float(np.mean(known)) if known else math.nan


def aggregate_scores(scores, reps: int = 2000, seed: int = 0) -> dict:
    """``scores [runs, games]`` (human-normalised final scores, say) -> ``iqm`` and ``mean``
    with their 95% ``*_interval`` from rliable's stratified bootstrap (runs resampled within
    each game; ``seed`` makes it repeatable)."""
    from rliable import library as rly, metrics      # slow to import; only needed here

    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2 or x.size == 0 or np.isnan(x).any():
        raise ValueError(f"scores must be a [runs, games] array without nan, got shape "
                         f"{x.shape}")
    state = np.random.get_state()        # rliable resamples with numpy's global generator
    np.random.seed(seed)
    try:
        point, interval = rly.get_interval_estimates(
            {"x": x}, lambda s: np.array([metrics.aggregate_iqm(s), metrics.aggregate_mean(s)]),
            reps=reps)
    finally:
        np.random.set_state(state)
    (iqm, mean), ((iqm_low, mean_low), (iqm_high, mean_high)) = point["x"], interval["x"]
    return {"iqm": float(iqm), "iqm_interval": [float(iqm_low), float(iqm_high)],
            "mean": float(mean), "mean_interval": [float(mean_low), float(mean_high)]}
