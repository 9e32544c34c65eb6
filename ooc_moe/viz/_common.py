"""What the plots of several notebooks share: tier and link colours, and a one-thread context."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


TIER_COLOURS = {"hbm": "#2a9d8f", "dram": "#e9c46a", "file": "#b0b7bf"}
TIER_LABELS = {"hbm": "HBM", "dram": "DRAM", "file": "file"}
CLAIMED_HIT_RATE = 0.8  # the seed prototype's expectation for sequential games
BOUNDARY_COLOUR = "#e76f51"
LINK_COLOURS = {"file_to_dram": "#6c757d", "dram_to_hbm": "#2a9d8f", "hbm_to_dram": "#e76f51",
                "dram_to_file": "#9d0208"}


def link_label(link: str) -> str:
    return link.replace("_to_", "→").replace("dram", "DRAM").replace("hbm", "HBM")


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
