"""MoE layers whose experts live in, and train through, a tiered expert store."""

from .blocks import DenseFFN, DenseTransformerBlock, MoETransformerBlock
from .layer import TieredMoELayer, expert_mixture
from .optim import ExpertOptimizer
from .router import ExpertRouter, RouterOutput

__all__ = ["DenseFFN", "DenseTransformerBlock", "ExpertOptimizer", "ExpertRouter",
           "MoETransformerBlock", "RouterOutput", "TieredMoELayer", "expert_mixture"]
