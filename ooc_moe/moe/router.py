"""Top-k expert routing with the Switch load-balancing loss and the ST-MoE router z-loss.

References: Fedus et al., *Switch Transformers* (2021), load balancing ``E * sum_i f_i P_i``;
Zoph et al., *ST-MoE* (2022), router z-loss ``mean(logsumexp(logits)^2)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RouterOutput", "ExpertRouter", "load_balancing_loss", "router_z_loss"]


class RouterOutput(NamedTuple):
    expert_indices: Tensor       # [tokens, top_k] int64
    expert_weights: Tensor       # [tokens, top_k] softmax over the chosen logits
    router_logits: Tensor        # [tokens, num_experts] (with noise, when training)
    load_balancing_loss: Tensor  # scalar, 1.0 when perfectly balanced
    z_loss: Tensor               # scalar


def load_balancing_loss(logits: Tensor, indices: Tensor) -> Tensor:
    """Switch loss ``E * sum_i f_i * P_i``: ``f_i`` = fraction of the ``tokens x top_k``
    assignments that go to expert i (so the f_i sum to one and a uniform router scores 1),
    ``P_i`` = mean router probability of expert i."""
    num_experts = logits.shape[-1]
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(logits.dtype)
    f = f / indices.numel()
    p = F.softmax(logits, dim=-1).mean(dim=0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE z-loss: keeps router logits small, which keeps the softmax numerically tame."""
    return torch.logsumexp(logits, dim=-1).square().mean()


class ExpertRouter(nn.Module):
    """A linear router choosing ``top_k`` of ``num_experts`` experts per token.

    In training, Gaussian noise of ``noise_std`` is added to the logits before the top-k, to
    explore experts. The weights of the chosen experts are a softmax over their logits.
    """

    def __init__(self, input_dim: int, num_experts: int, top_k: int = 2,
                 noise_std: float = 0.1) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std} must be >= 0")
        self.input_dim, self.num_experts = input_dim, num_experts
        self.top_k, self.noise_std = top_k, noise_std
        self.router = nn.Linear(input_dim, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.01)

    def forward(self, x: Tensor) -> RouterOutput:
        if x.dim() != 2 or x.shape[-1] != self.input_dim:
            raise ValueError(f"the router expects [tokens, {self.input_dim}] inputs, got "
                             f"{tuple(x.shape)}")
        logits = self.router(x)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        top_logits, indices = torch.topk(logits, self.top_k, dim=-1)
        weights = F.softmax(top_logits, dim=-1)
        return RouterOutput(indices, weights, logits, load_balancing_loss(logits, indices),
                            router_z_loss(logits))
