"""The file tier's three backends: one format, records of any size, threads, refusals, a full
disk."""

import errno
import fcntl
import itertools
import os
import shutil
import subprocess
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ooc_moe import TieredExpertStore
from ooc_moe.store import file_tier
from ooc_moe.store.file_tier import BACKENDS, BLOCK, DATA_NAME, META_NAME, ExpertFile, FileMeta
from reference import read_file_records

# float32 elements per record: 4 B, 304 B (13 records share a block), exactly one block,
# one block and 4 B, three blocks minus 288 B
NUMELS = [1, 76, 1024, 1025, 3000]
N = 5


def make_meta(numel: int, num_experts: int = N) -> FileMeta:
    return FileMeta(num_experts, 1, 1, "float32", numel)


def rows_for(meta: FileMeta, seed: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(
        (meta.num_experts, meta.record_numel), dtype=np.float32))


def read_all(file: ExpertFile) -> torch.Tensor:
    out = torch.empty(file.meta.num_experts, file.meta.record_numel)
    for e in range(file.meta.num_experts):
        file.read_into(e, out[e])
    return out


def write_all(file: ExpertFile, rows: torch.Tensor, order) -> None:
    for e in order:
        file.write_from(e, rows[e])


@pytest.mark.parametrize("numel", NUMELS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_records_round_trip_and_the_file_is_padded_with_zeros(tmp_path, backend, numel):
    meta = make_meta(numel)
    rows = rows_for(meta, numel)
    file = ExpertFile.create(tmp_path, meta, backend=backend)
    assert file.backend == backend and file.meta == meta and file.directory == tmp_path
    assert torch.equal(read_all(file), torch.zeros_like(rows))    # created zero-filled
    write_all(file, rows, [4, 0, 2, 1, 3])                         # the last record first
    assert torch.equal(read_all(file), rows)
    file.sync()
    file.close()
    file.close()                                                   # idempotent
    raw = (tmp_path / DATA_NAME).read_bytes()
    assert len(raw) == -(-meta.file_bytes // BLOCK) * BLOCK == meta.padded_bytes
    assert raw[meta.file_bytes:] == bytes(len(raw) - meta.file_bytes)
    assert np.array_equal(read_file_records(tmp_path), rows.numpy())


@pytest.mark.parametrize("writer, reader", list(itertools.product(BACKENDS, BACKENDS)))
def test_a_file_written_by_one_backend_reads_back_identically_through_another(
        tmp_path, writer, reader):
    meta = make_meta(1025)
    first, second = rows_for(meta, 1), rows_for(meta, 2)
    file = ExpertFile.create(tmp_path, meta, backend=writer)
    write_all(file, first, range(N))
    file.sync()
    file.close()
    other = ExpertFile.open(tmp_path, backend=reader)
    assert torch.equal(read_all(other), first)
    other.write_from(N - 1, second[N - 1])                         # and back again
    other.sync()
    other.close()
    file = ExpertFile.open(tmp_path, backend=writer)
    expected = torch.cat([first[:-1], second[-1:]])
    assert torch.equal(read_all(file), expected)
    file.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_threads_writing_neighbouring_records_lose_nothing(tmp_path, backend):
    """Records of 304 B: most blocks hold parts of several records, written by both threads
    (the direct backend's read-modify-write of shared blocks must not lose the other's bytes)."""
    meta = make_meta(76, num_experts=40)
    file = ExpertFile.create(tmp_path, meta, backend=backend)
    rounds = 60

    def writer(parity: int) -> None:
        row = torch.empty(meta.record_numel)
        for r in range(rounds):
            for e in range(parity, meta.num_experts, 2):
                row.fill_(r * 1000 + e)
                file.write_from(e, row)

    threads = [threading.Thread(target=writer, args=(p,)) for p in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = read_all(file)
    file.close()
    expected = (rounds - 1) * 1000 + torch.arange(meta.num_experts, dtype=torch.float32)
    assert torch.equal(got, expected[:, None].expand_as(got))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_store_reopens_after_flush_with_every_backend(tmp_path, backend):
    with TieredExpertStore(7, 4, 8, 1, 2, "cpu", path=tmp_path, file_backend=backend) as s:
        s.get_experts([6])[6].b2.fill_(2.5)                        # the last record
        s.mark_dirty([6])
        s.flush()
        assert np.all(read_file_records(tmp_path)[6, -4:] == 2.5)
    for other in BACKENDS:
        with TieredExpertStore.open(tmp_path, "cpu", file_backend=other) as s:
            assert torch.all(s.read_expert(6)["b2"] == 2.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_read_only_file_reads_and_refuses_writes(tmp_path, backend, monkeypatch):
    meta = make_meta(1025)
    rows = rows_for(meta, 3)
    file = ExpertFile.create(tmp_path, meta)
    write_all(file, rows, range(N))
    file.close()
    os.truncate(tmp_path / DATA_NAME, meta.file_bytes)              # an older, unpadded file
    (tmp_path / DATA_NAME).chmod(0o444)
    if os.geteuid() == 0:                                           # root may write anyway
        monkeypatch.setattr(os, "access", lambda path, mode: mode != os.W_OK)
    file = ExpertFile.open(tmp_path, backend=backend)
    assert not file.writable
    assert torch.equal(read_all(file), rows)
    with pytest.raises(PermissionError, match="opened read-only.*make it writable"):
        file.write_from(0, rows[1])
    file.close()
    assert (tmp_path / DATA_NAME).stat().st_size == meta.file_bytes


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_unpadded_file_opens_and_only_direct_pads_it(tmp_path, backend):
    meta = make_meta(76)
    rows = rows_for(meta, 4)
    file = ExpertFile.create(tmp_path, meta)
    write_all(file, rows, range(N))
    file.close()
    os.truncate(tmp_path / DATA_NAME, meta.file_bytes)
    file = ExpertFile.open(tmp_path, backend=backend)
    file.write_from(N - 1, rows[0])
    assert torch.equal(read_all(file), torch.cat([rows[:-1], rows[:1]]))
    file.close()
    size = (tmp_path / DATA_NAME).stat().st_size
    assert size == (meta.padded_bytes if backend == "direct" else meta.file_bytes)


def test_an_unknown_backend_names_the_choices_before_creating_anything(tmp_path):
    with pytest.raises(ValueError, match="unknown file_backend 'mmap'; use one of pread, "
                                         "memmap, direct"):
        TieredExpertStore(4, 2, 2, 1, 1, "cpu", path=tmp_path / "store", file_backend="mmap")
    assert not (tmp_path / "store").exists()
    TieredExpertStore(4, 2, 2, 1, 1, "cpu", path=tmp_path / "store").shutdown()
    with pytest.raises(ValueError, match="pread, memmap, direct"):
        TieredExpertStore.open(tmp_path / "store", file_backend="O_DIRECT")


def test_a_file_system_refusing_o_direct_at_open_is_a_clear_error(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(ValueError, match=f"{tmp_path}.*refuses O_DIRECT.*file_backend='pread'"
                                         ".*path= on a disk file system"):
        TieredExpertStore(4, 2, 2, 1, 1, "cpu", path=tmp_path, file_backend="direct")
    assert not (tmp_path / DATA_NAME).exists() and not (tmp_path / META_NAME).exists()
    TieredExpertStore(4, 2, 2, 1, 1, "cpu", path=tmp_path).shutdown()  # nothing left in the way


def test_a_file_system_refusing_o_direct_io_is_a_clear_error(tmp_path, monkeypatch):
    ExpertFile.create(tmp_path, make_meta(76)).close()
    real_preadv = os.preadv

    def refusing_preadv(fd, buffers, offset, *args):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", refusing_preadv)
    with pytest.raises(ValueError, match="refuses O_DIRECT"):
        ExpertFile.open(tmp_path, backend="direct")
    ExpertFile.open(tmp_path).close()                               # pread is unaffected


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the test (skipped where mounting is not permitted)."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_store_larger_than_the_disk_fails_at_creation_and_leaves_nothing(small_disk):
    # 12 records of 132,352 B: 1.6 MB on a 1 MiB disk
    with pytest.raises(OSError, match=f"{small_disk}/{DATA_NAME}: it needs 1,589,248 bytes and "
                                      r"the file system has [\d,]+ bytes free; free space") as err:
        TieredExpertStore(12, 64, 256, 1, 2, "cpu", path=small_disk)
    assert err.value.errno == errno.ENOSPC
    assert sorted(p.name for p in small_disk.iterdir()) == []


def test_fallocate_failing_late_leaves_nothing(small_disk, monkeypatch):
    """The free-space check passes but the allocation fails (another writer took the space)."""
    monkeypatch.setattr(file_tier.shutil, "disk_usage",
                        lambda path: SimpleNamespace(total=1 << 30, used=0, free=1 << 30))
    with pytest.raises(OSError, match="not enough space.*needs 1,589,248 bytes"):
        TieredExpertStore(12, 64, 256, 1, 2, "cpu", path=small_disk)
    assert sorted(p.name for p in small_disk.iterdir()) == []


def test_overwriting_with_a_store_that_does_not_fit_keeps_the_old_one(small_disk):
    with TieredExpertStore(12, 8, 16, 1, 2, "cpu", path=small_disk, seed=3) as s:
        kept = s.read_expert(11)["w1"].clone()
    with pytest.raises(OSError, match="not enough space"):
        TieredExpertStore(12, 64, 256, 1, 2, "cpu", path=small_disk, overwrite=True)
    with TieredExpertStore.open(small_disk, "cpu") as s:
        assert torch.equal(s.read_expert(11)["w1"], kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_backs_need_no_new_space_on_a_full_disk(small_disk, backend):
    """The file is preallocated: with the disk then filled up, every write-back succeeds."""
    path = small_disk / "store"
    s = TieredExpertStore(4, 64, 256, 1, 2, "cpu", path=path, file_backend=backend)  # 0.5 MB
    try:
        with open(small_disk / "filler", "wb", buffering=0) as filler, \
                pytest.raises(OSError) as full:
            while True:
                filler.write(bytes(BLOCK))
        assert full.value.errno == errno.ENOSPC
        for e in range(4):                       # every record dirty, evicted, written back
            s.get_experts([e])[e].w1.fill_(e + 0.5)
            s.mark_dirty([e])
        s.flush()
    finally:
        s.shutdown()
    with TieredExpertStore.open(path, "cpu", file_backend=backend) as s:
        for e in range(4):
            assert torch.all(s.read_expert(e)["w1"] == e + 0.5)


def test_the_file_tier_benchmark_measures_every_backend_warm_and_cold():
    from ooc_moe.bench import StoreBenchConfig, _fio_line, bench_file_tier

    figures = bench_file_tier(StoreBenchConfig(expert_dim=16, hidden_dim=64, num_experts=8,
                                               repeats=1, device="cpu"))
    measured = {(link["backend"], link["cold"]) for link in figures["links"]}
    assert measured == set(itertools.product(BACKENDS, (False, True)))
    assert all(link["ratio"] > 0 and link["bytes"] == 8 * 8512 for link in figures["links"])
    fio = figures["fio"]
    assert fio is None or "error" in fio or fio["bytes_per_s"] > 0
    assert "fio is not installed" in _fio_line(None, [])
