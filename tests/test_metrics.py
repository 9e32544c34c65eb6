"""Metrics against values computed by hand."""

import math

import numpy as np
import pytest
import torch

from ooc_moe.metrics import (experts_per_game, game_expert_counts, hit_rate,
                             mutual_information,
                             normalized_mutual_information, prefetch_coverage,
                             prefetch_precision, router_entropy)


def test_cache_metrics_by_hand():
    stats = dict(accesses=10, hbm_hits=6, dram_hits=3, file_reads=1, prefetch_hits=2,
                 prefetches_used=2, prefetches_wasted=6)
    assert hit_rate(stats) == 0.6
    assert prefetch_precision(stats) == 0.25
    assert prefetch_coverage(stats) == pytest.approx(2 / 6)
    empty = dict.fromkeys(stats, 0)
    assert hit_rate(empty) == prefetch_precision(empty) == prefetch_coverage(empty) == 0.0


def test_mutual_information_by_hand():
    # two games, each with its own expert: the expert tells the game: MI = H(T) = log 2
    separate = [[5, 0], [0, 5]]
    assert mutual_information(separate) == pytest.approx(math.log(2))
    assert normalized_mutual_information(separate) == pytest.approx(1.0)
    # every game uses every expert alike: MI = 0
    assert normalized_mutual_information([[3, 3], [1, 1]]) == pytest.approx(0.0)
    # P = [[.5, .25], [0, .25]]: P(t) = (.75, .25), P(e) = (.5, .5)
    mixed = [[2, 1], [0, 1]]
    mi = 0.5 * math.log(0.5 / (0.75 * 0.5)) + 0.25 * math.log(0.25 / (0.75 * 0.5)) \
        + 0.25 * math.log(0.25 / (0.25 * 0.5))
    h_t = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert mutual_information(mixed) == pytest.approx(mi)
    assert normalized_mutual_information(mixed) == pytest.approx(mi / h_t)
    assert normalized_mutual_information([[4, 2]]) == 0.0          # one game
    assert mutual_information(np.zeros((2, 3))) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        mutual_information([[-1, 2]])


def test_game_expert_counts():
    table = game_expert_counts([0, 0, 1], [[1, 2], [2, 2], [0, 3]], 2, 4)
    assert table.tolist() == [[0, 1, 3, 0], [1, 0, 0, 1]]


def test_router_entropy_limits():
    assert router_entropy(torch.zeros(5, 8)) == pytest.approx(1.0)
    one_hot = torch.full((5, 8), -1e4)
    one_hot[:, 3] = 1e4
    assert router_entropy(one_hot) == pytest.approx(0.0, abs=1e-9)
    two = torch.log(torch.tensor([[0.5, 0.5, 1e-30, 1e-30]]))      # uniform over 2 of 4
    assert router_entropy(two) == pytest.approx(math.log(2) / math.log(4))


def test_experts_per_game_by_hand():
    # game 0 spreads evenly over 4 experts (4); game 1 uses 2 experts 3:1, so
    # H = -(3/4 log 3/4 + 1/4 log 1/4) and exp(H) = 4 / 3**0.75; game 2 never played
    table = [[2, 2, 2, 2, 0], [0, 0, 0, 3, 1], [0, 0, 0, 0, 0]]
    assert experts_per_game(table) == pytest.approx((4 + 4 / 3 ** 0.75) / 2)
    assert experts_per_game([[0, 7, 0]]) == pytest.approx(1.0)
    assert experts_per_game(np.zeros((2, 3))) == 0.0
    with pytest.raises(ValueError, match="non-negative"):
        experts_per_game([[-1, 2]])


def test_router_entropy_ignores_experts_outside_a_cohort():
    # two of four experts allowed, uniform over them: entropy log 2, over log 4
    logits = torch.tensor([[0.0, float("-inf"), 0.0, float("-inf")]])
    assert router_entropy(logits) == pytest.approx(0.5)
