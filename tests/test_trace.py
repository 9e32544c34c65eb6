"""The simulator reproduces the real store exactly; Belady is optimal; traces round-trip."""

from functools import lru_cache

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ooc_moe import ExpertOptimizer, TieredExpertStore, TieredMoELayer
from ooc_moe.store.stats import PHASES
from ooc_moe.trace import RoutingTrace, simulate
from reference import ListLRU

N = 10
COUNTERS = ("accesses", "hbm_hits", "dram_hits", "file_reads", "prefetch_hits",
            "prefetches_issued", "prefetches_used", "prefetches_wasted", "prefetches_dropped",
            "hbm_evictions", "dram_evictions")
LINKS = ("file_to_dram", "dram_to_hbm", "hbm_to_dram", "dram_to_file")


def assert_reproduces(store, trace):
    result = simulate(trace, store.hbm_capacity, store.dram_capacity, "lru",
                      record_bytes=store.record_bytes)
    stats = store.get_stats_summary()
    for key in COUNTERS:
        assert getattr(result, key) == stats[key], key
    for link in LINKS:
        assert result.bytes_moved[link] == stats[f"bytes_{link}"], link
    assert result.hit_rate == stats["hit_rate"]
    ours = {p: {k: v for k, v in c.items() if k != "stall_seconds"}
            for p, c in store.stats_by_phase().items()}
    replayed = {p: {k: v for k, v in c.items() if k != "stall_seconds"}
                for p, c in result.by_phase.items()}
    assert ours == replayed                          # phase by phase, every counter
    for key in (*COUNTERS, *(f"bytes_{link}" for link in LINKS)):
        assert sum(c[key] for c in ours.values()) == stats[key], key
    return result


ids = st.lists(st.integers(0, N - 1), min_size=1, max_size=4)
calls = st.lists(st.one_of(
    st.tuples(st.just("get"), ids), st.tuples(st.just("train"), ids),
    st.tuples(st.just("prefetch"), ids, st.sampled_from(["hbm", "dram"])),
    st.tuples(st.just("flush")),
    st.tuples(st.just("expect"), st.lists(ids, min_size=1, max_size=3))), min_size=1, max_size=30)
phases = st.lists(st.sampled_from(PHASES), min_size=30, max_size=30)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(calls=calls, hbm=st.integers(1, 4), extra=st.integers(0, 4), phases=phases)
def test_simulator_reproduces_the_store_exactly(calls, hbm, extra, phases):
    trace = RoutingTrace()
    with TieredExpertStore(N, 2, 3, hbm, min(N, hbm + extra), "cpu") as store:
        store.trace = trace
        for step, (call, phase) in enumerate(zip(calls, phases)):
            trace.begin_step(game=step % 2)
            with store.in_phase(phase):
                if call[0] in ("get", "train"):
                    store.get_experts(call[1][:hbm])
                    if call[0] == "train":
                        store.mark_dirty(call[1][:hbm])
                elif call[0] == "prefetch":
                    store.prefetch(call[1], tier=call[2])
                elif call[0] == "expect":      # then the calls themselves, as a layer does
                    store.expect([c[:hbm] for c in call[1]])
                    for c in call[1][:2]:
                        store.get_experts(c[:hbm])
                else:
                    store.flush()
        store.synchronize()
        assert_reproduces(store, trace)


def test_phases_split_the_counters_and_restore_the_previous_phase():
    with TieredExpertStore(N, 2, 3, 2, 4, "cpu") as store:
        assert store.phase == "other"
        with store.in_phase("rollout"):
            store.get_experts([0, 1])                    # two file reads
            with store.in_phase("update"):
                store.get_experts([1, 2])                # a hit and a file read
            assert store.phase == "rollout"
            store.get_experts([2])                       # a hit
        assert store.phase == "other"
        by_phase = store.stats_by_phase()
        assert set(by_phase) == {"rollout", "update"}
        assert (by_phase["rollout"]["accesses"], by_phase["rollout"]["hbm_hits"]) == (3, 1)
        assert (by_phase["update"]["accesses"], by_phase["update"]["hbm_hits"]) == (2, 1)
        assert by_phase["rollout"]["bytes_file_to_dram"] == 2 * store.record_bytes
        with pytest.raises(ValueError, match="unknown phase 'train'"):
            with store.in_phase("train"):
                pass
        assert store.phase == "other"
        store.reset_stats()
        assert store.stats_by_phase() == {}


