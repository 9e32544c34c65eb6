"""Plots and widgets for the notebooks, grouped by the notebook that uses them.

Every plot function returns its matplotlib ``Figure`` and never calls ``plt.show()``: in a
notebook the inline backend shows the figures a cell made; in a script, save and close them.
Widgets use only core ipywidgets that exist in both 7.7 (Colab) and 8, and are wired with
``interactive_output``. Widget callbacks swallow nothing; the tests call them directly because
a notebook run does not see errors raised inside a callback.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from functools import partial
from typing import Iterator, Mapping, Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, MaxNLocator

from .agent import ContextWindows, MoERLAgent, MoERLAgentConfig
from .detector import EnvironmentDetector
from .frame_moe import FrameMoE, routing_per_frame, train_sequentially
from .metrics import (game_expert_counts, normalized_mutual_information, prefetch_scores,
                      router_entropy)
from .moe import ExpertOptimizer, TieredMoELayer
from .moe.layer import Dispatch
from .moe.router import load_balancing_loss, router_z_loss
from .store import TieredExpertStore
from .trace import POLICIES, RoutingTrace, SimResult, simulate
from .train import TrainArgs, train
from .store.stats import LINKS
from .workloads import KINDS, game_blocks, replay_pattern

__all__ = ["TIER_COLOURS", "CLAIMED_HIT_RATE", "plot_tier_map", "cache_explorer",
           "show_cache_explorer", "cache_explorer_widget",
           "routing_loss_curves", "plot_routing_losses", "plot_dispatch", "moe_training_run",
           "plot_moe_training", "show_moe_training", "moe_layer_widget",
           "plot_frames", "plot_confusion", "frame_moe_run", "step_experts", "step_slices",
           "frames_trace", "routing_summary", "plot_game_expert_maps", "detector_expert_map",
           "plot_detector_experts", "prefetch_scores", "PREFETCH_CHOICES", "prefetch_sets",
           "simulate_steps", "trace_cache_curves", "plot_cache_explorer", "show_trace_cache",
           "trace_cache_widget",
           "plot_param_budget", "layer_routing_counts", "position_routing_counts",
           "plot_layer_routing", "one_rollout",
           "plot_rollout_routing", "train_run", "plot_learning_curve", "plot_store_history",
           "summarize_history",
           "plot_retention", "plot_forgetting", "plot_hit_rate_over_time",
           "plot_game_expert_usage", "save_run_plots", "show_sequential_run",
           "plot_game_over_stages", "sequential_results_widget"]

TIER_COLOURS = {"hbm": "#2a9d8f", "dram": "#e9c46a", "file": "#b0b7bf"}
TIER_LABELS = {"hbm": "HBM", "dram": "DRAM", "file": "file"}
CLAIMED_HIT_RATE = 0.8  # the seed prototype's expectation for sequential games


# -- notebook 01: the tiered store ------------------------------------------------------------
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
    ax.axhline(CLAIMED_HIT_RATE, color="grey", linestyle="--", label="prototype's claim: 80%")
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


# -- notebook 02: MoE layers ------------------------------------------------------------------
LINK_COLOURS = {"file_to_dram": "#6c757d", "dram_to_hbm": "#2a9d8f", "hbm_to_dram": "#e76f51",
                "dram_to_file": "#9d0208"}


def _link_label(link: str) -> str:
    return link.replace("_to_", "→").replace("dram", "DRAM").replace("hbm", "HBM")


def routing_loss_curves(num_experts: int = 8, top_k: int = 2, tokens_per_game: int = 64, *,
                        biases: np.ndarray | None = None, scales: np.ndarray | None = None,
                        seed: int = 0) -> dict:
    """The router's two auxiliary losses on synthetic logits.

    ``num_experts // top_k`` games each prefer their own ``top_k`` experts: game g adds
    ``bias`` to the logits of experts ``g*top_k .. (g+1)*top_k - 1`` (on top of N(0, 1) noise).
    For each bias, the Switch load-balancing loss is measured on a batch of game 0 alone and on
    a batch mixing every game. The z-loss is measured on the noise scaled by each of ``scales``.
    Returns a dict of numpy arrays (plus ``num_experts`` and ``top_k``).
    """
    biases = np.linspace(0, 6, 13) if biases is None else np.asarray(biases, dtype=float)
    scales = np.linspace(0, 8, 17) if scales is None else np.asarray(scales, dtype=float)
    games = num_experts // top_k
    assert games >= 1, f"need num_experts >= top_k, got {num_experts} < {top_k}"
    noise = torch.randn(games, tokens_per_game, num_experts,
                        generator=torch.Generator().manual_seed(seed))
    favourite = torch.zeros(games, 1, num_experts)
    for g in range(games):
        favourite[g, 0, g * top_k:(g + 1) * top_k] = 1.0
    one_game, mixed = [], []
    for bias in biases:
        logits = noise + float(bias) * favourite                  # [games, tokens, experts]
        indices = logits.topk(top_k, dim=-1).indices
        one_game.append(load_balancing_loss(logits[0], indices[0]).item())
        mixed.append(load_balancing_loss(logits.reshape(-1, num_experts),
                                         indices.reshape(-1, top_k)).item())
    z = [router_z_loss(float(s) * noise.reshape(-1, num_experts)).item() for s in scales]
    return {"num_experts": num_experts, "top_k": top_k, "bias": biases,
            "balance_one_game": np.array(one_game), "balance_mixed": np.array(mixed),
            "scale": scales, "z_loss": np.array(z)}


def plot_routing_losses(curves: dict) -> Figure:
    """(a) load-balancing loss against the games' preference for their own experts, on a
    one-game batch and a mixed batch; (b) the z-loss against the scale of the logits."""
    e, k = curves["num_experts"], curves["top_k"]
    fig, (lb, z) = plt.subplots(1, 2, figsize=(10, 3.6), layout="constrained")
    lb.plot(curves["bias"], curves["balance_one_game"], "o-", color="#e76f51",
            label="batch of one game")
    lb.plot(curves["bias"], curves["balance_mixed"], "o-", color="#2a9d8f",
            label=f"batch mixing all {e // k} games")
    lb.axhline(1.0, color="grey", linestyle="--", label="1.0: perfectly balanced")
    lb.axhline(e / k, color="grey", linestyle=":", label=f"{e}/{k}: all on {k} experts")
    lb.set(xlabel="logit bias of each game towards its own experts",
           ylabel="load-balancing loss", ylim=(0, e / k * 1.15),
           title=f"(a) Switch loss, {e} experts, top-{k}")
    lb.legend(fontsize=8, loc="center right")
    z.plot(curves["scale"], curves["z_loss"], "o-", color="#264653")
    z.axhline(np.log(e) ** 2, color="grey", linestyle="--", label=f"(ln {e})²: all logits equal")
    z.set(xlabel="scale (std) of the router logits", ylabel="z-loss",
          title="(b) router z-loss = mean logsumexp²")
    z.legend(fontsize=8)
    return fig


def _expert_colours(num_experts: int) -> ListedColormap:
    colours = plt.get_cmap("tab10").colors if num_experts <= 10 else plt.get_cmap("tab20").colors
    assert num_experts <= len(colours), f"plot_dispatch draws at most 20 experts, got {num_experts}"
    return ListedColormap(colours[:num_experts])


def plot_dispatch(indices: torch.Tensor, num_experts: int) -> Figure:
    """(a) the router's choices ``[tokens, top_k]``, coloured by expert; (b) the same
    assignments in ``Dispatch`` order: one contiguous slice per expert, labelled by token."""
    indices = indices.cpu()
    dispatch = Dispatch.from_indices(indices)
    tokens, top_k = indices.shape
    cmap, span = _expert_colours(num_experts), dict(vmin=-0.5, vmax=num_experts - 0.5)
    fig, (routed, grouped) = plt.subplots(
        1, 2, figsize=(11, 2.6), width_ratios=[tokens, tokens * top_k], layout="constrained")
    routed.imshow(indices.T.numpy(), cmap=cmap, aspect="auto", **span)
    for t in range(tokens):
        for k in range(top_k):
            routed.text(t, k, f"e{indices[t, k].item()}", ha="center", va="center", fontsize=8)
    routed.set(xticks=range(tokens), yticks=range(top_k), xlabel="token",
               yticklabels=[f"choice {k + 1}" for k in range(top_k)],
               title="(a) routing: expert_indices")
    in_order = indices.reshape(-1)[dispatch.order]
    grouped.imshow(in_order[None].numpy(), cmap=cmap, aspect="auto", **span)
    for s, t in enumerate(dispatch.token.tolist()):
        grouped.text(s, 0, f"t{t}", ha="center", va="center", fontsize=8)
    for e, (start, end) in dispatch.slices.items():
        grouped.axvline(start - 0.5, color="black", linewidth=1.5)
        grouped.text((start + end - 1) / 2, -0.55, f"e{e}\n{start}:{end}", ha="center",
                     va="bottom", fontsize=8)
    grouped.set(xticks=range(len(in_order)), yticks=[], ylim=(0.5, -1.3),
                xlabel="position in the sorted order (dispatch.token labels each cell)",
                title="(b) grouped: each expert's slice start:end of the sorted order")
    return fig


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread: the matrices here are tiny, and on a busy machine
    extra OpenMP threads only compete with the store's transfer thread (we measured runs
    several to tens of times slower on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def moe_training_run(num_experts: int, top_k: int, hbm_capacity: int, *,
                     dram_capacity: int | None = None, dim: int = 16, hidden: int = 32,
                     tokens: int = 256, steps: int = 10, seed: int = 0,
                     load_balance_coef: float = 0.01, lr: float = 1e-2) -> dict:
    """Train a small ``TieredMoELayer`` on a fixed regression task and record, per step, what
    the routing and the store did.

    The store is real and trainable (``optimizer_state=True``, a temporary file, CPU); DRAM
    holds every expert unless ``dram_capacity`` says otherwise. One step = forward, backward,
    ``torch.optim.Adam`` on the router and LayerNorm, ``ExpertOptimizer`` on the experts; the
    counters of a step cover all three. Every step trains on the same batch, so the routing
    changes only through training and the router's noise. Returns numpy arrays over steps:
    ``usage [steps, num_experts]`` (assignments per expert), ``bytes`` (link -> bytes moved),
    ``accesses``, ``hbm_hits``, ``prefetch_hits``, ``hit_rate``, ``experts_used``, ``waves``
    (per forward pass), ``loss`` (task MSE), ``balance_loss``; and ``totals``, the store's
    summary at the end.
    """
    dram_capacity = num_experts if dram_capacity is None else dram_capacity
    data = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=data)
    target = x + torch.tanh(x @ torch.randn(dim, dim, generator=data) / dim ** 0.5)
    rows: list[dict] = []
    # fork_rng: the layer's initialisation and router noise are seeded without touching the
    # caller's global RNG state
    with _one_thread(), torch.random.fork_rng(devices=[]), TieredExpertStore(
            num_experts, dim, hidden, hbm_capacity, dram_capacity, "cpu", seed=seed,
            optimizer_state=True) as store:
        torch.manual_seed(seed)
        layer = TieredMoELayer(dim, hidden, store, top_k, dropout=0.0,
                               load_balance_coef=load_balance_coef)
        dense_opt = torch.optim.Adam(layer.parameters(), lr=lr)
        expert_opt = ExpertOptimizer(store, lr=lr)
        for _ in range(steps):
            before = store.get_stats_summary()
            y, aux_loss = layer(x)
            loss = F.mse_loss(y, target)
            dense_opt.zero_grad(set_to_none=True)
            (loss + aux_loss).backward()
            dense_opt.step()
            expert_opt.step()
            rows.append(_step_record(store, layer, before, loss.item()))
        totals = store.get_stats_summary()   # before shutdown() flushes the dirty records
    result = {key: np.array([row[key] for row in rows]) for key in rows[0] if key != "bytes"}
    result["bytes"] = {link: np.array([row["bytes"][link] for row in rows]) for link in LINKS}
    result.update(num_experts=num_experts, top_k=top_k, hbm_capacity=hbm_capacity,
                  dram_capacity=dram_capacity, tokens=tokens, steps=steps,
                  record_bytes=store.record_bytes, totals=totals)
    return result


def _step_record(store: TieredExpertStore, layer: TieredMoELayer, before: dict,
                 loss: float) -> dict:
    """One step of ``moe_training_run``: routing figures and the change in the counters."""
    after = store.get_stats_summary()
    delta = {key: after[key] - before[key] for key in ("accesses", "hbm_hits", "prefetch_hits")}
    routing = layer.last_routing
    used = routing.expert_indices.unique().tolist()
    waves = len(layer.last_waves)
    return {"usage": torch.bincount(routing.expert_indices.reshape(-1),
                                    minlength=store.num_experts).numpy(),
            "bytes": {link: after[f"bytes_{link}"] - before[f"bytes_{link}"] for link in LINKS},
            **delta, "hit_rate": delta["hbm_hits"] / max(delta["accesses"], 1),
            "experts_used": len(used), "waves": waves, "loss": loss,
            "balance_loss": routing.load_balancing_loss.item()}


def _plot_usage(ax: Axes, result: dict) -> None:
    """(a) assignments per expert over the whole run, against a uniform router."""
    total = result["usage"].sum(axis=0)
    ax.bar(np.arange(result["num_experts"]), total, color="#264653")
    ax.axhline(total.sum() / result["num_experts"], color="grey", linestyle="--",
               label="uniform")
    ax.set(xlabel="expert id", ylabel="token assignments",
           title=f"(a) expert usage over {result['steps']} steps "
                 f"(balance loss {result['balance_loss'][-1]:.2f})")
    ax.legend(fontsize=8)


def _plot_step_bytes(ax: Axes, result: dict) -> None:
    """(b) KiB per link per step, stacked; step 1 starts cold (every expert in the file)."""
    steps = np.arange(1, result["steps"] + 1)
    bottom = np.zeros(len(steps))
    for link in LINKS:
        kib = result["bytes"][link] / 1024
        ax.bar(steps, kib, bottom=bottom, color=LINK_COLOURS[link], label=_link_label(link))
        bottom += kib
    ax.annotate("cold", (1, bottom[0]), ha="center", va="bottom", fontsize=8)
    ax.set(xlabel="training step", ylabel="KiB moved",
           ylim=(0, max(bottom.max() * 1.15, 1)),
           title=f"(b) traffic per step (one record = {result['record_bytes'] / 1024:.1f} KiB)")
    ax.legend(fontsize=8, ncols=2)


def _plot_step_hits(ax: Axes, result: dict) -> None:
    """(c) HBM hit rate of each step's accesses (forward, backward and optimizer)."""
    steps = np.arange(1, result["steps"] + 1)
    ax.plot(steps, result["hit_rate"], "o-", color=TIER_COLOURS["hbm"])
    lo, hi = result["waves"].min(), result["waves"].max()
    waves = f"{lo}" if lo == hi else f"{lo}-{hi}"
    ax.set(xlabel="training step", ylabel="HBM hit rate", ylim=(0, 1.05),
           title=f"(c) HBM hits per step ({waves} wave{'s' if hi > 1 else ''} per pass)")


