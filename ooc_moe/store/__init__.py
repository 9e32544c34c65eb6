"""The tiered expert store: a file, a DRAM slot pool and an HBM slot pool."""

from .layout import Expert, RecordLayout
from .stats import StoreStats
from .tiered_store import DiskFullError, TieredExpertStore, TransferError

__all__ = ["DiskFullError", "Expert", "RecordLayout", "StoreStats", "TieredExpertStore",
           "TransferError"]
