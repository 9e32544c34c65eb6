"""Atomic checkpoints of a training run: ``RUN/checkpoint/{state.pt, store/experts.*}``.

A checkpoint is written whole into ``RUN/checkpoint.tmp``, every file fsynced, then swapped in
by renames: the old ``checkpoint`` becomes ``checkpoint.old``, ``checkpoint.tmp`` becomes
``checkpoint``, and ``checkpoint.old`` is removed. A process killed at any point leaves a
complete ``checkpoint`` or a complete ``checkpoint.old`` (between the two renames), never a
half-written one that loads: ``checkpoint.tmp`` is never read, and ``state.pt`` is written last.

``state.pt`` holds what ``torch.save`` can hold (dense weights, optimizer states, RNG states,
the schedule position, the history); the experts, with their Adam moments, are a copy of the
store's file made after ``store.flush()``.

A job of ``W > 1`` ranks (``torch.distributed``, experts sharded over the ranks) saves with
``sharded=True`` on every rank: each rank writes its own state and its store's file into
``checkpoint.tmp/rank-<r>/{state.pt, store/}``; once every rank has written (a failure on any
rank fails them all), rank 0 writes the shared ``state.pt`` (with ``world = W``, without
what each rank keeps in its own) last and swaps the directory in as above. A checkpoint resumes only with the world size that wrote it
(``load_checkpoint`` says so before anything is read into a model).
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..distributed import any_rank, shard_dir, world_info
from ..store.file_tier import DATA_NAME, META_NAME

__all__ = ["save_checkpoint", "load_checkpoint", "find_checkpoint", "CheckpointError",
           "CheckpointMismatch"]

STATE_NAME = "state.pt"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointError(OSError):
    """A checkpoint could not be written; the previous one is intact."""


class CheckpointMismatch(ValueError):
    """A checkpoint was written by a job of another world size than the one resuming it."""


def save_checkpoint(run_dir: str | os.PathLike, state: dict, store=None, *,
                    sharded: bool = False, rank_state: dict | None = None) -> Path:
    """Write ``state`` (and a copy of ``store``'s expert file) as ``run_dir/checkpoint``.
    ``sharded``: every rank of the ``torch.distributed`` world calls it, with the same
    ``state`` (rank 0's is kept), its own ``rank_state`` and its own store (shard)."""
    if sharded:
        return _save_sharded(Path(run_dir), state, rank_state or {}, store)
    run_dir = Path(run_dir)
    tmp = run_dir / "checkpoint.tmp"
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
    _swap_in(run_dir, tmp)
    return run_dir / "checkpoint"


def _swap_in(run_dir: Path, tmp: Path) -> None:
    """``tmp`` becomes ``run_dir/checkpoint`` (the old one ``checkpoint.old`` meanwhile)."""
    final, old = run_dir / "checkpoint", run_dir / "checkpoint.old"
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(run_dir)
    if old.exists():
        shutil.rmtree(old)


def _save_sharded(run_dir: Path, state: dict, rank_state: dict, store) -> Path:
    rank, world = world_info()
    tmp = run_dir / "checkpoint.tmp"
    if store is not None:
        store.flush()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)                 # left by a job killed while writing
        run_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    problem = None
    try:
        buffer = io.BytesIO()
        torch.save(rank_state, buffer)
        _write_checkpoint(shard_dir(tmp), buffer, store)
    except OSError as err:
        problem = f"rank {rank}: {err.strerror or err}"
    if not any_rank(problem is not None) and rank == 0:
        try:
            buffer = io.BytesIO()
            shared = {k: v for k, v in state.items() if k not in rank_state}  # each rank's own
            torch.save({**shared, "world": world}, buffer)
            (tmp / STATE_NAME).write_bytes(buffer.getbuffer())   # last: it completes the whole
            _fsync(tmp / STATE_NAME)
            _fsync(tmp)
        except OSError as err:
            problem = f"rank 0: {err.strerror or err}"
    if any_rank(problem is not None):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        dist.barrier()
        previous = find_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier one"
        raise CheckpointError(f"cannot write a checkpoint in {run_dir} "
                              f"({problem or 'another rank failed'}); {kept}. Free space on "
                              "that disk and resume with --resume")
    if rank == 0:
        _swap_in(run_dir, tmp)
    dist.barrier()
    return run_dir / "checkpoint"


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
    there (to be reopened with ``TieredExpertStore.open(store_dir)``). In a job of ``W > 1``
    ranks, each rank reads the shared state plus its own (``state["rank_state"]``) and copies
    its own shard; a checkpoint of another world size raises ``CheckpointMismatch``."""
    path = find_checkpoint(run_dir)
    if path is None:
        raise FileNotFoundError(f"no checkpoint in {run_dir}: it holds no checkpoint/"
                                f"{STATE_NAME} (was the run started with --out {run_dir}?)")
    state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=False)
    world = world_info()[1]
    saved = state.get("world", 1)
    if saved != world:
        games = state.get("args", {}).get("games", [])
        command = "train" if all(g.startswith("synthetic") for g in games) else "train-atari"
        how = (f"torchrun --nproc_per_node {saved} -m ooc_moe {command} --resume {run_dir}"
               if saved > 1 else f"python -m ooc_moe {command} --resume {run_dir}, "
               "without torchrun")
        raise CheckpointMismatch(
            f"the checkpoint in {run_dir} was written by {saved} rank(s), each holding its "
            f"shard of the experts, and this job has {world}: resume it with {how}")
    if world > 1:
        path = shard_dir(path)
        state["rank_state"] = torch.load(path / STATE_NAME, map_location="cpu",
                                         weights_only=False)
    if store_dir is not None:
        Path(store_dir).mkdir(parents=True, exist_ok=True)
        for name in (DATA_NAME, META_NAME):
            if not (path / "store" / name).is_file():
                raise FileNotFoundError(f"{path} holds no expert file: it is a checkpoint "
                                        "of a run without a store (the dense baseline)")
            shutil.copyfile(path / "store" / name, Path(store_dir) / name)
    return state
