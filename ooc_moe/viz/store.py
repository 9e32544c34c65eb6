"""Notebook 01: where each expert lives, and a cache explorer over synthetic access patterns."""

from __future__ import annotations

from functools import partial

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..store import TieredExpertStore
from ..store.stats import LINKS
from ..workloads import KINDS, game_blocks, replay_pattern
from ._common import CLAIMED_HIT_RATE, TIER_COLOURS, TIER_LABELS


def plot_tier_map(store: TieredExpertStore, title: str = "where each expert lives") -> Figure:
    """A strip over expert ids coloured by the fastest tier holding each expert."""
    tiers = list(TIER_COLOURS)
    where = [store.where(e) for e in range(store.num_experts)]
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.25 * store.num_experts), 1.5),
                           layout="constrained")
    ax.imshow([[tiers.index(w) for w in where]], aspect="auto", vmin=0, vmax=len(tiers) - 1,
              cmap=ListedColormap(list(TIER_COLOURS.values())))
    ax.set_xticks(np.arange(-0.5, store.num_experts), minor=True)
    ax.grid(which="minor", axis="x", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    ax.set(yticks=[], xlabel="expert id", title=title)
    capacity = {"hbm": store.hbm_capacity, "dram": store.dram_capacity, "file": store.num_experts}
    handles = [Patch(color=TIER_COLOURS[t], label=f"{TIER_LABELS[t]} ({where.count(t)}/"
                     f"{capacity[t]})") for t in tiers]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.2), frameon=False)
    return fig


def _plot_tier_shares(ax: Axes, summary: dict) -> None:
    """(a) where each access was served from."""
    counts = {"HBM hit": summary["hbm_hits"], "DRAM hit": summary["dram_hits"],
              "file read": summary["file_reads"]}
    shares = np.array(list(counts.values())) / max(summary["accesses"], 1)
    bars = ax.bar(list(counts), shares, color=list(TIER_COLOURS.values()))
    ax.bar_label(bars, labels=[f"{s:.1%}" for s in shares])
    ax.set(ylim=(0, 1.1), ylabel="share of expert accesses", title="(a) served from")


def _plot_link_bytes(ax: Axes, summary: dict) -> None:
    """(b) bytes per link, labelled with how many expert records crossed it."""
    moved = np.array([summary[f"bytes_{link}"] for link in LINKS])
    labels = [link.replace("_to_", "→").replace("dram", "DRAM").replace("hbm", "HBM")
              for link in LINKS]
    bars = ax.bar(labels, moved / 1024, color=["#6c757d", "#2a9d8f", "#e76f51", "#e76f51"])
    ax.bar_label(bars, labels=[f"{n // summary['record_bytes']} rec." for n in moved])
    ax.set(ylabel="KiB moved", title="(b) traffic per link (reads, then write-backs)")
    ax.set_ylim(0, max(moved.max() / 1024 * 1.2, 1))
    ax.tick_params(axis="x", labelsize=8)


def _plot_hit_rate_over_time(ax: Axes, records: list[dict], boundaries: list[int],
                             window: int) -> None:
    """(c) HBM hit rate per step (moving average), cumulative, and game boundaries."""
    rate = np.array([r["hit_rate"] for r in records])
    n = len(rate)
    # a trailing mean; the first steps average over what exists so far
    smoothed = np.convolve(rate, np.ones(window))[:n] / np.minimum(np.arange(1, n + 1), window)
    ax.plot(smoothed, color=TIER_COLOURS["hbm"], label=f"HBM hit rate ({window}-step mean)")
    ax.plot([r["cumulative_hit_rate"] for r in records], color="black", linewidth=1,
            label="cumulative")
    ax.axhline(CLAIMED_HIT_RATE, color="grey", linestyle="--",
               label=f"prototype's claim: {CLAIMED_HIT_RATE:.0%}")
    for i, start in enumerate(boundaries):
        ax.axvline(start, color="#e76f51", linestyle=":", linewidth=1)
        ax.text(start + 2, 0.9, f"game {i + 1}", color="#e76f51", fontsize=8)
    ax.set(xlim=(0, n), ylim=(0, 1.05), xlabel="step", ylabel="HBM hit rate",
           title="(c) hit rate over time")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)


