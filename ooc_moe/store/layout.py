"""The layout of one expert record: every tensor of an expert in one contiguous row.

An expert is a two-layer FFN, ``y = W2 relu(W1 x + b1) + b2``. All of its tensors live in a
single flat row so that moving the expert between tiers is one copy, as in mixtral-offloading's
``expert_cache.py``. This module is the only place that knows the order and shapes of the
fields; every tier stores rows of ``RecordLayout.numel`` elements and asks the layout for views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["RecordLayout", "Expert"]


@dataclass(frozen=True)
class RecordLayout:
    """Field names, shapes and offsets of one expert record.

    Fields, in order: ``w1 [hidden, dim]``, ``b1 [hidden]``, ``w2 [dim, hidden]``, ``b2 [dim]``.
    """

    expert_dim: int
    hidden_dim: int
    # filled in at construction: (name, shape, offset) per field, and the row length
    fields: tuple[tuple[str, tuple[int, ...], int], ...] = field(init=False, repr=False)
    numel: int = field(init=False)

    def __post_init__(self) -> None:
        d, h = self.expert_dim, self.hidden_dim
        shapes = (("w1", (h, d)), ("b1", (h,)), ("w2", (d, h)), ("b2", (d,)))
        fields, offset = [], 0
        for name, shape in shapes:
            fields.append((name, shape, offset))
            offset += math.prod(shape)
        object.__setattr__(self, "fields", tuple(fields))
        object.__setattr__(self, "numel", offset)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _, _ in self.fields)

    def views(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into one record row (changing a view changes the row)."""
        assert row.dim() == 1 and row.numel() == self.numel, (
            f"a record row has {self.numel} elements, got shape {tuple(row.shape)}")
        return {name: row[off:off + math.prod(shape)].view(shape)
                for name, shape, off in self.fields}

    def init_row(self, row: torch.Tensor, generator: torch.Generator) -> None:
        """Initialise as the user's prototype: weights ~ N(0, 0.02^2), biases zero."""
        for name, view in self.views(row).items():
            if name.startswith("w"):
                view.copy_(torch.randn(view.shape, generator=generator) * 0.02)
            else:
                view.zero_()


class Expert:
    """One expert as handed out by the store: named tensors that are views of its HBM slot.

    In-place changes to ``w1, b1, w2, b2`` change the slot; call ``store.mark_dirty([id])``
    afterwards so the change is written back when the expert leaves the tier.
    """

    __slots__ = ("id", "row", "w1", "b1", "w2", "b2")

    def __init__(self, expert_id: int, row: torch.Tensor, views: dict[str, torch.Tensor]) -> None:
        self.id = expert_id
        self.row = row
        for name, view in views.items():
            setattr(self, name, view)

    def __repr__(self) -> str:
        return f"Expert(id={self.id}, dim={self.w1.shape[1]}, hidden={self.w1.shape[0]}, " \
               f"device={self.row.device}, dtype={self.row.dtype})"
