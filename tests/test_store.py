"""Behaviour of TieredExpertStore: tiers, write-back, prefetch, errors, threads, failures."""

import os
import threading

import numpy as np
import pytest
import torch

from ooc_moe import TieredExpertStore, TransferError
from ooc_moe.store.file_tier import BACKENDS
from reference import read_file_records

N, DIM, HIDDEN = 12, 4, 8


@pytest.fixture
def store(tmp_path):
    with TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", path=tmp_path, seed=0) as s:
        yield s


def flat(expert: dict) -> torch.Tensor:
    return torch.cat([expert[k].reshape(-1) for k in ("w1", "b1", "w2", "b2")])


def test_initialisation_follows_the_prototype_and_the_seed(tmp_path):
    with TieredExpertStore(64, 32, 64, 2, 4, "cpu", path=tmp_path / "a", seed=7) as a, \
            TieredExpertStore(64, 32, 64, 2, 4, "cpu", path=tmp_path / "b", seed=7) as b, \
            TieredExpertStore(64, 32, 64, 2, 4, "cpu", path=tmp_path / "c", seed=8) as c:
        e = a.read_expert(5)
        assert e["w1"].shape == (64, 32) and e["w2"].shape == (32, 64)
        assert e["b1"].abs().sum() == 0 and e["b2"].abs().sum() == 0
        weights = torch.cat([a.read_expert(i)["w1"].reshape(-1) for i in range(64)])
        assert abs(weights.std().item() - 0.02) < 0.001 and abs(weights.mean().item()) < 0.001
        assert torch.equal(flat(a.read_expert(3)), flat(b.read_expert(3)))
        assert not torch.equal(flat(a.read_expert(3)), flat(c.read_expert(3)))


