"""ooc_moe: out-of-core Mixture-of-Experts for sequential multi-game Atari RL."""

from .moe import (DenseFFN, DenseTransformerBlock, ExpertOptimizer, ExpertRouter,
                  MoETransformerBlock, RouterOutput, TieredMoELayer)
from .store import (DiskFullError, Expert, RecordLayout, StoreStats, TieredExpertStore,
                    TransferError)

__version__ = "0.1.0"
__all__ = ["DenseFFN", "DenseTransformerBlock", "DiskFullError", "Expert", "ExpertOptimizer",
           "ExpertRouter", "MoETransformerBlock", "RecordLayout", "RouterOutput", "StoreStats",
           "TieredExpertStore", "TieredMoELayer", "TransferError"]
