"""Notebook 02: router losses, grouped dispatch, and a MoE layer training through the store."""

from __future__ import annotations

from functools import partial

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ..moe import ExpertOptimizer, TieredMoELayer
from ..moe.layer import Dispatch
from ..moe.router import load_balancing_loss, router_z_loss
from ..store import TieredExpertStore
from ..store.stats import LINKS
from ..threads import one_thread
from ._common import LINK_COLOURS, TIER_COLOURS, link_label


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


def plot_expert_exchange(ranks: list[dict]) -> Figure:
    """An expert-parallel run (each rank's ``train_sharded_layer`` figures, in rank order):
    (a) the rows of token assignments each rank sent to each rank in the last step (to itself
    on the diagonal: no network); (b) per rank, the mean step time split into the exchanges
    of rows (forward and backward, waiting for the others included) and the rest."""
    world = len(ranks)
    sent = np.array([r["sent"][-1] for r in ranks])
    fig, (matrix, times) = plt.subplots(1, 2, figsize=(10, 3.4), width_ratios=[1, 1.4],
                                        layout="constrained")
    matrix.imshow(sent, cmap="Blues", vmin=0)
    for i in range(world):
        for j in range(world):
            matrix.text(j, i, f"{sent[i, j]}", ha="center", va="center",
                        color="white" if sent[i, j] > sent.max() / 2 else "black")
    labels = [f"rank {r}\n(e % {world} = {r})" for r in range(world)]
    matrix.set(xticks=range(world), yticks=range(world), xticklabels=labels,
               yticklabels=[f"rank {r}" for r in range(world)], xlabel="to (owner of the expert)",
               ylabel="from (owner of the token)", title="(a) rows sent, last step")
    exchange = np.array([np.mean(r["exchange_s"]) for r in ranks]) * 1e3
    rest = np.array([np.mean(r["step_s"]) for r in ranks]) * 1e3 - exchange
    y = np.arange(world)
    times.barh(y, rest, color="tab:grey", label="routing, experts, optimizers")
    times.barh(y, exchange, left=rest, color="tab:orange", label="exchanges of rows")
    times.set(yticks=y, yticklabels=[f"rank {r}" for r in range(world)], xlabel="ms per step",
              title="(b) where a step's time goes")
    times.invert_yaxis()
    times.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2, fontsize=8)
    return fig


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
    with one_thread(), torch.random.fork_rng(devices=[]), TieredExpertStore(
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
        ax.bar(steps, kib, bottom=bottom, color=LINK_COLOURS[link], label=link_label(link))
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
