"""The file tier ("NVMe"): one real file holding every expert record, the authoritative copy.

Format (the same for every backend): record ``i`` occupies bytes ``[i * record_bytes,
(i + 1) * record_bytes)`` of ``experts.bin``; ``experts.json`` beside it says the shape and
dtype so that a reopened file is checked before use. The file is either exactly
``num_experts * record_bytes`` long or that size rounded up to a multiple of 4096 bytes with
zero padding after the last record (``O_DIRECT`` can only write whole blocks, so a block
holding the end of the last record must exist in full). ``create`` always writes the padded
size; ``open`` accepts both, and the direct backend pads an older unpadded file when it may
write it. Creation preallocates the whole file (``posix_fallocate``), so writing records back
later never needs new space on ordinary file systems; when the disk is too small, creation
fails at once, naming the bytes needed and free, and leaves nothing behind.

Three backends do the record I/O, behind one interface (``read_into``, ``write_from``, ``sync``,
``close``, ``directory``, ``meta``, ``backend``):

- ``"pread"``: positioned ``preadv`` / ``pwritev`` straight into and out of the DRAM slot's
  memory: one copy through the page cache, the GIL released while the kernel copies.
- ``"memmap"``: a ``numpy.memmap`` of the file; a read copies from the map (page faults fill
  the page cache), a write copies into it (dirty pages); ``sync`` is ``msync`` then ``fsync``.
- ``"direct"``: ``O_DIRECT``, bypassing the page cache as NVMe offload engines do. The kernel
  wants block-aligned offsets, lengths and memory, and records generally are not block
  multiples, so each I/O goes through a page-aligned bounce buffer (one per thread) covering
  the record's aligned span; a write reads the partial edge blocks first (read-modify-write),
  under a lock, so neighbouring records that share a block never lose each other's bytes.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import shutil
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

__all__ = ["FileMeta", "ExpertFile", "BACKENDS", "BLOCK", "DATA_NAME", "META_NAME"]

DATA_NAME = "experts.bin"
META_NAME = "experts.json"
FORMAT = "ooc-moe-experts/1"
BLOCK = 4096   # O_DIRECT alignment: a multiple of the logical block size of 512 B and 4 KiB disks

_DTYPES = {str(t).removeprefix("torch."): t for t in
           (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} is not supported for experts; use one of "
                         f"{sorted(_DTYPES)}")
    return name


def _round_up(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


def _as_array(t: torch.Tensor) -> np.ndarray:
    """A writable uint8 view of a contiguous CPU tensor (any dtype, pinned or not)."""
    assert t.device.type == "cpu" and t.is_contiguous(), "file I/O needs a contiguous CPU tensor"
    return t.view(-1).view(torch.uint8).numpy()


def _positioned(fd: int, buf: np.ndarray, offset: int, path: Path, *, write: bool,
                need: int | None = None) -> None:
    """``pwritev``/``preadv`` of ``buf`` at ``offset`` until ``need`` bytes (default: all) are
    done; a read may stop short of ``len(buf)`` at the end of the file, never short of need."""
    need, done = len(buf) if need is None else need, 0
    while done < need:
        part = buf[done:]
        n = os.pwritev(fd, [part], offset + done) if write else os.preadv(fd, [part], offset + done)
        if n == 0:
            raise OSError(f"{path} ended at byte {offset + done}, inside a record; the file was "
                          "truncated while in use")
        done += n


def _preallocate(fd: int, size: int) -> None:
    """Give the file ``size`` bytes of real disk space (zeros), or raise ENOSPC now."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    else:  # macOS: no posix_fallocate; the space is then taken when first written
        os.ftruncate(fd, size)


def _no_space(data: Path, needed: int) -> OSError:
    free = shutil.disk_usage(data.parent).free
    return OSError(errno.ENOSPC, f"not enough space for the expert file {data}: it needs "
                   f"{needed:,} bytes and the file system has {free:,} bytes free; free space "
                   "there or pass path= on a larger disk (nothing was written)")