def test_experts_are_views_of_hbm_slots_and_promotion_goes_through_dram(store):
    assert store.where(3) == "file"
    expert = store.get_experts([3])[3]
    assert store.where(3) == "hbm" and 3 in store._plan.dram_of  # inclusive hierarchy
    assert expert.w1.shape == (HIDDEN, DIM) and expert.w1.device == store.device
    slot = store._engine.hbm_pool[store._plan.hbm_of[3]]
    assert expert.w1.data_ptr() == slot.data_ptr()
    expert.b2.fill_(5.0)
    assert torch.all(store.read_expert(3)["b2"] == 5.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dirty_records_survive_eviction_through_both_tiers_and_reopen(tmp_path, backend):
    with TieredExpertStore(N, DIM, HIDDEN, 2, 3, "cpu", path=tmp_path,
                           file_backend=backend) as s:
        before = flat(s.read_expert(0))
        s.get_experts([0])[0].w2.add_(1.5)
        s.mark_dirty([0])
        for e in range(1, N):          # push 0 out of HBM, then out of DRAM
            s.get_experts([e])
        assert s.where(0) == "file"
        stats = s.get_stats_summary()
        assert stats["bytes_hbm_to_dram"] == s.record_bytes
        assert stats["bytes_dram_to_file"] == s.record_bytes
        after = flat(s.read_expert(0))
    expected = before.clone()
    expected[2 * DIM * HIDDEN - DIM * HIDDEN + HIDDEN: 2 * DIM * HIDDEN + HIDDEN] += 1.5
    assert torch.equal(after, expected)
    assert np.array_equal(read_file_records(tmp_path)[0], expected.numpy())
    with TieredExpertStore.open(tmp_path, "cpu", hbm_capacity=2, dram_capacity=3,
                                file_backend=backend) as s:
        assert torch.equal(flat(s.read_expert(0)), expected)


def test_clean_evictions_move_no_bytes(store):
    for e in range(N):
        store.get_experts([e])
    stats = store.get_stats_summary()
    assert stats["hbm_evictions"] == N - 2 and stats["dram_evictions"] == N - 4
    assert stats["bytes_hbm_to_dram"] == 0 and stats["bytes_dram_to_file"] == 0
    assert stats["bytes_file_to_dram"] == N * store.record_bytes


def test_counters_add_up_and_keep_the_prototype_keys(store):
    for step in ([0, 1], [0, 1], [2, 3], [0, 1], [4]):
        store.get_experts(step)
    s = store.get_stats_summary()
    for key in ("hit_rate", "total_hits", "total_misses", "prefetch_hits", "evictions",
                "hbm_occupancy"):
        assert key in s
    assert s["total_hits"] + s["total_misses"] == s["accesses"] == 9
    assert (s["hbm_hits"], s["dram_hits"], s["file_reads"]) == (2, 2, 5)
    assert s["hit_rate"] == pytest.approx(2 / 9) and s["hbm_occupancy"] == 1.0


def test_prefetch_hits_and_never_evicts_experts_in_use(store):
    in_use = store.get_experts([0, 1])
    store.prefetch([2, 3])                     # HBM holds 2: both slots are in use
    store.synchronize()
    assert store.where(0) == store.where(1) == "hbm"
    assert store.stats.prefetches_dropped == 2
    in_use[0].w1.add_(1.0)                     # still valid
    store.get_experts([4])                     # releases 0 and 1
    store.prefetch([5])
    store.synchronize()
    assert store.where(5) == "hbm"
    store.get_experts([5])
    s = store.get_stats_summary()
    assert s["prefetch_hits"] == 1 and s["prefetches_used"] == 1 and s["prefetches_issued"] == 1


def test_prefetch_to_dram_then_get_is_a_dram_hit(store):
    store.prefetch([7, 8], tier="dram")
    store.synchronize()
    assert store.where(7) == "dram"
    store.get_experts([7])
    s = store.get_stats_summary()
    assert s["dram_hits"] == 1 and s["prefetches_used"] == 1 and s["bytes_file_to_dram"] == \
        2 * store.record_bytes


def test_unused_prefetches_count_as_wasted(store):
    store.prefetch([0, 1])
    store.get_experts([2, 3])                  # evicts both prefetched experts from HBM
    assert store.stats.prefetches_wasted == 2


def test_pinned_experts_stay_resident(store):
    with store.pinned([0]) as experts:
        for e in range(1, N):
            store.get_experts([e])
            assert store.where(0) == "hbm"
        with pytest.raises(ValueError, match="needs 3 HBM slots .2 requested, 1 more pinned"):
            store.get_experts([1, 2])          # one slot is pinned
        experts[0].w1.zero_()
    store.get_experts([1, 2])
    with pytest.raises(ValueError, match="not pinned"):
        store.unpin([0])


def test_more_experts_than_hbm_is_a_clear_error(store):
    with pytest.raises(ValueError, match="hbm_capacity is 2.*waves"):
        store.get_experts([0, 1, 2])
    assert store.get_stats_summary()["accesses"] == 0


@pytest.mark.parametrize("ids, error, match", [
    ([N], ValueError, "out of range"),
    ([-1], ValueError, "out of range"),
    (["a"], TypeError, "must be ints"),
    ([1.0], TypeError, "must be ints"),
    ([True], TypeError, "must be ints"),
    (3, TypeError, "bare int"),
])
def test_bad_ids_raise_and_change_nothing(store, ids, error, match):
    with pytest.raises(error, match=match):
        store.get_experts(ids)
    with pytest.raises(error, match=match):
        store.prefetch(ids)
    assert store.get_stats_summary()["accesses"] == 0


def test_ids_may_be_numpy_or_torch_integers(store):
    assert set(store.get_experts(np.array([1, 2]))) == {1, 2}
    assert set(store.get_experts(torch.tensor([[3], [3]]))) == {3}


@pytest.mark.parametrize("hbm, dram, match", [
    (0, 4, "hbm_capacity must be an int >= 1"),
    (2, 0, "dram_capacity must be an int >= 1"),
    (N + 1, N + 1, "larger than num_experts"),
    (2, N + 1, "larger than num_experts"),
    (4, 2, "inclusive"),
    (2.5, 4, "must be an int"),
])
def test_impossible_capacities(tmp_path, hbm, dram, match):
    with pytest.raises(ValueError, match=match):
        TieredExpertStore(N, DIM, HIDDEN, hbm, dram, "cpu", path=tmp_path)
    assert not (tmp_path / "experts.bin").exists()


def test_unwritable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match="writable path"):
        TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", path=blocker / "experts")
    if os.geteuid() != 0:      # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(ValueError, match="not writable"):
            TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", path=ro)