def two_layer_training(num_experts: int, hbm: int, dram: int, steps: int, tokens: int,
                       steps_per_game: int) -> tuple[RoutingTrace, object]:
    """Two layers sharing one store, trained on random tokens and flushed; returns the trace
    and its replay, checked against the store's own counters."""
    trace = RoutingTrace()
    with TieredExpertStore(num_experts, 8, 16, hbm, dram, "cpu", optimizer_state=True) as store:
        store.trace = trace
        torch.manual_seed(0)
        layers = [TieredMoELayer(8, 16, store, top_k=2, dropout=0.0) for _ in range(2)]
        opt = ExpertOptimizer(store)
        for step in range(steps):
            trace.begin_step(game=step // steps_per_game)
            h = torch.randn(tokens, 8)
            for layer in layers:
                h, aux = layer(h)
                trace.record_layer(layer.last_routing.expert_indices.unique().tolist())
            (h.square().mean() + aux).backward()
            opt.step()
        store.flush()
        return trace, assert_reproduces(store, trace)


def test_simulator_reproduces_a_real_moe_training_run():
    """Waves, backward re-gathering, prefetches and optimizer updates of two shared layers."""
    trace, result = two_layer_training(12, 3, 6, steps=6, tokens=32, steps_per_game=3)
    assert result.prefetches_issued > 0 and result.bytes_moved["dram_to_file"] > 0
    assert len(trace.layers) == 6 and all(len(step) == 2 for step in trace.layers)


def _future_dropped(events) -> int:
    """How many times a ``get`` of ``events`` did not match the next expected call."""
    future, dropped = [], 0
    for kind, ids, _ in events:
        if kind == "expect":
            future.insert(0, set(ids))
        elif kind == "get" and future:
            if future.pop(0) != set(ids):
                future, dropped = [], dropped + 1
    return dropped


def test_layers_expect_exactly_the_fetches_to_come_and_that_saves_copies():
    """Two layers sharing a store too small for a step: every expectation a layer (and the
    optimizer) gives comes true in order, and the known future saves copies over plain LRU
    on the same trace, staying within Belady's."""
    trace, _ = two_layer_training(8, 3, 8, steps=20, tokens=4, steps_per_game=20)
    assert sum(kind == "expect" for kind, _, _ in trace.events) > 40
    assert _future_dropped(trace.events) == 0
    copies = {name: simulate(trace, 3, 8, policy, hints=hints).moves["dram_to_hbm"]
              for name, policy, hints in (("hinted", "lru", True), ("lru", "lru", False),
                                          ("belady", "belady", True))}
    assert copies["belady"] <= copies["hinted"] < copies["lru"], copies


def test_a_known_future_keeps_the_expert_needed_next():
    """By hand: HBM holds 2. After 0 then 1, LRU would evict 0 for 2; told that 0 comes
    right after 2, the store evicts 1 instead, and 0 is a hit. A call that was not expected
    drops the future: LRU again."""
    for expect, then, evicted in (([[2], [0]], [2], 1), ([[2], [0]], [3], 0)):
        with TieredExpertStore(4, 2, 3, 2, 4, "cpu") as store:
            store.get_experts([0])
            store.get_experts([1])
            store.expect(expect)
            store.get_experts(then)
            assert store.where(evicted) == "dram"
            assert {store.where(e) for e in {0, 1} - {evicted}} == {"hbm"}
    with TieredExpertStore(4, 2, 3, 2, 4, "cpu") as store:
        with pytest.raises(ValueError, match="expert id"):
            store.expect([[0], [9]])


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.lists(st.integers(0, 7), min_size=1, max_size=3), max_size=40),
       hbm=st.integers(3, 5), extra=st.integers(0, 3))
def test_lru_matches_an_independent_list_model(steps, hbm, extra):
    lru = ListLRU(hbm, hbm + extra)
    for step in steps:
        lru.get(step)
    result = simulate(steps, hbm, hbm + extra, "lru")
    for key, count in lru.counts.items():
        assert getattr(result, key) == count, key


def brute_force_hits(accesses: tuple, capacity: int) -> int:
    """The most hits any eviction choices achieve (one access at a time)."""
    @lru_cache(maxsize=None)
    def best(i: int, cache: frozenset) -> int:
        if i == len(accesses):
            return 0
        e = accesses[i]
        if e in cache:
            return 1 + best(i + 1, cache)
        if len(cache) < capacity:
            return best(i + 1, cache | {e})
        return max(best(i + 1, (cache - {v}) | {e}) for v in cache)
    return best(0, frozenset())


@settings(max_examples=300, deadline=None)
@given(accesses=st.lists(st.integers(0, 5), max_size=14), capacity=st.integers(1, 4))
def test_belady_is_optimal(accesses, capacity):
    result = simulate([[e] for e in accesses], capacity, policy="belady")
    assert result.hbm_hits == brute_force_hits(tuple(accesses), capacity)


@settings(max_examples=200, deadline=None)
@given(steps=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=3), max_size=40),
       hbm=st.integers(3, 6))
def test_belady_bounds_lru_and_lfu_on_multi_expert_steps(steps, hbm):
    best = simulate(steps, hbm, policy="belady").hbm_hits
    assert best >= simulate(steps, hbm, policy="lru").hbm_hits
    assert best >= simulate(steps, hbm, policy="lfu").hbm_hits


def test_hand_computed_lru_lfu_belady():
    steps = [[0], [1], [0], [2], [0], [1], [3], [0]]
    # capacity 2. LRU: 0m 1m 0h 2m(ev 1) 0h 1m(ev 2) 3m(ev 0) 0m(ev 1) -> 2 hits
    assert simulate(steps, 2, policy="lru").hbm_hits == 2
    # LFU: ... 2m evicts 1 (1 use vs 0's 2), 0h, 1m evicts 2, 3m evicts 1, 0h -> 3 hits
    assert simulate(steps, 2, policy="lfu").hbm_hits == 3
    # Belady: 2m evicts 1 (next use 5 vs 4), 0h, 1m evicts 2 (never again), 3m evicts 1, 0h
    assert simulate(steps, 2, policy="belady").hbm_hits == 3


def test_prefetch_replay_precision_and_coverage():
    steps = [[0, 1], [2, 3], [0, 1], [4, 5]]
    oracle = simulate(steps, 4, prefetch=[[]] + steps[1:])
    assert oracle.prefetches_issued == 4 and oracle.prefetch_hits == 4
    assert oracle.prefetch_precision == 1.0
    assert oracle.prefetch_coverage == pytest.approx(4 / (4 + 2))  # only step 0 missed
    wrong = simulate(steps, 4, prefetch=[[6, 7], [6, 7], [], []])
    assert wrong.prefetch_precision == 0.0 and wrong.prefetches_wasted == 2


def test_bytes_and_modelled_seconds():
    result = simulate([[0], [1], [2]], 1, 2, record_bytes=100)
    assert result.bytes_moved == {"file_to_dram": 300, "dram_to_hbm": 300, "hbm_to_dram": 0,
                                  "dram_to_file": 0}
    assert result.transfer_seconds == pytest.approx(300 / 3.1e9 + 300 / 20.9e9)


def test_trace_round_trips_through_npz(tmp_path):
    trace = RoutingTrace()
    with TieredExpertStore(N, 2, 3, 2, 4, "cpu") as store:
        store.trace = trace
        for step, ids in enumerate(([0, 1], [2], [3, 4])):
            trace.begin_step(step % 2)
            trace.record_prefetch([ids[0]])
            with store.in_phase("rollout"):
                store.prefetch([ids[0]])
            store.get_experts(ids)
            store.mark_dirty(ids)
            trace.record_layer(ids)
            trace.record_layer(ids[::-1])
    trace.save(tmp_path / "trace.npz")
    loaded = RoutingTrace.load(tmp_path / "trace.npz")
    assert loaded == trace
    assert simulate(loaded, 2, 4).__dict__ == simulate(trace, 2, 4).__dict__


def test_bad_input():
    with pytest.raises(ValueError, match="policy must be one of"):
        simulate([[0]], 1, policy="fifo")
    with pytest.raises(ValueError, match="inclusive"):
        simulate([[0]], 3, 2)
    with pytest.raises(ValueError, match="uses 3 experts but hbm_capacity is 2"):
        simulate([[0, 1, 2]], 2)
    with pytest.raises(RuntimeError, match="begin_step"):
        RoutingTrace().record_layer([1])
