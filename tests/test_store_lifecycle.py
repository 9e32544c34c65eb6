"""A store's life on any machine: closing when dropped (no leaked worker, pools or file),
flushing at close, the stream argument, synchronize, and a disk that runs out of space."""

import errno
import gc
import glob
import os
import tempfile
import threading
import warnings

import pytest
import torch

from ooc_moe import DiskFullError, TieredExpertStore
from reference import read_file_records

N, DIM, HIDDEN = 12, 4, 8


def _workers() -> int:
    return sum(t.name == "ooc-moe-transfers" for t in threading.enumerate())


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _dirty_store(path) -> TieredExpertStore:
    store = TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", path=path)
    for e in range(N):                       # every expert changed, some evicted dirty
        store.get_experts([e])[e].b1.fill_(float(e + 1))
        store.mark_dirty([e])
    return store


def test_dropped_stores_stop_their_worker_close_their_file_and_flush(tmp_path):
    gc.collect()
    workers, fds = _workers(), _open_fds()
    for i in range(5):
        store = _dirty_store(tmp_path / str(i))
        store.prefetch([0, 1])
        assert _workers() == workers + 1
        del store                             # never shut down
        gc.collect()
        assert _workers() == workers and _open_fds() == fds
    for i in range(5):                        # the finaliser wrote every dirty record
        with TieredExpertStore.open(tmp_path / str(i), "cpu") as reopened:
            for e in range(N):
                assert torch.all(reopened.read_expert(e)["b1"] == e + 1)


def test_a_dropped_temporary_store_removes_its_directory():
    store = TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu")
    path = store.path
    store.get_experts([3])
    del store
    gc.collect()
    assert not os.path.exists(path)


def test_the_finaliser_runs_once_and_shutdown_frees_the_pools(tmp_path):
    store = _dirty_store(tmp_path)
    engine = store._engine
    store.shutdown()
    assert engine.hbm_pool is None and engine.dram_pool is None and not store._finalizer.alive
    store.shutdown()                          # idempotent
    with pytest.raises(RuntimeError, match="shut down"):
        store.get_experts([0])


def test_a_stream_is_refused_on_a_cpu_store(tmp_path):
    with pytest.raises(ValueError, match="CUDA stores"):
        TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", path=tmp_path, stream=object())
    assert TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu").compute_stream is None


def test_cpu_stores_pin_nothing_and_say_so():
    with TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu") as store:
        assert store.pinned_bytes == 0 and store.get_stats_summary()["pinned_bytes"] == 0


def _fail_writes(monkeypatch, store):
    def no_space(e, row):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store._file, "write_from", no_space)


def test_a_full_disk_at_flush_loses_nothing_and_a_retry_writes_everything(tmp_path, monkeypatch):
    store = TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", path=tmp_path)
    store.get_experts([0])[0].b1.fill_(1.0)
    store.mark_dirty([0])
    store.flush()
    flushed = read_file_records(tmp_path).copy()
    for e in (0, 1):
        store.get_experts([e])[e].b1.fill_(10.0 + e)
        store.mark_dirty([e])
    write_from = store._file.write_from
    _fail_writes(monkeypatch, store)
    with pytest.raises(DiskFullError) as info:
        store.flush()
    message = str(info.value)
    assert str(tmp_path) in message and "bytes free" in message and "flush() again" in message
    assert f"{2 * store.record_bytes} bytes to write" in message
    assert info.value.errno == errno.ENOSPC
    assert (read_file_records(tmp_path) == flushed).all()      # last flushed contents
    assert store.is_dirty(0) and store.is_dirty(1)
    assert torch.all(store.read_expert(1)["b1"] == 11.0)
    with pytest.raises(DiskFullError):
        store.shutdown()                                          # stays open, loses nothing
    monkeypatch.setattr(store._file, "write_from", write_from)   # space freed
    store.shutdown()
    with TieredExpertStore.open(tmp_path, "cpu") as reopened:
        assert torch.all(reopened.read_expert(0)["b1"] == 10.0)
        assert torch.all(reopened.read_expert(1)["b1"] == 11.0)


@pytest.mark.parametrize("background", [False, True])
def test_a_full_disk_during_write_back_keeps_the_dirty_record(tmp_path, monkeypatch, background):
    store = TieredExpertStore(N, DIM, HIDDEN, 1, 2, "cpu", path=tmp_path)
    store.get_experts([2])[2].b1.fill_(6.0)
    store.mark_dirty([2])
    store.get_experts([4])                    # 2 written down: dirty in DRAM only
    write_from = store._file.write_from
    _fail_writes(monkeypatch, store)
    with pytest.raises(DiskFullError):
        if background:
            store.prefetch([5], tier="dram")  # must write 2 back to the file first
            store.synchronize()
        else:
            store.get_experts([5])
    assert store.is_dirty(2) and torch.all(store.read_expert(2)["b1"] == 6.0)
    monkeypatch.setattr(store._file, "write_from", write_from)
    store.get_experts([5])
    assert store.where(2) == "file" and torch.all(store.read_expert(2)["b1"] == 6.0)
    store.shutdown()


def test_a_store_that_cannot_flush_at_close_warns(tmp_path, monkeypatch):
    store = _dirty_store(tmp_path)
    _fail_writes(monkeypatch, store)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        store._finalizer()
    assert any("could not be written" in str(w.message) for w in caught)


def test_a_bad_backend_or_stream_leaves_no_file_and_no_directory(tmp_path):
    temp = set(glob.glob(os.path.join(tempfile.gettempdir(), "ooc-moe-*")))
    fds = _open_fds()
    with pytest.raises(ValueError, match="pread, memmap, direct"):
        TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", file_backend="nvme")
    with pytest.raises(ValueError, match="CUDA stores"):
        TieredExpertStore(N, DIM, HIDDEN, 2, 4, "cpu", stream=object())
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "ooc-moe-*"))) == temp
    assert _open_fds() == fds
