"""The store on a CUDA GPU: data races, overlap, pinned memory, leaks, streams and devices.

Every test here is marked ``cuda`` (skipped without a GPU). Race windows are widened on
purpose: ``torch.cuda._sleep`` delays the compute stream before each kernel that writes an
expert, and the copy stream before each copy, so a missing wait (the compute stream on a copy,
a copy on the compute stream's use of a slot, the host on a device-to-host copy) shows up as
wrong data, not as a one-in-a-million flake.
"""

import gc
import random
import subprocess
import sys
import threading
import time

import pytest
import torch

from ooc_moe import ExpertOptimizer, TieredExpertStore
from ooc_moe.store import transfer
from test_moe import DIM, E, HIDDEN, TOKENS, close, make_layer, reference_for, train

pytestmark = pytest.mark.cuda

SLEEP = 2_000_000        # GPU cycles, about a millisecond


@pytest.fixture
def slow_copies(monkeypatch):
    """Delay the copy stream before every copy (a slow PCIe link, exaggerated)."""
    copy = transfer.CudaCopies.copy

    def delayed(self, h, d, dst, src, after):
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            torch.cuda._sleep(SLEEP)
        copy(self, h, d, dst, src, after)

    monkeypatch.setattr(transfer.CudaCopies, "copy", delayed)


def _write(expert, value: float) -> None:
    """A late kernel that overwrites the whole expert on the current stream."""
    torch.cuda._sleep(SLEEP)
    for name in ("w1", "b1", "w2", "b2"):
        getattr(expert, name).fill_(value)


def _value(store, e: int) -> set:
    record = store.read_expert(e)
    return {v for name in ("w1", "b1", "w2", "b2") for v in record[name].unique().tolist()}


def test_random_operations_agree_with_a_cpu_shadow(tmp_path, slow_copies):
    """get / write in place / mark_dirty / prefetch / flush at random on 512x2048 records,
    HBM 4, DRAM 8, 32 experts, against a dict of the values each expert should hold."""
    rng = random.Random(0)
    store = TieredExpertStore(32, 512, 2048, 4, 8, "cuda", path=tmp_path)
    shadow: dict[int, float] = {}
    for step in range(400):
        op = rng.random()
        if op < 0.45:
            ids = rng.sample(range(32), rng.randint(1, 3))
            experts = store.get_experts(ids)
            for e in ids:
                if rng.random() < 0.6:
                    shadow[e] = float(step + 1)
                    _write(experts[e], shadow[e])
            store.mark_dirty([e for e in ids if shadow.get(e) == step + 1])
        elif op < 0.8:
            store.prefetch(rng.sample(range(32), rng.randint(1, 4)),
                           tier=rng.choice(["hbm", "dram"]))
        elif op < 0.9:
            store.flush()
        else:
            e = rng.choice(list(shadow) or [0])
            if e in shadow:
                assert _value(store, e) == {shadow[e]}, (step, e)
    store.flush()
    reopened = TieredExpertStore.open(tmp_path, "cuda", hbm_capacity=2, dram_capacity=2)
    for e, value in shadow.items():
        assert _value(store, e) == {value} and _value(reopened, e) == {value}, e
    reopened.shutdown()
    store.shutdown()


def test_a_slot_reused_while_its_copy_is_in_flight_gets_the_new_record(tmp_path, slow_copies):
    with TieredExpertStore(8, 256, 512, 1, 2, "cuda", path=tmp_path) as store:
        for e in range(8):
            _write(store.get_experts([e])[e], float(e))
            store.mark_dirty([e])
        for e in range(8):                   # each fetch reuses the slot the last one filled
            store.prefetch([e])
            assert _value(store, e) == {float(e)}
            expert = store.get_experts([(e + 1) % 8])[(e + 1) % 8]
            assert expert.b1.unique().tolist() == [float((e + 1) % 8)]


def test_a_prefetch_evicting_a_dirty_expert_waits_for_its_queued_kernel(tmp_path, slow_copies):
    with TieredExpertStore(8, 256, 512, 2, 2, "cuda", path=tmp_path) as store:
        store.get_experts([0, 1])
        a = store.get_experts([0])[0]
        torch.cuda._sleep(50 * SLEEP)       # the write of expert 0 is still queued ...
        _write(a, 42.0)
        store.mark_dirty([0])
        store.get_experts([1])               # 0 leaves use
        store.prefetch([2])                  # ... when this evicts it (HBM and DRAM: file)
        assert store.where(0) == "file"
        assert _value(store, 0) == {42.0}


def test_write_downs_do_not_block_the_host(tmp_path, monkeypatch):
    """A dirty eviction queues its device-to-host copy and returns."""
    copy = transfer.CudaCopies.copy

    def very_slow(self, h, d, dst, src, after):
        with torch.cuda.stream(self.stream):
            torch.cuda._sleep(200 * SLEEP)   # ~0.2 s before each copy
        copy(self, h, d, dst, src, after)

    with TieredExpertStore(8, 256, 512, 1, 4, "cuda", path=tmp_path) as store:
        store.get_experts([0])
        store.synchronize()
        _write(store.get_experts([0])[0], 1.0)
        store.mark_dirty([0])
        torch.cuda.synchronize()
        monkeypatch.setattr(transfer.CudaCopies, "copy", very_slow)
        start = time.perf_counter()
        store.get_experts([1])               # write 0 down, load 1: both queued
        queued = time.perf_counter() - start
        store.synchronize()
        done = time.perf_counter() - start
        assert queued < 0.1 < done, (queued, done)
        assert _value(store, 0) == {1.0}


