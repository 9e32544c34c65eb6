"""``ExpertOptimizer``: a lazy, per-expert Adam for experts that live in a tiered store.

Only experts that received a gradient since the last step are updated, each with its own
step count, exactly as ``torch.optim.Adam`` treats parameters whose ``.grad`` is None
(``zero_grad(set_to_none=True)``). Gradient, moments and step count are part of each expert's
record, so the update runs wherever the record is fetched to (the HBM tier) and the state
travels back down with it. The update is ``torch.optim.Adam``'s (Kingma & Ba, 2015):
``m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
p -= lr * (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps)``.

``clip_grad_norm_`` clips the global norm over dense parameters *and* experts, as
``torch.nn.utils.clip_grad_norm_`` does over every parameter: the experts' gradients are in
their records, so their squared norms come from the layer's backward
(``expert_grad_sq_norms``) and their scaling is applied by the next ``step``, which fetches
them anyway.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..store import TieredExpertStore
from .layer import expert_grad_sq_norms, plan_waves

__all__ = ["ExpertOptimizer", "clip_grad_norm_"]


class ExpertOptimizer:
    """Adam over the experts of ``store`` (which needs ``optimizer_state=True``). With
    ``prefetch``, the next wave of experts is fetched while the current one is updated."""

    def __init__(self, store: TieredExpertStore, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 prefetch: bool = True,
                 reduce_norm: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """``reduce_norm``: where ``store`` is one rank's shard of a pool, sums a squared
        norm over the ranks (``ooc_moe.distributed.sum_over_ranks``), so that
        ``clip_grad_norm_`` clips the norm over every rank's experts."""
        if not store.layout.optimizer_state:
            raise ValueError("the store's records have no optimizer state: create it with "
                             "TieredExpertStore(..., optimizer_state=True)")
        if not lr > 0 or not eps > 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"need lr > 0, eps > 0 and 0 <= betas < 1; got lr={lr}, "
                             f"betas={betas}, eps={eps}")
        self.store, self.lr, self.betas, self.eps = store, lr, betas, eps
        self.prefetch, self.reduce_norm = prefetch, reduce_norm
        self.grad_scale = 1.0   # set by clip_grad_norm_, applied to the pending gradients

    def grad_sq_norm(self) -> torch.Tensor:
        """The squared norm of all pending expert gradients together, as ``step`` will apply
        them (times ``grad_scale ** 2``; over every rank's shard with ``reduce_norm``), 0-dim."""
        norms = expert_grad_sq_norms(self.store)
        pending = [norms[e] for e in sorted(self.store.experts_with_grad)]  # a fixed order
        total = (torch.stack(pending).sum() if pending
                 else torch.zeros((), device=self.store.device)) * self.grad_scale ** 2
        return total if self.reduce_norm is None else self.reduce_norm(total)

    @torch.no_grad()
    def step(self) -> int:
        """Update every expert with a pending gradient, then clear its gradient. Returns
        how many experts were updated."""
        pending = sorted(self.store.experts_with_grad)
        b1, b2, scale = *self.betas, self.grad_scale
        waves = plan_waves(self.store, pending, self.prefetch)
        if len(waves) > 1:
            self.store.expect(waves)    # evictions keep the waves still to come
        for i, wave in enumerate(waves):
            experts = self.store.get_experts(wave)
            if self.prefetch and i + 1 < len(waves):
                self.store.prefetch(waves[i + 1])  # copies overlap this wave's update
            for ex in experts.values():
                if scale != 1.0:
                    ex.grad.mul_(scale)
                step = ex.step.add_(1)
                ex.exp_avg.mul_(b1).add_(ex.grad, alpha=1 - b1)
                ex.exp_avg_sq.mul_(b2).addcmul_(ex.grad, ex.grad, value=1 - b2)
                denom = (ex.exp_avg_sq.sqrt() / (1 - b2 ** step).sqrt()).add_(self.eps)
                ex.params.addcdiv_(ex.exp_avg / (1 - b1 ** step), denom, value=-self.lr)
                ex.grad.zero_()
            self.store.mark_dirty(wave)
        self._cleared()
        return len(pending)

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Drop pending gradients without applying them (``step`` already clears those it
        applies, so a zero_grad after step moves no data)."""
        for wave in plan_waves(self.store, sorted(self.store.experts_with_grad)):
            for ex in self.store.get_experts(wave).values():
                ex.grad.zero_()
            self.store.mark_dirty(wave)
        self._cleared()

    def _cleared(self) -> None:
        self.store.experts_with_grad.clear()
        expert_grad_sq_norms(self.store).clear()
        self.grad_scale = 1.0


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float,
                    expert_opt: ExpertOptimizer | None = None) -> torch.Tensor:
    """Scale dense gradients (now) and ``expert_opt``'s pending expert gradients (at its next
    ``step``) by ``min(1, max_norm / (total + 1e-6))``, ``total`` the norm over all of them, as
    ``torch.nn.utils.clip_grad_norm_`` does. Returns ``total``, before clipping."""
    grads = [p.grad for p in parameters if p.grad is not None]
    sq = [torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads]
    if expert_opt is not None:
        sq.append(expert_opt.grad_sq_norm())
    if not sq:
        return torch.zeros(())
    total = torch.stack([s.to(sq[0].device) for s in sq]).sum().sqrt()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.to(g.device))
    if expert_opt is not None:
        expert_opt.grad_scale *= float(coef)
    return total
