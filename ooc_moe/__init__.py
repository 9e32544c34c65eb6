"""ooc_moe: out-of-core Mixture-of-Experts for sequential multi-game Atari RL."""

from .store import Expert, RecordLayout, StoreStats, TieredExpertStore, TransferError

__version__ = "0.1.0"
__all__ = ["Expert", "RecordLayout", "StoreStats", "TieredExpertStore", "TransferError"]
