"""The MoE agent: a Decision-Transformer-style policy whose feed-forward experts live out of core.

Each observation (a stack of ``frame_stack`` 84x84 frames) is encoded once by a Nature-CNN
(Mnih et al., 2015) into one normalised token (plus a learned position); the agent keeps,
per environment, a rolling window of the last ``context_len`` tokens (``ContextWindows``);
causal transformer blocks with tiered MoE feed-forwards (``MoETransformerBlock``) read the
window, and action and value heads read the last position. At an episode's start the window is filled with its first token, so no
padding or padding mask is needed and rollouts and PPO updates see identical windows.

Routing modes: ``"token"``, the router sees the token only; ``"env"``, it also sees a learned
embedding of the game (predicted by the environment detector during play), which lets a
router send each game to its own experts; ``"cohort"``, each game owns ``cohort_size``
experts per layer (``CohortTable``, default: the HBM slots per layer) and the router chooses
only among them. ``balance`` is the routers' balance mode (``batch``, ``none``, ``horizon``;
formulas in ``ooc_moe.moe.router``). ``DenseRLAgent`` is the baseline with the same
active parameters per token (``DenseTransformerBlock``), same interface. ``CNNAgent`` is
the agent of CleanRL's ``ppo_atari.py`` (Huang et al., 2022): the Nature-CNN and two heads, no
window (a "window" of one observation), the anchor every learning table is read against.

Every agent exposes what the trainer needs: ``encode(obs) -> [B, token_dim]``,
``forward(windows [B, T, token_dim], games) -> (logits, values, aux_loss)``, ``context_len``,
``token_dim``, ``routes_by_game``, ``store`` (None without experts) and ``moe_layers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import math

import torch
import torch.nn as nn
from torch import Tensor

from .moe import DenseTransformerBlock, MoETransformerBlock, TieredMoELayer
from .moe.router import BALANCE_MODES, CohortTable
from .store import RecordLayout, TieredExpertStore

__all__ = ["MoERLAgentConfig", "MoERLAgent", "DenseRLAgent", "NatureCNN", "ContextWindows",
           "CNNAgentConfig", "CNNAgent", "layer_init", "float_channels_last"]

ROUTING_MODES = ("token", "env", "cohort")
ENCODER_INITS = ("cleanrl", "torch")


@dataclass
class MoERLAgentConfig:
    """Every size of the agent, with the user's prototype defaults."""

    obs_shape: tuple = (1, 84, 84)   # one frame: channels, height, width
    num_actions: int = 18            # ALE's full action space, shared by every game
    num_envs: int = 57               # games the agent (and its detector) can tell apart
    frame_stack: int = 4
    num_experts: int = 256           # in the one pool shared by every MoE layer
    expert_dim: int = 512            # the model width
    expert_hidden: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    top_k: int = 2
    context_len: int = 32            # observations the transformer sees
    dropout: float = 0.0             # RL usually trains without dropout
    hbm_cap: int = 32
    dram_cap: int = 128
    routing: str = "token"           # "token", "env" or "cohort"
    load_balance_coef: float = 0.01
    router_noise: float = 0.0        # exploration noise on router logits; 0 keeps PPO's
                                     # rollout and update policies identical
    balance: str = "batch"           # "batch", "none" or "horizon" (ooc_moe.moe.router)
    balance_horizon: int = 1_000_000  # tokens the horizon's load average spans
    balance_rate: float = 1e-3       # the horizon's bias step per training forward
    cohort_size: int | None = None   # experts per game and layer (cohort routing); None:
                                     # hbm_cap // num_layers, the HBM slots of a layer
    encoder_init: str = "cleanrl"    # the Nature-CNN's init: "cleanrl" (orthogonal, gain
                                     # sqrt 2) or "torch" (its default; an ablation)
    token_norm: bool = True          # LayerNorm on each frame's token (False: an ablation)
    final_norm: bool = True          # LayerNorm before the heads (False: an ablation)
    newest_only: bool = True         # the MoE agent's last block computes (routes, fetches
                                     # experts for) the newest position alone, the one the
                                     # heads read (False: every position, as before
                                     # 2026-12-06); the dense agent's always does (the same
                                     # outputs there: no router)

    def __post_init__(self) -> None:
        if self.routing not in ROUTING_MODES:
            raise ValueError(f"routing must be one of {ROUTING_MODES}, got {self.routing!r}")
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {BALANCE_MODES}, got {self.balance!r} "
                             "(e.g. --balance horizon)")
        if self.encoder_init not in ENCODER_INITS:
            raise ValueError(f"encoder_init must be one of {ENCODER_INITS}, got "
                             f"{self.encoder_init!r} (e.g. --encoder_init cleanrl)")
        if self.balance_horizon < 1:
            raise ValueError(f"balance_horizon={self.balance_horizon} must be >= 1 token "
                             "(e.g. --balance_horizon 1000000)")
        if self.routing == "cohort":
            if self.cohort_size is None:       # derived: the HBM slots of one layer
                self.cohort_size = self.hbm_cap // self.num_layers
                if self.cohort_size < self.top_k:
                    raise ValueError(f"hbm_cap={self.hbm_cap} gives {self.num_layers} layers "
                                     f"{self.cohort_size} HBM slots each, fewer than top_k="
                                     f"{self.top_k}: give --cohort_size (>= top_k) or a "
                                     "larger --hbm_capacity")
            if not self.top_k <= self.cohort_size <= self.num_experts:
                raise ValueError(f"cohort_size={self.cohort_size} must be between top_k="
                                 f"{self.top_k} and num_experts={self.num_experts}: each "
                                 "game's top-k runs inside its cohort (e.g. --cohort_size "
                                 f"{max(self.top_k, self.hbm_cap // self.num_layers)})")
            if self.balance == "horizon":
                raise ValueError("balance='horizon' is not defined inside cohorts: use "
                                 "--balance batch (balanced within each cohort) or none "
                                 "with --routing cohort")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and num_experts="
                             f"{self.num_experts}")
        if self.expert_dim % self.num_heads:
            raise ValueError(f"expert_dim={self.expert_dim} must be divisible by num_heads="
                             f"{self.num_heads}")
        if not 1 <= self.hbm_cap <= self.dram_cap <= self.num_experts:
            raise ValueError(f"need 1 <= hbm_cap ({self.hbm_cap}) <= dram_cap "
                             f"({self.dram_cap}) <= num_experts ({self.num_experts})")
        if self.context_len < 1:
            raise ValueError(f"context_len must be >= 1, got {self.context_len}")
        self.obs_shape = tuple(self.obs_shape)

    def estimate_params(self) -> dict:
        """Parameter counts (total, and active per token) and bytes per tier (fp32)."""
        d, h, e = self.expert_dim, self.expert_hidden, self.num_experts
        layout = RecordLayout(d, h, optimizer_state=True)
        expert = layout.param_numel
        c = self.obs_shape[0] * self.frame_stack
        encoder = (c * 32 * 64 + 32) + (32 * 64 * 16 + 64) + (64 * 64 * 9 + 64) + (3136 * d + d)
        attention = 4 * d * d + 4 * d + 2 * d               # q, k, v, out projections + norm
        router = d * e + 2 * d                              # router + the MoE LayerNorm
        tokens = 2 * d * self.token_norm + self.context_len * d  # token norm + positions
        dense = encoder + tokens + self.num_layers * (attention + router) \
            + 2 * d * self.final_norm \
            + (d + 1) * (self.num_actions + 1) + (self.num_envs * d if self.routing == "env"
                                                   else 0)
        return {"dense": dense, "experts": e * expert, "total": dense + e * expert,
                "active_per_token": dense + self.num_layers * self.top_k * expert,
                "record_bytes": layout.numel * 4,
                "bytes_hbm": self.hbm_cap * layout.numel * 4,
                "bytes_dram": self.dram_cap * layout.numel * 4,
                "bytes_file": e * layout.numel * 4}

    def create_agent(self, device: str | torch.device | None = None,
                     path: str | None = None) -> "MoERLAgent":
        return MoERLAgent(self, device=device, path=path)


