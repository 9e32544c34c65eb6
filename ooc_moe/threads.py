"""One torch thread for small models on a busy machine (notebooks, their runs and plots)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["one_thread"]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread: the matrices here are tiny, and on a busy machine
    extra OpenMP threads only compete with the store's transfer thread (we measured runs
    several to tens of times slower on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
