"""Evaluate an agent on one game: the score that fills one cell of the retention matrix.

``episodes`` environments each play one episode from a fixed seed (the same in every run, so
runs and stages are compared on the same starts), capped at ``max_steps`` agent steps; an
episode cut by the cap scores what it had scored by then (stated with the result as
``finished``). Actions are sampled from the policy, as in training, from a torch RNG seeded
for the evaluation alone: evaluating changes neither the training's random stream nor the
trainer's context windows. Through the MoE agent the evaluation's expert fetches are real
store traffic, counted under the store's ``eval`` phase (not in the training's per-update
figures); the expert choices are returned in ``routing`` (``[layers, experts]`` counts).
In a data-parallel job every rank plays the same episodes (same seeds), and a rank whose
episodes have ended keeps calling the agent until every rank's have, since the experts it
owns answer the others' tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..agent import ContextWindows
from ..distributed import any_rank
from .ppo import PPOTrainer

__all__ = ["EvalArgs", "evaluate", "evaluate_random"]


@dataclass
class EvalArgs:
    episodes: int = 8         # one episode per environment, all run side by side
    max_steps: int = 2_000    # cap on an episode's agent steps (x4 frames)
    seed: int = 12_345        # environment and action seeds, the same in every run

    def __post_init__(self) -> None:
        for name in ("episodes", "max_steps"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"evaluation {name} must be an int >= 1, got {value!r}")


def evaluate(trainer: PPOTrainer, env, game_index: int, args: EvalArgs) -> dict:
    """Play one episode in each of ``env``'s environments (``args.episodes`` of them, made
    with ``make_env(game, args.episodes, args.seed)``, so a reset without a seed is the same
    in every run).

    Returns ``score`` (mean return), ``returns``, ``finished`` (episodes that ended before
    the cap), ``steps`` and ``routing`` (per MoE layer, expert choice counts)."""
    agent = trainer.agent
    device, n = trainer.device, args.episodes
    windows = ContextWindows(n, agent.context_len, agent.token_dim, device)
    counts = [np.zeros((1, layer.routed_experts())) for layer in agent.moe_layers]
    games = torch.full((n,), game_index, dtype=torch.long, device=device)
    returns, done = np.zeros(n), np.zeros(n, dtype=bool)
    cuda = [device.index or 0] if device.type == "cuda" else []
    obs, _ = env.reset()
    new_episode = torch.ones(n, dtype=torch.bool, device=device)
    steps = 0
    with torch.random.fork_rng(devices=cuda), trainer.phase("eval"):
        torch.manual_seed(args.seed)
        while steps < args.max_steps and _any_rank_playing(trainer, not done.all()):
            action, _, _, routing = trainer.act(torch.as_tensor(obs).to(device), new_episode,
                                                games, windows)
            trainer.count_routing(routing, torch.zeros(n, dtype=torch.long), counts)
            obs, reward, terminated, truncated, _ = env.step(action.cpu().numpy())
            returns += np.where(done, 0.0, reward)
            done |= np.logical_or(terminated, truncated)
            new_episode = torch.zeros(n, dtype=torch.bool, device=device)
            steps += 1
    return {"score": float(returns.mean()), "returns": returns.tolist(),
            "finished": int(done.sum()), "steps": steps,
            "routing": [c[0].tolist() for c in counts]}


def _any_rank_playing(trainer: PPOTrainer, playing: bool) -> bool:
    """Whether this rank (any rank, in a data-parallel job: their sharded experts answer
    only when every rank calls the agent) still has an episode in play."""
    return any_rank(playing) if trainer.data_parallel else playing


def evaluate_random(env, args: EvalArgs, actions: Sequence[int] | None = None) -> dict:
    """The protocol of ``evaluate`` (same episodes, cap and seeds) played with uniformly random
    ``actions`` (default: all of the env's; a numpy generator seeded with ``args.seed``): the
    baseline a capped evaluation is normalised against. Returns ``score``, ``returns``,
    ``finished`` and ``steps``."""
    n = args.episodes
    rng = np.random.default_rng(args.seed)
    actions = np.arange(env.single_action_space.n) if actions is None else np.asarray(actions)
    returns, done = np.zeros(n), np.zeros(n, dtype=bool)
    env.reset()
    steps = 0
    while steps < args.max_steps and not done.all():
        action = actions[rng.integers(0, len(actions), n)]
        _, reward, terminated, truncated, _ = env.step(action)
        returns += np.where(done, 0.0, reward)
        done |= np.logical_or(terminated, truncated)
        steps += 1
    return {"score": float(returns.mean()), "returns": returns.tolist(),
            "finished": int(done.sum()), "steps": steps}