@dataclass
class CNNAgentConfig:
    """The sizes of CleanRL's ``ppo_atari.py`` agent."""

    obs_shape: tuple = (1, 84, 84)   # one frame: channels, height, width
    num_actions: int = 18
    num_envs: int = 57               # games of the sequence (the agent does not read them)
    frame_stack: int = 4
    hidden_dim: int = 512            # the Nature-CNN's last layer

    def __post_init__(self) -> None:
        self.obs_shape = tuple(self.obs_shape)

    def estimate_params(self) -> dict:
        """Parameter counts, in the keys of ``MoERLAgentConfig.estimate_params`` that apply."""
        c, d = self.obs_shape[0] * self.frame_stack, self.hidden_dim
        n = (c * 32 * 64 + 32) + (32 * 64 * 16 + 64) + (64 * 64 * 9 + 64) + (3136 * d + d) \
            + (d + 1) * (self.num_actions + 1)
        return {"dense": n, "experts": 0, "total": n, "active_per_token": n}

    def create_agent(self, device: str | torch.device | None = None) -> "CNNAgent":
        return CNNAgent(self, device)


def layer_init(layer: nn.Module, std: float = math.sqrt(2), bias_const: float = 0.0
               ) -> nn.Module:
    """CleanRL's initialisation: orthogonal weights of gain ``std``, constant biases."""
    nn.init.orthogonal_(layer.weight, std)
    nn.init.constant_(layer.bias, bias_const)
    return layer


