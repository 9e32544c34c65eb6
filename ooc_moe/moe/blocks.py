"""Transformer blocks with a tiered MoE feed-forward, and the dense baseline.

``DenseFFN`` has the same *active* parameters per token as a top-k MoE layer over experts of
``expert_hidden`` units: one FFN of ``top_k * expert_hidden`` units (the router's and the
extra output biases aside), which is the comparison MoE-in-RL studies ask for (Sokar et al.,
2025; Obando-Ceron et al., 2024).
"""

from __future__ import annotations

import torch.nn as nn
from torch import Tensor

from ..store import TieredExpertStore
from .layer import TieredMoELayer

__all__ = ["DenseFFN", "MoETransformerBlock", "DenseTransformerBlock"]


class DenseFFN(nn.Module):
    """``y = x + dropout(W2 relu(W1 LN(x) + b1) + b2)``; returns ``(y, 0)`` like the MoE layer."""

    def __init__(self, input_dim: int, expert_hidden: int, top_k: int = 2,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(input_dim)
        self.ffn = nn.Sequential(nn.Linear(input_dim, top_k * expert_hidden), nn.ReLU(),
                                 nn.Linear(top_k * expert_hidden, input_dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x + self.dropout(self.ffn(self.layer_norm(x))), x.new_zeros(())


class _Block(nn.Module):
    """Pre-norm self-attention, then a feed-forward module returning ``(y, aux_loss)``."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, dropout=dropout, batch_first=True)
        self.attn_norm = nn.LayerNorm(dim)
        self.attn_drop = nn.Dropout(dropout)

    def attend(self, x: Tensor, attn_mask: Tensor | None, newest_only: bool = False) -> Tensor:
        """``x + attention(LN(x))``; ``newest_only``: only the last position's row
        (``[batch, 1, dim]``, which a causal mask lets see every position)."""
        h = self.attn_norm(x)
        if newest_only:
            x, query, attn_mask = x[:, -1:], h[:, -1:], None
        else:
            query = h
        a, _ = self.attn(query, h, h, attn_mask=attn_mask, need_weights=False)
        return x + self.attn_drop(a)


class MoETransformerBlock(_Block):
    """Attention + ``TieredMoELayer``; ``forward(x [batch, seq, dim], attn_mask,
    router_context, cohort)`` returns ``(y, aux_loss)``. ``moe_layer``: the layer's class
    (``ooc_moe.distributed.ShardedMoELayer`` for experts sharded over ranks);
    ``moe_options``: its keyword options (the balance mode, say)."""

    def __init__(self, dim: int, num_heads: int, expert_store: TieredExpertStore,
                 ffn_hidden_dim: int, top_k: int = 2, dropout: float = 0.1,
                 moe_layer: type[TieredMoELayer] = TieredMoELayer, **moe_options) -> None:
        super().__init__(dim, num_heads, dropout)
        self.moe = moe_layer(dim, ffn_hidden_dim, expert_store, top_k, dropout, **moe_options)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None,
                router_context: Tensor | None = None, cohort: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        return self.moe(self.attend(x, attn_mask), router_context, cohort)

    def newest(self, x: Tensor, router_context: Tensor | None = None,
               cohort: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``forward`` (causal) of the last position alone: ``[batch, 1, dim]``, routed
        and balanced over those tokens only."""
        return self.moe(self.attend(x, None, newest_only=True), router_context, cohort)


class DenseTransformerBlock(_Block):
    """Attention + ``DenseFFN`` with the active parameters of a top-k MoE block."""

    def __init__(self, dim: int, num_heads: int, ffn_hidden_dim: int, top_k: int = 2,
                 dropout: float = 0.1) -> None:
        super().__init__(dim, num_heads, dropout)
        self.ffn = DenseFFN(dim, ffn_hidden_dim, top_k, dropout)

    def forward(self, x: Tensor, attn_mask: Tensor | None = None,
                router_context: Tensor | None = None, cohort: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
        """``router_context`` and ``cohort`` are accepted for interface parity and ignored
        (no router)."""
        return self.ffn(self.attend(x, attn_mask))

    def newest(self, x: Tensor, router_context: Tensor | None = None,
               cohort: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``forward`` (causal) of the last position alone: ``[batch, 1, dim]``, equal to
        ``forward(x, causal_mask)[0][:, -1:]`` at a fraction of the work."""
        return self.ffn(self.attend(x, None, newest_only=True))
