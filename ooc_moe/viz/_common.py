"""What the plots of several notebooks share: tier and link colours."""

from __future__ import annotations


TIER_COLOURS = {"hbm": "#2a9d8f", "dram": "#e9c46a", "file": "#b0b7bf"}
TIER_LABELS = {"hbm": "HBM", "dram": "DRAM", "file": "file"}
CLAIMED_HIT_RATE = 0.8  # the seed prototype's expectation for sequential games
BOUNDARY_COLOUR = "#e76f51"
LINK_COLOURS = {"file_to_dram": "#6c757d", "dram_to_hbm": "#2a9d8f", "hbm_to_dram": "#e76f51",
                "dram_to_file": "#9d0208"}


def link_label(link: str) -> str:
    return link.replace("_to_", "→").replace("dram", "DRAM").replace("hbm", "HBM")
