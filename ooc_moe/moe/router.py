"""Routing policies: top-k expert choice, the balance modes, and cohorts of experts per game.

A linear router scores every expert per token (``logits [tokens, E]``); the top-k experts
are chosen and weighted by a softmax over their own logits (the *gates*). Routing modes (the
agent's ``routing``): ``token`` (the router sees the token), ``env`` (also an embedding of the
game) and ``cohort``: each game owns ``C`` experts per layer (``CohortTable``), and the
logits of every other expert are set to ``-inf`` before the top-k, so the choice, the gates
and the losses below live inside the game's cohort. A game seen for the first time gets the
``C`` experts with the fewest cohort assignments so far (ties: the lowest id), layer after
layer, so cohorts overlap only when ``games x layers x C > experts``.

Balance modes (``balance``), with ``f_i`` = share of the ``tokens x top_k`` assignments that
go to expert ``i`` and ``P_i`` = its mean router probability:

- ``batch``: the Switch loss of the batch, ``N * sum_i f_i P_i`` (Fedus et al., 2021), ``N``
  the experts a token may choose from (``E``, or ``C`` inside a cohort: 1 when balanced);
  on single-game batches it pushes every game over every expert;
- ``none``: no balancing loss;
- ``horizon``: auxiliary-loss-free balancing (Wang et al., 2024, *Auxiliary-Loss-Free Load
  Balancing Strategy for Mixture-of-Experts*; DeepSeek-V3): a per-expert bias ``b`` is added
  to the logits for the top-k *selection* only (the gates use the logits without it), and
  after each training forward ``load_ema = (1 - a) * load_ema + a * f`` with
  ``a = min(1, tokens / balance_horizon)``, then ``b += balance_rate * sign(mean(load_ema) -
  load_ema)``. The load is averaged over about ``balance_horizon`` tokens, which can span
  games: one game's batches may use few experts, while an expert left idle over the horizon
  gains bias until it is chosen again. ``b`` and ``load_ema`` are buffers (in checkpoints).

Every mode adds the ST-MoE router z-loss ``mean(logsumexp(logits)^2)`` (Zoph et al., 2022),
over the experts a token may choose from.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RouterOutput", "ExpertRouter", "CohortTable", "load_balancing_loss",
           "router_z_loss", "BALANCE_MODES"]

BALANCE_MODES = ("batch", "none", "horizon")


class RouterOutput(NamedTuple):
    expert_indices: Tensor       # [tokens, top_k] int64
    expert_weights: Tensor       # [tokens, top_k] softmax over the chosen logits
    router_logits: Tensor        # [tokens, num_experts] (with noise, when training; -inf
                                 # outside the token's cohort)
    load_balancing_loss: Tensor  # scalar, 1.0 when perfectly balanced (0 unless "batch")
    z_loss: Tensor               # scalar


def load_balancing_loss(logits: Tensor, indices: Tensor, choices: int | None = None) -> Tensor:
    """Switch loss ``N * sum_i f_i * P_i``: ``f_i`` = fraction of the ``tokens x top_k``
    assignments that go to expert i (so the f_i sum to one), ``P_i`` = mean router
    probability of expert i, ``N = choices`` the experts a token may choose from (default:
    all), so that a router uniform over them scores 1."""
    num_experts = logits.shape[-1]
    f = torch.bincount(indices.reshape(-1), minlength=num_experts).to(logits.dtype)
    f = f / indices.numel()
    p = F.softmax(logits, dim=-1).mean(dim=0)
    return (choices or num_experts) * (f * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE z-loss: keeps router logits small, which keeps the softmax numerically tame."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def _check_balance(balance: str, balance_horizon: int, balance_rate: float) -> None:
    if balance not in BALANCE_MODES:
        raise ValueError(f"balance must be one of {BALANCE_MODES}, got {balance!r} (e.g. "
                         "--balance horizon)")
    if balance_horizon < 1:
        raise ValueError(f"balance_horizon={balance_horizon} must be >= 1 token (e.g. "
                         "--balance_horizon 1000000)")
    if balance_rate < 0:
        raise ValueError(f"balance_rate={balance_rate} must be >= 0")


class ExpertRouter(nn.Module):
    """A linear router choosing ``top_k`` of ``num_experts`` experts per token.

    In training, Gaussian noise of ``noise_std`` is added to the logits before the top-k, to
    explore experts. The weights of the chosen experts are a softmax over their logits.
    ``balance``: ``"batch"``, ``"none"`` or ``"horizon"`` (see the module docstring).
    """

    def __init__(self, input_dim: int, num_experts: int, top_k: int = 2,
                 noise_std: float = 0.1, *, balance: str = "batch",
                 balance_horizon: int = 1_000_000, balance_rate: float = 1e-3) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}")
        if noise_std < 0:
            raise ValueError(f"noise_std={noise_std} must be >= 0")
        _check_balance(balance, balance_horizon, balance_rate)
        self.input_dim, self.num_experts = input_dim, num_experts
        self.top_k, self.noise_std = top_k, noise_std
        self.balance, self.balance_horizon, self.balance_rate = (balance, balance_horizon,
                                                                 balance_rate)
        self.router = nn.Linear(input_dim, num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=0.01)
        if balance == "horizon":
            self.register_buffer("selection_bias", torch.zeros(num_experts))
            self.register_buffer("load_ema", torch.full((num_experts,), 1.0 / num_experts))

    def forward(self, x: Tensor, cohort: Tensor | None = None) -> RouterOutput:
        """``x [tokens, input_dim]``; ``cohort [tokens, C]``: the experts each token may
        choose from (all without)."""
        if x.dim() != 2 or x.shape[-1] != self.input_dim:
            raise ValueError(f"the router expects [tokens, {self.input_dim}] inputs, got "
                             f"{tuple(x.shape)}")
        logits = self.router(x)
        if self.training and self.noise_std > 0:
            logits = logits + torch.randn_like(logits) * self.noise_std
        choices = self.num_experts
        if cohort is not None:
            if cohort.shape != (x.shape[0], cohort.shape[1]) or cohort.shape[1] < self.top_k:
                raise ValueError(f"cohort must be [tokens={x.shape[0]}, C >= top_k="
                                 f"{self.top_k}] expert ids, got {tuple(cohort.shape)}")
            logits = torch.full_like(logits, float("-inf")).scatter(
                1, cohort, logits.gather(1, cohort))
            choices = cohort.shape[1]
        select = logits + self.selection_bias if self.balance == "horizon" else logits
        indices = torch.topk(select, self.top_k, dim=-1).indices
        weights = F.softmax(logits.gather(1, indices), dim=-1)
        if self.balance == "batch":
            balance_loss = load_balancing_loss(logits, indices, choices)
        else:
            balance_loss = logits.new_zeros(())
        if self.balance == "horizon" and self.training and torch.is_grad_enabled():
            self._update_bias(indices)
        return RouterOutput(indices, weights, logits, balance_loss, router_z_loss(logits))

    @torch.no_grad()
    def _update_bias(self, indices: Tensor) -> None:
        """One step of the horizon's bias: the load's EMA, then a sign step toward the mean."""
        load = torch.bincount(indices.reshape(-1), minlength=self.num_experts)
        alpha = min(1.0, indices.shape[0] / self.balance_horizon)
        self.load_ema.mul_(1 - alpha).add_(load.to(self.load_ema.dtype) / indices.numel(),
                                           alpha=alpha)
        self.selection_bias.add_(torch.sign(self.load_ema.mean() - self.load_ema),
                                 alpha=self.balance_rate)


class CohortTable(nn.Module):
    """Per game and layer, the ``cohort_size`` experts the game may use (``cohort`` routing).

    ``table [games, layers, C]`` holds expert ids (-1: the game has not been seen) and
    ``assignments [E]`` how many cohorts hold each expert; both are buffers, so checkpoints
    keep them. A game's cohorts are chosen the first time ``lookup`` sees it.
    """

    def __init__(self, num_games: int, num_layers: int, cohort_size: int,
                 num_experts: int) -> None:
        super().__init__()
        if not 1 <= cohort_size <= num_experts:
            raise ValueError(f"cohort_size={cohort_size} must be between 1 and num_experts="
                             f"{num_experts}")
        self.register_buffer("table", torch.full((num_games, num_layers, cohort_size), -1,
                                                 dtype=torch.long))
        self.register_buffer("assignments", torch.zeros(num_experts, dtype=torch.long))

    def assign(self, game: int) -> None:
        """Give ``game`` (if new) the least-assigned experts in each layer (ties: lowest id)."""
        if self.table[game, 0, 0] >= 0:
            return
        size = self.table.shape[-1]
        for layer in range(self.table.shape[1]):
            chosen = torch.argsort(self.assignments, stable=True)[:size]
            self.table[game, layer] = chosen.sort().values
            self.assignments[chosen] += 1

    def lookup(self, games: Tensor) -> Tensor:
        """``games [B]`` -> ``[layers, B, C]`` expert ids, assigning new games first."""
        for game in games.unique().tolist():
            self.assign(game)
        return self.table[games].transpose(0, 1)
