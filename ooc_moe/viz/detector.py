"""Notebook 03: the detector on real frames, routing traces of a frame MoE, and the trace
cache explorer."""

from __future__ import annotations

import time
from functools import partial
from typing import Mapping, Sequence

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..detector import EnvironmentDetector
from ..frame_moe import FrameMoE, routing_per_frame, train_sequentially
from ..metrics import (game_expert_counts, normalized_mutual_information, router_entropy)
from ..store import TieredExpertStore
from ..trace import POLICIES, RoutingTrace, SimResult, simulate
from ..threads import one_thread
from ._common import BOUNDARY_COLOUR, CLAIMED_HIT_RATE, TIER_COLOURS


PREFETCH_CHOICES = ("none", "recorded", "detector", "oracle")


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
    with one_thread(), torch.random.fork_rng(devices=[]), TieredExpertStore(
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