def cache_explorer(hbm_capacity: int, dram_capacity: int, pattern: str, num_experts: int = 64,
                   num_steps: int = 400, experts_per_step: int = 4, prefetch: bool = False, *,
                   training: bool = False, num_games: int = 4, seed: int = 0,
                   window: int = 20) -> Figure:
    """Replay ``pattern`` through a small real store and plot where accesses were served,
    the traffic per link and the HBM hit rate over time.

    ``prefetch`` prefetches each next step's experts (an oracle); ``training`` marks the used
    experts dirty every step, so evictions cost write-backs. Raises ValueError on impossible
    settings (e.g. ``dram_capacity < hbm_capacity``).
    """
    records, summary = replay_pattern(
        pattern, hbm_capacity, dram_capacity, num_experts=num_experts, num_steps=num_steps,
        experts_per_step=experts_per_step, prefetch_next=prefetch, mark_dirty=training,
        num_games=num_games, seed=seed)
    fig, axes = plt.subplot_mosaic([["tiers", "links"], ["time", "time"]], figsize=(10, 6.5),
                                   layout="constrained")
    _plot_tier_shares(axes["tiers"], summary)
    _plot_link_bytes(axes["links"], summary)
    boundaries = ([b.start for b in game_blocks(num_steps, num_games)]
                  if pattern == "sequential_games" else [])
    _plot_hit_rate_over_time(axes["time"], records, boundaries, window)
    extras = "".join([", oracle prefetch" if prefetch else "", ", training" if training else ""])
    fig.suptitle(f"{pattern}: {experts_per_step} of {num_experts} experts per step, HBM "
                 f"{hbm_capacity}, DRAM {dram_capacity}{extras} -> HBM hit rate "
                 f"{summary['hit_rate']:.1%}")
    return fig


def show_cache_explorer(hbm_capacity: int, dram_capacity: int, pattern: str,
                        prefetch: bool = False, training: bool = False, **sizes) -> None:
    """The explorer widget's callback: draw ``cache_explorer``, or say why a setting is
    impossible instead of raising inside the widget."""
    if dram_capacity < hbm_capacity:
        print(f"DRAM ({dram_capacity} slots) must hold at least as many experts as HBM "
              f"({hbm_capacity}): the hierarchy is inclusive, every expert in HBM keeps its "
              "DRAM slot. Raise the DRAM slider.")
        return
    cache_explorer(hbm_capacity, dram_capacity, pattern, prefetch=prefetch, training=training,
                   **sizes)
    plt.show()


def cache_explorer_widget(num_experts: int = 64, num_steps: int = 400,
                          experts_per_step: int = 4) -> widgets.VBox:
    """Sliders for the two capacities, a pattern menu and prefetch/training switches."""
    hbm_default = min(num_experts, max(experts_per_step, num_experts // 8))
    slider = partial(widgets.IntSlider, max=num_experts, continuous_update=False,
                     style={"description_width": "initial"})
    hbm = slider(value=hbm_default, min=experts_per_step, description="HBM slots")
    dram = slider(value=max(hbm_default, num_experts // 2), min=hbm_default,
                  description="DRAM slots")
    # inclusive hierarchy: DRAM can never be set below HBM (raising min raises the value too)
    hbm.observe(lambda change: setattr(dram, "min", change["new"]), names="value")
    pattern = widgets.Dropdown(options=list(KINDS), value="sequential_games",
                               description="pattern")
    prefetch = widgets.Checkbox(value=False, description="oracle prefetch of next step")
    training = widgets.Checkbox(value=False, description="training (dirty experts)")
    callback = partial(show_cache_explorer, num_experts=num_experts, num_steps=num_steps,
                       experts_per_step=experts_per_step)
    out = widgets.interactive_output(callback, {
        "hbm_capacity": hbm, "dram_capacity": dram, "pattern": pattern, "prefetch": prefetch,
        "training": training})
    return widgets.VBox([widgets.HBox([hbm, dram, pattern]), widgets.HBox([prefetch, training]),
                         out])
