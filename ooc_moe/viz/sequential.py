"""Notebook 05: the sequential experiment: retention matrices, forgetting, hit rate over
time, game x expert usage."""

from __future__ import annotations

from functools import partial
from typing import Mapping, Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..metrics import normalized_mutual_information
from ..scores import run_kind
from .agent import plot_tier_history


RUN_COLOURS = {"cnn": "#8d99ae", "dense": "#e76f51", "token": "#264653", "env": "#2a9d8f",
               "cohort": "#9b5de5"}


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
    sequence; > 0 = forgotten), one panel per game (games score on different scales), one
    bar per kind of run: the mean over seeds, with its 95% interval (``forgetting_noise``:
    a t interval over seeds, or with one seed over the evaluation's paired episodes) where
    the summary has one, else min-max bars."""
    kinds = list(summary)
    games = summary[kinds[0]]["games"][:-1]           # the last game cannot be forgotten
    fig, axes = plt.subplots(1, max(len(games), 1), squeeze=False, layout="constrained",
                             figsize=(1.5 + 2.4 * max(len(games), 1), 3.4))
    intervals = all(np.isfinite(summary[k].get("forgetting_noise", [np.nan])[:len(games)]).all()
                    for k in kinds)
    for g, (ax, game) in enumerate(zip(axes[0], games)):
        for i, kind in enumerate(kinds):
            s = summary[kind]
            mean = s["forgetting"][g]
            if intervals:
                low = high = s["forgetting_noise"][g]
            else:
                low = mean - s.get("forgetting_min", s["forgetting"])[g]
                high = s.get("forgetting_max", s["forgetting"])[g] - mean
            ax.bar(i, mean, 0.8, color=RUN_COLOURS.get(kind, "#adb5bd"),
                   label=f"{kind} (seeds {','.join(map(str, s.get('seeds', [])))})")
            ax.errorbar(i, mean, yerr=[[low], [high]], fmt="none", color="black", capsize=3,
                        linewidth=1)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(kinds)), kinds, rotation=30)
        ax.set_title(game, fontsize=10)
    axes[0, 0].set_ylabel("forgetting (raw score)")
    axes[0, -1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle("forgetting per game (bars: "
                 + ("95% intervals)" if intervals else "min-max over seeds)"), fontsize=10)
    return fig


def plot_hit_rate_over_time(metrics: dict) -> Figure:
    """Where a MoE run's expert accesses were served, per update, with game boundaries."""
    fig, ax = plt.subplots(figsize=(8, 3.4), layout="constrained")
    plot_tier_history(ax, {"MoE": metrics["history"]})
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
        ax.plot(labels, scores, "o-", color=RUN_COLOURS.get(run_kind(name), "#adb5bd"),
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
