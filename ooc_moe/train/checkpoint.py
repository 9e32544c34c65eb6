"""Atomic checkpoints of a training run: ``RUN/checkpoint/{state.pt, store/experts.*}``.

A checkpoint is written whole into ``RUN/checkpoint.tmp``, every file fsynced, then swapped in
by renames: the old ``checkpoint`` becomes ``checkpoint.old``, ``checkpoint.tmp`` becomes
``checkpoint``, and ``checkpoint.old`` is removed. A process killed at any point leaves a
complete ``checkpoint`` or a complete ``checkpoint.old`` (between the two renames), never a
half-written one that loads: ``checkpoint.tmp`` is never read, and ``state.pt`` is written last.

``state.pt`` holds what ``torch.save`` can hold (dense weights, optimizer states, RNG states,
the schedule position, the history); the experts, with their Adam moments, are a copy of the
store's file made after ``store.flush()``.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import torch

from ..store.file_tier import DATA_NAME, META_NAME

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "CheckpointError"]

STATE_NAME = "state.pt"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


def save_checkpoint(run_dir: str | os.PathLike, state: dict, store=None) -> Path:
    """Write ``state`` (and a copy of ``store``'s expert file) as ``run_dir/checkpoint``."""
    run_dir = Path(run_dir)
    tmp, final, old = (run_dir / "checkpoint.tmp", run_dir / "checkpoint",
                       run_dir / "checkpoint.old")
    if tmp.exists():
        shutil.rmtree(tmp)                     # left by a run killed while writing
    if store is not None:
        store.flush()                          # every dirty expert is in the file now
    buffer = io.BytesIO()
    torch.save(state, buffer)                  # its size is known before anything is written
    needed = buffer.tell()
    if store is not None:
        needed += sum((Path(store.path) / name).stat().st_size for name in (DATA_NAME, META_NAME))
    run_dir.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(run_dir).free
    problem = f"it needs {needed} bytes, {free} are free" if needed > free else None
    if problem is None:
        try:
            _write_checkpoint(tmp, buffer, store)
        except OSError as err:
            problem = f"{err.strerror or err} (it needs {needed} bytes, {free} were free)"
    if problem is not None:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = find_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier one"
        raise CheckpointError(f"cannot write a checkpoint in {run_dir}: {problem}; {kept}. "
                              "Free space on that disk (or train with --out on a larger one) "
                              "and resume with --resume")
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(run_dir)
    if old.exists():
        shutil.rmtree(old)
    return final


def _write_checkpoint(tmp: Path, buffer: io.BytesIO, store) -> None:
    (tmp / "store").mkdir(parents=True)
    if store is not None:
        for name in (DATA_NAME, META_NAME):
            shutil.copyfile(Path(store.path) / name, tmp / "store" / name)
            _fsync(tmp / "store" / name)
    (tmp / STATE_NAME).write_bytes(buffer.getbuffer())
    _fsync(tmp / STATE_NAME)
    _fsync(tmp)


def find_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint in ``run_dir`` (``checkpoint``, else ``checkpoint.old``)."""
    for name in ("checkpoint", "checkpoint.old"):
        path = Path(run_dir) / name
        if (path / STATE_NAME).is_file():
            return path
    return None


def load_checkpoint(run_dir: str | os.PathLike, store_dir: str | os.PathLike | None = None
                    ) -> dict:
    """Read the state of ``run_dir``'s checkpoint; with ``store_dir``, copy its expert file
    there (to be reopened with ``TieredExpertStore.open(store_dir)``)."""
    path = find_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: it holds no checkpoint/"
                                f"{STATE_NAME} (was the run started with --out {run_dir}?)")
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
    if store_dir is not None:
        Path(store_dir).mkdir(parents=True, exist_ok=True)
        for name in (DATA_NAME, META_NAME):
            if not (path / "store" / name).is_file():
                raise FileNotFoundError(f"{path} holds no expert file: it is a checkpoint "
                                        "of a run without a store (the dense baseline)")
            shutil.copyfile(path / "store" / name, Path(store_dir) / name)
    return state
