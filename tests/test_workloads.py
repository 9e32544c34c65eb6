"""Access patterns (shapes, determinism, locality, argument checks) and replay's records."""

from collections import Counter

import pytest

from ooc_moe import TieredExpertStore
from ooc_moe.store.stats import LINKS
from ooc_moe.workloads import (KINDS, access_pattern, game_blocks, replay, replay_pattern,
                               working_set_size)


def hbm_hits_per_step(steps, capacity):
    """Reference: HBM hits per step of an LRU that never evicts the current step's experts."""
    lru, hits = [], []
    for ids in steps:
        hits.append(sum(e in lru for e in ids))
        for e in ids:
            if e in lru:
                lru.remove(e)
            elif len(lru) == capacity:
                lru.remove(next(v for v in lru if v not in ids))
            lru.append(e)
    return hits


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_experts, experts_per_step", [(8, 1), (16, 4), (64, 8), (5, 5)])
def test_steps_have_distinct_ids_in_range(kind, num_experts, experts_per_step):
    steps = access_pattern(kind, num_experts, 50, experts_per_step, seed=3)
    assert len(steps) == 50
    for ids in steps:
        assert len(ids) == len(set(ids)) == experts_per_step
        assert all(type(e) is int and 0 <= e < num_experts for e in ids)


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_pattern_other_seed_other_pattern(kind):
    a = access_pattern(kind, 32, 40, 4, seed=1)
    assert a == access_pattern(kind, 32, 40, 4, seed=1)
    assert a != access_pattern(kind, 32, 40, 4, seed=2)


@pytest.mark.parametrize("num_steps, num_games", [(400, 4), (10, 3), (7, 7), (5, 1)])
def test_game_blocks_tile_the_steps(num_steps, num_games):
    blocks = game_blocks(num_steps, num_games)
    assert len(blocks) == num_games
    assert [t for b in blocks for t in b] == list(range(num_steps))
    assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_sequential_games_reuse_a_small_working_set_per_game():
    n, k, games = 64, 4, 4
    steps = access_pattern("sequential_games", n, 400, k, num_games=games, seed=0)
    rand = access_pattern("random", n, 400, k, seed=0)
    size = working_set_size(n, k, games)
    assert 2 * k <= size <= n // 4
    unions = []
    for block in game_blocks(400, games):
        unions.append({e for t in block for e in steps[t]})
        assert len(unions[-1]) <= size               # a game stays within its favourites
        assert len({e for t in block for e in rand[t]}) >= 0.9 * n  # random touches ~all
    assert len(set.union(*unions)) > size            # different games prefer different experts


def test_zipf_is_skewed_and_random_is_not():
    counts = {kind: Counter(e for ids in access_pattern(kind, 64, 2000, 4, seed=0) for e in ids)
              for kind in ("zipf", "random")}
    mean = 2000 * 4 / 64
    assert max(counts["zipf"].values()) > 4 * mean
    assert max(counts["random"].values()) < 1.5 * mean
    assert len(counts["random"]) == 64


@pytest.mark.parametrize("args, kwargs, message", [
    (("lru_friendly", 8, 10, 2), {}, "unknown access pattern"),
    (("random", 8, 10, 9), {}, "experts_per_step"),
    (("zipf", 8, 10, 0), {}, "experts_per_step"),
    (("random", 0, 10, 1), {}, "num_experts"),
    (("random", 8, 0, 1), {}, "num_steps"),
    (("random", 8, 10, 2.0), {}, "experts_per_step"),
    (("sequential_games", 8, 3, 2), {"num_games": 4}, "num_games"),
    (("sequential_games", 8, 10, 2), {"num_games": 0}, "num_games"),
])
def test_bad_arguments_raise_value_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        access_pattern(*args, **kwargs)


@pytest.mark.parametrize("kind", KINDS)
def test_replay_records_agree_with_store_counters_and_reference_lru(kind):
    steps = access_pattern(kind, 24, 120, 3, seed=5)
    with TieredExpertStore(24, 4, 8, hbm_capacity=6, dram_capacity=12, device="cpu") as store:
        store.get_experts([0, 1])           # earlier traffic must not leak into the records
        before = store.get_stats_summary()
        records = replay(store, steps)
        after = store.get_stats_summary()
    assert [r["step"] for r in records] == list(range(120))
    for key in ("accesses", "hbm_hits", "dram_hits", "file_reads"):
        assert sum(r[key] for r in records) == after[key] - before[key]
    assert [r["hbm_hits"] for r in records] == hbm_hits_per_step([[0, 1]] + steps, 6)[1:]
    for r in records:
        assert r["accesses"] == r["hbm_hits"] + r["dram_hits"] + r["file_reads"] == 3
        assert r["hit_rate"] == pytest.approx(r["hbm_hits"] / 3)
    total_hits = sum(r["hbm_hits"] for r in records)
    assert records[-1]["cumulative_hit_rate"] == pytest.approx(total_hits / (3 * 120))
    for link in LINKS:
        assert records[-1][f"bytes_{link}"] == after[f"bytes_{link}"] - before[f"bytes_{link}"]


def test_oracle_prefetch_needs_room_for_two_steps():
    steps = access_pattern("random", 32, 60, 4, seed=0)
    with TieredExpertStore(32, 4, 8, hbm_capacity=8, dram_capacity=16, device="cpu") as store:
        records = replay(store, steps, prefetch_next=True)
        stats = store.get_stats_summary()
    # every expert a prefetch moved up was used; those already in HBM needed no prefetch
    assert stats["prefetch_hits"] == stats["prefetches_issued"] == stats["prefetches_used"] > 0
    assert stats["prefetches_wasted"] == stats["prefetches_dropped"] == 0
    assert records[0]["hit_rate"] == 0 and all(r["hit_rate"] == 1 for r in records[1:])
    # with one step's worth of HBM every prefetch would evict experts in use: all are dropped
    # (except those the next step shares with the current one: they are already in HBM)
    with TieredExpertStore(32, 4, 8, hbm_capacity=4, dram_capacity=16, device="cpu") as store:
        squeezed = replay(store, steps, prefetch_next=True)
        dropped = store.get_stats_summary()["prefetches_dropped"]
    assert dropped == sum(len(set(b) - set(a)) for a, b in zip(steps, steps[1:])) > 0
    plain, _ = replay_pattern("random", 4, 16, num_experts=32, num_steps=60, expert_dim=4,
                              hidden_dim=8)
    assert [r["hit_rate"] for r in squeezed] == [r["hit_rate"] for r in plain]


def test_training_replay_writes_evicted_experts_back():
    kwargs = dict(num_experts=32, num_steps=100, experts_per_step=4)
    reads, clean = replay_pattern("random", 4, 8, **kwargs)
    _, dirty = replay_pattern("random", 4, 8, mark_dirty=True, **kwargs)
    assert clean["bytes_hbm_to_dram"] == clean["bytes_dram_to_file"] == 0
    assert dirty["bytes_hbm_to_dram"] == dirty["hbm_evictions"] * dirty["record_bytes"]
    assert dirty["bytes_dram_to_file"] == dirty["dram_evictions"] * dirty["record_bytes"]
    assert dirty["hit_rate"] == clean["hit_rate"] and len(reads) == 100
