"""``ExpertOptimizer``: a lazy, per-expert Adam for experts that live in a tiered store.

Only experts that received a gradient since the last step are updated, each with its own
step count, exactly as ``torch.optim.Adam`` treats parameters whose ``.grad`` is None
(``zero_grad(set_to_none=True)``). Gradient, moments and step count are part of each expert's
record, so the update runs wherever the record is fetched to (the HBM tier) and the state
travels back down with it. The update is ``torch.optim.Adam``'s (Kingma & Ba, 2015):
``m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
p -= lr * (m / (1-b1^t)) / (sqrt(v) / sqrt(1-b2^t) + eps)``.
"""

from __future__ import annotations

import torch

from ..store import TieredExpertStore
from .layer import plan_waves

__all__ = ["ExpertOptimizer"]


class ExpertOptimizer:
    """Adam over the experts of ``store`` (which needs ``optimizer_state=True``). With
    ``prefetch``, the next wave of experts is fetched while the current one is updated."""

    def __init__(self, store: TieredExpertStore, lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 prefetch: bool = True) -> None:
        if not store.layout.optimizer_state:
            raise ValueError("the store's records have no optimizer state: create it with "
                             "TieredExpertStore(..., optimizer_state=True)")
        if not lr > 0 or not eps > 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"need lr > 0, eps > 0 and 0 <= betas < 1; got lr={lr}, "
                             f"betas={betas}, eps={eps}")
        self.store, self.lr, self.betas, self.eps = store, lr, betas, eps
        self.prefetch = prefetch

    @torch.no_grad()
    def step(self) -> int:
        """Update every expert with a pending gradient, then clear its gradient. Returns
        how many experts were updated."""
        pending = sorted(self.store.experts_with_grad)
        b1, b2 = self.betas
        waves = plan_waves(self.store, pending, self.prefetch)
        for i, wave in enumerate(waves):
            experts = self.store.get_experts(wave)
            if self.prefetch and i + 1 < len(waves):
                self.store.prefetch(waves[i + 1])  # copies overlap this wave's update
            for ex in experts.values():
                step = ex.step.add_(1)
                ex.exp_avg.mul_(b1).add_(ex.grad, alpha=1 - b1)
                ex.exp_avg_sq.mul_(b2).addcmul_(ex.grad, ex.grad, value=1 - b2)
                denom = (ex.exp_avg_sq.sqrt() / (1 - b2 ** step).sqrt()).add_(self.eps)
                ex.params.addcdiv_(ex.exp_avg / (1 - b1 ** step), denom, value=-self.lr)
                ex.grad.zero_()
            self.store.mark_dirty(wave)
        self.store.experts_with_grad.clear()
        return len(pending)

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Drop pending gradients without applying them (``step`` already clears those it
        applies, so a zero_grad after step moves no data)."""
        for wave in plan_waves(self.store, sorted(self.store.experts_with_grad)):
            for ex in self.store.get_experts(wave).values():
                ex.grad.zero_()
            self.store.mark_dirty(wave)
        self.store.experts_with_grad.clear()