def _write_json_atomically(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


@dataclass(frozen=True)
class FileMeta:
    """What ``experts.json`` records about ``experts.bin``."""

    num_experts: int
    expert_dim: int
    hidden_dim: int
    dtype: str
    record_numel: int
    optimizer_state: bool = False
    format: str = FORMAT

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def record_bytes(self) -> int:
        return self.record_numel * self.torch_dtype.itemsize

    @property
    def file_bytes(self) -> int:
        """The records alone."""
        return self.num_experts * self.record_bytes

    @property
    def padded_bytes(self) -> int:
        """The records and the zero padding to a whole number of blocks (what create writes)."""
        return _round_up(self.file_bytes)


class ExpertFile:
    """Whole-record I/O on ``DIR/experts.bin``; ``create`` and ``open`` pick the backend class.

    Subclasses implement ``_read(offset, dst)`` and ``_write(offset, src)`` on uint8 arrays of
    one record; this class checks the record and opens, syncs and closes the descriptor.
    """

    backend = ""

    def __init__(self, directory: Path, meta: FileMeta, writable: bool) -> None:
        self.directory, self.meta, self.writable = directory, meta, writable
        self.path = directory / DATA_NAME
        self._fd = self._open_fd(os.O_RDWR if writable else os.O_RDONLY)

    def _open_fd(self, flags: int) -> int:
        return os.open(self.path, flags)

    # -- creating and opening -------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | os.PathLike, meta: FileMeta, *,
               overwrite: bool = False, backend: str = "pread") -> "ExpertFile":
        """Create an empty (zero-filled, preallocated) file of ``meta.num_experts`` records."""
        kind = _backend_class(backend)
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot create the expert directory {directory}: {err}; "
                             "pass a writable path=") from err
        data = directory / DATA_NAME
        if data.exists() and not overwrite:
            raise FileExistsError(
                f"{data} already holds experts; reopen it with TieredExpertStore.open("
                f"'{directory}'), or pass overwrite=True to replace it")
        if not os.access(directory, os.W_OK):
            raise ValueError(f"the expert directory {directory} is not writable; pass a "
                             "writable path=")
        # refuse before truncating a store that overwrite would replace: it is kept then
        reclaimed = data.stat().st_blocks * 512 if data.exists() else 0
        if meta.padded_bytes > shutil.disk_usage(directory).free + reclaimed:
            raise _no_space(data, meta.padded_bytes)
        fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            try:
                _preallocate(fd, meta.padded_bytes)
            finally:
                os.close(fd)
            _write_json_atomically(directory / META_NAME, asdict(meta))
            return kind(directory, meta, writable=True)
        except BaseException as err:
            for name in (DATA_NAME, META_NAME):
                (directory / name).unlink(missing_ok=True)
            if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _no_space(data, meta.padded_bytes) from err
            raise

    @classmethod
    def open(cls, directory: str | os.PathLike, *, backend: str = "pread") -> "ExpertFile":
        """Open an existing expert file after checking it against its metadata."""
        kind = _backend_class(backend)
        directory = Path(directory)
        meta_path, data = directory / META_NAME, directory / DATA_NAME
        if not meta_path.is_file() or not data.is_file():
            raise FileNotFoundError(f"{directory} holds no expert store ({DATA_NAME} and "
                                    f"{META_NAME}); create one with TieredExpertStore(...)")
        raw = json.loads(meta_path.read_text())
        if raw.get("format") != FORMAT:
            raise ValueError(f"{meta_path} has format {raw.get('format')!r}, expected "
                             f"{FORMAT!r}")
        meta = FileMeta(**raw)
        size = data.stat().st_size
        if size not in (meta.file_bytes, meta.padded_bytes):
            raise ValueError(f"{data} has {size} bytes but its metadata describes "
                             f"{meta.num_experts} records of {meta.record_bytes} bytes "
                             f"({meta.file_bytes}, or {meta.padded_bytes} with padding to "
                             f"{BLOCK}-byte blocks); the file is truncated or not this store's")
        return kind(directory, meta, writable=os.access(data, os.W_OK))

    # -- record I/O -------------------------------------------------------------------------
    def read_into(self, expert_id: int, row: torch.Tensor) -> None:
        """Read record ``expert_id`` into ``row`` (a contiguous CPU tensor of one record)."""
        self._read(expert_id * self.meta.record_bytes, self._record(row))

    def write_from(self, expert_id: int, row: torch.Tensor) -> None:
        """Write ``row`` as record ``expert_id``."""
        if not self.writable:
            raise PermissionError(f"{self.path} was opened read-only (this process may not "
                                  "write it): make it writable and reopen the store to change "
                                  "experts")
        self._write(expert_id * self.meta.record_bytes, self._record(row))

    def _record(self, row: torch.Tensor) -> np.ndarray:
        buf = _as_array(row)
        assert len(buf) == self.meta.record_bytes, "row is not one record"
        return buf

    def _read(self, offset: int, dst: np.ndarray) -> None:
        raise NotImplementedError

    def _write(self, offset: int, src: np.ndarray) -> None:
        raise NotImplementedError

    def sync(self) -> None:
        """Make every written record durable (fsync)."""
        os.fsync(self._fd)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.path}', writable={self.writable})"


class PreadFile(ExpertFile):
    """``preadv`` / ``pwritev`` between the slot's memory and the page cache."""

    backend = "pread"

    def _read(self, offset: int, dst: np.ndarray) -> None:
        _positioned(self._fd, dst, offset, self.path, write=False)

    def _write(self, offset: int, src: np.ndarray) -> None:
        _positioned(self._fd, src, offset, self.path, write=True)


class MemmapFile(ExpertFile):
    """A ``numpy.memmap`` of the whole file: reads and writes are copies from and to the map.

    The file is preallocated, so a write never faults on a page the disk has no room for
    (which would be SIGBUS, not an exception)."""

    backend = "memmap"

    def __init__(self, directory: Path, meta: FileMeta, writable: bool) -> None:
        super().__init__(directory, meta, writable)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r+" if writable else "r")

    def _read(self, offset: int, dst: np.ndarray) -> None:
        np.copyto(dst, self._map[offset:offset + len(dst)])  # numpy releases the GIL

    def _write(self, offset: int, src: np.ndarray) -> None:
        np.copyto(self._map[offset:offset + len(src)], src)

    def sync(self) -> None:
        """Write the dirty pages (msync), then fsync."""
        self._map.flush()
        super().sync()

    def close(self) -> None:
        self._map = None  # unmaps (nothing else holds a view of it)
        super().close()


class DirectFile(ExpertFile):
    """``O_DIRECT`` reads and writes of each record's block-aligned span, through a
    page-aligned bounce buffer per thread (the store reads and writes from two threads)."""

    backend = "direct"

    def __init__(self, directory: Path, meta: FileMeta, writable: bool) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()   # read-modify-write of blocks shared by two records
        self._span = _round_up(meta.record_bytes) + BLOCK  # the most blocks one record touches
        super().__init__(directory, meta, writable)
        try:
            if writable and os.fstat(self._fd).st_size != meta.padded_bytes:
                _preallocate(self._fd, meta.padded_bytes)  # an older, unpadded file
            with self._refusal():   # some file systems accept the flag but not the I/O
                _positioned(self._fd, self._buffer()[:BLOCK], 0, self.path, write=False,
                            need=min(BLOCK, meta.file_bytes))
        except BaseException:
            self.close()
            raise

    @contextmanager
    def _refusal(self) -> Iterator[None]:
        """Turn the kernel's EINVAL for O_DIRECT into an error that says what to do."""
        try:
            yield
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            raise ValueError(f"{self.path}: the file system refuses O_DIRECT ({err.strerror}); "
                             "use file_backend='pread' (or 'memmap'), or put path= on a disk "
                             "file system such as ext4 or xfs") from err

    def _open_fd(self, flags: int) -> int:
        if not hasattr(os, "O_DIRECT"):
            raise ValueError(f"O_DIRECT does not exist on {sys.platform}; use "
                             "file_backend='pread' (or 'memmap')")
        with self._refusal():
            return os.open(self.path, flags | os.O_DIRECT)

    def _buffer(self) -> np.ndarray:
        """This thread's page-aligned bounce buffer (an anonymous mapping)."""
        buf = getattr(self._local, "buf", None)
        if buf is None:
            buf = self._local.buf = np.frombuffer(mmap.mmap(-1, self._span), dtype=np.uint8)
        return buf

    def _span_of(self, offset: int, n: int) -> tuple[int, int]:
        """The aligned start of the record's first block and the length of its blocks."""
        start = offset - offset % BLOCK
        return start, _round_up(offset + n) - start

    def _read(self, offset: int, dst: np.ndarray) -> None:
        start, length = self._span_of(offset, len(dst))
        head, buf = offset - start, self._buffer()
        with self._refusal():
            # an unpadded read-only file ends inside the last block: a short read is enough
            _positioned(self._fd, buf[:length], start, self.path, write=False,
                        need=head + len(dst))
        np.copyto(dst, buf[head:head + len(dst)])

    def _write(self, offset: int, src: np.ndarray) -> None:
        start, length = self._span_of(offset, len(src))
        head, buf = offset - start, self._buffer()
        tail = length - head - len(src)
        with self._lock, self._refusal():
            if head:      # the first block also holds the end of the previous record
                _positioned(self._fd, buf[:BLOCK], start, self.path, write=False)
            if tail and (length > BLOCK or not head):  # the last block: the next record's start
                _positioned(self._fd, buf[length - BLOCK:length], start + length - BLOCK,
                            self.path, write=False)
            np.copyto(buf[head:head + len(src)], src)
            _positioned(self._fd, buf[:length], start, self.path, write=True)

    def close(self) -> None:
        self._local = threading.local()  # frees the other threads' bounce buffers
        super().close()


_BACKENDS = {kind.backend: kind for kind in (PreadFile, MemmapFile, DirectFile)}
BACKENDS = tuple(_BACKENDS)


def _backend_class(backend: str) -> type[ExpertFile]:
    if backend not in _BACKENDS:
        raise ValueError(f"unknown file_backend {backend!r}; use one of {', '.join(BACKENDS)}")
    return _BACKENDS[backend]
