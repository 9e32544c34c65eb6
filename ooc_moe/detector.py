"""Environment detector and prefetch planner: which game is this, and which experts come next?

**What.** ``EnvironmentDetector`` is a small CNN over a stack of frames with two heads: the
game being played (one of ``num_envs``) and, for each of ``num_layers`` MoE layers, one logit
per expert: the probability that the router uses that expert in the next step, the forward
pass that will process this observation.
``PrefetchPlanner`` turns those probabilities into ``store.prefetch(ids)`` calls issued before
the step computes, then scores each plan against the experts the router really used
(precision and coverage, with running totals).

**Why.** An out-of-core MoE is fast only if the experts a step needs are already in HBM when
the router asks for them; every miss stalls compute on a copy. A game played for thousands of
steps reuses a working set of experts, so an LRU cache does well inside a game but misses at
every switch. Predicting the working set from the pixels lets the copies start before the
router runs. The seed prototype had this module but never trained it and prefetched a random
set; here both heads are trained: cross-entropy on the game id, binary cross-entropy on a
multi-hot target of the experts the router chose (``used_expert_targets``).

**Training.** ``DetectorTrainer`` owns an Adam optimiser and a ring buffer of recent frames.
Offline: ``fit(obs, game_ids)``. Online (one update per environment step): ``add`` the step's
frames, game ids and routing, then ``step()`` trains on a minibatch drawn from the buffer;
``train_step`` trains on whatever batch the caller passes.

References: Mnih et al., *Human-level control through deep RL* (Nature 2015), the Atari CNN
this one narrows; Eliseev & Mazur, *Fast Inference of Mixture-of-Experts Language Models with
Offloading* (2023), speculative expert loading; Xue et al., *MoE-Infinity* (2024),
activation-aware expert prefetching.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .agent import float_channels_last

__all__ = ["DetectorPrediction", "used_expert_targets", "EnvironmentDetector",
           "DetectorTrainer", "PlanRecord", "PrefetchPlanner", "evaluate_game_accuracy"]


# -- helpers --------------------------------------------------------------------------------
def _check_int(name: str, value, low: int, high: int | None = None, hint: str = "") -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"between {low} and {high}"
        raise ValueError(f"{name} must be {bounds}, got {value}{hint}")
    return int(value)


def _as_tensor(x) -> Tensor:
    return x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))


def _flat_ids(used_ids) -> set[int]:
    """Expert ids from an int, a tensor (e.g. ``expert_indices``) or a nest of either."""
    if isinstance(used_ids, Tensor):
        return set(used_ids.reshape(-1).tolist())
    if isinstance(used_ids, (int, np.integer)) and not isinstance(used_ids, bool):
        return {int(used_ids)}
    if isinstance(used_ids, np.ndarray):
        return set(used_ids.reshape(-1).tolist())
    ids: set[int] = set()
    for item in used_ids:
        ids |= _flat_ids(item)
    return ids


def used_expert_targets(expert_indices_per_layer: Tensor | Sequence[Tensor], num_experts: int,
                        batch_size: int | None = None) -> Tensor:
    """Multi-hot targets (float32) of the experts the router used, for the expert head.

    ``expert_indices_per_layer``: one ``[tokens, top_k]`` index tensor per MoE layer, e.g.
    ``[layer.last_routing.expert_indices for layer in layers]`` (a lone tensor is one layer).

    - ``batch_size=B``: per observation. ``TieredMoELayer`` flattens ``[B, seq, dim]`` to
      ``[B * seq, dim]``, so the tokens of observation ``b`` are the ``b``-th block of
      ``tokens // B`` consecutive tokens (every layer's token count must be a multiple of
      ``B``). Returns ``[B, num_layers, num_experts]``.
    - ``batch_size=None``: per batch. The union over every token, ``[1, num_layers,
      num_experts]``; ``DetectorTrainer`` broadcasts it to every observation of the batch, so
      the head learns "used by the step that processes this observation", which is exactly
      what a prefetch must cover when one step serves a batch of environments.
    """
    if isinstance(expert_indices_per_layer, Tensor):
        expert_indices_per_layer = [expert_indices_per_layer]
    layers = list(expert_indices_per_layer)
    if not layers:
        raise ValueError("expert_indices_per_layer is empty: pass one [tokens, top_k] tensor "
                         "per MoE layer")
    num_experts = _check_int("num_experts", num_experts, 1)
    rows = 1 if batch_size is None else _check_int("batch_size", batch_size, 1)
    out = torch.zeros(rows, len(layers), num_experts, device=layers[0].device)
    for layer, indices in enumerate(layers):
        if indices.dim() == 1:
            indices = indices[:, None]
        if indices.dim() != 2:
            raise ValueError(f"layer {layer}: expert indices must be [tokens, top_k], got "
                             f"{tuple(indices.shape)}")
        tokens = indices.shape[0]
        if indices.numel() and not (0 <= int(indices.min()) and
                                    int(indices.max()) < num_experts):
            raise ValueError(f"layer {layer}: expert ids must lie in 0..{num_experts - 1}")
        if batch_size is not None and tokens % batch_size:
            raise ValueError(f"layer {layer} routed {tokens} tokens, not a multiple of "
                             f"batch_size={batch_size}: pass the batch size the layer saw, or "
                             "batch_size=None for one per-batch target")
        per_obs = tokens // rows if tokens else 1
        sample = (torch.arange(tokens, device=indices.device) // per_obs)[:, None]
        out[sample.expand_as(indices).reshape(-1), layer, indices.reshape(-1)] = 1.0
    return out


class DetectorPrediction(NamedTuple):
    game: int                      # argmax of the batch-mean game probabilities
    confidence: float              # that mean probability
    game_probs: Tensor             # [B, num_envs]
    expert_probs: Tensor           # [B, num_layers, num_experts]
    prefetch_set: list[list[int]]  # per layer: top_k experts by aggregated probability, best first


# -- the detector -------------------------------------------------------------------------
class EnvironmentDetector(nn.Module):
    """Game classifier + next-step expert predictor over stacked frames.

    Args:
        obs_shape: one frame, ``(C, H, W)``, e.g. ``(1, 84, 84)`` for grey Atari frames.
        num_envs: how many games it tells apart.
        num_experts: experts per MoE layer.
        hidden_dim: width of the shared features both heads read.
        history_len: frames stacked per observation; the input is ``[B, C * history_len, H, W]``
            (``AtariVectorEnv``'s ``[B, 4, 84, 84]`` for ``(1, 84, 84)`` and 4).
        num_layers: MoE layers; the head predicts each layer's experts separately.

    ``forward(obs)`` returns ``(game_logits [B, num_envs], expert_logits [B, num_layers,
    num_experts])``. uint8 frames are scaled by 1/255 inside; floating frames are taken as
    already in [0, 1]. The encoder is the Nature-DQN shape with half its channels (16, 32, 32
    instead of 32, 64, 64): telling games apart from pixels is easy, and it runs every step.
    """

    def __init__(self, obs_shape: Sequence[int], num_envs: int, num_experts: int,
                 hidden_dim: int = 256, history_len: int = 4, num_layers: int = 1) -> None:
        super().__init__()
        if len(tuple(obs_shape)) != 3:
            raise ValueError(f"obs_shape must be one frame's (C, H, W), e.g. (1, 84, 84), got "
                             f"{tuple(obs_shape)}")
        c, h, w = (_check_int(f"obs_shape[{i}]", v, 1) for i, v in enumerate(obs_shape))
        self.num_envs = _check_int("num_envs", num_envs, 1)
        self.num_experts = _check_int("num_experts", num_experts, 1)
        self.num_layers = _check_int("num_layers", num_layers, 1)
        self.history_len = _check_int("history_len", history_len, 1)
        hidden_dim = _check_int("hidden_dim", hidden_dim, 1)
        if h < 36 or w < 36:
            raise ValueError(f"frames of {h}x{w} are too small for the encoder (8/4, 4/2, 3/1 "
                             "convolutions): use at least 36x36, e.g. the 84x84 Atari frames")
        self.obs_shape = (c, h, w)
        self.input_shape = (c * history_len, h, w)      # what forward expects per observation
        self.encoder = nn.Sequential(
            nn.Conv2d(c * history_len, 16, 8, stride=4), nn.ReLU(),   # 84 -> 20
            nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(),                # 20 -> 9
            nn.Conv2d(32, 32, 3, stride=1), nn.ReLU(),                # 9 -> 7
            nn.Flatten(),
        )
        with torch.no_grad():
            features = self.encoder(torch.zeros(1, *self.input_shape)).shape[1]
        self.proj = nn.Sequential(nn.Linear(features, hidden_dim), nn.ReLU())
        self.game_head = nn.Linear(hidden_dim, num_envs)
        self.expert_head = nn.Linear(hidden_dim, num_layers * num_experts)

    def prepare(self, obs) -> Tensor:
        """``obs`` as float ``[B, C * history_len, H, W]`` in [0, 1] on this module's device.

        Accepts ``[C * history_len, H, W]`` (one observation), ``[B, C * history_len, H, W]``
        or ``[B, history_len, C, H, W]``; tensors or numpy arrays.
        """
        x = _as_tensor(obs)
        expected = self.input_shape
        if x.dim() == 5 and tuple(x.shape[1:]) == (self.history_len, *self.obs_shape):
            x = x.reshape(x.shape[0], *expected)
        elif x.dim() == 3 and tuple(x.shape) == expected:
            x = x[None]
        if x.dim() != 4 or tuple(x.shape[1:]) != expected or x.shape[0] == 0:
            raise ValueError(
                f"expected observations of shape [B, {expected[0]}, {expected[1]}, "
                f"{expected[2]}] (history_len={self.history_len} frames of "
                f"{self.obs_shape}), got {tuple(x.shape)}")
        device = self.game_head.weight.device
        if x.dtype == torch.uint8:                               # a copy: div_ is safe
            return float_channels_last(x, device).div_(255.0)
        if not x.is_floating_point():
            raise ValueError(f"observations must be uint8 frames (or floats in [0, 1]), got "
                             f"{x.dtype}")
        return float_channels_last(x, device)

    def forward(self, obs) -> tuple[Tensor, Tensor]:
        h = self.proj(self.encoder(self.prepare(obs)))                    # [B, hidden]
        expert_logits = self.expert_head(h).view(-1, self.num_layers, self.num_experts)
        return self.game_head(h), expert_logits

    @torch.no_grad()
    def predict(self, obs, top_k: int, *, reduce: str = "mean") -> DetectorPrediction:
        """The game and, per layer, the ``top_k`` experts to prefetch for the batch ``obs``.

        The batch is aggregated with ``reduce``: "mean" ranks experts by their mean
        probability over the batch (the expected share of observations that use them);
        "any" by ``1 - prod(1 - p)``, the chance that at least one observation of the batch
        uses them if observations were independent. The game is the argmax of the
        batch-mean game probabilities; ``confidence`` is that mean probability.
        """
        top_k = _check_int("top_k", top_k, 1, self.num_experts,
                           f" (this detector predicts {self.num_experts} experts per layer)")
        game_logits, expert_logits = self(obs)
        game_probs = F.softmax(game_logits, dim=-1)                       # [B, num_envs]
        expert_probs = torch.sigmoid(expert_logits)                       # [B, L, E]
        mean_game = game_probs.mean(0)
        scores = _aggregate(expert_probs, reduce)                         # [L, E]
        prefetch = scores.topk(top_k, dim=-1).indices.tolist()
        return DetectorPrediction(int(mean_game.argmax()), float(mean_game.max()), game_probs,
                                  expert_probs, prefetch)

    def get_prefetch_set(self, obs, top_k: int) -> list[list[int]]:
        """``predict(obs, top_k).prefetch_set``: per layer, the ``top_k`` likeliest experts."""
        return self.predict(obs, top_k).prefetch_set

    @torch.no_grad()
    def expert_scores(self, obs, reduce: str = "mean") -> Tensor:
        """Batch-aggregated expert probabilities ``[num_layers, num_experts]`` (see predict)."""
        return _aggregate(torch.sigmoid(self(obs)[1]), reduce)


def _aggregate(expert_probs: Tensor, reduce: str) -> Tensor:
    if reduce == "mean":
        return expert_probs.mean(0)
    if reduce == "any":
        return 1.0 - (1.0 - expert_probs).prod(0)
    raise ValueError(f"reduce must be 'mean' or 'any', got {reduce!r}")


# -- training -------------------------------------------------------------------------------
class DetectorTrainer:
    """Adam on ``game_loss + expert_loss_coef * expert_loss`` for an ``EnvironmentDetector``.

    - ``train_step(obs, game_ids, used_experts)``: one update on exactly this batch;
    - online: ``add(obs, game_ids, used_experts)`` each environment step, then ``step()``:
      one update on ``batch_size`` observations drawn uniformly from the buffer: uint8
      frames on the CPU, a ring of the last ``buffer_size`` per game (and one for frames of
      no known game), so that a game played long ago is still in the minibatches and the
      detector does not forget it while the next game is trained;
    - offline: ``fit(obs, game_ids, steps=...)``: random minibatches of a labelled set.

    ``game_ids`` may be None (or -1 per observation) when the game is unknown and
    ``used_experts`` None when there is no routing; those terms are then left out.
    ``used_experts`` is a multi-hot ``[B, num_layers, num_experts]`` or a per-batch
    ``[1, num_layers, num_experts]`` target, as ``used_expert_targets`` builds.
    """

    def __init__(self, detector: EnvironmentDetector, lr: float = 1e-3, *,
                 expert_loss_coef: float = 1.0, batch_size: int = 64, buffer_size: int = 2048,
                 seed: int = 0, known_accuracy: float = 0.9, known_window: int = 8) -> None:
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0.0 < known_accuracy <= 1.0:
            raise ValueError(f"known_accuracy must lie in (0, 1], got {known_accuracy}")
        self.known_accuracy = known_accuracy
        self.known_window = _check_int("known_window", known_window, 1)
        self.detector = detector
        self.optimizer = torch.optim.Adam(detector.parameters(), lr=lr)
        self.expert_loss_coef = float(expert_loss_coef)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.buffer_size = _check_int("buffer_size", buffer_size, 1)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        L, E = detector.num_layers, detector.num_experts
        # one ring of buffer_size per label (-1 = unknown game, then each game): region
        # r = label + 1 is rows [r * buffer_size, (r + 1) * buffer_size). Allocated on the
        # first add; a region's pages are touched only once frames of its game arrive.
        rows = self.buffer_size * (detector.num_envs + 1)
        self._obs: Tensor | None = None                                   # [N, C*T, H, W] uint8
        self._games = torch.full((rows,), -1, dtype=torch.long)
        self._used = torch.zeros(rows, L, E, dtype=torch.bool)
        self._has_used = torch.zeros(rows, dtype=torch.bool)
        self._next = [0] * (detector.num_envs + 1)          # per region: next row to write
        self._count = [0] * (detector.num_envs + 1)         # per region: rows filled
        # per game, (frames named right, frames) of its last known_window minibatches
        self.named: list[deque] = [deque(maxlen=self.known_window)
                                   for _ in range(detector.num_envs)]

    def __len__(self) -> int:
        """How many observations the buffer holds."""
        return sum(self._count)

    def _targets(self, batch: int, game_ids, used_experts) -> tuple[Tensor, Tensor | None]:
        det = self.detector
        games = (torch.full((batch,), -1, dtype=torch.long) if game_ids is None
                 else _as_tensor(game_ids).reshape(-1).long())
        if games.numel() == 1 and batch > 1:
            games = games.expand(batch)
        if games.numel() != batch:
            raise ValueError(f"{games.numel()} game ids for {batch} observations")
        if bool(((games < -1) | (games >= det.num_envs)).any()):
            raise ValueError(f"game ids must lie in 0..{det.num_envs - 1} (or -1 = unknown)")
        if used_experts is None:
            return games, None
        used = _as_tensor(used_experts).float()
        if used.dim() == 2:
            used = used[None]
        if used.dim() != 3 or tuple(used.shape[1:]) != (det.num_layers, det.num_experts) or (
                used.shape[0] not in (1, batch)):
            raise ValueError(f"used_experts must be [B or 1, {det.num_layers}, "
                             f"{det.num_experts}] (num_layers, num_experts), got "
                             f"{tuple(used.shape)}: build it with used_expert_targets")
        return games, used.expand(batch, -1, -1)

    def train_step(self, obs, game_ids=None, used_experts=None) -> dict[str, float]:
        """One Adam step on this batch; returns the losses and the batch's game accuracy."""
        x = self.detector.prepare(obs)
        games, used = self._targets(x.shape[0], game_ids, used_experts)
        return self._update(x, games, used, None)

    def _update(self, x: Tensor, games: Tensor, used: Tensor | None,
                has_used: Tensor | None) -> dict[str, float]:
        """``has_used`` [B] bool: which rows of ``used`` are real (None = all)."""
        device = x.device
        games = games.to(device)
        known = games >= 0                               # observations with a game label
        if used is not None:
            has_used = (torch.ones(x.shape[0], dtype=torch.bool) if has_used is None
                        else has_used).to(device)
            used = used.to(device)
        if not known.any() and (used is None or not has_used.any()):
            # nothing to learn from: no step (Adam would still move on old moments)
            return {"loss": 0.0, "game_loss": 0.0, "expert_loss": 0.0,
                    "game_accuracy": math.nan}
        game_logits, expert_logits = self.detector(x)    # [B, num_envs], [B, L, E]
        zero = game_logits.new_zeros(())
        game_loss = F.cross_entropy(game_logits[known], games[known]) if known.any() else zero
        expert_loss = zero
        if used is not None and has_used.any():
            expert_loss = F.binary_cross_entropy_with_logits(expert_logits[has_used],
                                                             used[has_used])
        loss = game_loss + self.expert_loss_coef * expert_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.steps += 1
        with torch.no_grad():
            hits = game_logits.argmax(-1)[known] == games[known]
            for game in games[known].unique().tolist():
                mine = games[known] == game
                self.named[game].append((int(hits[mine].sum()), int(mine.sum())))
        return {"loss": loss.item(), "game_loss": game_loss.item(),
                "expert_loss": expert_loss.item(),
                "game_accuracy": hits.float().mean().item() if known.any() else math.nan}

    def add(self, obs, game_ids=None, used_experts=None) -> None:
        """Append a batch of uint8 observations (and their labels) to the buffer; within each
        game's ring the oldest are overwritten once it holds ``buffer_size``."""
        x = _as_tensor(obs)
        if x.dtype != torch.uint8:
            raise ValueError(f"the buffer stores raw uint8 frames, got {x.dtype}")
        if x.dim() == len(self.detector.input_shape):
            x = x[None]
        self.detector.prepare(x[:1])                                      # checks the shape
        x = x.reshape(x.shape[0], *self.detector.input_shape).cpu()
        games, used = self._targets(x.shape[0], game_ids, used_experts)
        games = games.cpu()
        used = None if used is None else used.cpu() > 0.5
        if self._obs is None:
            self._obs = torch.empty(len(self._games), *self.detector.input_shape,
                                    dtype=torch.uint8)
        for region in (games + 1).unique().tolist():
            rows = (games + 1 == region).nonzero().reshape(-1)[-self.buffer_size:]  # newest
            n, start = len(rows), self._next[region]
            slots = region * self.buffer_size + (start + torch.arange(n)) % self.buffer_size
            self._obs[slots] = x[rows]
            self._games[slots] = games[rows]
            self._has_used[slots] = used is not None
            self._used[slots] = used[rows] if used is not None else False
            self._next[region] = (start + n) % self.buffer_size
            self._count[region] = min(self._count[region] + n, self.buffer_size)

    def seen_games(self) -> Tensor:
        """``[num_envs]`` bool: the games whose labelled frames the buffer holds."""
        return torch.tensor([n > 0 for n in self._count[1:]])

    def known_games(self) -> Tensor:
        """``[num_envs]`` bool: the games the detector names reliably: over the game's last
        ``known_window`` minibatches (no fewer), it named at least ``known_accuracy`` of the
        game's frames right, each judged before its update (a game whose frames only wait in
        the buffer, or whose logit is still learning, is not known)."""
        known = []
        for window in self.named:
            right, frames = (sum(x) for x in zip(*window)) if window else (0, 0)
            known.append(len(window) == self.known_window and right >= self.known_accuracy
                         * frames)
        return torch.tensor(known)

    @torch.no_grad()
    def predict_games(self, obs) -> Tensor | None:
        """Per observation, the likeliest game among the ``known_games`` (a detector cannot
        name a game it has not learnt yet); None before it knows any."""
        known = self.known_games()
        if not known.any():
            return None
        probs = self.detector.predict(obs, top_k=1).game_probs
        return probs.masked_fill(~known.to(probs.device), -1.0).argmax(-1)

    def step(self) -> dict[str, float]:
        """One update on ``batch_size`` observations drawn uniformly from the buffer (the
        expert loss only over those added with their routing).

        No update while the buffer holds one game and no routing: with a single class
        there is nothing to tell apart, and fitting it only saturates the game head (under
        Adam its ReLUs die, and the detector never learns the next game: measured on three
        synthetic games played in sequence, it then named the first game for all three).
        """
        if len(self) == 0:
            raise RuntimeError("the buffer is empty: add() observations before step()")
        if self.seen_games().sum() < 2 and not self._has_used.any():
            return {"loss": 0.0, "game_loss": 0.0, "expert_loss": 0.0,
                    "game_accuracy": math.nan}
        filled = torch.cat([r * self.buffer_size + torch.arange(n)
                            for r, n in enumerate(self._count) if n])
        pick = torch.randint(len(filled), (min(self.batch_size, len(filled)),),
                             generator=self.generator)
        idx = filled[pick]
        x = self.detector.prepare(self._obs[idx])
        has_used = self._has_used[idx]
        used = self._used[idx].float() if has_used.any() else None
        return self._update(x, self._games[idx], used, has_used)

    def fit(self, obs, game_ids, used_experts=None, *, steps: int,
            max_seconds: float | None = None) -> dict[str, float]:
        """Up to ``steps`` updates on random minibatches of ``(obs, game_ids, used_experts)``,
        stopping early after ``max_seconds``. Returns the last losses, steps and seconds."""
        steps = _check_int("steps", steps, 1)
        obs_t = _as_tensor(obs)
        games = _as_tensor(game_ids).reshape(-1)
        used = None if used_experts is None else _as_tensor(used_experts)
        n = obs_t.shape[0]
        if games.numel() != n or (used is not None and used.shape[0] != n):
            raise ValueError(f"{n} observations but {games.numel()} game ids"
                             + ("" if used is None else f" and {used.shape[0]} expert targets"))
        started, losses, done = time.perf_counter(), {}, 0
        for done in range(1, steps + 1):
            idx = torch.randint(n, (min(self.batch_size, n),), generator=self.generator)
            losses = self.train_step(obs_t[idx], games[idx],
                                     None if used is None else used[idx])
            if max_seconds is not None and time.perf_counter() - started > max_seconds:
                break
        return {**losses, "steps": done, "seconds": time.perf_counter() - started}


@torch.no_grad()
def evaluate_game_accuracy(detector: EnvironmentDetector, obs, game_ids,
                           batch_size: int = 256) -> tuple[float, np.ndarray]:
    """Game accuracy on ``(obs, game_ids)`` and the confusion matrix ``[num_envs, num_envs]``
    (int64; row = true game, column = predicted game)."""
    batch_size = _check_int("batch_size", batch_size, 1)
    obs_t = _as_tensor(obs)
    games = _as_tensor(game_ids).reshape(-1).long()
    if games.numel() != obs_t.shape[0] or games.numel() == 0:
        raise ValueError(f"{obs_t.shape[0]} observations but {games.numel()} game ids")
    if bool(((games < 0) | (games >= detector.num_envs)).any()):
        raise ValueError(f"game ids must lie in 0..{detector.num_envs - 1}")
    predicted = torch.cat([detector(obs_t[i:i + batch_size])[0].argmax(-1).cpu()
                           for i in range(0, obs_t.shape[0], batch_size)])
    confusion = np.zeros((detector.num_envs, detector.num_envs), dtype=np.int64)
    np.add.at(confusion, (games.numpy(), predicted.numpy()), 1)
    return float(np.trace(confusion) / confusion.sum()), confusion


# -- prefetching -----------------------------------------------------------------------------
@dataclass
class PlanRecord:
    """One step of a ``PrefetchPlanner``: what it predicted and, once observed, what was used."""
    planned: list[int]                  # the predicted experts, likeliest first
    dropped: int                        # prefetch requests the store dropped (no free slot)
    switch: bool = False                # the step's (leading) game differs from the last plan's
    games: list[int] = field(default_factory=list)  # the games the step is routed with
    used: list[int] | None = None       # experts the step really used (set by observe)

    @property
    def hits(self) -> int:
        return len(set(self.planned) & set(self.used or ()))


@dataclass
class _Totals:
    steps: int = 0          # observed plans
    planned: int = 0        # ids planned in observed steps
    used: int = 0
    hits: int = 0
    dropped: int = 0        # store drops over every plan
    unobserved: int = 0     # plans replaced before observe() was called

    def add(self, planned: Sequence[int], used: Sequence[int]) -> None:
        self.steps += 1
        self.planned += len(planned)
        self.used += len(used)
        self.hits += len(set(planned) & set(used))

    def merge(self, other: "_Totals") -> None:
        for name in ("steps", "planned", "used", "hits", "dropped", "unobserved"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def figures(self) -> dict[str, float]:
        return {"precision": _ratio(self.hits, self.planned),
                "coverage": _ratio(self.hits, self.used)}


def _switch_figures(s: _Totals) -> dict[str, float]:
    """``switches`` (graded windows), ``switch_precision`` and ``switch_coverage`` of ``s``."""
    return {"switches": s.steps, **{f"switch_{k}": v for k, v in s.figures().items()}}


class PrefetchPlanner:
    """Predicts the next step's experts and prefetches them before the step computes.

    Call ``plan(obs)`` as soon as a step's observations are known, before the forward pass
    that routes them, and ``observe(used_ids)`` after it.

    **The prediction.** Without cohorts: the experts of ``store`` the detector scores with
    probability ``>= min_prob``, likeliest first. ``cohorts`` (a ``CohortTable``, for
    ``cohort`` routing): a game may only use its cohort, so the plan follows the game: for each
    game of the step (the one of most observations first), at a game switch its whole cohort
    (all layers: everything the new game may use while it is played), between switches the
    experts of its cohort it used in its last ``recent_steps`` observed steps, most used first
    (its whole cohort while it has none). ``top_k`` (None = no limit) caps the prediction.

    **The copies.** The step's (leading) game is the routing's when the caller passes
    ``games``, else the detector's (among ``known_games()``, a boolean mask such as
    ``DetectorTrainer.known_games``, when given). While it stays the same, the experts the
    last step used are kept: a prefetch never evicts them (they are the likeliest to be used again, and a
    wrong prediction must not cost the step its experts). At a *game switch* they are not
    kept: the new game's experts go into the slots the old game frees. Predicted experts not
    yet in HBM are copied, likeliest first, into the slots neither pinned, in use, kept nor
    holding a predicted expert (``store.room_for_prefetch``); those already there are touched.
    For ``tier="dram"`` the prediction is copied into DRAM, at most ``store.dram_capacity``.
    ``PlanRecord.dropped`` counts requests the store still dropped (rare).

    **The grades.** ``observe`` scores the prediction against the experts the step used:

    - precision = predicted experts that were used / predicted experts,
    - coverage  = used experts that had been predicted / used experts,

    per step (returned) and as running totals (``precision``, ``coverage``, ``summary()``).
    A switch's prediction is what stays in HBM while the new game is played, so it is graded
    against every expert used from the switch until the next one (or until now), as the
    store grades a prefetch by whether it was used before its eviction:
    ``summary()["switch_precision"]``, ``["switch_coverage"]``, ``["switches"]``, the
    switches graded, and the same per store phase at the switch (``["switch_phases"]``):
    training switches happen in the ``rollout``, an evaluation playing every game in turn
    switches in ``eval``. These grade the *prediction*; the store's ``prefetches_*`` counters grade the transfers (an expert
    already in HBM is predicted, and counted here, but costs no copy).

    ``layer``: the MoE layer whose experts ``store`` holds, when each layer has its own store
    (one planner per layer). None: every layer draws from this one store, and an expert's
    score is ``1 - prod_l(1 - p_l)``, the chance that some layer uses it.
    """

    def __init__(self, store, detector: EnvironmentDetector, top_k: int | None = None, *,
                 min_prob: float = 0.5, layer: int | None = None, tier: str = "hbm",
                 reduce: str = "mean", keep_history: bool = True, cohorts=None,
                 known_games: Callable[[], Tensor] | None = None,
                 recent_steps: int = 4) -> None:
        if store.num_experts != detector.num_experts:
            raise ValueError(f"the store holds {store.num_experts} experts but the detector "
                             f"predicts {detector.num_experts} per layer")
        if top_k is not None:
            _check_int("top_k", top_k, 1, detector.num_experts)
        if layer is not None:
            _check_int("layer", layer, 0, detector.num_layers - 1)
        if not 0.0 <= min_prob <= 1.0:
            raise ValueError(f"min_prob must lie in [0, 1], got {min_prob}")
        if tier not in ("hbm", "dram"):
            raise ValueError(f"tier must be 'hbm' or 'dram', got {tier!r}")
        _check_int("recent_steps", recent_steps, 1)
        _aggregate(torch.zeros(1, 1), reduce)                             # validates reduce
        self.store, self.detector = store, detector
        self.top_k, self.min_prob, self.layer = top_k, min_prob, layer
        self.tier, self.reduce, self.keep_history = tier, reduce, keep_history
        self.cohorts, self.known_games, self.recent_steps = cohorts, known_games, recent_steps
        self.history: list[PlanRecord] = []
        self._pending: PlanRecord | None = None
        self._totals = _Totals()
        self._switch_totals: dict[str, _Totals] = {}     # per store phase at the switch
        self._last_game: int | None = None
        self._last_used: list[int] = []
        self._window: tuple[list[int], set[int], str] | None = None  # the switch being graded
        self._recent: dict[int, deque] = {}     # per game, its cohort experts used per step

    def scores(self, obs) -> Tensor:
        """The probability ``[num_experts]`` that the next step uses each of the store's
        experts."""
        with torch.no_grad():
            return self._scores(self.detector(obs)[1])

    def _scores(self, expert_logits: Tensor) -> Tensor:
        probs = _aggregate(torch.sigmoid(expert_logits), self.reduce)    # [L, E]
        if self.layer is not None:
            return probs[self.layer]
        return 1.0 - (1.0 - probs).prod(0)

    def _cohort(self, game: int) -> list[int]:
        return list(dict.fromkeys(self.cohorts.lookup(torch.tensor([game])).reshape(-1).tolist()))

    def _cohort_ids(self, counts: Tensor, switch: bool) -> list[int]:
        """Per game with ``counts > 0`` (``bincount`` of a step's games, the game of most
        entries first), its cohort at a ``switch``, else its recent experts or its cohort."""
        ids: list[int] = []
        for game in counts.argsort(descending=True, stable=True)[:int((counts > 0).sum())].tolist():
            recent = Counter(e for step in self._recent.get(game, ()) for e in step)
            experts = ([] if switch else [e for e, _ in recent.most_common()]) or self._cohort(game)
            ids += [e for e in experts if e not in ids]
        return ids

    def plan(self, obs, games: Tensor | None = None) -> list[int]:
        """Predict the experts of ``obs``'s step and prefetch those not yet in the tier;
        returns the ids passed to ``store.prefetch`` (predicted and kept experts already
        there, then the copies). ``games``: the games the step is routed with, when known
        (with ``cohorts`` this saves a forward of the detector)."""
        expert_logits = None
        if games is None or self.cohorts is None:
            with torch.no_grad():
                game_logits, expert_logits = self.detector(obs)
            if games is None:
                if self.known_games is not None:   # it cannot name a game not learnt yet
                    game_logits = game_logits.masked_fill(
                        ~self.known_games().to(game_logits.device), -math.inf)
                games = game_logits.argmax(-1)
        games = games.reshape(-1).cpu()
        counts = torch.bincount(games)
        lead = int(counts.argmax())
        switch, self._last_game = self._last_game is not None and lead != self._last_game, lead
        if switch:                     # the last game's stay ends here, observed or not
            self._close_window()
        if self.cohorts is not None:
            ids = self._cohort_ids(counts, switch)
        else:
            scores = self._scores(expert_logits).cpu()
            order = torch.argsort(scores, descending=True, stable=True)
            ids = order[scores[order] >= self.min_prob].tolist()
        ids = ids[:self.top_k]
        asked = self._prefetch(ids, [] if switch else self._last_used)
        dropped = len(asked) - len(self.store.prefetch(asked, tier=self.tier)) if asked else 0
        if self._pending is not None:                  # the last plan was never observed
            self._record(self._pending)
        self._pending = PlanRecord(ids, dropped, switch, games.unique().tolist())
        return asked

    def _prefetch(self, ids: list[int], keep: list[int]) -> list[int]:
        """The ids of the prefetch call: the predicted and kept experts already in HBM (so
        that nothing evicts them), then as many predicted ones as the other slots hold."""
        if self.tier == "dram":
            return ids[:self.store.dram_capacity]
        where = {e: self.store.where(e) for e in dict.fromkeys(ids + keep)}
        resident = [e for e in where if where[e] == "hbm"]
        room = self.store.room_for_prefetch(resident)
        return resident + [e for e in ids if where[e] != "hbm"][:max(room, 0)]

    def observe(self, used_ids) -> dict[str, float]:
        """Score the last plan against ``used_ids`` (ids, a tensor such as
        ``layer.last_routing.expert_indices``, or a list of them); returns that step's
        ``precision`` and ``coverage`` (nan when nothing was planned / used)."""
        if self._pending is None:
            raise RuntimeError("observe() scores the last plan(): call plan(obs) first")
        used = sorted(_flat_ids(used_ids))
        if used and not (0 <= used[0] and used[-1] < self.store.num_experts):
            raise ValueError(f"used expert ids must lie in 0..{self.store.num_experts - 1}, "
                             f"got {used}")
        record, self._pending = self._pending, None
        record.used = self._last_used = used
        self._record(record)
        if self.cohorts is not None:
            for game in record.games:
                cohort = set(self._cohort(game))
                self._recent.setdefault(game, deque(maxlen=self.recent_steps)).append(
                    [e for e in used if e in cohort])
        if record.switch:
            self._close_window()
            self._window = (record.planned, set(), self.store.phase)
        if self._window is not None:
            self._window[1].update(used)
        return {"precision": _ratio(record.hits, len(record.planned)),
                "coverage": _ratio(record.hits, len(record.used))}

    def _record(self, record: PlanRecord) -> None:
        self._totals.dropped += record.dropped
        if record.used is None:       # an unobserved plan cannot be scored
            self._totals.unobserved += 1
        else:
            self._totals.add(record.planned, record.used)
        if self.keep_history:
            self.history.append(record)

    @property
    def precision(self) -> float:
        """Planned experts that were then used / planned experts, over observed steps."""
        return self._totals.figures()["precision"]

    @property
    def coverage(self) -> float:
        """Used experts that had been planned / used experts, over observed steps."""
        return self._totals.figures()["coverage"]

    def summary(self) -> dict:
        """Running totals, precision and coverage over every observed step, and at game
        switches over their windows (``switches``, ``switch_precision``, ``switch_coverage``),
        also per store phase at the switch (``switch_phases``: ``{phase: {switches,
        switch_precision, switch_coverage}}``; training switches are ``rollout``'s, the
        evaluation's game after game ``eval``'s)."""
        t = self._totals
        phases = {phase: replace(s) for phase, s in self._switch_totals.items()}
        if self._window is not None:                         # a switch still being graded
            planned, used, phase = self._window
            phases.setdefault(phase, _Totals()).add(planned, used)
        every = _Totals()
        for s in phases.values():
            every.merge(s)
        return {"steps": t.steps, "planned": t.planned, "used": t.used, "hits": t.hits,
                "dropped": t.dropped, "unobserved": t.unobserved, **t.figures(),
                **_switch_figures(every),
                "switch_phases": {phase: _switch_figures(s) for phase, s in phases.items()}}

    def reset(self) -> None:
        """Forget the history, the running totals and the last step's experts."""
        self.history.clear()
        self._pending = None
        self._totals, self._switch_totals = _Totals(), {}
        self._last_game, self._last_used, self._window = None, [], None
        self._recent.clear()

    def _close_window(self) -> None:
        if self._window is not None:
            planned, used, phase = self._window
            self._switch_totals.setdefault(phase, _Totals()).add(planned, used)
            self._window = None


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan
