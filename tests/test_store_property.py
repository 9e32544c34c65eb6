"""Random sequences of store operations against a plain dict of values and a list-based LRU."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ooc_moe import TieredExpertStore
from ooc_moe.store.file_tier import BACKENDS
from reference import ListLRU, read_file_records

N, DIM, HIDDEN = 10, 3, 5

ids = st.lists(st.integers(0, N - 1), min_size=1, max_size=4)
ops = st.lists(st.one_of(
    st.tuples(st.just("get"), ids),
    st.tuples(st.just("modify"), ids, st.integers(1, 9)),
    st.tuples(st.just("prefetch"), ids, st.sampled_from(["hbm", "dram"])),
    st.tuples(st.just("flush")),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("sync")),
    # expect calls, then make the first of them (modifying every other one), as a layer does
    st.tuples(st.just("expect"), st.lists(ids, min_size=1, max_size=4), st.integers(0, 4)),
), min_size=1, max_size=40)


def _expanded(ops):
    """``ops`` with each ``("expect", calls, k)`` followed by the first ``k`` of its calls."""
    for op in ops:
        yield op[:2] if op[0] == "expect" else op
        if op[0] == "expect":
            for i, call in enumerate(op[1][:op[2]]):
                yield ("modify", call, i + 1) if i % 2 else ("get", call)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(ops=ops, hbm=st.integers(1, 4), extra_dram=st.integers(0, 4))
def test_store_matches_dict_and_reference_lru(tmp_path_factory, backend, ops, hbm, extra_dram):
    path = tmp_path_factory.mktemp("store")
    dram = min(hbm + extra_dram, N)
    store = TieredExpertStore(N, DIM, HIDDEN, hbm, dram, "cpu", path=path, seed=1,
                              file_backend=backend)
    values = {e: torch.from_numpy(row.copy()) for e, row in enumerate(read_file_records(path))}
    lru = ListLRU(hbm, dram)
    try:
        for op in _expanded(ops):
            kind = op[0]
            if kind in ("get", "modify"):
                request = op[1][:hbm]
                experts = store.get_experts(request)
                lru.get(request)
                assert set(experts) == set(request)
                if kind == "modify":
                    for e, expert in experts.items():
                        expert.w1.add_(op[2])
                        expert.b2.sub_(op[2])
                        values[e][: DIM * HIDDEN] += op[2]
                        values[e][-DIM:] -= op[2]
                    store.mark_dirty(request)
            elif kind == "prefetch":
                store.prefetch(op[1], tier=op[2])
                lru.prefetch(op[1], op[2])
            elif kind == "expect":    # evictions by the known future (a layer's waves)
                calls = [call[:hbm] for call in op[1]]
                store.expect(calls)
                lru.expect(calls)
            elif kind == "flush":
                store.flush()
                assert np.array_equal(read_file_records(path),
                                      torch.stack([values[e] for e in range(N)]).numpy())
            elif kind == "sync":
                store.synchronize()
                store._engine.data.check()
                assert store._engine.data.hbm_of == store._plan.hbm_of  # nothing in flight
            else:
                store.shutdown()
                store = TieredExpertStore.open(path, "cpu", hbm_capacity=hbm,
                                               dram_capacity=dram, file_backend=backend)
                lru = ListLRU(hbm, dram)
            store._plan.check()  # prefetches may still be in flight: checked at "sync"
            assert sorted(store._plan.hbm_of) == sorted(lru.hbm)
            assert sorted(store._plan.dram_of) == sorted(lru.dram)
            stats = store.get_stats_summary()
            for key, count in lru.counts.items():
                assert stats[key] == count, key
            assert stats["total_hits"] + stats["total_misses"] == stats["accesses"]
            assert stats["prefetches_issued"] >= stats["prefetches_used"] + stats["prefetches_wasted"]
        for e in range(N):
            got = store.read_expert(e)
            assert torch.equal(torch.cat([got[k].reshape(-1) for k in ("w1", "b1", "w2", "b2")]),
                               values[e])
    finally:
        store.shutdown()
    assert np.array_equal(read_file_records(path), torch.stack([values[e] for e in range(N)]).numpy())