def _plot_step_loss(ax: Axes, result: dict) -> None:
    """(d) the task loss per step."""
    steps = np.arange(1, result["steps"] + 1)
    ax.plot(steps, result["loss"], "o-", color="#e76f51")
    ax.set(xlabel="training step", ylabel="MSE", title="(d) task loss")


def plot_moe_training(result: dict) -> Figure:
    """Four panels for a ``moe_training_run`` result: expert usage, bytes per link per step,
    HBM hit rate per step, loss per step."""
    fig, axes = plt.subplot_mosaic([["usage", "bytes"], ["hits", "loss"]], figsize=(11, 6.5),
                                   layout="constrained")
    _plot_usage(axes["usage"], result)
    _plot_step_bytes(axes["bytes"], result)
    _plot_step_hits(axes["hits"], result)
    _plot_step_loss(axes["loss"], result)
    for name in ("bytes", "hits", "loss"):
        axes[name].xaxis.set_major_locator(MaxNLocator(integer=True))
    totals = result["totals"]
    fig.suptitle(f"{result['num_experts']} experts, top-{result['top_k']}, "
                 f"{result['tokens']} tokens; HBM {result['hbm_capacity']}, DRAM "
                 f"{result['dram_capacity']} slots -> HBM hit rate {totals['hit_rate']:.1%}")
    return fig


def show_moe_training(num_experts: int, top_k: int, hbm_capacity: int, **options) -> None:
    """The MoE widget's callback: train, plot, or say why a setting is impossible."""
    if top_k > num_experts or hbm_capacity > num_experts:
        print(f"top-k ({top_k}) and HBM slots ({hbm_capacity}) can be at most the number of "
              f"experts ({num_experts}): lower them or add experts.")
        return
    plot_moe_training(moe_training_run(num_experts, top_k, hbm_capacity, **options))
    plt.show()


def moe_layer_widget(max_experts: int = 64, max_top_k: int = 4, **options) -> widgets.VBox:
    """Sliders for the number of experts, top-k and HBM slots; each change trains a fresh
    layer with ``moe_training_run(..., **options)`` and plots it."""
    slider = partial(widgets.IntSlider, continuous_update=False,
                     style={"description_width": "initial"})
    experts = slider(value=min(16, max_experts), min=min(2, max_experts), max=max_experts,
                     description="experts")
    top_k = slider(value=min(2, experts.value), min=1, max=min(max_top_k, experts.value),
                   description="top-k")
    hbm = slider(value=min(4, experts.value), min=1, max=experts.value,
                 description="HBM slots")

    def clamp(change: dict) -> None:
        # lowering a slider's max lowers its value too; registered before interactive_output,
        # so the callback never sees more top-k or HBM slots than experts
        top_k.max = min(max_top_k, change["new"])
        hbm.max = change["new"]

    experts.observe(clamp, names="value")
    out = widgets.interactive_output(partial(show_moe_training, **options), {
        "num_experts": experts, "top_k": top_k, "hbm_capacity": hbm})
    return widgets.VBox([widgets.HBox([experts, top_k, hbm]), out])


# -- notebook 03: the environment detector, real routing and the cache -----------------------
PREFETCH_CHOICES = ("none", "recorded", "detector", "oracle")
BOUNDARY_COLOUR = "#e76f51"


def plot_frames(frames: np.ndarray, game_ids: np.ndarray, games: Sequence[str],
                per_game: int = 2) -> Figure:
    """The newest frame of ``per_game`` observations of each game, spread evenly over that
    game's frames (``frames`` uint8 ``[N, 4, 84, 84]`` as ``collect_frames`` returns them)."""
    game_ids = np.asarray(game_ids)
    fig, axes = plt.subplots(per_game, len(games), figsize=(2.1 * len(games), 2.2 * per_game),
                             squeeze=False, layout="constrained")
    for g, name in enumerate(games):
        idx = np.flatnonzero(game_ids == g)
        assert len(idx), f"no frames of game {g} ({name}): check game_ids"
        for row, i in enumerate(idx[np.linspace(0, len(idx) - 1, per_game).round().astype(int)]):
            axes[row, g].imshow(frames[i, -1], cmap="gray", vmin=0, vmax=255)
            axes[row, g].set(xticks=[], yticks=[])
            axes[row, g].set_title(f"{name}, frame {i}", fontsize=9)
    return fig


def plot_confusion(confusion: np.ndarray, games: Sequence[str]) -> Figure:
    """A confusion matrix (row = true game, column = predicted game), each cell labelled with
    its count and shaded by its share of the row."""
    confusion = np.asarray(confusion)
    n = len(games)
    assert confusion.shape == (n, n), f"confusion is {confusion.shape}, expected ({n}, {n})"
    shares = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.8 * n + 2, 0.8 * n + 1.2), layout="constrained")
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, int(confusion[i, j]), ha="center", va="center",
                    color="white" if shares[i, j] > 0.5 else "black")
    accuracy = np.trace(confusion) / max(confusion.sum(), 1)
    ax.set(xticks=range(n), yticks=range(n), xticklabels=games, yticklabels=games,
           xlabel="predicted game", ylabel="true game", title=f"accuracy {accuracy:.1%}")
    return fig


def frame_moe_run(frames: np.ndarray, game_ids: np.ndarray, eval_frames: np.ndarray | None = None,
                  *, num_experts: int = 64, num_layers: int = 2, top_k: int = 2,
                  batch_size: int = 8, steps_per_game: int = 100,
                  load_balance_coef: float = 0.01, noise_std: float = 0.1, dim: int = 16,
                  hidden: int = 32, lr: float = 1e-3, seed: int = 0) -> dict:
    """Train a ``FrameMoE`` game after game (``train_sequentially``) and return its routing.

    The store holds every expert in HBM (and DRAM), so recording never streams: the trace is
    the router's choices, which ``simulate_steps`` then replays at any cache size.
    ``noise_std`` is the router's exploration noise (``ExpertRouter``'s default is 0.1).
    Returns ``trace`` (the ``RoutingTrace``), ``losses`` per step, ``seconds`` of training,
    ``routing`` and ``eval_routing`` (``routing_per_frame`` of ``frames`` and ``eval_frames``,
    ``[N, layers, experts]``), per layer the router ``entropy`` (normalised, eval mode) on
    ``eval_frames``, the game the model ``predicted`` for each of them, and the
    configuration.
    """
    eval_frames = frames if eval_frames is None else eval_frames
    num_games = int(np.max(game_ids)) + 1
    with _one_thread(), torch.random.fork_rng(devices=[]), TieredExpertStore(
            num_experts, dim, hidden, num_experts, num_experts, "cpu", seed=seed,
            optimizer_state=True) as store:
        torch.manual_seed(seed)
        model = FrameMoE(store, num_games, num_layers, top_k, load_balance_coef, noise_std)
        started = time.perf_counter()
        run = train_sequentially(model, frames, game_ids, steps_per_game, batch_size, lr, seed)
        seconds = time.perf_counter() - started
        routing = routing_per_frame(model, frames)
        eval_routing = routing_per_frame(model, eval_frames)
        entropy, predicted = _eval_pass(model, eval_frames)
    return {"trace": run.trace, "losses": np.array(run.losses), "seconds": seconds,
            "routing": routing, "eval_routing": eval_routing, "entropy": entropy,
            "predicted": predicted, "num_experts": num_experts, "num_games": num_games,
            "batch_size": batch_size, "steps_per_game": steps_per_game,
            "load_balance_coef": load_balance_coef, "noise_std": noise_std, "top_k": top_k,
            "num_layers": num_layers}


@torch.no_grad()
def _eval_pass(model: FrameMoE, frames: np.ndarray,
               batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the router's normalised entropy over every token of ``frames`` (eval mode:
    no noise), and the game the model predicts for each frame."""
    device = model.layers[0].expert_store.device
    model.eval()
    entropy, predicted, tokens = np.zeros(len(model.layers)), [], 0
    for start in range(0, len(frames), batch_size):
        logits, _ = model(torch.as_tensor(frames[start:start + batch_size], device=device))
        predicted.append(logits.argmax(1).cpu().numpy())
        n = logits.shape[0] * FrameMoE.TOKENS
        entropy += n * np.array([router_entropy(layer.last_routing.router_logits)
                                 for layer in model.layers])
        tokens += n
    return entropy / tokens, np.concatenate(predicted)


def step_experts(trace: RoutingTrace | Sequence[Sequence[int]]) -> list[list[int]]:
    """Per step, the sorted experts it used. For a ``RoutingTrace``, the union over its layers
    (``trace.layers``): the layers of a ``FrameMoE`` share one store, so an expert used by
    both is one record to fetch. A sequence of steps comes back sorted and de-duplicated."""
    if isinstance(trace, RoutingTrace):
        return [sorted({int(e) for layer in step for e in layer}) for step in trace.layers]
    return [sorted({int(e) for e in step}) for step in trace]


def step_slices(game_ids: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Frame indices of each step when ``batch_size`` consecutive frames of one game form a
    step, game after game (the last step of a game may be smaller). With ``collect_frames``
    and ``batch_size = num_envs``, one step is one environment step of every environment."""
    game_ids = np.asarray(game_ids)
    assert batch_size >= 1, f"batch_size must be >= 1, got {batch_size}"
    slices = []
    for game in np.unique(game_ids):
        idx = np.flatnonzero(game_ids == game)
        slices += [idx[start:start + batch_size] for start in range(0, len(idx), batch_size)]
    return slices


def frames_trace(used, game_ids: np.ndarray, batch_size: int) -> RoutingTrace:
    """A ``RoutingTrace`` of playing frames game after game, ``batch_size`` frames per step
    (``step_slices``): per step and layer, the experts any of its frames used. ``used`` is
    the multi-hot ``[N, layers, experts]`` of ``routing_per_frame``."""
    used = torch.as_tensor(np.asarray(used)) > 0
    assert used.dim() == 3 and len(used) == len(game_ids), \
        f"used must be [N, layers, experts] for {len(game_ids)} frames, got {tuple(used.shape)}"
    trace = RoutingTrace()
    for idx in step_slices(game_ids, batch_size):
        trace.begin_step(int(np.asarray(game_ids)[idx[0]]))
        for layer in used[torch.as_tensor(idx)].any(0):              # [experts] per layer
            trace.record_layer(torch.nonzero(layer).flatten().tolist())
    return trace


def routing_summary(trace: RoutingTrace, num_experts: int) -> dict:
    """How much a trace's routing leaves for a cache to exploit.

    - ``experts_per_step``: mean number of experts a step used (``step_experts``);
    - ``working_set``: per game, the experts used over the second half of its steps (after
      the router has adapted to it), averaged over games;
    - ``nmi``: ``normalized_mutual_information`` of the ``[games, experts]`` table counting,
      per step, each expert it used: MI(game; expert) / H(game);
    - ``usage``: that table divided by each game's number of steps (the share of a game's
      steps that used each expert).
    """
    steps, games = step_experts(trace), np.asarray(trace.games)
    num_games = int(games.max()) + 1
    table = game_expert_counts(games, steps, num_games, num_experts)
    working = []
    for game in np.unique(games):
        idx = np.flatnonzero(games == game)
        working.append(len({e for t in idx[len(idx) // 2:] for e in steps[t]}))
    per_game = np.bincount(games, minlength=num_games)[:, None]
    return {"experts_per_step": float(np.mean([len(s) for s in steps])),
            "working_set": float(np.mean(working)),
            "nmi": normalized_mutual_information(table),
            "usage": table / np.maximum(per_game, 1)}


def plot_game_expert_maps(maps: Mapping[str, np.ndarray], games: Sequence[str],
                          vmax: float = 1.0) -> Figure:
    """One ``[games, experts]`` heatmap per entry of ``maps`` (title -> table), stacked, on a
    shared colour scale from 0 to ``vmax``."""
    fig, axes = plt.subplots(len(maps), 1, figsize=(11, 0.45 * len(games) * len(maps) + 1.4),
                             squeeze=False, layout="constrained")
    for ax, (title, table) in zip(axes[:, 0], maps.items()):
        table = np.asarray(table)
        assert table.shape[0] == len(games), f"{title}: {table.shape[0]} rows, {len(games)} games"
        image = ax.imshow(table, aspect="auto", cmap="viridis", vmin=0, vmax=vmax,
                          interpolation="nearest")
        ax.set(yticks=range(len(games)), yticklabels=games, title=title)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel("expert id")
    fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.9)
    return fig


@torch.no_grad()
def detector_expert_map(detector: EnvironmentDetector, frames: np.ndarray, game_ids: np.ndarray,
                        batch_size: int = 256) -> np.ndarray:
    """``[games, experts]``: per game, the mean over its frames of the detector's probability
    that some layer uses each expert, ``1 - prod_l (1 - p_l)`` (the score ``PrefetchPlanner``
    ranks by when the layers share one store)."""
    probs = torch.cat([torch.sigmoid(detector(frames[i:i + batch_size])[1]).cpu()
                       for i in range(0, len(frames), batch_size)])          # [N, L, E]
    any_layer = (1.0 - (1.0 - probs).prod(1)).numpy()                         # [N, E]
    game_ids = np.asarray(game_ids)
    return np.stack([any_layer[game_ids == g].mean(0) for g in range(detector.num_envs)])


def plot_detector_experts(detector: EnvironmentDetector, frames: np.ndarray,
                          game_ids: np.ndarray, used, games: Sequence[str]) -> Figure:
    """(a) what the detector's expert head predicts per game against (b) what the router did:
    the share of each game's frames whose tokens used each expert (``used`` is the multi-hot
    ``[N, layers, experts]`` of ``routing_per_frame`` for ``frames``)."""
    used_any = (torch.as_tensor(np.asarray(used)) > 0).any(1).float().numpy()   # [N, E]
    game_ids = np.asarray(game_ids)
    actual = np.stack([used_any[game_ids == g].mean(0) for g in range(len(games))])
    return plot_game_expert_maps({
        "(a) detector: mean predicted probability that a frame uses the expert":
            detector_expert_map(detector, frames, game_ids),
        "(b) router: share of the frames that used the expert": actual}, games)


def _prefetch_problem(trace, choice: str, detector_sets) -> str | None:
    """Why ``choice`` cannot be replayed on ``trace`` (None when it can)."""
    if choice not in PREFETCH_CHOICES:
        return f"prefetch must be one of {PREFETCH_CHOICES}, got {choice!r}"
    num_steps = len(step_experts(trace))
    if choice == "recorded" and not (isinstance(trace, RoutingTrace) and any(trace.prefetch)):
        return ("this trace recorded no prefetches (train_sequentially and frames_trace issue "
                "none): choose 'detector' or 'oracle'")
    if choice == "detector":
        if detector_sets is None:
            return "no detector prefetch sets were given for this trace: choose another prefetch"
        if len(detector_sets) != num_steps:
            return (f"{len(detector_sets)} detector prefetch sets for a trace of {num_steps} "
                    "steps: they must be one per step")
    return None


def prefetch_sets(trace: RoutingTrace | Sequence[Sequence[int]], choice: str,
                  detector_sets: Sequence[Sequence[int]] | None = None) -> list | bool:
    """The ``prefetch`` argument of ``simulate_steps`` for a menu ``choice``:

    - ``"none"``: False, no prefetching;
    - ``"recorded"``: what the run prefetched before each step (``trace.prefetch``);
    - ``"detector"``: ``detector_sets``, one predicted set per step;
    - ``"oracle"``: each step's own experts, prefetched before it, i.e. a perfect prediction
      of the next step made during the step before.

    Raises ValueError, saying why, when the choice is unavailable for this trace.
    """
    problem = _prefetch_problem(trace, choice, detector_sets)
    if problem:
        raise ValueError(problem)
    if choice == "none":
        return False
    if choice == "recorded":
        return [list(ids) for ids in trace.prefetch]
    if choice == "detector":
        return [list(ids) for ids in detector_sets]
    return step_experts(trace)


def simulate_steps(trace: RoutingTrace | Sequence[Sequence[int]], hbm_capacity: int,
                   dram_capacity: int | None = None, policy: str = "lru",
                   prefetch: bool | Sequence[Sequence[int]] = False, *,
                   record_bytes: int = 0) -> SimResult:
    """``simulate`` on the step view of a trace: one access per expert a step used.

    This view, rather than the recorded store calls, is what the notebook replays: the store
    calls of a training run depend on the HBM size it was recorded with (how a batch was
    split into waves, forward, backward and optimizer passes), while the experts a step uses
    depend only on the router. A step that uses more experts than ``hbm_capacity`` is
    streamed in waves of at most ``hbm_capacity`` experts (in id order), each one ``get``, as
    ``TieredMoELayer`` streams a batch that does not fit; so every HBM size >= 1 is valid.
    ``prefetch``: False, or per step the ids to prefetch into HBM before its first wave
    (``prefetch_sets``). ``dram_capacity=None``: DRAM holds every expert.
    """
    if not isinstance(hbm_capacity, (int, np.integer)) or hbm_capacity < 1:
        raise ValueError(f"hbm_capacity must be an int >= 1, got {hbm_capacity!r}")
    waves = RoutingTrace()
    for t, step in enumerate(step_experts(trace)):
        for start in range(0, len(step), hbm_capacity):
            waves.events.append(("get", tuple(step[start:start + hbm_capacity]), t))
    return simulate(waves, int(hbm_capacity), dram_capacity, policy,
                    False if prefetch is None else prefetch, record_bytes=record_bytes)


def trace_cache_curves(trace: RoutingTrace | Sequence[Sequence[int]], hbm_sizes: Sequence[int],
                       dram_capacity: int | None = None, policies: Sequence[str] = POLICIES,
                       prefetch_sets: Mapping[str, Sequence[Sequence[int]]] | None = None
                       ) -> dict[str, np.ndarray]:
    """HBM hit rate of ``simulate_steps`` for each HBM size: one curve per policy, keyed by
    its name, and one per policy and prefetch set (``prefetch_sets``: name -> per-step ids),
    keyed ``"policy+name"``. DRAM is ``dram_capacity`` slots (None: every expert), or the
    HBM size where that is larger."""
    runs = {policy: (policy, False) for policy in policies}
    for name, sets in (prefetch_sets or {}).items():
        runs.update({f"{policy}+{name}": (policy, sets) for policy in policies})
    return {key: np.array([simulate_steps(trace, hbm, None if dram_capacity is None
                                          else max(dram_capacity, hbm), policy, sets).hit_rate
                           for hbm in hbm_sizes])
            for key, (policy, sets) in runs.items()}


def _plot_served_vs_belady(ax: Axes, result: SimResult, bound: SimResult, label: str) -> None:
    """(a) where the accesses were served from, for the chosen setting and for Belady."""
    names = ["HBM hit", "DRAM hit", "file read"]
    width = 0.38
    for offset, (res, name, style) in zip((-width / 2, width / 2), (
            (result, label, dict(color=list(TIER_COLOURS.values()))),
            (bound, "Belady, no prefetch", dict(color="white", edgecolor="#264653",
                                                hatch="//")))):
        shares = np.array([res.hbm_hits, res.dram_hits, res.file_reads]) / max(res.accesses, 1)
        bars = ax.bar(np.arange(3) + offset, shares, width, label=name, **style)
        ax.bar_label(bars, labels=[f"{s:.0%}" for s in shares], fontsize=8)
    ax.axhline(CLAIMED_HIT_RATE, color="grey", linestyle="--", label="prototype's claim: 80%")
    ax.set(xticks=range(3), xticklabels=names, ylim=(0, 1.15), ylabel="share of accesses",
           title="(a) served from")
    ax.legend(fontsize=8, loc="upper right")


def _plot_trace_hits_over_time(ax: Axes, result: SimResult, bound: SimResult, steps: list,
                               games: list | None, game_names: Sequence[str] | None,
                               window: int) -> None:
    """(b) HBM hit rate per step (trailing mean), Belady's, and the game boundaries."""
    x = [t for t, step in enumerate(steps) if step]        # simulate skips empty steps
    for res, colour, name in ((result, TIER_COLOURS["hbm"], "chosen"),
                              (bound, "#264653", "Belady, no prefetch")):
        rate = np.asarray(res.hit_rate_per_step)
        n = len(rate)
        smoothed = np.convolve(rate, np.ones(window))[:n] / np.minimum(np.arange(1, n + 1),
                                                                       window)
        ax.plot(x[:n], smoothed, color=colour, linewidth=1.8 if name == "chosen" else 1,
                label=f"{name} ({window}-step mean)")
    ax.axhline(CLAIMED_HIT_RATE, color="grey", linestyle="--")
    if games:
        for t in [0] + [t for t in range(1, len(games)) if games[t] != games[t - 1]]:
            ax.axvline(t, color=BOUNDARY_COLOUR, linestyle=":", linewidth=1)
            name = game_names[games[t]] if game_names else f"game {games[t]}"
            ax.text(t + 0.5, 1.02, name, color=BOUNDARY_COLOUR, fontsize=8)
    ax.set(xlim=(0, len(steps)), ylim=(0, 1.1), xlabel="step", ylabel="HBM hit rate",
           title="(b) HBM hit rate over time")
    ax.legend(fontsize=8, loc="lower right")


def plot_cache_explorer(trace: RoutingTrace | Sequence[Sequence[int]], hbm_capacity: int,
                        dram_capacity: int | None = None, policy: str = "lru",
                        prefetch: str = "none",
                        detector_sets: Sequence[Sequence[int]] | None = None, *,
                        game_names: Sequence[str] | None = None, window: int = 10,
                        title: str = "") -> Figure:
    """Replay ``trace`` (``simulate_steps``) with one cache setting: (a) the share of accesses
    served by HBM, DRAM and the file, against Belady's optimal replacement without prefetching
    and the prototype's 80% claim; (b) the HBM hit rate per step, with game boundaries.

    ``prefetch`` is one of ``PREFETCH_CHOICES`` (see ``prefetch_sets``). With prefetching the
    hit rate can pass Belady's: a prefetched expert still crossed the link, only earlier.
    Raises ValueError on impossible settings.
    """
    steps = step_experts(trace)
    result = simulate_steps(trace, hbm_capacity, dram_capacity, policy,
                            prefetch_sets(trace, prefetch, detector_sets))
    bound = simulate_steps(trace, hbm_capacity, dram_capacity, "belady", False)
    fig, (served, over_time) = plt.subplots(1, 2, figsize=(12, 3.9), width_ratios=[1, 1.8],
                                            layout="constrained")
    label = policy.upper() + ("" if prefetch == "none" else f" + {prefetch} prefetch")
    _plot_served_vs_belady(served, result, bound, label)
    games = trace.games if isinstance(trace, RoutingTrace) else None
    _plot_trace_hits_over_time(over_time, result, bound, steps, games, game_names, window)
    dram = "all" if dram_capacity is None else dram_capacity
    fig.suptitle(f"{title + ': ' if title else ''}{label}, HBM {hbm_capacity}, DRAM {dram}; "
                 f"{np.mean([len(s) for s in steps]):.1f} experts per step -> HBM hit rate "
                 f"{result.hit_rate:.1%} (Belady {bound.hit_rate:.1%})")
    return fig


def show_trace_cache(traces: Mapping[str, RoutingTrace], trace_name: str, hbm_capacity: int,
                     dram_capacity: int, policy: str, prefetch: str,
                     detector_sets: Mapping[str, Sequence[Sequence[int]]] | None = None,
                     game_names: Sequence[str] | None = None) -> None:
    """The trace explorer's callback: draw ``plot_cache_explorer``, or say why a setting is
    impossible instead of raising inside the widget."""
    trace = traces[trace_name]
    sets = (detector_sets or {}).get(trace_name)
    if dram_capacity < hbm_capacity:
        print(f"DRAM ({dram_capacity} slots) must hold at least as many experts as HBM "
              f"({hbm_capacity}): the tiers are inclusive. Raise the DRAM slider.")
        return
    problem = _prefetch_problem(trace, prefetch, sets)
    if problem:
        print(f"{trace_name}: {problem}.")
        return
    plot_cache_explorer(trace, hbm_capacity, dram_capacity, policy, prefetch, sets,
                        game_names=game_names, title=trace_name)
    plt.show()


def trace_cache_widget(traces: RoutingTrace | Mapping[str, RoutingTrace],
                       detector_sets: Mapping[str, Sequence[Sequence[int]]] | None = None,
                       num_experts: int | None = None, *, hbm_capacity: int | None = None,
                       game_names: Sequence[str] | None = None) -> widgets.VBox:
    """Menus for the trace, the replacement policy and the prefetch source, and sliders for
    the HBM and DRAM slots (1 to ``num_experts``; None: the largest expert id + 1). The DRAM
    slider never goes below HBM; a prefetch source a trace lacks prints why."""
    traces = {"trace": traces} if isinstance(traces, RoutingTrace) else dict(traces)
    if num_experts is None:
        num_experts = 1 + max(e for trace in traces.values() for step in step_experts(trace)
                              for e in step)
    hbm_default = hbm_capacity or max(1, num_experts // 4)
    slider = partial(widgets.IntSlider, min=1, max=num_experts, continuous_update=False,
                     style={"description_width": "initial"})
    hbm = slider(value=hbm_default, description="HBM slots")
    dram = slider(value=num_experts, description="DRAM slots")
    dram.min = hbm_default
    # registered before interactive_output, so the callback never sees DRAM < HBM
    hbm.observe(lambda change: setattr(dram, "min", change["new"]), names="value")
    menu = partial(widgets.Dropdown, style={"description_width": "initial"})
    trace = menu(options=list(traces), description="trace")
    policy = menu(options=list(POLICIES), value="lru", description="policy")
    prefetch = menu(options=list(PREFETCH_CHOICES), value="none", description="prefetch")
    callback = partial(show_trace_cache, traces, detector_sets=detector_sets,
                       game_names=game_names)
    out = widgets.interactive_output(callback, {
        "trace_name": trace, "hbm_capacity": hbm, "dram_capacity": dram, "policy": policy,
        "prefetch": prefetch})
    return widgets.VBox([widgets.HBox([trace, policy, prefetch]), widgets.HBox([hbm, dram]),
                         out])


# -- notebook 04: the agent, its parameter budget, and PPO -----------------------------------
def _named(items, kind: type, name: str) -> dict:
    """One ``kind`` object as ``{name: obj}``, or a mapping as a dict."""
    return {name: items} if isinstance(items, kind) else dict(items)


def _human(n: float, unit: str = "") -> str:
    """3 significant digits with a decimal prefix: 546323635 -> '546M', 8.6e9 B -> '8.60 GB'."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{' ' if unit else ''}{prefix}{unit}"
    return f"{n:.3g}{' ' if unit else ''}{unit}"


PARAM_BARS = {"total": "total", "active_per_token": "active per token",
              "dense": "dense (always in HBM)"}
TIER_BYTES = {"hbm": "bytes_hbm", "dram": "bytes_dram", "file": "bytes_file"}


def _grouped_bars(ax: Axes, values: dict[str, list[float]], colours: list[str],
                  unit: str) -> None:
    """One group of bars per config (``values``: config -> one value per bar), log scale,
    each bar labelled with its value."""
    names = list(values)
    width = 0.8 / len(colours)
    for i, colour in enumerate(colours):
        heights = [values[name][i] for name in names]
        bars = ax.bar(np.arange(len(names)) + (i - (len(colours) - 1) / 2) * width, heights,
                      width, color=colour)
        ax.bar_label(bars, labels=[_human(h, unit) for h in heights], fontsize=7)
    ax.set(xticks=range(len(names)), xticklabels=names, yscale="log")


def plot_param_budget(configs: MoERLAgentConfig | Mapping[str, MoERLAgentConfig]) -> Figure:
    """``estimate_params`` of one config or of several (name -> config): (a) parameters, the
    total against those a token uses (the dense part plus top-k experts in every layer); (b)
    bytes of the expert store per tier: HBM slots, DRAM slots and the file, each record fp32
    with its gradient and Adam moments (about 4x the expert's parameters)."""
    configs = _named(configs, MoERLAgentConfig, "config")
    estimates = {name: config.estimate_params() for name, config in configs.items()}
    fig, (params, tiers) = plt.subplots(1, 2, figsize=(11, 3.8), layout="constrained")
    _grouped_bars(params, {name: [e[key] for key in PARAM_BARS] for name, e in estimates.items()},
                  ["#264653", "#e76f51", "#8ab17d"], "")
    params.legend(handles=[Patch(color=c, label=label) for c, label in
                           zip(["#264653", "#e76f51", "#8ab17d"], PARAM_BARS.values())],
                  fontsize=8, loc="upper right")
    params.set(ylabel="parameters", title="(a) parameters: total vs active per token")
    _grouped_bars(tiers, {name: [e[key] for key in TIER_BYTES.values()]
                          for name, e in estimates.items()}, list(TIER_COLOURS.values()), "B")
    tiers.legend(handles=[Patch(color=TIER_COLOURS[t], label=f"{TIER_LABELS[t]}")
                          for t in TIER_BYTES], fontsize=8, loc="upper right")
    tiers.set(ylabel="bytes", title="(b) expert records per tier (with optimizer state)")
    for ax in (params, tiers):
        low, high = ax.get_ylim()
        ax.set_ylim(low, high * 30)                  # room for the labels and the legend
    return fig


def layer_routing_counts(agent: MoERLAgent) -> np.ndarray:
    """``[layers, experts]``: how many token assignments (top-k per token) each MoE layer gave
    each expert in the agent's last forward pass."""
    layers = agent.moe_layers
    assert layers and all(layer.last_routing is not None for layer in layers), \
        "no routing to count: run agent(windows) first (a DenseRLAgent has no MoE layers)"
    return np.stack([torch.bincount(layer.last_routing.expert_indices.reshape(-1).cpu(),
                                    minlength=agent.config.num_experts).numpy()
                     for layer in layers])


def position_routing_counts(agent: MoERLAgent, window_len: int | None = None) -> np.ndarray:
    """``[layers, positions, experts]``: ``layer_routing_counts`` split by each token's
    position in its window. ``window_len``: the length T of the last forward's windows
    ``[B, T, dim]`` (default ``context_len``, what rollouts and PPO updates use)."""
    layer_routing_counts(agent)                                   # the same checks
    T = window_len or agent.config.context_len
    counts = []
    for layer in agent.moe_layers:
        indices = layer.last_routing.expert_indices.cpu()         # [B*T, top_k]
        assert indices.shape[0] % T == 0, \
            f"{indices.shape[0]} tokens are not windows of {T}: pass window_len"
        by_position = indices.view(-1, T, indices.shape[-1])      # [B, T, top_k]
        counts.append(np.stack([torch.bincount(by_position[:, t].reshape(-1),
                                               minlength=agent.config.num_experts).numpy()
                                for t in range(T)]))
    return np.stack(counts)


def plot_layer_routing(routing: MoERLAgent | np.ndarray, title: str | None = None, *,
                       row_label: str = "layer") -> Figure:
    """A ``[layer x expert]`` heatmap of token assignments: of the agent's last forward pass
    (``layer_routing_counts``), or a given ``[rows, experts]`` table of counts (e.g. one layer
    of ``position_routing_counts``, with ``row_label="position"``). Cells are labelled with
    their counts when there are at most 32 experts."""
    counts = layer_routing_counts(routing) if isinstance(routing, MoERLAgent) \
        else np.asarray(routing)
    assert counts.ndim == 2, f"routing must be [rows, experts], got shape {counts.shape}"
    layers, experts = counts.shape
    fig, ax = plt.subplots(figsize=(min(12, 2.5 + 0.45 * experts), 1.4 + 0.45 * layers),
                           layout="constrained")
    image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
    if experts <= 32:
        for (layer, expert), n in np.ndenumerate(counts):
            ax.text(expert, layer, int(n), ha="center", va="center", fontsize=7,
                    color="white" if n < counts.max() / 2 else "black")
    used = (counts > 0).sum(1)
    ax.set(xlabel="expert id", yticks=range(layers),
           yticklabels=[f"{row_label} {i} ({u} used)" for i, u in enumerate(used)],
           title=title or f"token assignments per layer and expert ({int(counts.sum())} in all)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=ax, label="assignments")
    return fig


STORE_COUNTERS = ("accesses", "hbm_hits", "dram_hits", "file_reads", "prefetch_hits")


@torch.no_grad()
def one_rollout(agent: MoERLAgent, env, steps: int, *, seed: int | None = None) -> dict:
    """Play ``steps`` steps of the vector ``env`` with ``agent``, sampling each action from its
    policy, as ``PPOTrainer`` collects a rollout: every observation is encoded once and pushed
    into rolling ``ContextWindows``, and the windows go through the transformer. Episode starts
    are read from ``terminated | truncated`` (``SameStep`` autoreset, as ``train.make_env``);
    with ``routing="env"`` every environment is game 0.

    Returns numpy arrays: ``routing [steps, layers, experts]`` (per step and MoE layer, the
    assignments each expert got: every position of every window, top-k each), ``waves [steps,
    layers]`` (how many HBM loads each layer's forward needed), ``rewards`` and ``actions``
    ``[steps, envs]``; ``store``, the change in the store's counters and bytes per link; and
    ``seconds`` and ``sps`` (environment steps of all environments per second).
    """
    assert agent.moe_layers, "one_rollout records routing: give it a MoERLAgent, not a dense one"
    device = next(agent.parameters()).device
    cfg = agent.config
    obs, _ = env.reset(seed=seed)
    num_envs = len(obs)
    windows = ContextWindows(num_envs, cfg.context_len, cfg.expert_dim, device)
    new_episode = torch.ones(num_envs, dtype=torch.bool, device=device)
    games = torch.zeros(num_envs, dtype=torch.long, device=device)   # routing="env": game 0
    routing, waves, rewards, actions = [], [], [], []
    before = agent.store.get_stats_summary()
    started = time.perf_counter()
    with _one_thread():
        for _ in range(steps):
            tokens = agent.encode(torch.as_tensor(obs, device=device))       # [envs, dim]
            logits, _, _ = agent(windows.push(tokens, new_episode),
                                 games if cfg.routing == "env" else None)
            action = torch.distributions.Categorical(logits=logits).sample()
            obs, reward, terminated, truncated, _ = env.step(action.cpu().numpy())
            new_episode = torch.as_tensor(np.logical_or(terminated, truncated), device=device)
            routing.append(layer_routing_counts(agent))
            waves.append([len(layer.last_waves) for layer in agent.moe_layers])
            rewards.append(reward)
            actions.append(action.cpu().numpy())
    seconds = time.perf_counter() - started
    after = agent.store.get_stats_summary()
    keys = STORE_COUNTERS + tuple(f"bytes_{link}" for link in LINKS)
    return {"routing": np.stack(routing), "waves": np.array(waves),
            "rewards": np.array(rewards), "actions": np.array(actions),
            "store": {key: after[key] - before[key] for key in keys},
            "seconds": seconds, "sps": steps * num_envs / seconds}


def plot_rollout_routing(rollout: dict, title: str | None = None) -> Figure:
    """Per MoE layer, which experts each step of a ``one_rollout`` used (an ``[expert x step]``
    image of assignments): rows that stay lit over many steps are a working set a cache can
    keep; speckle all over is routing no cache smaller than the layer can follow."""
    routing = rollout["routing"]                                  # [steps, layers, experts]
    steps, layers, experts = routing.shape
    fig, axes = plt.subplots(layers, 1, figsize=(11, 0.6 + layers * min(4, 0.6 + 0.12 * experts)),
                             squeeze=False, sharex=True, layout="constrained")
    for layer, ax in enumerate(axes[:, 0]):
        counts = routing[:, layer].T                              # [experts, steps]
        image = ax.imshow(counts, aspect="auto", cmap="viridis", interpolation="nearest")
        per_step = (counts > 0).sum(0).mean()
        ax.set(ylabel="expert id", title=f"layer {layer}: {per_step:.1f} of {experts} experts "
                                         f"per step, {rollout['waves'][:, layer].mean():.1f} "
                                         "HBM waves per forward")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        fig.colorbar(image, ax=ax, label="assignments", pad=0.01)
    axes[-1, 0].set_xlabel("rollout step")
    if title:
        fig.suptitle(title)
    return fig


def train_run(args: TrainArgs, progress: bool = False) -> dict:
    """``ooc_moe.train.train(args)`` with one torch thread (restored afterwards): the models
    here are small, and extra threads only compete with the environments and the store."""
    with _one_thread():
        return train(args, progress=progress)


def _update_returns(history: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Global steps and mean episodic return of the updates that finished an episode."""
    rows = [(h["global_step"], np.mean(h["charts/episodic_returns"])) for h in history
            if h["charts/episodic_returns"]]
    steps, means = zip(*rows) if rows else ((), ())
    return np.array(steps, dtype=float), np.array(means, dtype=float)


def _game_boundaries(ax: Axes, history: Sequence[dict], label: bool = True) -> None:
    """A dotted line (and the game's name) where each game of ``history`` starts."""
    if len({h["game"] for h in history}) < 2:
        return
    for i, h in enumerate(history):
        if i == 0 or h["game"] != history[i - 1]["game"]:
            x = history[i - 1]["global_step"] if i else 0
            ax.axvline(x, color=BOUNDARY_COLOUR, linestyle=":", linewidth=1)
            if label:
                ax.text(x, 1.0, f" {h['game']}", color=BOUNDARY_COLOUR, fontsize=8,
                        transform=ax.get_xaxis_transform(), va="bottom")


def plot_learning_curve(runs: Sequence[dict] | Mapping[str, Sequence[dict]],
                        random_return: float | None = None,
                        optimal_return: float | None = None, *,
                        references: Mapping[str, float] | None = None) -> Figure:
    """(a) episodic return against environment steps, every finished episode as a dot and
    the mean per update as a line, with ``random_return``, ``optimal_return`` and any other
    ``references`` (name -> return) as dashed lines; a reference far outside the returns
    (more than twice their range away) is written in the corner instead, so that the curve
    stays readable. (b) where the store served the expert accesses of each update (HBM hit,
    DRAM hit, file read; shares stacked to 1). ``runs``: one ``train`` history, or several by
    name (panel (b) shows the first run that has a store).
    """
    runs = {"MoE": runs} if isinstance(runs, Sequence) else dict(runs)
    fig, (curve, tiers) = plt.subplots(1, 2, figsize=(12, 3.9), width_ratios=[1.4, 1],
                                       layout="constrained")
    returns = []
    for (name, history), colour in zip(runs.items(), ["#264653", "#e76f51", "#8ab17d",
                                                      "#6c757d"]):
        dots = [(h["global_step"], r) for h in history for r in h["charts/episodic_returns"]]
        if dots:
            curve.scatter(*zip(*dots), s=6, color=colour, alpha=0.3, linewidths=0)
            returns += [r for _, r in dots]
        curve.plot(*_update_returns(history), "o-", color=colour, markersize=3,
                   label=f"{name}: mean per update")
    lines = {"random": random_return, "optimal": optimal_return, **(references or {})}
    off_scale = []
    for (name, value), colour in zip(lines.items(), ["grey", "black", "#9d0208", "#2a9d8f"]):
        if value is None:
            continue
        if returns and not _near(value, returns):
            off_scale.append(f"{name} = {value:.4g}")
        else:
            curve.axhline(value, color=colour, linestyle="--", linewidth=1,
                          label=f"{name} ({value:.4g})")
    if off_scale:
        curve.text(0.99, 0.97, ", ".join(off_scale) + " (off the scale)", ha="right",
                   va="top", fontsize=8, transform=curve.transAxes)
    _game_boundaries(curve, next(iter(runs.values())))
    curve.xaxis.set_major_formatter(EngFormatter(sep=""))
    curve.set(xlabel="environment steps (global_step)", ylabel="episodic return",
              title="(a) return")
    curve.legend(fontsize=8, loc="upper left")
    _plot_tier_history(tiers, runs)
    return fig


def _near(value: float, returns: Sequence[float]) -> bool:
    """Whether a reference line fits on the returns' axis: at most twice their range (at
    least 1) beyond them."""
    low, high = min(returns), max(returns)
    margin = 2 * max(high - low, 1.0)
    return low - margin <= value <= high + margin


TIER_KEYS = {"hbm": "store/hit_rate", "dram": "store/dram_hit_rate",
             "file": "store/file_read_rate"}


def _plot_tier_history(ax: Axes, runs: Mapping[str, Sequence[dict]]) -> None:
    """(b) of ``plot_learning_curve``: the store's shares per update, stacked."""
    stored = [(name, h) for name, h in runs.items() if h and "store/hit_rate" in h[0]]
    if not stored:
        ax.text(0.5, 0.5, "no expert store (dense agent)", ha="center", va="center",
                transform=ax.transAxes)
        ax.set(xticks=[], yticks=[], title="(b) where expert accesses were served")
        return
    name, history = stored[0]
    steps = [h["global_step"] for h in history]
    shares = [[h[key] for h in history] for key in TIER_KEYS.values()]
    ax.stackplot(steps, *shares, colors=list(TIER_COLOURS.values()),
                 labels=[f"{TIER_LABELS[t]} ({np.mean(s):.0%} mean)" for t, s in
                         zip(TIER_KEYS, shares)])
    ax.axhline(CLAIMED_HIT_RATE, color="grey", linestyle="--", linewidth=1,
               label="prototype's claim: 80% HBM")
    _game_boundaries(ax, history, label=False)
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set(xlim=(steps[0], steps[-1]) if len(steps) > 1 else None, ylim=(0, 1),
           xlabel="environment steps (global_step)", ylabel="share of expert accesses",
           title=f"(b) {name}: where expert accesses were served")
    ax.legend(fontsize=8, loc="lower right")


def plot_store_history(history: Sequence[dict]) -> Figure:
    """The other ``store/*`` and ``routing/*`` figures a ``train`` run logs per update: (a)
    the detector's prefetch precision (prefetched experts that were used) and coverage (used
    experts that were prefetched); (b) MiB moved per link, stacked; (c) the router entropy
    (normalised, 1 = uniform) and the game-expert NMI (0 with a single game, by definition).
    """
    assert history and "store/hit_rate" in history[0], \
        "no store/* figures in this history: was it a dense run (baseline='dense')?"
    steps = np.array([h["global_step"] for h in history])
    width = 0.8 * (steps[1] - steps[0]) if len(steps) > 1 else 1.0
    fig, (prefetch, moved, routing) = plt.subplots(1, 3, figsize=(13, 3.6),
                                                   layout="constrained")
    for key, colour in (("precision", "#264653"), ("coverage", "#e76f51")):
        values = [h[f"store/prefetch_{key}"] for h in history]
        prefetch.plot(steps, values, "o-", color=colour, markersize=3,
                      label=f"{key} ({np.nanmean(values):.0%} mean)")
    prefetch.set(ylim=(0, 1.05), ylabel="share", title="(a) detector prefetch")
    bottom = np.zeros(len(steps))
    for link in LINKS:
        mib = np.array([h[f"store/bytes_{link}"] for h in history]) / 2**20
        moved.bar(steps, mib, width, bottom=bottom, color=LINK_COLOURS[link],
                  label=_link_label(link))
        bottom += mib
    moved.set(ylabel="MiB per update", title="(b) traffic per link")
    for key, colour, label in (("routing/router_entropy", "#2a9d8f", "router entropy"),
                               ("routing/mutual_information", "#9d0208", "game-expert NMI")):
        routing.plot(steps, [h[key] for h in history], "o-", color=colour, markersize=3,
                     label=label)
    routing.set(ylim=(-0.02, 1.05), title="(c) routing")
    for ax in (prefetch, moved, routing):
        ax.set_xlabel("environment steps (global_step)")
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))
        ax.legend(fontsize=8)
        _game_boundaries(ax, history, label=False)
    return fig


def summarize_history(history: Sequence[dict], last: int = 4) -> dict:
    """The figures a notebook prints about a ``train`` run: ``steps``; ``first_return`` (mean
    of the first update that finished episodes) and ``last_return`` (mean of the episodes of
    the last ``last`` updates); the median ``sps``; with a store, the mean per update of each
    ``store/*`` share (``hit_rate``, ``dram_hit_rate``, ``file_read_rate``,
    ``prefetch_precision``, ``prefetch_coverage``) and the total ``bytes_<link>``."""
    _, means = _update_returns(history)
    tail = [r for h in history[-last:] for r in h["charts/episodic_returns"]]
    summary = {"steps": history[-1]["global_step"],
               "first_return": float(means[0]) if len(means) else float("nan"),
               "last_return": float(np.mean(tail)) if tail else float("nan"),
               "sps": float(np.median([h["charts/SPS"] for h in history]))}
    if "store/hit_rate" in history[0]:
        for key in ("hit_rate", "dram_hit_rate", "file_read_rate", "prefetch_precision",
                    "prefetch_coverage"):
            summary[key] = float(np.nanmean([h[f"store/{key}"] for h in history]))
        for link in LINKS:
            summary[f"bytes_{link}"] = int(sum(h[f"store/bytes_{link}"] for h in history))
    return summary


# -- notebook 05: the sequential experiment ------------------------------------------------

RUN_COLOURS = {"token": "#264653", "env": "#2a9d8f", "dense": "#e76f51"}


def _kind(name: str) -> str:
    return name.rsplit("-seed", 1)[0]


def _column_scaled(matrices: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each game's scores scaled to [0, 1] over all the matrices, so colours compare across
    runs while games of different score ranges share one colour map."""
    stacked = np.concatenate(matrices)
    low, high = stacked.min(0), stacked.max(0)
    span = np.where(high > low, high - low, 1.0)
    return [(m - low) / span for m in matrices]


def _plot_retention(ax: Axes, matrix: np.ndarray, scaled: np.ndarray, games: Sequence[str],
                    title: str) -> None:
    ax.imshow(scaled, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                color="white" if scaled[i, j] < 0.6 else "black")
    ax.set_xticks(range(len(games)), games, rotation=30, ha="right")
    ax.set_yticks(range(matrix.shape[0]), ["untrained"] + [f"after {g}" for g in games])
    ax.set(xlabel="evaluated on", title=title)


def plot_retention(results: Mapping[str, dict]) -> Figure:
    """The retention matrix of each run (or kind of run, from ``summarize``), side by side:
    rows = after which stage (the first row: the untrained agent), columns = the game
    evaluated, raw scores written in the cells; colours scale each game's scores over all
    the panels (0 = its lowest, 1 = its highest), so panels compare cell by cell."""
    names = list(results)
    matrices = [np.array([results[n]["initial"]] + results[n]["retention"]) for n in names]
    scaled = _column_scaled(matrices)
    fig, axes = plt.subplots(1, len(names), figsize=(1.6 + 3.4 * len(names), 3.9),
                             layout="constrained", squeeze=False)
    for ax, name, matrix, s in zip(axes[0], names, matrices, scaled):
        _plot_retention(ax, matrix, s, results[name]["games"], name)
    fig.suptitle("retention: score on each game after each stage\n(colour: each game's "
                 "lowest to highest score over all panels)", fontsize=9)
    return fig


def plot_forgetting(summary: Mapping[str, dict]) -> Figure:
    """Forgetting per game (score at the end of its own stage minus at the end of the
    sequence; > 0 = forgotten) for each kind of run: the mean over seeds, with min-max bars."""
    kinds = list(summary)
    games = summary[kinds[0]]["games"][:-1]           # the last game cannot be forgotten
    fig, ax = plt.subplots(figsize=(2 + 1.6 * max(len(games), 1), 3.4), layout="constrained")
    width = 0.8 / len(kinds)
    for i, kind in enumerate(kinds):
        s = summary[kind]
        mean = np.array(s["forgetting"][:len(games)])
        low = np.array(s.get("forgetting_min", s["forgetting"])[:len(games)])
        high = np.array(s.get("forgetting_max", s["forgetting"])[:len(games)])
        x = np.arange(len(games)) + (i - (len(kinds) - 1) / 2) * width
        ax.bar(x, mean, width, color=RUN_COLOURS.get(kind, "#6c757d"),
               label=f"{kind} (seeds {','.join(map(str, s.get('seeds', [])))})")
        ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt="none", color="black",
                    capsize=3, linewidth=1)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(games)), games)
    ax.set(ylabel="forgetting (raw score)", title="forgetting per game (bars: min-max over "
           "seeds)")
    ax.legend(fontsize=8)
    return fig


def plot_hit_rate_over_time(metrics: dict) -> Figure:
    """Where a MoE run's expert accesses were served, per update, with game boundaries."""
    fig, ax = plt.subplots(figsize=(8, 3.4), layout="constrained")
    _plot_tier_history(ax, {"MoE": metrics["history"]})
    ax.set_title("where the MoE run's expert accesses were served, per update (dotted: a new "
                 "game)", fontsize=10)
    return fig


def plot_game_expert_usage(metrics: dict, layer: int | None = None,
                           game: str | None = None) -> Figure:
    """Which experts each game uses when the final agent plays it (the last evaluation), as
    a share of the game's expert choices, at ``layer`` (None: every layer, one panel each);
    ``game`` is outlined. Each title gives the layer's normalised game-expert MI."""
    routing = metrics.get("eval_routing")
    if not routing:
        raise ValueError("this run has no expert routing (a dense run, or not finished)")
    if layer is not None and not 0 <= layer < len(routing):
        raise ValueError(f"layer must lie in 0..{len(routing) - 1}, got {layer}")
    layers = range(len(routing)) if layer is None else [layer]
    games = metrics["games"]
    fig, axes = plt.subplots(len(layers), 1, squeeze=False, layout="constrained",
                             figsize=(9, 0.3 + (0.9 + 0.45 * len(games)) * len(layers)))
    for ax, index in zip(axes[:, 0], layers):
        table = np.array(routing[index], dtype=float)
        image = ax.imshow(table / np.maximum(table.sum(1, keepdims=True), 1), cmap="magma",
                          aspect="auto", vmin=0)
        fig.colorbar(image, ax=ax, label="share")
        ax.set_yticks(range(len(games)), games)
        if game is not None:
            row = games.index(game)
            ax.add_patch(plt.Rectangle((-0.5, row - 0.5), table.shape[1], 1, fill=False,
                                       edgecolor="#2a9d8f", linewidth=2))
        ax.set_title(f"layer {index}: share of each game's expert choices, final agent "
                     f"(NMI {normalized_mutual_information(table):.3f})", fontsize=9)
    axes[-1, 0].set_xlabel("expert")
    return fig


def save_run_plots(metrics: dict, out) -> list[str]:
    """Write a run's PNGs into ``out``: ``retention.png`` and, for a MoE run, ``hit_rate.png``
    and ``game_expert.png`` (every layer). Returns the file names."""
    from pathlib import Path

    out = Path(out)
    figures = {"retention.png": plot_retention({out.name or "run": metrics})}
    if "hit_rate" in metrics:
        figures["hit_rate.png"] = plot_hit_rate_over_time(metrics)
    if metrics.get("eval_routing"):
        figures["game_expert.png"] = plot_game_expert_usage(metrics)
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    return sorted(figures)


def show_sequential_run(results: Mapping[str, dict], run: str, layer: int, game: str) -> None:
    """The widget's view: ``run``'s retention matrix, its game x expert usage at ``layer``
    with ``game`` outlined (MoE runs), and ``game``'s score after each stage in every run."""
    metrics = results[run]
    plot_retention({run: metrics})
    if metrics.get("eval_routing"):
        plot_game_expert_usage(metrics, min(layer, len(metrics["eval_routing"]) - 1), game)
    plot_game_over_stages(results, game)
    plt.show()


def plot_game_over_stages(results: Mapping[str, dict], game: str) -> Figure:
    """``game``'s score before training and after each stage, one line per run: how it rises
    during its own stage and what is left of it after the later ones."""
    fig, ax = plt.subplots(figsize=(7, 3.2), layout="constrained")
    games = next(iter(results.values()))["games"]
    if game not in games:
        raise ValueError(f"{game!r} is not one of this experiment's games {games}")
    col = games.index(game)
    labels = ["untrained"] + [f"after {g}" for g in games]
    for name, m in results.items():
        scores = [m["initial"][col]] + [row[col] for row in m["retention"]]
        ax.plot(labels, scores, "o-", color=RUN_COLOURS.get(_kind(name), "#6c757d"),
                alpha=0.8, label=name)
    ax.axvspan(col + 0.5, col + 1.5, color="#e9c46a", alpha=0.3, label=f"{game}'s own stage")
    ax.set(ylabel=f"{game} score", title=f"{game} through the sequence")
    ax.legend(fontsize=8)
    return fig


def sequential_results_widget(results: Mapping[str, dict]) -> widgets.VBox:
    """Pick a run, a layer and a game: ``show_sequential_run``."""
    first = next(iter(results.values()))
    layers = max(len(m.get("eval_routing") or []) for m in results.values())
    run = widgets.Dropdown(options=list(results), description="run")
    layer = widgets.Dropdown(options=list(range(max(layers, 1))), description="layer")
    game = widgets.Dropdown(options=list(first["games"]), description="game")
    out = widgets.interactive_output(partial(show_sequential_run, results),
                                     {"run": run, "layer": layer, "game": game})
    return widgets.VBox([widgets.HBox([run, layer, game]), out])
