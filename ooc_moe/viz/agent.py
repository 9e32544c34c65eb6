"""Notebook 04: the agent's parameter budget, its routing per layer, PPO learning curves
and store figures."""

from __future__ import annotations

import time
from itertools import cycle
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import EngFormatter, MaxNLocator

from ..agent import ContextWindows, MoERLAgent, MoERLAgentConfig
from ..scores import run_kind
from ..store.stats import LINKS
from ..threads import one_thread
from ._common import (BOUNDARY_COLOUR, CLAIMED_HIT_RATE, LINK_COLOURS, TIER_COLOURS,
                      TIER_LABELS, link_label)


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
    ``[B, T, dim]`` (default ``context_len``, what rollouts and PPO updates use). A last
    layer that computed the newest position alone (``newest_only``) counts in the last row."""
    layer_routing_counts(agent)                                   # the same checks
    T = window_len or agent.config.context_len
    windows = agent.moe_layers[0].last_routing.expert_indices.shape[0] // T
    counts = []
    for layer in agent.moe_layers:
        indices = layer.last_routing.expert_indices.cpu()         # [B*T or B, top_k]
        assert indices.shape[0] in (windows * T, windows), \
            f"{indices.shape[0]} tokens are not windows of {T}: pass window_len"
        by_position = indices.view(windows, -1, indices.shape[-1])  # [B, T or 1, top_k]
        table = np.zeros((T, agent.config.num_experts), dtype=np.int64)
        for t in range(by_position.shape[1]):
            table[T - by_position.shape[1] + t] = torch.bincount(
                by_position[:, t].reshape(-1), minlength=agent.config.num_experts).numpy()
        counts.append(table)
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
    with ``routing="env"`` every environment is game 0. Actions come from all 18 logits (no
    ``action_mask``: for an agent trained with one, the rollout plays actions it never took).

    Returns numpy arrays: ``routing [steps, layers, experts]`` (per step and MoE layer, the
    assignments each expert got over the positions the layer computes of every window, the
    last layer's newest alone with ``newest_only``, top-k each), ``waves [steps, layers]``
    (how many HBM loads each layer's forward needed), ``rewards`` and ``actions``
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
    with one_thread():
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
    plot_tier_history(tiers, runs)
    return fig


def last_episodes_return(history: Sequence[dict], last: int = 100
                         ) -> tuple[np.ndarray, np.ndarray]:
    """After each update that finished an episode: its ``global_step`` and the mean return of
    the ``last`` training episodes finished by then (fewer at first): the measure of the
    ``learning`` table's last column, along the run."""
    steps, means, returns = [], [], []
    for h in history:
        if h["charts/episodic_returns"]:
            returns += h["charts/episodic_returns"]
            steps.append(h["global_step"])
            means.append(np.mean(returns[-last:]))
    return np.array(steps, dtype=float), np.array(means, dtype=float)


def plot_learning_by_kind(runs: Mapping[str, dict], random_return: float | None = None,
                          last: int = 100) -> Figure:
    """Per kind of run (``run_kind`` of each name: seeds of one agent), the mean return of the
    ``last`` training episodes along the steps (``last_episodes_return``): the mean over the
    seeds (on the steps all of them reached) as a line, their range shaded, each seed a
    thin line. ``runs``: name -> ``metrics.json``; ``random_return`` a dashed line."""
    kinds: dict[str, list] = {}
    for name, metrics in sorted(runs.items()):
        kinds.setdefault(run_kind(name), []).append(last_episodes_return(metrics["history"],
                                                                         last))
    fig, ax = plt.subplots(figsize=(8, 4), layout="constrained")
    colours = cycle(["#264653", "#e76f51", "#8ab17d", "#6c757d", "#9d0208", "#2a9d8f"])
    for (kind, curves), colour in zip(kinds.items(), colours):
        for steps, means in curves:
            ax.plot(steps, means, color=colour, linewidth=0.6, alpha=0.5)
        grid = curves[0][0][curves[0][0] <= min(steps[-1] for steps, _ in curves)]
        seeds = np.array([np.interp(grid, steps, means) for steps, means in curves])
        ax.fill_between(grid, seeds.min(0), seeds.max(0), color=colour, alpha=0.15)
        ax.plot(grid, seeds.mean(0), color=colour, linewidth=2,
                label=f"{kind} ({len(curves)} seed{'s' if len(curves) > 1 else ''})")
    if random_return is not None:
        ax.axhline(random_return, color="grey", linestyle="--", linewidth=1,
                   label=f"random ({random_return:.4g})")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.set(xlabel="environment steps (global_step)",
           ylabel=f"mean return, last {last} episodes",
           title=f"training return (last {last} episodes): mean over seeds, range shaded")
    ax.legend(fontsize=8, loc="upper left")
    return fig


def _near(value: float, returns: Sequence[float]) -> bool:
    """Whether a reference line fits on the returns' axis: at most twice their range (at
    least 1) beyond them."""
    low, high = min(returns), max(returns)
    margin = 2 * max(high - low, 1.0)
    return low - margin <= value <= high + margin


TIER_KEYS = {"hbm": "store/hit_rate", "dram": "store/dram_hit_rate",
             "file": "store/file_read_rate"}


def plot_tier_history(ax: Axes, runs: Mapping[str, Sequence[dict]]) -> None:
    """Onto ``ax``, the store's shares per update (HBM, DRAM, file), stacked, for the first
    run of ``runs`` that has a store (panel (b) of ``plot_learning_curve``)."""
    stored = [(name, h) for name, h in runs.items() if h and "store/hit_rate" in h[0]]
    if not stored:
        ax.text(0.5, 0.5, "no expert store (dense or cnn agent)", ha="center", va="center",
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
                  label=link_label(link))
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