def _check_observations(obs: Tensor, config) -> None:
    expected = (config.frame_stack * config.obs_shape[0], *config.obs_shape[1:])
    if obs.dim() != 4 or tuple(obs.shape[1:]) != expected:
        raise ValueError(f"expected observations [batch, {', '.join(map(str, expected))}], "
                         f"got {tuple(obs.shape)}")


def float_channels_last(frames: Tensor, device=None) -> Tensor:
    """A float32 copy of ``frames [B, C, H, W]`` (never the caller's), channels last:
    PyTorch's CPU convolutions run faster forward and backward on that layout, and frames
    already in it (the rollout buffer's) convert faster without naming it."""
    if frames.is_contiguous(memory_format=torch.channels_last):
        return frames.to(device, torch.float32, copy=True)
    return frames.to(device, torch.float32, memory_format=torch.channels_last, copy=True)


class NatureCNN(nn.Module):
    """The Atari encoder of Mnih et al. (2015): uint8 frames -> one ``dim`` token. ``init``
    is applied to each layer as it is made (``layer_init``: CleanRL's, in its order)."""

    def __init__(self, in_channels: int, dim: int, init=lambda layer: layer) -> None:
        super().__init__()
        self.net = nn.Sequential(
            init(nn.Conv2d(in_channels, 32, 8, stride=4)), nn.ReLU(),
            init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(), nn.Flatten(),
            init(nn.Linear(64 * 7 * 7, dim)), nn.ReLU())

    def forward(self, obs: Tensor) -> Tensor:
        return self.net(float_channels_last(obs).div_(255.0))


class ContextWindows:
    """Per environment, the last ``context_len`` tokens; a new episode fills its window with
    its first token. Rollouts encode each observation once and push it here."""

    def __init__(self, num_envs: int, context_len: int, dim: int, device=None) -> None:
        self.tokens = torch.zeros(num_envs, context_len, dim, device=device)
        self.started = torch.zeros(num_envs, dtype=torch.bool, device=device)

    def push(self, tokens: Tensor, new_episode: Tensor) -> Tensor:
        """Append ``tokens [N, dim]``; ``new_episode [N]`` bool. Returns the windows."""
        fresh = new_episode.to(torch.bool) | ~self.started
        self.tokens = torch.cat([self.tokens[:, 1:], tokens[:, None]], dim=1)
        self.tokens[fresh] = tokens[fresh, None].expand(-1, self.tokens.shape[1], -1)
        self.started |= True
        return self.tokens