def test_a_prefetch_into_a_free_slot_overlaps_a_running_kernel(tmp_path):
    with TieredExpertStore(16, 512, 2048, 8, 16, "cuda", path=tmp_path) as store:
        store.prefetch(list(range(8)), tier="dram")
        store.synchronize()
        store.get_experts([8])
        kernel_done = torch.cuda.Event()
        torch.cuda._sleep(500 * SLEEP)       # ~0.5 s of compute queued before the prefetch
        kernel_done.record()
        store.prefetch(list(range(4)))
        store._engine.drain()                # the copies are queued on the copy stream
        for e in range(4):
            store._copies.ready[store._plan.hbm_of[e]].synchronize()
        assert not kernel_done.query(), "the prefetch waited for unrelated compute"
        assert store.get_experts(list(range(4)))
        torch.cuda.synchronize()
        assert store.stats.prefetch_hits == 4


def test_synchronize_means_the_copies_are_done(tmp_path, slow_copies):
    with TieredExpertStore(8, 256, 512, 4, 8, "cuda", path=tmp_path) as store:
        store.prefetch([0, 1, 2, 3])
        store.synchronize()
        assert all(store._copies.ready[h].query() for h in range(4))


def test_a_second_thread_prefetching_while_compute_runs_on_its_own_stream(tmp_path,
                                                                         slow_copies):
    compute = torch.cuda.Stream()
    with torch.cuda.stream(compute):
        store = TieredExpertStore(16, 256, 512, 4, 8, "cuda", path=tmp_path)
    assert store.compute_stream == compute
    stop = threading.Event()

    def prefetcher():
        rng = random.Random(1)
        while not stop.is_set():
            store.prefetch(rng.sample(range(16), 2))
            time.sleep(0.001)

    thread = threading.Thread(target=prefetcher)
    thread.start()
    try:
        with torch.cuda.stream(compute):
            for step in range(200):
                e = step % 16
                _write(store.get_experts([e])[e], float(step))
                store.mark_dirty([e])
                if step >= 16:
                    assert _value(store, (step - 3) % 16) == {float(step - 3)}, step
    finally:
        stop.set()
        thread.join()
    for e in range(16):
        assert _value(store, e) == {float(max(s for s in range(200) if s % 16 == e))}
    store.shutdown()


def _host_allocator_bytes() -> int:
    """Bytes held by PyTorch's caching (pinned) host allocator."""
    stats = torch.cuda.host_memory_stats()
    return sum(v for k, v in stats.items() if k.startswith("allocated_bytes") and
               k.endswith("current"))


def test_pinned_bytes_are_exactly_the_pool(tmp_path):
    before = _host_allocator_bytes()
    with TieredExpertStore(24, 96, 200, 3, 11, "cuda", path=tmp_path) as store:
        pool = store._engine.dram_pool
        assert pool.is_pinned()
        assert store.pinned_bytes == 11 * store.record_bytes == pool.numel() * 4
        assert store.get_stats_summary()["pinned_bytes"] == store.pinned_bytes
        assert _host_allocator_bytes() == before, "the pool went through the caching host allocator"


def test_five_stores_created_and_dropped_free_their_memory(tmp_path):
    gc.collect()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    for i in range(5):
        store = TieredExpertStore(16, 512, 2048, 8, 16, "cuda", path=tmp_path / str(i))
        store.get_experts(list(range(8)))
        assert torch.cuda.memory_allocated() > baseline
        del store
        gc.collect()
        assert torch.cuda.memory_allocated() == baseline, i


@pytest.mark.parametrize("hbm", [1, 2, 3, E])
@pytest.mark.parametrize("prefetch", [True, False])
def test_the_tiered_layer_on_cuda_matches_a_plain_moe(tmp_path, hbm, prefetch, slow_copies):
    """Forward, backward and 50 Adam steps against the plain MoE (float64, on the CPU)."""
    store = TieredExpertStore(E, DIM, HIDDEN, hbm, E, "cuda", path=tmp_path, seed=3,
                              dtype=torch.float64, optimizer_state=True)
    layer = make_layer(store, 1)
    layer.prefetch = prefetch
    experts, (ref,) = reference_for(store, [layer])   # on the CPU
    layer.cuda()
    torch.manual_seed(5)
    x = torch.randn(4, TOKENS, DIM, dtype=torch.float64)
    target = torch.randn_like(x)
    losses, _ = train([layer], list(layer.parameters()), x.cuda(), target.cuda(), 50,
                      ExpertOptimizer(store, lr=1e-2))
    ref_losses, _ = train([ref], [ref.router, ref.ln_weight, ref.ln_bias,
                                  *experts.parameters()], x, target, 50)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    store.flush()
    for e in range(E):
        record = store.read_expert(e)
        for name, param in zip(("w1", "b1", "w2", "b2"), experts.expert_params(e)):
            close(record[name], param.detach(), 1e-4)
    store.shutdown()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_store_on_the_second_gpu_leaves_the_first_untouched(tmp_path):
    code = f"""
import torch
from ooc_moe import TieredExpertStore
with TieredExpertStore(8, 64, 128, 2, 4, "cuda:1", path={str(tmp_path)!r}) as s:
    for e in range(8):
        s.prefetch([e]); s.get_experts([e])[e].b1.add_(1.0); s.mark_dirty([e])
    s.flush()
assert not torch._C._cuda_hasPrimaryContext(0), "a CUDA context was created on GPU 0"
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr
