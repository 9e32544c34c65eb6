"""The file tier ("NVMe"): one real file holding every expert record, the authoritative copy.

Record ``i`` occupies bytes ``[i * record_bytes, (i + 1) * record_bytes)`` of ``experts.bin``;
``experts.json`` beside it says the shape and dtype so that a reopened file is checked before
use. Reads and writes are positioned system calls (``preadv`` / ``pwritev``) straight into and
out of the DRAM slot's memory: one copy through the page cache, no Python-level buffering, and
the GIL is released while the kernel copies, so a background reader overlaps compute.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["FileMeta", "ExpertFile", "DATA_NAME", "META_NAME"]

DATA_NAME = "experts.bin"
META_NAME = "experts.json"
FORMAT = "ooc-moe-experts/1"

_DTYPES = {str(t).removeprefix("torch."): t for t in
           (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


def dtype_name(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"dtype {dtype} is not supported for experts; use one of "
                         f"{sorted(_DTYPES)}")
    return name


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
        return self.num_experts * self.record_bytes


def _as_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (any dtype, pinned or not)."""
    assert t.device.type == "cpu" and t.is_contiguous(), "file I/O needs a contiguous CPU tensor"
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


class ExpertFile:
    """Positioned reads and writes of whole records in ``DIR/experts.bin``."""

    def __init__(self, directory: Path, meta: FileMeta, fd: int) -> None:
        self.directory, self.meta, self._fd = directory, meta, fd

    # -- creating and opening -------------------------------------------------------------
    @classmethod
    def create(cls, directory: str | os.PathLike, meta: FileMeta, *,
               overwrite: bool = False, backend: str = "pread") -> "ExpertFile":
        """Create an empty (zero-filled) file of ``meta.num_experts`` records."""
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
        fd = os.open(data, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, meta.file_bytes)
            _write_json_atomically(directory / META_NAME, asdict(meta))
        except BaseException:
            os.close(fd)
            raise
        return cls(directory, meta, fd)

    @classmethod
    def open(cls, directory: str | os.PathLike, *, backend: str = "pread") -> "ExpertFile":
        """Open an existing expert file after checking it against its metadata."""
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
        if size != meta.file_bytes:
            raise ValueError(f"{data} has {size} bytes but its metadata describes "
                             f"{meta.num_experts} records of {meta.record_bytes} bytes "
                             f"({meta.file_bytes}); the file is truncated or not this store's")
        flags = os.O_RDWR if os.access(data, os.W_OK) else os.O_RDONLY
        return cls(directory, meta, os.open(data, flags))

    # -- record I/O -------------------------------------------------------------------------
    def read_into(self, expert_id: int, row: torch.Tensor) -> None:
        """Read record ``expert_id`` into ``row`` (a contiguous CPU tensor of one record)."""
        self._transfer(expert_id, row, write=False)

    def write_from(self, expert_id: int, row: torch.Tensor) -> None:
        """Write ``row`` as record ``expert_id``."""
        self._transfer(expert_id, row, write=True)

    def _transfer(self, expert_id: int, row: torch.Tensor, *, write: bool) -> None:
        buf = _as_bytes(row)
        assert len(buf) == self.meta.record_bytes, "row is not one record"
        offset, done = expert_id * self.meta.record_bytes, 0
        while done < len(buf):
            part = buf[done:]
            n = (os.pwritev(self._fd, [part], offset + done) if write
                 else os.preadv(self._fd, [part], offset + done))
            if n == 0:
                raise OSError(f"{self.directory / DATA_NAME} ended inside record {expert_id}; "
                              "the file was truncated while in use")
            done += n

    def sync(self) -> None:
        """Make every written record durable (fsync)."""
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_json_atomically(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
