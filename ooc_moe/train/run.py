"""Train an agent on games one after another: environments, agents, logging, outputs.

``python -m ooc_moe train`` (synthetic games) and ``train-atari`` (real ALE games) call
``train(TrainArgs(...))``. Each update logs CleanRL's charts and losses plus the store's
``store/*`` figures (hit rate per tier, prefetch precision and coverage, bytes per link), the
normalised mutual information between game and expert choice and the router entropy.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..agent import DenseRLAgent, MoERLAgent, MoERLAgentConfig
from ..detector import DetectorTrainer, EnvironmentDetector, PrefetchPlanner
from ..metrics import normalized_mutual_information, prefetch_coverage, prefetch_precision
from ..store.stats import LINKS
from ..trace import RoutingTrace
from .ppo import PPOArgs, PPOTrainer

__all__ = ["TrainArgs", "make_env", "build_agent", "train"]



@dataclass
class TrainArgs:
    games: tuple = ("synthetic-0", "synthetic-1")  # played in this order (ALE or synthetic-N)
    steps_per_game: int = 20_000    # environment steps per game, all environments together
    seed: int = 1                   # seeds python, numpy, torch and the environments
    device: str | None = None       # None: cuda if available, else cpu
    out: str | None = None          # write metrics.json (and trace.npz) here
    baseline: str = "moe"           # "moe", or "dense" (same active parameters)
    routing: str = "token"          # "token" or "env" (router also sees the detected game)
    num_experts: int = 64
    expert_dim: int = 128
    expert_hidden_dim: int = 256
    num_layers: int = 2
    num_heads: int = 4
    top_k: int = 2
    context_len: int = 8
    hbm_capacity: int = 16
    dram_capacity: int = 64
    load_balance_coef: float = 0.01
    detector: bool = True           # train a detector online and prefetch with it (MoE only)
    trace: bool = False             # record every store call (trace.npz)
    ppo: PPOArgs = field(default_factory=PPOArgs)

    def __post_init__(self) -> None:
        if isinstance(self.games, str):
            self.games = tuple(g.strip() for g in self.games.split(",") if g.strip())
        if not self.games:
            raise ValueError("give at least one game, e.g. --games pong,breakout")
        if self.baseline not in ("moe", "dense"):
            raise ValueError(f"baseline must be 'moe' or 'dense', got {self.baseline!r}")
        if self.steps_per_game < self.ppo.batch_size:
            raise ValueError(f"steps_per_game={self.steps_per_game} is less than one rollout "
                             f"(num_envs x num_steps = {self.ppo.batch_size})")

    def agent_config(self) -> MoERLAgentConfig:
        return MoERLAgentConfig(
            num_envs=len(self.games), num_experts=self.num_experts, expert_dim=self.expert_dim,
            expert_hidden=self.expert_hidden_dim, num_layers=self.num_layers,
            num_heads=self.num_heads, top_k=self.top_k, context_len=self.context_len,
            hbm_cap=self.hbm_capacity, dram_cap=self.dram_capacity, routing=self.routing,
            load_balance_coef=self.load_balance_coef)


def make_env(game: str, num_envs: int, seed: int):
    """A vectorised env that autoresets in the same step and reports raw rewards."""
    if game.startswith("synthetic"):
        from ..envs.synthetic import make_synthetic
        return make_synthetic(game, num_envs, seed=seed, autoreset_mode="SameStep")
    from ..envs.atari import make_atari
    return make_atari(game, num_envs, seed=seed, autoreset_mode="SameStep",
                      reward_clipping=False)


def build_agent(args: TrainArgs, path: str | None = None):
    config = args.agent_config()
    if args.baseline == "dense":
        return DenseRLAgent(config, args.device)
    return MoERLAgent(config, device=args.device, path=path)


def _store_figures(store, before: dict) -> dict:
    now = store.get_stats_summary()
    delta = {k: now[k] - before[k] for k in ("accesses", "hbm_hits", "dram_hits", "file_reads",
                                              "prefetch_hits", "prefetches_used",
                                              "prefetches_wasted")}
    return {"store/hit_rate": delta["hbm_hits"] / max(delta["accesses"], 1),
            "store/dram_hit_rate": delta["dram_hits"] / max(delta["accesses"], 1),
            "store/file_read_rate": delta["file_reads"] / max(delta["accesses"], 1),
            "store/prefetch_precision": prefetch_precision(delta),
            "store/prefetch_coverage": prefetch_coverage(delta),
            **{f"store/bytes_{link}": now[f"bytes_{link}"] - before[f"bytes_{link}"]
               for link in LINKS}}


def train(args: TrainArgs, progress: bool = True) -> dict:
    """Train on ``args.games`` in order; returns the history of per-update logs."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    agent = build_agent(args)
    device = next(agent.parameters()).device
    planner = detector_trainer = None
    if args.baseline == "moe" and (args.detector or args.routing == "env"):
        cfg = agent.config
        detector = EnvironmentDetector(cfg.obs_shape, len(args.games), cfg.num_experts,
                                       hidden_dim=128, num_layers=cfg.num_layers).to(device)
        detector_trainer = DetectorTrainer(detector, seed=args.seed)
        if args.detector:
            planner = PrefetchPlanner(agent.store, detector)
    trace = RoutingTrace() if args.trace and agent.store is not None else None
    if trace is not None:
        agent.store.trace = trace
    trainer = PPOTrainer(agent, args.ppo, planner=planner, detector_trainer=detector_trainer)
    iterations = args.steps_per_game // args.ppo.batch_size
    history, started = [], time.perf_counter()
    try:
        for game_index, game in enumerate(args.games):
            env = make_env(game, args.ppo.num_envs, args.seed + 1000 * game_index)
            state = trainer.start(env, args.seed + 1000 * game_index)
            bar = tqdm(range(iterations), desc=f"{game} ({args.baseline})", disable=not progress)
            for it in bar:
                if args.ppo.anneal_lr:
                    trainer.set_learning_rate(args.ppo.learning_rate * (1 - it / iterations))
                before = agent.store.get_stats_summary() if agent.store is not None else None
                if trace is not None:
                    trace.begin_step(game_index)
                logs = trainer.iteration(env, state, game_index)
                logs.update({"game": game, "game_index": game_index, "iteration": it,
                             "global_step": (game_index * iterations + it + 1)
                             * args.ppo.batch_size})
                if before is not None:
                    logs.update(_store_figures(agent.store, before))
                    table = sum(trainer.routing_counts)
                    logs["routing/mutual_information"] = normalized_mutual_information(
                        table[:game_index + 1])
                    logs["routing/router_entropy"] = float(np.mean(trainer.router_entropies[
                        -args.ppo.num_steps:]))
                history.append(logs)
                if args.out:                  # progressively: a long run can be read while it runs
                    _write_metrics(args, history, started)
                returns = logs["charts/episodic_returns"]
                if returns:
                    bar.set_postfix(ret=f"{np.mean(returns):.1f}",
                                    sps=f"{logs['charts/SPS']:.0f}")
            env.close()
    finally:
        if agent.store is not None:
            agent.store.trace = None
    result = {"args": _jsonable(args), "history": history,
              "seconds": time.perf_counter() - started,
              "params": agent.config.estimate_params()}
    if planner is not None:
        result["planner"] = planner.summary()
    if args.out:
        _write_metrics(args, history, started, result)
        if trace is not None:
            trace.save(Path(args.out) / "trace.npz")
    result["agent"] = agent
    return result


def _write_metrics(args: TrainArgs, history: list, started: float,
                   result: dict | None = None) -> None:
    """Write ``metrics.json`` atomically (a reader never sees half a file)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = result or {"args": _jsonable(args), "history": history,
                        "seconds": time.perf_counter() - started, "finished": False}
    tmp = out / "metrics.json.tmp"
    tmp.write_text(json.dumps(result, indent=1, default=float))
    tmp.replace(out / "metrics.json")


def _jsonable(args: TrainArgs) -> dict:
    d = asdict(args)
    d["games"] = list(args.games)
    return d
