"""A plain PyTorch MoE for the tests: every expert an nn.Parameter, naive masked dispatch.
Shares no code with ooc_moe.moe (the router formulas are written again here)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class ReferenceExperts(nn.Module):
    """A pool of FFN experts as plain parameters (one pool may serve several layers)."""

    def __init__(self, records: list[dict]) -> None:
        super().__init__()
        self.w1 = nn.ParameterList([nn.Parameter(r["w1"].clone()) for r in records])
        self.b1 = nn.ParameterList([nn.Parameter(r["b1"].clone()) for r in records])
        self.w2 = nn.ParameterList([nn.Parameter(r["w2"].clone()) for r in records])
        self.b2 = nn.ParameterList([nn.Parameter(r["b2"].clone()) for r in records])

    def expert_params(self, e: int) -> list[nn.Parameter]:
        return [self.w1[e], self.b1[e], self.w2[e], self.b2[e]]

    def ffn(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x @ self.w1[e].T + self.b1[e]) @ self.w2[e].T + self.b2[e]


class ReferenceMoELayer(nn.Module):
    def __init__(self, experts: ReferenceExperts, router_weight, ln_weight, ln_bias, top_k,
                 lb_coef=0.01, z_coef=1e-3) -> None:
        super().__init__()
        self.experts = [experts]  # not a submodule: the pool may be shared
        self.router = nn.Parameter(router_weight.clone())
        self.ln_weight = nn.Parameter(ln_weight.clone())
        self.ln_bias = nn.Parameter(ln_bias.clone())
        self.top_k, self.lb_coef, self.z_coef = top_k, lb_coef, z_coef

    def forward(self, x):
        experts = self.experts[0]
        h = F.layer_norm(x, x.shape[-1:], self.ln_weight, self.ln_bias)
        logits = h @ self.router.T
        top, idx = logits.topk(self.top_k, dim=-1)
        w = top.softmax(-1)
        y = torch.zeros_like(h)
        for e in range(len(experts.w1)):
            for k in range(self.top_k):
                mask = idx[:, k] == e
                if mask.any():
                    y[mask] = y[mask] + w[mask, k, None] * experts.ffn(e, h[mask])
        num = logits.shape[-1]
        counts = torch.stack([(idx == e).sum() for e in range(num)]).to(x.dtype)
        lb = num * (counts / idx.numel() * logits.softmax(-1).mean(0)).sum()
        z = torch.logsumexp(logits, -1).pow(2).mean()
        return x + y, self.lb_coef * lb + self.z_coef * z, idx