class _SequenceAgent(nn.Module):
    """Encoder, positions, blocks, heads: what the MoE agent and its dense baseline share."""

    last_block_newest_only = False    # the last block's ``newest`` instead of every position

    def __init__(self, config: MoERLAgentConfig, blocks: nn.ModuleList,
                 cohorts: CohortTable | None = None) -> None:
        super().__init__()
        self.config = config
        d = config.expert_dim
        # CleanRL's initialisation (orthogonal, gain sqrt 2) by default: under torch's own
        # (encoder_init="torch") the encoder's outputs shrink layer by layer, the normalised
        # tokens are nearly the same for every frame, and on Breakout the critic explained
        # none of the returns' variance for 80k+ steps (results/breakout-ablation)
        self.encoder = NatureCNN(config.obs_shape[0] * config.frame_stack, d,
                                 layer_init if config.encoder_init == "cleanrl"
                                 else lambda layer: layer)
        # Tokens are normalised and positions learned from a small start (as GPT-2), so that
        # what a frame shows, not where it sits in the window, drives routing: fixed
        # sinusoids of norm ~sqrt(dim/2) swamped the CNN's small outputs and routed every
        # token by its position alone.
        self.token_norm = nn.LayerNorm(d) if config.token_norm else nn.Identity()
        self.positions = nn.Parameter(torch.randn(config.context_len, d) * 0.02)
        self.register_buffer("causal", torch.triu(torch.ones(config.context_len,
                                                             config.context_len,
                                                             dtype=torch.bool), 1),
                             persistent=False)
        self.game_embedding = nn.Embedding(config.num_envs, d) \
            if config.routing == "env" else None
        self.blocks = blocks
        self.cohorts = cohorts
        self.context_len, self.token_dim = config.context_len, d
        self.routes_by_game = config.routing == "env" or cohorts is not None
        self.norm = nn.LayerNorm(d) if config.final_norm else nn.Identity()
        self.actor = nn.Linear(d, config.num_actions)
        self.critic = nn.Linear(d, 1)
        nn.init.orthogonal_(self.actor.weight, 0.01)   # CleanRL's head initialisation
        nn.init.zeros_(self.actor.bias)
        nn.init.orthogonal_(self.critic.weight, 1.0)
        nn.init.zeros_(self.critic.bias)

    def encode(self, obs: Tensor) -> Tensor:
        """``uint8 [B, frame_stack * C, H, W]`` -> normalised tokens ``[B, dim]``."""
        _check_observations(obs, self.config)
        return self.token_norm(self.encoder(obs))

    def forward(self, windows: Tensor, games: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """``windows [B, T, dim]`` (T <= context_len, newest last) -> action logits ``[B, A]``,
        values ``[B]`` and the summed auxiliary (router) loss."""
        T = windows.shape[1]
        if not 1 <= T <= self.config.context_len:
            raise ValueError(f"windows hold {T} tokens; at most context_len="
                             f"{self.config.context_len}")
        if self.routes_by_game and games is None:
            raise ValueError(f"routing={self.config.routing!r} needs the game of every "
                             "window (games=)")
        context = None
        if self.game_embedding is not None:
            context = self.game_embedding(games)[:, None, :]        # [B, 1, dim]
        cohorts = ([None] * len(self.blocks) if self.cohorts is None
                   else self.cohorts.lookup(games))                 # [layers, B, C]
        x = windows + self.positions[:T]
        aux = x.new_zeros(())
        last = len(self.blocks) - 1
        for i, (block, cohort) in enumerate(zip(self.blocks, cohorts)):
            if i == last and self.last_block_newest_only:
                x, block_aux = block.newest(x, context, cohort)
            else:
                x, block_aux = block(x, self.causal[:T, :T], context, cohort)
            aux = aux + block_aux
        h = self.norm(x[:, -1])
        return self.actor(h), self.critic(h).squeeze(-1), aux


class MoERLAgent(_SequenceAgent):
    """The agent with tiered MoE blocks sharing one store of ``num_experts`` experts.
    ``moe_layer``: the MoE layers' class; with ``ooc_moe.distributed.ShardedMoELayer``,
    ``store`` is this rank's shard (``shard_store``) of the ``num_experts``."""

    def __init__(self, config: MoERLAgentConfig, store: TieredExpertStore | None = None,
                 device: str | torch.device | None = None, path: str | None = None,
                 moe_layer: type[TieredMoELayer] = TieredMoELayer) -> None:
        if store is None:
            store = TieredExpertStore(config.num_experts, config.expert_dim,
                                      config.expert_hidden, config.hbm_cap, config.dram_cap,
                                      device, path=path, optimizer_state=True)
        blocks = nn.ModuleList(
            MoETransformerBlock(config.expert_dim, config.num_heads, store,
                                config.expert_hidden, config.top_k, config.dropout,
                                noise_std=config.router_noise,
                                load_balance_coef=config.load_balance_coef,
                                balance=config.balance,
                                balance_horizon=config.balance_horizon,
                                balance_rate=config.balance_rate, moe_layer=moe_layer)
            for _ in range(config.num_layers))
        # one id space for all layers (they share the store), so cohorts are chosen across them
        cohorts = (CohortTable(config.num_envs, config.num_layers, config.cohort_size,
                               config.num_experts) if config.routing == "cohort" else None)
        super().__init__(config, blocks, cohorts)
        self.last_block_newest_only = config.newest_only
        self.store = store
        self.to(store.device)

    @property
    def moe_layers(self) -> list:
        return [block.moe for block in self.blocks]


class DenseRLAgent(_SequenceAgent):
    """The baseline: ``DenseFFN`` blocks with the MoE agent's active parameters per token.
    Its last block computes the newest position alone, the one the heads read (the same
    outputs, less work); the MoE agent's does so with ``newest_only`` (else it computes
    every position, whose routing then feeds its balancing loss and routing figures too)."""

    last_block_newest_only = True

    def __init__(self, config: MoERLAgentConfig, device: str | torch.device | None = None
                 ) -> None:
        blocks = nn.ModuleList(
            DenseTransformerBlock(config.expert_dim, config.num_heads, config.expert_hidden,
                                  config.top_k, config.dropout)
            for _ in range(config.num_layers))
        super().__init__(config, blocks)
        self.store = None
        self.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def moe_layers(self) -> list:
        return []


class CNNAgent(nn.Module):
    """CleanRL's ``ppo_atari.py`` agent: ``hidden = NatureCNN(obs / 255)``, actor and critic
    heads on it; every layer ``layer_init`` (gain sqrt(2)), the actor's 0.01, the critic's 1.
    ``encode`` gives ``hidden``, so the trainer's windows hold one observation."""

    context_len = 1
    routes_by_game = False

    def __init__(self, config: CNNAgentConfig, device: str | torch.device | None = None
                 ) -> None:
        super().__init__()
        self.config, self.token_dim = config, config.hidden_dim
        self.encoder = NatureCNN(config.obs_shape[0] * config.frame_stack, config.hidden_dim,
                                 init=layer_init)
        self.actor = layer_init(nn.Linear(config.hidden_dim, config.num_actions), std=0.01)
        self.critic = layer_init(nn.Linear(config.hidden_dim, 1), std=1.0)
        self.store = None
        self.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    @property
    def moe_layers(self) -> list:
        return []

    def encode(self, obs: Tensor) -> Tensor:
        """``uint8 [B, frame_stack * C, H, W]`` -> ``hidden [B, hidden_dim]``."""
        _check_observations(obs, self.config)
        return self.encoder(obs)

    def forward(self, windows: Tensor, games: Tensor | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        """``windows [B, T, hidden_dim]``: the newest (last) is read -> logits ``[B, A]``,
        values ``[B]`` and a zero auxiliary loss."""
        hidden = windows[:, -1]
        return self.actor(hidden), self.critic(hidden).squeeze(-1), hidden.new_zeros(())
