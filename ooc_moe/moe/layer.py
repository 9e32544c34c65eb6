"""A MoE layer whose experts live in a ``TieredExpertStore`` and train through it.

Tokens are dispatched *grouped*: the ``tokens x top_k`` assignments are sorted by expert once,
each expert runs one matmul pair on its own tokens, and the results are combined with
``index_add``. A batch may touch far more experts than HBM holds, so the experts are streamed
through HBM in *waves*: fetch as many as fit, compute their tokens, move on. Backward (a custom
``torch.autograd.Function``) fetches the weights again, wave by wave in reverse order, as
ZeRO-3 / ZeRO-Infinity re-gather parameters for backward, and accumulates each expert's weight
gradient into its own record, which travels through the tiers with it. When every expert of
the batch fits in HBM there is one wave and nothing is fetched twice. After adding to a record's
gradient the backward also notes its squared norm (``expert_grad_sq_norms``), so the global
gradient norm can be clipped without another pass over the experts.

The layer tells the store its waves before fetching them (``TieredExpertStore.expect``): those
of this forward and, when training, those the backward will fetch again. The layers of a
model run backward in reverse, so each layer's expectation goes ahead of the ones before it
and the store's known future is the exact order of the remaining fetches once the last layer
has run its forward. Evictions then keep the experts needed soonest (Belady within that
horizon), which plain LRU gets wrong in backward: it evicts the wave needed next.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..store import TieredExpertStore
from .router import ExpertRouter, RouterOutput

__all__ = ["Dispatch", "plan_waves", "expert_mixture", "TieredMoELayer",
           "expert_grad_sq_norms"]

# Per store, per expert with a pending gradient, the squared norm of the gradient in its
# record: written after every addition to it (a later layer sharing the store overwrites it
# with the norm of the sum), cleared by ``ExpertOptimizer`` with the gradients.
_GRAD_SQ_NORMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def expert_grad_sq_norms(store: TieredExpertStore) -> dict[int, Tensor]:
    """``{expert id: ||grad||^2}`` (0-dim tensors on the store's device) of every expert
    whose record holds a gradient; the dict itself, to be cleared with the gradients."""
    return _GRAD_SQ_NORMS.setdefault(store, {})


@dataclass
class Dispatch:
    """The ``tokens x top_k`` assignments sorted by expert (computed once per forward)."""

    order: Tensor        # [S] positions in the flattened [tokens, top_k] routing, by expert
    token: Tensor        # [S] token of each sorted assignment
    slices: dict         # expert id -> (start, end) of its assignments in the sorted order

    @classmethod
    def from_indices(cls, indices: Tensor) -> "Dispatch":
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        ends = torch.cumsum(counts, 0).tolist()
        starts = [0] + ends[:-1]
        slices = dict(zip(experts.tolist(), zip(starts, ends)))
        return cls(order, order // indices.shape[1], slices)


def plan_waves(store: TieredExpertStore, experts: list[int],
               prefetch: bool = True) -> list[list[int]]:
    """Split ``experts`` into waves that fit the free HBM slots.

    Experts already in HBM go first (they are used before anything can evict them), then
    those in DRAM, then the file. If all fit, there is one wave; otherwise, with ``prefetch``,
    waves use half the free slots so the next wave can be prefetched while this one computes.
    """
    free = store.available_slots
    if free < 1:
        raise ValueError("every HBM slot is pinned: unpin experts so the layer can stream")
    rank = {"hbm": 0, "dram": 1, "file": 2}
    experts = sorted(experts, key=lambda e: rank[store.where(e)])
    size = free if len(experts) <= free or not prefetch else max(1, free // 2)
    return [experts[i:i + size] for i in range(0, len(experts), size)]


class _StreamedExperts(torch.autograd.Function):
    """``out[t] = sum_k w[t,k] * FFN_{e[t,k]}(x[t])`` with the experts streamed in waves."""

    @staticmethod
    def forward(ctx, x: Tensor, weights: Tensor, dispatch: Dispatch,
                store: TieredExpertStore, waves: list, prefetch: bool) -> Tensor:
        y = x.new_empty(dispatch.token.numel(), x.shape[1])        # [S, dim] per assignment
        for i, wave in enumerate(waves):
            experts = store.get_experts(wave)
            if prefetch and i + 1 < len(waves):
                store.prefetch(waves[i + 1])
            for e in wave:
                ex, (s, t) = experts[e], dispatch.slices[e]
                h = F.relu(torch.addmm(ex.b1, x[dispatch.token[s:t]], ex.w1.T))
                y[s:t] = torch.addmm(ex.b2, h, ex.w2.T)
        w = weights.reshape(-1)[dispatch.order]
        out = torch.zeros_like(x).index_add_(0, dispatch.token, y * w[:, None])
        ctx.save_for_backward(x, weights, y)
        ctx.dispatch, ctx.store, ctx.waves, ctx.prefetch = dispatch, store, waves, prefetch
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weights, y = ctx.saved_tensors
        d, store = ctx.dispatch, ctx.store
        g = grad_out[d.token]                                       # [S, dim] dL/d out[t]
        grad_weights = torch.zeros_like(weights).reshape(-1)
        grad_weights[d.order] = (g * y).sum(-1)
        gy = g * weights.reshape(-1)[d.order][:, None]              # dL/d y per assignment
        gx = torch.empty_like(g)                                    # dL/d x per assignment
        waves = ctx.waves[::-1]  # the last forward wave is most likely still resident
        sq_norms = expert_grad_sq_norms(store)
        for i, wave in enumerate(waves):
            experts = store.get_experts(wave)
            if ctx.prefetch and i + 1 < len(waves):
                store.prefetch(waves[i + 1])
            for e in wave:
                ex, (s, t) = experts[e], d.slices[e]
                tokens = d.token[s:t]
                xe, ge = x[tokens], gy[s:t]
                a = torch.addmm(ex.b1, xe, ex.w1.T)                 # recomputed, not stored
                ex.grad_w2.addmm_(ge.T, F.relu(a))
                ex.grad_b2.add_(ge.sum(0))
                ga = (ge @ ex.w2) * (a > 0)
                ex.grad_w1.addmm_(ga.T, xe)
                ex.grad_b1.add_(ga.sum(0))
                gx[s:t] = ga @ ex.w1
                sq_norms[e] = torch.dot(ex.grad, ex.grad)
            store.mark_dirty(wave)
            store.experts_with_grad.update(wave)
        # summed in the experts' order, not the waves' (which follow what the store holds), so
        # the same inputs give the same gradient whatever the cache held (a resumed run too)
        grad_x = torch.zeros_like(x).index_add_(0, d.token, gx)
        return grad_x, grad_weights.view_as(weights), None, None, None, None


def expert_mixture(x: Tensor, indices: Tensor, weights: Tensor, store: TieredExpertStore,
                   prefetch: bool = True) -> tuple[Tensor, list[list[int]]]:
    """``sum_k weights[:, k] * expert_{indices[:, k]}(x)`` for ``x [tokens, dim]``, experts
    streamed from ``store`` (the next wave prefetched while one computes, if ``prefetch``).
    Differentiable in ``x`` and ``weights``; expert gradients are accumulated into the
    store's records (see ``ExpertOptimizer``). Returns the output and the waves used."""
    if x.dtype != store.dtype or x.device != store.device:
        raise ValueError(f"inputs are {x.dtype} on {x.device} but the experts are "
                         f"{store.dtype} on {store.device}: move the module (or the store) so "
                         "that they match")
    training = torch.is_grad_enabled() and (x.requires_grad or weights.requires_grad)
    if training and not store.layout.optimizer_state:
        raise ValueError("this store's records have no gradient accumulator: create it with "
                         "TieredExpertStore(..., optimizer_state=True) to train its experts, "
                         "or run the layer under torch.no_grad()")
    dispatch = Dispatch.from_indices(indices)
    waves = plan_waves(store, list(dispatch.slices), prefetch)
    # the store's known future: these waves, then (if training) backward's waves in reverse,
    # ahead of what earlier layers expect, so evictions keep what is needed soonest
    future = waves + (waves[::-1] if training else [])
    if len(future) > 1:
        store.expect(future)
    return _StreamedExperts.apply(x, weights, dispatch, store, waves, prefetch), waves


class TieredMoELayer(nn.Module):
    """``y = x + dropout(sum_k w_k * FFN_{e_k}(LN(x)))`` with experts from ``expert_store``.

    Accepts ``[tokens, dim]`` or ``[batch, seq, dim]``; returns ``(y, aux_loss)`` where
    ``aux_loss = load_balance_coef * load_balancing_loss + z_loss_coef * z_loss``. Several
    layers may share one store (one pool of experts for all layers) or have one each.
    With ``prefetch``, a batch that needs more experts than HBM holds prefetches the next
    wave of experts while the current one computes. ``balance``, ``balance_horizon`` and
    ``balance_rate`` set the router's balance mode (``ExpertRouter``).
    """

    def __init__(self, input_dim: int, hidden_dim: int, expert_store: TieredExpertStore,
                 top_k: int = 2, dropout: float = 0.1, *, noise_std: float = 0.1,
                 load_balance_coef: float = 0.01, z_loss_coef: float = 1e-3,
                 prefetch: bool = True, balance: str = "batch",
                 balance_horizon: int = 1_000_000, balance_rate: float = 1e-3) -> None:
        super().__init__()
        if (expert_store.expert_dim, expert_store.hidden_dim) != (input_dim, hidden_dim):
            raise ValueError(f"the store's experts are {expert_store.expert_dim} -> "
                             f"{expert_store.hidden_dim} but the layer was asked for "
                             f"{input_dim} -> {hidden_dim}")
        self.expert_store = expert_store
        self.input_dim, self.hidden_dim, self.top_k = input_dim, hidden_dim, top_k
        self.router = ExpertRouter(input_dim, self.routed_experts(), top_k, noise_std,
                                   balance=balance, balance_horizon=balance_horizon,
                                   balance_rate=balance_rate)
        self.layer_norm = nn.LayerNorm(input_dim)
        self.dropout = nn.Dropout(dropout)
        self.load_balance_coef, self.z_loss_coef = load_balance_coef, z_loss_coef
        self.prefetch = prefetch
        self.last_routing: RouterOutput | None = None
        self.last_waves: list[list[int]] = []   # the experts of each wave of the last forward

    def forward(self, x: Tensor, router_context: Tensor | None = None,
                cohort: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``router_context`` (broadcastable to ``x``) is added to what the router sees, not
        to the experts' input: e.g. an embedding of the game being played. ``cohort``
        (``[tokens, C]``, or ``[batch, C]`` for ``[batch, seq, dim]`` inputs): the experts
        each token may be routed to."""
        if x.dim() not in (2, 3) or x.shape[-1] != self.input_dim:
            raise ValueError(f"expected [tokens, {self.input_dim}] or [batch, seq, "
                             f"{self.input_dim}] input, got {tuple(x.shape)}")
        flat = x.reshape(-1, self.input_dim)
        h = self.layer_norm(flat)
        if cohort is not None and x.dim() == 3:                     # one per sequence
            cohort = cohort[:, None].expand(-1, x.shape[1], -1).reshape(flat.shape[0], -1)
        if router_context is not None:
            context = router_context.expand_as(x).reshape(-1, self.input_dim)
            routing = self.router(h + context, cohort)
        else:
            routing = self.router(h, cohort)
        self.last_routing = routing
        y = self.mixture(h, routing)
        aux = (self.load_balance_coef * routing.load_balancing_loss
               + self.z_loss_coef * routing.z_loss)
        return (flat + self.dropout(y)).view_as(x), aux

    def routed_experts(self) -> int:
        """How many experts the router chooses from: the store's."""
        return self.expert_store.num_experts

    def mixture(self, h: Tensor, routing: RouterOutput) -> Tensor:
        """The experts' weighted sum for each token of ``h [tokens, dim]``."""
        y, self.last_waves = expert_mixture(h, routing.expert_indices, routing.expert_weights,
                                            self.expert_store, self.prefetch)
        return y

    def extra_repr(self) -> str:
        return (f"input_dim={self.input_dim}, hidden_dim={self.hidden_dim}, top_k={self.top_k}, "
                f"experts={self.expert_store.num_experts} (hbm {self.expert_store.hbm_capacity})")
