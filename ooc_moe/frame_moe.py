"""A small MoE model over real Atari frames, trained game after game through a tiered store.

Until the agent of notebook 04 exists, this is where real routing comes from: a CNN cuts a
stack of frames into 9 patch tokens, ``num_layers`` ``TieredMoELayer``s (sharing one store,
the prototype's single pool of experts) process them, and a linear head names the game. It is
trained the way the RL agent will be, one game at a time, and ``train_sequentially`` records
every store call and each layer's experts in a ``RoutingTrace`` (game boundaries included),
plus which experts each frame's tokens used, the targets of the environment detector.

The classification task itself is easy (the detector does it with a smaller CNN); what
matters here is that routing is driven by real pixels and by real training through the
store, including the single-game batches whose load-balancing loss notebook 02 discusses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .detector import DetectorTrainer, PrefetchPlanner, used_expert_targets
from .moe import ExpertOptimizer, TieredMoELayer
from .store import TieredExpertStore
from .trace import RoutingTrace

__all__ = ["FrameMoE", "SequentialRun", "train_sequentially", "routing_per_frame"]


class FrameMoE(nn.Module):
    """Frames ``uint8 [B, 4, 84, 84]`` -> 9 tokens -> MoE layers -> game logits."""

    TOKENS = 9

    def __init__(self, store: TieredExpertStore, num_games: int, num_layers: int = 2,
                 top_k: int = 2, load_balance_coef: float = 0.01,
                 router_noise: float = 0.1) -> None:
        super().__init__()
        dim = store.expert_dim
        self.encoder = nn.Sequential(                       # 84 -> 20 -> 9 -> 3 (x 3 patches)
            nn.Conv2d(4, 16, 8, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool2d(3))
        self.to_tokens = nn.Linear(32, dim)
        self.layers = nn.ModuleList(
            TieredMoELayer(dim, store.hidden_dim, store, top_k, dropout=0.0,
                           noise_std=router_noise, load_balance_coef=load_balance_coef)
            for _ in range(num_layers))
        self.head = nn.Linear(dim, num_games)

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """Game logits ``[B, games]`` and the layers' summed auxiliary loss."""
        x = self.encoder(obs.float() / 255.0)                       # [B, 32, 3, 3]
        h = self.to_tokens(x.flatten(2).transpose(1, 2))            # [B, 9, dim]
        aux = h.new_zeros(())
        for layer in self.layers:
            h, layer_aux = layer(h)
            aux = aux + layer_aux
        return self.head(h.mean(1)), aux

    def expert_indices(self) -> list[Tensor]:
        """Per layer, the ``[B * 9, top_k]`` experts of the last forward."""
        return [layer.last_routing.expert_indices for layer in self.layers]


@dataclass
class SequentialRun:
    trace: RoutingTrace
    losses: list          # per step
    accuracy: list        # per step, on the step's batch
    batches: list         # per step, the indices of its frames


def train_sequentially(model: FrameMoE, frames: np.ndarray, games: np.ndarray,
                       steps_per_game: int, batch_size: int = 32, lr: float = 1e-3,
                       seed: int = 0, *, planner: PrefetchPlanner | None = None,
                       detector_trainer: DetectorTrainer | None = None) -> SequentialRun:
    """Train on each game's frames in turn (game 0 first), recording a ``RoutingTrace``.

    With a ``planner``, each step's experts are predicted from its frames and prefetched
    before the forward pass, and the plan is scored against the routing. With a
    ``detector_trainer``, the detector learns online: every step adds its frames, game ids and
    per-frame routing to the trainer's buffer and takes one training step.
    """
    store = model.layers[0].expert_store
    rng = np.random.default_rng(seed)
    trace = RoutingTrace()
    dense_opt = torch.optim.Adam(model.parameters(), lr=lr)
    expert_opt = ExpertOptimizer(store, lr=lr)
    losses, accuracy, batches = [], [], []
    store.trace = trace
    try:
        for game in np.unique(games):
            pool = np.flatnonzero(games == game)
            for _ in range(steps_per_game):
                batch = rng.choice(pool, batch_size, replace=len(pool) < batch_size)
                batches.append(batch)
                obs = torch.as_tensor(frames[batch], device=store.device)
                target = torch.as_tensor(games[batch], device=store.device)
                trace.begin_step(int(game))
                if planner is not None:
                    trace.record_prefetch(planner.plan(obs))
                logits, aux = model(obs)
                indices = model.expert_indices()
                for layer_indices in indices:
                    trace.record_layer(layer_indices.unique().tolist())
                if planner is not None:
                    planner.observe(indices)
                if detector_trainer is not None:
                    detector_trainer.add(obs.cpu(), target.cpu(), used_expert_targets(
                        [i.cpu() for i in indices], store.num_experts, batch_size=batch_size))
                    detector_trainer.step()
                loss = F.cross_entropy(logits, target) + aux
                dense_opt.zero_grad(set_to_none=True)
                loss.backward()
                dense_opt.step()
                expert_opt.step()
                losses.append(loss.item())
                accuracy.append((logits.argmax(1) == target).float().mean().item())
    finally:
        store.trace = None
    return SequentialRun(trace, losses, accuracy, batches)


@torch.no_grad()
def routing_per_frame(model: FrameMoE, frames: np.ndarray, batch_size: int = 256) -> Tensor:
    """Multi-hot ``[N, layers, experts]``: the experts each frame's tokens are routed to
    (the model in eval mode: no router noise)."""
    store = model.layers[0].expert_store
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(frames), batch_size):
            obs = torch.as_tensor(frames[start:start + batch_size], device=store.device)
            model(obs)
            hot = torch.zeros(len(obs), len(model.layers), store.num_experts)
            for layer, indices in enumerate(model.expert_indices()):
                sample = torch.arange(indices.shape[0]) // FrameMoE.TOKENS
                hot[sample[:, None].expand_as(indices).reshape(-1), layer,
                    indices.reshape(-1).cpu()] = 1.0
            out.append(hot)
    finally:
        model.train(was_training)
    return torch.cat(out)
