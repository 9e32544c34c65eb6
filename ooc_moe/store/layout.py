"""The layout of one expert record: every tensor of an expert in one contiguous row.

An expert is a two-layer FFN, ``y = W2 relu(W1 x + b1) + b2``. All of its tensors live in a
single flat row so that moving the expert between tiers is one copy, as in mixtral-offloading's
``expert_cache.py``. A trainable record also carries its optimizer state, so that state
travels with the expert through the tiers (as ZeRO-Infinity swaps parameters with their
optimizer states)::

    [ params: w1 b1 w2 b2 | grad (same shape) | exp_avg | exp_avg_sq | step ]

This module is the only place that knows the order and shapes of the fields; every tier stores
rows of ``RecordLayout.numel`` elements and asks the layout for named views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["RecordLayout", "Expert", "PARAM_NAMES"]

PARAM_NAMES = ("w1", "b1", "w2", "b2")
STATE_NAMES = ("grad", "exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class RecordLayout:
    """Field names, shapes and offsets of one expert record.

    Parameters, in order: ``w1 [hidden, dim]``, ``b1 [hidden]``, ``w2 [dim, hidden]``,
    ``b2 [dim]`` (``param_numel`` elements). With ``optimizer_state`` the record continues with
    a gradient accumulator and Adam's two moments (``param_numel`` each) and a step count.
    """

    expert_dim: int
    hidden_dim: int
    optimizer_state: bool = False
    # filled in at construction
    param_fields: tuple[tuple[str, tuple[int, ...], int], ...] = field(init=False, repr=False)
    param_numel: int = field(init=False)
    numel: int = field(init=False)

    def __post_init__(self) -> None:
        d, h = self.expert_dim, self.hidden_dim
        fields, offset = [], 0
        for name, shape in zip(PARAM_NAMES, ((h, d), (h,), (d, h), (d,))):
            fields.append((name, shape, offset))
            offset += math.prod(shape)
        object.__setattr__(self, "param_fields", tuple(fields))
        object.__setattr__(self, "param_numel", offset)
        object.__setattr__(self, "numel", offset * 4 + 1 if self.optimizer_state else offset)

    def split_params(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views ``w1, b1, w2, b2`` of a flat parameter-shaped segment."""
        return {name: flat[off:off + math.prod(shape)].view(shape)
                for name, shape, off in self.param_fields}

    def views(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into one record row (changing a view changes the row): the parameters,
        ``params`` (all of them, flat) and, with optimizer state, ``grad`` (flat) with
        ``grad_w1 .. grad_b2``, ``exp_avg``, ``exp_avg_sq`` and ``step`` (one element)."""
        assert row.dim() == 1 and row.numel() == self.numel, (
            f"a record row has {self.numel} elements, got shape {tuple(row.shape)}")
        p = self.param_numel
        views = {"params": row[:p], **self.split_params(row[:p])}
        if self.optimizer_state:
            for i, name in enumerate(STATE_NAMES, start=1):
                views[name] = row[i * p:(i + 1) * p]
            views.update({f"grad_{k}": v for k, v in self.split_params(views["grad"]).items()})
            views["step"] = row[4 * p:]
        return views

    def init_row(self, row: torch.Tensor, generator: torch.Generator) -> None:
        """Initialise as the user's prototype: weights ~ N(0, 0.02^2), biases zero; optimizer
        state zero."""
        row.zero_()
        for name, view in self.views(row).items():
            if name in ("w1", "w2"):
                view.copy_(torch.randn(view.shape, generator=generator) * 0.02)


class Expert:
    """One expert as handed out by the store: named tensors that are views of its HBM slot.

    In-place changes to ``w1, b1, w2, b2`` change the slot; call ``store.mark_dirty([id])``
    afterwards so the change is written back when the expert leaves the tier. Trainable
    records also expose ``grad``, ``grad_w1 .. grad_b2``, ``exp_avg``, ``exp_avg_sq`` and
    ``step`` (None otherwise).
    """

    __slots__ = ("id", "row", "params", *PARAM_NAMES, *STATE_NAMES,
                 *(f"grad_{n}" for n in PARAM_NAMES), "step")

    def __init__(self, expert_id: int, row: torch.Tensor, views: dict[str, torch.Tensor]) -> None:
        self.id = expert_id
        self.row = row
        for name in self.__slots__[2:]:
            setattr(self, name, views.get(name))

    def __repr__(self) -> str:
        return f"Expert(id={self.id}, dim={self.w1.shape[1]}, hidden={self.w1.shape[0]}, " \
               f"device={self.row.device}, dtype={self.row.dtype})"