def test_existing_file_is_not_overwritten_by_accident(tmp_path):
    with TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", path=tmp_path, seed=1) as s:
        kept = flat(s.read_expert(0))
    with pytest.raises(FileExistsError, match="TieredExpertStore.open"):
        TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", path=tmp_path, seed=2)
    with TieredExpertStore.open(tmp_path, "cpu", hbm_capacity=2, dram_capacity=4) as s:
        assert torch.equal(flat(s.read_expert(0)), kept)
    with TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", path=tmp_path, seed=2,
                           overwrite=True) as s:
        assert not torch.equal(flat(s.read_expert(0)), kept)


def test_reopening_a_file_of_another_shape_is_a_clear_error(tmp_path):
    TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", path=tmp_path).shutdown()
    original = (tmp_path / "experts.bin").read_bytes()
    with pytest.raises(ValueError, match="hidden_dim=8, not 16"):
        TieredExpertStore.open(tmp_path, "cpu", hbm_capacity=2, dram_capacity=4, hidden_dim=16)
    with pytest.raises(ValueError, match="dtype=float32, not float16"):
        TieredExpertStore.open(tmp_path, "cpu", hbm_capacity=2, dram_capacity=4,
                               dtype=torch.float16)
    with pytest.raises(ValueError, match="larger than num_experts"):
        TieredExpertStore.open(tmp_path, "cpu", hbm_capacity=2, dram_capacity=N + 1)
    assert (tmp_path / "experts.bin").read_bytes() == original
    with open(tmp_path / "experts.bin", "ab") as f:
        f.write(b"\0" * 4)
    with pytest.raises(ValueError, match="truncated or not this store's"):
        TieredExpertStore.open(tmp_path, "cpu", hbm_capacity=2, dram_capacity=4)
    with pytest.raises(FileNotFoundError, match="holds no expert store"):
        TieredExpertStore.open(tmp_path / "nowhere")


def test_use_after_shutdown_is_a_clear_error(tmp_path):
    s = TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", path=tmp_path)
    s.shutdown()
    s.shutdown()  # idempotent
    for call in (lambda: s.get_experts([0]), lambda: s.prefetch([0]), s.flush,
                 lambda: s.read_expert(0), lambda: s.mark_dirty([0])):
        with pytest.raises(RuntimeError, match="shut down.*open"):
            call()


def test_temporary_directory_is_removed_at_shutdown():
    s = TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu")
    path = s.path
    assert (path / "experts.bin").stat().st_size == -(-N * s.record_bytes // 4096) * 4096
    s.shutdown()
    assert not path.exists()


def test_mark_dirty_needs_an_hbm_resident_expert(store):
    with pytest.raises(ValueError, match="not in HBM"):
        store.mark_dirty([0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_records_round_trip(tmp_path, backend):
    with TieredExpertStore(N, DIM, HIDDEN, 1, 2, "cpu", path=tmp_path, file_backend=backend,
                           dtype=torch.bfloat16) as s:
        s.get_experts([0])[0].b1.fill_(0.5)
        s.mark_dirty([0])
        for e in range(1, 4):
            s.get_experts([e])
    with TieredExpertStore.open(tmp_path, "cpu", hbm_capacity=1, dram_capacity=2,
                                file_backend=backend) as s:
        b1 = s.read_expert(0)["b1"]
        assert b1.dtype == torch.bfloat16 and torch.all(b1 == 0.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_prefetch_and_get_lose_nothing(tmp_path, backend):
    """A second thread prefetches at random while the main thread trains in place."""
    rng = np.random.default_rng(0)
    with TieredExpertStore(N, DIM, HIDDEN, 3, 5, "cpu", path=tmp_path,
                           file_backend=backend) as s:
        expected = {e: flat(s.read_expert(e)) for e in range(N)}
        stop = threading.Event()

        def prefetcher():
            r = np.random.default_rng(1)
            while not stop.is_set():
                s.prefetch(r.choice(N, 2, replace=False).tolist(),
                           tier=str(r.choice(["hbm", "dram"])))

        thread = threading.Thread(target=prefetcher)
        thread.start()
        try:
            for _ in range(400):
                ids = rng.choice(N, 2, replace=False).tolist()
                for e, expert in s.get_experts(ids).items():
                    expert.w1.add_(1.0)
                    expected[e][: DIM * HIDDEN] += 1.0
                s.mark_dirty(ids)
        finally:
            stop.set()
            thread.join()
        s.synchronize()
        assert s.stats.prefetches_issued > 0
        for e in range(N):
            assert torch.equal(flat(s.read_expert(e)), expected[e])
    assert np.array_equal(read_file_records(tmp_path),
                          torch.stack([expected[e] for e in range(N)]).numpy())


def test_failing_prefetch_loses_nothing_and_surfaces_on_the_next_call(tmp_path, monkeypatch):
    with TieredExpertStore(N, DIM, HIDDEN, 2, 2, "cpu", path=tmp_path) as s:
        s.get_experts([0])[0].w1.fill_(3.0)     # dirty in HBM ...
        s.mark_dirty([0])
        s.get_experts([1])[1].w1.fill_(4.0)
        s.mark_dirty([1])
        original_read = s._file.read_into

        def broken_read(e, row):
            if e == 5:
                raise OSError("injected read error")
            original_read(e, row)

        monkeypatch.setattr(s._file, "read_into", broken_read)
        s.get_experts([2])                       # ... 0 written down to DRAM, then the file
        s.prefetch([5])                          # evicts 1 (dirty) and fails reading 5
        s._engine.drain()                        # let the worker fail before the next call
        with pytest.raises(TransferError, match="injected read error"):
            s.get_experts([3])
        s._plan.check()
        assert s.where(5) == "file"
        monkeypatch.setattr(s._file, "read_into", original_read)
        assert torch.all(s.read_expert(0)["w1"] == 3.0)
        assert torch.all(s.read_expert(1)["w1"] == 4.0)
        assert torch.all(s.get_experts([5, 1])[1].w1 == 4.0)
    with TieredExpertStore.open(tmp_path, "cpu", hbm_capacity=2, dram_capacity=2) as s:
        assert torch.all(s.read_expert(1)["w1"] == 4.0)


def test_failing_write_back_keeps_the_dirty_record(tmp_path, monkeypatch):
    with TieredExpertStore(N, DIM, HIDDEN, 1, 1, "cpu", path=tmp_path) as s:
        s.get_experts([0])[0].b1.fill_(7.0)
        s.mark_dirty([0])
        original_write = s._file.write_from
        monkeypatch.setattr(s._file, "write_from",
                            lambda e, row: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            s.get_experts([1])                  # demand fetch must write 0 back first
        s._plan.check()
        assert torch.all(s.read_expert(0)["b1"] == 7.0)
        monkeypatch.setattr(s._file, "write_from", original_write)
        s.get_experts([1])
        assert s.where(0) == "file"
        assert torch.all(s.read_expert(0)["b1"] == 7.0)


def test_where_and_is_dirty_check_their_input(store):
    with pytest.raises(ValueError, match="out of range"):
        store.where(N)
    store.get_experts([1])[1].b1.add_(1.0)
    assert not store.is_dirty(2)
    store.mark_dirty([1])
    assert store.is_dirty(1) and store.where(1) == "hbm"
    store.flush()
    assert not store.is_dirty(1)


def test_open_caps_its_default_capacities_at_the_expert_count(tmp_path):
    TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", path=tmp_path).shutdown()
    with TieredExpertStore.open(tmp_path, "cpu") as s:
        assert (s.hbm_capacity, s.dram_capacity) == (N, N)


def test_prefetch_returns_what_it_accepted_and_prefetch_slots_counts_free_slots(store):
    store.get_experts([0])
    assert store.prefetch_slots == 1                       # 2 slots, expert 0 in use
    assert store.prefetch([0, 1, 2]) == [0, 1]             # 0 resident, 1 fits, 2 dropped
    assert store.stats.prefetches_dropped == 1


def test_init_ids_give_a_shard_the_experts_of_the_whole_pool(tmp_path):
    with TieredExpertStore(6, 4, 8, 2, 6, "cpu", seed=4) as pool, \
            TieredExpertStore(3, 4, 8, 1, 3, "cpu", seed=4, init_ids=[1, 3, 5]) as shard:
        for i, e in enumerate([1, 3, 5]):
            assert torch.equal(shard.read_expert(i)["w1"], pool.read_expert(e)["w1"])
    for bad in ([0, 0, 1], [0, 1], [-1, 0, 1]):
        with pytest.raises(ValueError, match="init_ids must be 3 distinct ids"):
            TieredExpertStore(3, 4, 8, 1, 3, "cpu", init_ids=bad)
