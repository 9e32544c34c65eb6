"""The sequential protocol: train on games one after another, evaluate every game after each.

``python -m ooc_moe train`` (synthetic games) and ``train-atari`` (real ALE games) call
``train(TrainArgs(...))``. For games ``g1..gN``: evaluate the untrained agent on every game
(``initial``) and random play under the same protocol (``random_scores``, the baseline of
the human-normalised scores; random among the actions the agent may take, ``action_mask``),
then per stage train ``steps_per_game`` on one game and evaluate every game (``evaluate``:
fixed seeds, the same in every run) -> one row of the retention matrix.

Each update logs CleanRL's charts and losses plus the store's ``store/*`` figures (hit rate
per tier, prefetch precision and coverage, bytes per link; ``store/phases``: the counters of
each phase, ``rollout``, ``update`` and ``optimizer``), the normalised mutual information
between game and expert choice and the router entropy; for agents that route by game
(``env``, ``cohort``), ``routing/routed_with_game``: the share of the rollout's observations
routed with the game being played (the online detector's accuracy while acting; below 1, the
update trains another game's experts on this game). ``metrics.json`` sums them into
``cache`` (per phase, ``eval`` included: ``hbm_hit_rate``, ``prefetch_precision``,
``prefetch_coverage``, ``stall_seconds``, bytes per link; the vocabulary of
``ooc_moe.store.stats``) and ``bytes_per_update`` (update and optimizer phases); with
``trace``, ``belady`` holds the same figures for Belady's policy replaying the run's own trace
at its own capacities (the part of the run since it last started, after a resume), and
``lru`` for plain LRU, the store without the known future its layers give it.
With ``out``: ``metrics.json``
(rewritten after every update), TensorBoard event files with CleanRL's tags
(``charts/episodic_return``, ``charts/SPS``, ``losses/*``, ...; ``store/*``, ``routing/*`` and
each evaluation's ``eval/<game>``; ``tensorboard --logdir OUT``), checkpoints
(``checkpoint.py``) to resume from, and at the end ``retention.csv``, the plots and, with
``trace``, ``trace.npz``.

Under ``torchrun`` (``torch.distributed`` initialised with ``W > 1`` ranks) the run is
data-parallel with the experts sharded: each rank plays ``num_envs / W`` of the
environments (seeds offset by rank; batch and minibatches over all ranks are one process's,
as in CleanRL's ``ppo_atari_multigpu.py``), holds the experts ``e % W == rank`` in a store
of its own (``OUT/store/rank-<r>``, capacities per rank) and a replica of the dense
parameters; every PPO minibatch averages the gradients over the ranks
(``ooc_moe.distributed``). Rank 0 writes ``metrics.json``, the plots
and TensorBoard; the training returns are every rank's, the ``store/*`` figures rank 0's
shard. The detector and its prefetch plan are single-process (off with ``W > 1``; game
routing then uses the true game). Checkpoints hold every rank's state and shard and resume
with the same ``W``; under ``torchrun --max_restarts`` a restarted job resumes from the
last one by itself.

Resuming restores weights, optimizer states, detector, RNG states and the schedule position;
the environments of the interrupted stage restart (episodes in flight are lost, as are the
updates since the last checkpoint) and the store's counters start again from zero; TensorBoard
drops the events the interrupted run logged after its checkpoint (``purge_step``).
"""

from __future__ import annotations

import json
import numbers
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

from ..agent import CNNAgent, CNNAgentConfig, DenseRLAgent, MoERLAgent, MoERLAgentConfig
from ..detector import DetectorTrainer, EnvironmentDetector, PrefetchPlanner
from ..distributed import (ShardedMoELayer, gather_lists, shard_dir, shard_store,
                           world_info)
from ..metrics import (cache_figures, experts_per_game, normalized_mutual_information,
                       prefetch_coverage, prefetch_precision)
from ..moe import TieredMoELayer
from ..scores import average_final_score, forgetting, human_normalized
from ..store import TieredExpertStore
from ..store.stats import LINKS
from ..threads import one_thread
from ..trace import RoutingTrace, simulate
from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .evaluate import EvalArgs, evaluate, evaluate_random
from .ppo import PPOArgs, PPOTrainer

__all__ = ["TrainArgs", "make_env", "action_masks", "build_agent", "build_trainer", "train",
           "args_from_json", "args_to_json", "BASELINES", "ACTION_MASKS", "ATARI_ENVS"]

BASELINES = ("moe", "dense", "cnn")
ACTION_MASKS = ("none", "legal")
ATARI_ENVS = ("vector", "cleanrl")


@dataclass
class TrainArgs:
    games: tuple = ("synthetic-0", "synthetic-1")  # played in this order (ALE or synthetic-N)
    steps_per_game: int = 20_000    # environment steps per game, all environments together
    seed: int = 1                   # seeds python, numpy, torch and the environments
    device: str | None = None       # None: cuda if available, else cpu
    out: str | None = None          # write metrics.json (and trace.npz) here
    baseline: str = "moe"           # "moe", "dense" (same active parameters) or "cnn"
                                    # (CleanRL's ppo_atari.py agent: no window, no experts)
    routing: str = "token"          # "token", "env" (router also sees the detected game) or
                                    # "cohort" (each game routed inside its own experts)
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
    balance: str = "batch"          # "batch", "none" or "horizon" (ooc_moe.moe.router)
    balance_horizon: int = 1_000_000  # tokens the horizon balance averages the load over
    cohort_size: int | None = None  # experts per game and layer; None: HBM slots per layer
    encoder_init: str = "cleanrl"   # "cleanrl" or "torch" (MoERLAgentConfig.encoder_init)
    token_norm: bool = True         # LayerNorm on each token (MoERLAgentConfig.token_norm)
    final_norm: bool = True         # LayerNorm before the heads (MoERLAgentConfig.final_norm)
    newest_only: bool = True        # MoE's last block: the newest position alone
                                    # (MoERLAgentConfig.newest_only)
    action_mask: str = "none"       # "none": all 18 actions; "legal": each game's minimal set
    atari_env: str = "vector"       # "vector": ale-py's AtariVectorEnv; "cleanrl": CleanRL's
                                    # wrappers (FIRE and a fresh frame stack at a lost life)
    detector: bool = True           # train a detector online and prefetch with it (MoE only)
    trace: bool = False             # record every store call (trace.npz)
    checkpoint_every: int = 0       # also checkpoint every N updates (0: after stages only)
    ppo: PPOArgs = field(default_factory=PPOArgs)
    eval: EvalArgs = field(default_factory=EvalArgs)

    def __post_init__(self) -> None:
        if isinstance(self.games, str):
            self.games = tuple(g.strip() for g in self.games.split(",") if g.strip())
        if not self.games:
            raise ValueError("give at least one game, e.g. --games pong,breakout")
        if len(set(self.games)) != len(self.games):
            raise ValueError(f"games {list(self.games)} name a game twice: each game is one "
                             "stage and one column of the retention matrix")
        if self.action_mask not in ACTION_MASKS:
            raise ValueError(f"action_mask must be one of {ACTION_MASKS}, got "
                             f"{self.action_mask!r} (e.g. --action_mask legal)")
        if self.atari_env not in ATARI_ENVS:
            raise ValueError(f"atari_env must be one of {ATARI_ENVS}, got {self.atari_env!r} "
                             "(e.g. --atari_env cleanrl)")
        if self.baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {self.baseline!r}")
        if self.steps_per_game < self.ppo.batch_size:
            raise ValueError(f"steps_per_game={self.steps_per_game} is less than one rollout "
                             f"(num_envs x num_steps = {self.ppo.batch_size})")

    def agent_config(self) -> MoERLAgentConfig | CNNAgentConfig:
        """The agent's sizes (the cnn baseline has its fixed ones)."""
        if self.baseline == "cnn":
            return CNNAgentConfig(num_envs=len(self.games))
        return MoERLAgentConfig(
            num_envs=len(self.games), num_experts=self.num_experts, expert_dim=self.expert_dim,
            expert_hidden=self.expert_hidden_dim, num_layers=self.num_layers,
            num_heads=self.num_heads, top_k=self.top_k, context_len=self.context_len,
            hbm_cap=self.hbm_capacity, dram_cap=self.dram_capacity, routing=self.routing,
            load_balance_coef=self.load_balance_coef, balance=self.balance,
            balance_horizon=self.balance_horizon, cohort_size=self.cohort_size,
            encoder_init=self.encoder_init, token_norm=self.token_norm,
            final_norm=self.final_norm, newest_only=self.newest_only)


def make_env(game: str, num_envs: int, seed: int, atari_env: str = "vector"):
    """A vectorised env that autoresets in the same step and reports raw rewards; an Atari
    game through ``make_atari``, or with ``atari_env="cleanrl"`` through CleanRL's wrappers
    (``make_cleanrl_atari``)."""
    if game.startswith("synthetic"):
        from ..envs.synthetic import make_synthetic
        return make_synthetic(game, num_envs, seed=seed, autoreset_mode="SameStep")
    if atari_env == "cleanrl":
        from ..envs.cleanrl_atari import make_cleanrl_atari
        return make_cleanrl_atari(game, num_envs, seed=seed, autoreset_mode="SameStep",
                                  reward_clipping=False)
    from ..envs.atari import make_atari
    return make_atari(game, num_envs, seed=seed, autoreset_mode="SameStep",
                      reward_clipping=False)


def action_masks(games: Sequence[str], num_actions: int) -> torch.Tensor:
    """``[games, num_actions]`` bool: each game's minimal action set (``minimal_actions``) in
    the full action space; every action of a synthetic game (they all do something)."""
    from ..envs.atari import minimal_actions
    from ..envs.synthetic import is_synthetic
    masks = torch.ones(len(games), num_actions, dtype=torch.bool)
    for row, game in zip(masks, games):
        if not is_synthetic(game):
            row.zero_()
            row[minimal_actions(game)] = True
    return masks


def build_agent(args: TrainArgs, store_dir: Path | None = None, *, reopen: bool = False):
    """The MoE agent (its expert file in ``store_dir``, a temporary one without; ``reopen``:
    the file already there, from a checkpoint), the dense or the cnn baseline. In a
    ``torch.distributed`` job of ``W > 1`` ranks, the MoE agent's experts are sharded: this
    rank's store holds its ``num_experts / W`` in ``store_dir/rank-<rank>``."""
    config = args.agent_config()
    if args.baseline == "cnn":
        return CNNAgent(config, args.device)
    if args.baseline == "dense":
        return DenseRLAgent(config, args.device)
    world = world_info()[1]
    if reopen:
        path = shard_dir(store_dir) if world > 1 else store_dir
        store = TieredExpertStore.open(path, args.device, hbm_capacity=config.hbm_cap,
                                       dram_capacity=config.dram_cap,
                                       num_experts=config.num_experts // world,
                                       expert_dim=config.expert_dim,
                                       hidden_dim=config.expert_hidden)
    else:
        create = shard_store if world > 1 else TieredExpertStore
        store = create(config.num_experts, config.expert_dim, config.expert_hidden,
                       config.hbm_cap, config.dram_cap, args.device, path=store_dir,
                       seed=args.seed, optimizer_state=True, overwrite=True)
    return MoERLAgent(config, store=store,
                      moe_layer=ShardedMoELayer if world > 1 else TieredMoELayer)


def build_trainer(args: TrainArgs, agent) -> PPOTrainer:
    """The PPO trainer of ``agent``; for the MoE agent with ``args.detector`` (or env routing)
    also the environment detector, trained online, and its prefetch planner (in a single
    process; a job of several ranks trains data-parallel without them)."""
    planner = detector_trainer = None
    world = world_info()[1]
    if args.baseline == "moe" and (args.detector or args.routing == "env") and world == 1:
        cfg = agent.config
        detector = EnvironmentDetector(cfg.obs_shape, len(args.games), cfg.num_experts,
                                       hidden_dim=128, num_layers=cfg.num_layers
                                       ).to(next(agent.parameters()).device)
        detector_trainer = DetectorTrainer(detector, seed=args.seed)
        if args.detector:
            planner = PrefetchPlanner(agent.store, detector, keep_history=False,
                                      cohorts=agent.cohorts,   # cohort routing: follow the game
                                      known_games=detector_trainer.known_games)
    masks = (action_masks(args.games, agent.config.num_actions)
             if args.action_mask == "legal" else None)
    return PPOTrainer(agent, rank_ppo_args(args.ppo, world), planner=planner,
                      detector_trainer=detector_trainer, data_parallel=world > 1,
                      action_masks=masks)


def rank_ppo_args(ppo: PPOArgs, world: int) -> PPOArgs:
    """One rank's share of ``ppo`` in a job of ``world`` ranks: ``num_envs / world``
    environments, the rest unchanged, so the batch and the minibatches over all ranks are
    those of one process (as CleanRL's ``ppo_atari_multigpu.py`` splits them)."""
    if world == 1:
        return ppo
    if ppo.num_envs % world:
        raise ValueError(f"num_envs={ppo.num_envs} does not divide over {world} ranks: each "
                         f"rank runs num_envs / {world} environments; use a multiple of {world}")
    return replace(ppo, num_envs=ppo.num_envs // world)


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


def _counter_delta(now: dict, before: dict) -> dict:
    """``now - before`` of two ``stats_by_phase`` snapshots, phases without change left out."""
    delta = {p: {k: v - before.get(p, {}).get(k, 0) for k, v in c.items()} for p, c in now.items()}
    return {p: c for p, c in delta.items() if any(c.values())}


def _add_counters(total: dict, by_phase: dict) -> dict:
    for phase, counters in by_phase.items():
        done = total.setdefault(phase, {})
        for k, v in counters.items():
            done[k] = done.get(k, 0) + v
    return total


def _cache_summary(by_phase: dict, updates: int) -> dict:
    """Per phase ``cache_figures``, and the bytes moved per PPO update (update and optimizer
    phases together)."""
    moved = sum(v for p in ("update", "optimizer") for k, v in by_phase.get(p, {}).items()
                if k.startswith("bytes_"))
    return {"phases": {p: cache_figures(c) for p, c in by_phase.items()},
            "bytes_per_update": moved / updates if updates else None}


def _replay(trace: RoutingTrace, store: TieredExpertStore, updates: int,
            policy: str, hints: bool = True) -> dict:
    """``policy`` replaying ``trace`` at the store's capacities (``_cache_summary``)."""
    result = simulate(trace, store.hbm_capacity, store.dram_capacity, policy, hints=hints,
                      record_bytes=store.record_bytes)
    summary = _cache_summary(result.by_phase, updates)
    for figures in summary["phases"].values():
        figures.pop("stall_seconds")            # a replay does not wait for copies
    return summary


class _Run:
    """One run's moving parts: agent, detector, trainer, and the schedule position."""

    def __init__(self, args: TrainArgs, resume: bool) -> None:
        self.args = args
        self.rank, self.world = world_info()
        self.dir = Path(args.out) if args.out else None
        store_dir = self.dir / "store" if self.dir and args.baseline == "moe" else None
        saved = None
        if resume:
            if self.dir is None:
                raise ValueError("resuming needs the run's directory (out=...)")
            saved = load_checkpoint(self.dir, store_dir if store_dir is None or self.world == 1
                                    else shard_dir(store_dir))
        elif self.dir is not None and find_checkpoint(self.dir) is not None:
            raise ValueError(f"{self.dir} holds a checkpoint of an earlier run: resume it with "
                             f"--resume {self.dir}, or choose another --out")
        _seed_everything(args.seed)                   # the same dense weights on every rank
        self.agent = build_agent(args, store_dir, reopen=resume)
        self.trainer = build_trainer(args, self.agent)
        if self.world > 1:                            # each rank its own actions and batches
            _seed_everything(args.seed + 7919 * self.rank)
        self.planner, self.detector_trainer = (self.trainer.planner,
                                               self.trainer.detector_trainer)
        self.writer: SummaryWriter | None = None       # opened by train() with out
        self.game_index, self.iteration = 0, 0
        self.history: list[dict] = []
        self.initial: list[float] | None = None       # scores of the untrained agent
        self.initial_returns: list[list[float]] = []  # its returns per game and episode
        self.random_scores: list[float] | None = None  # random play, the same protocol
        self.retention: list[list[float]] = []        # one row per finished stage
        self.evaluations: list[list[dict]] = []       # the same, with returns and routing
        self.seconds = 0.0
        self.eval_counters: dict = {}     # store counters of every evaluation, by phase
        self.replays: dict = {}           # at the end of a traced run: belady, lru
        self.updates_traced = 0           # updates since the trace started
        if saved is not None:
            self._restore(saved)

    # -- checkpoints ----------------------------------------------------------------------
    def state(self) -> dict:
        det = self.detector_trainer
        return {
            "args": args_to_json(self.args), "game_index": self.game_index,
            "iteration": self.iteration, "history": self.history, "initial": self.initial,
            "initial_returns": self.initial_returns, "random_scores": self.random_scores,
            "retention": self.retention, "evaluations": self.evaluations,
            "seconds": self.seconds, "eval_counters": self.eval_counters,
            "agent": self.agent.state_dict(),
            "dense_opt": self.trainer.dense_opt.state_dict(),
            "routing_counts": self.trainer.routing_counts,
            "detector": None if det is None else {
                "model": det.detector.state_dict(), "opt": det.optimizer.state_dict(),
                "generator": det.generator.get_state(), "steps": det.steps,
                "named": [list(window) for window in det.named]},
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available()
                    else None}}

    @staticmethod
    def rank_state(state: dict) -> dict:
        """What of ``state`` differs between the ranks of a data-parallel job: RNG states,
        routing counts and the agent's state (its routers' balance state is per rank)."""
        return {key: state[key] for key in ("rng", "routing_counts", "agent")}

    def _restore(self, saved: dict) -> None:
        saved = {**saved, **saved.get("rank_state", {})}     # this rank's own, in a job
        self.game_index, self.iteration = saved["game_index"], saved["iteration"]
        self.history, self.initial = saved["history"], saved["initial"]
        self.initial_returns = saved.get("initial_returns", [])   # older checkpoints: none
        self.random_scores = saved.get("random_scores")           # older checkpoints: none
        self.retention, self.evaluations = saved["retention"], saved["evaluations"]
        self.seconds = saved["seconds"]
        self.eval_counters = saved.get("eval_counters", {})       # older checkpoints: none
        self.agent.load_state_dict(saved["agent"])
        self.trainer.dense_opt.load_state_dict(saved["dense_opt"])
        self.trainer.routing_counts = saved["routing_counts"]
        if saved["detector"] is not None:
            det, d = self.detector_trainer, saved["detector"]
            det.detector.load_state_dict(d["model"])
            det.optimizer.load_state_dict(d["opt"])
            det.generator.set_state(d["generator"])
            det.steps = d["steps"]
            for window, saved_named in zip(det.named, d.get("named", [])):  # older: none
                window.extend(saved_named)
        rng = saved["rng"]
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    def checkpoint(self, started: float) -> None:
        if self.writer is not None:
            self.writer.flush()                 # the events up to the checkpoint are on disk
        if self.dir is not None:
            state = self.state()
            state["seconds"] = self.seconds_now(started)
            save_checkpoint(self.dir, state, self.agent.store, sharded=self.world > 1,
                            rank_state=self.rank_state(state) if self.world > 1 else None)

    def seconds_now(self, started: float) -> float:
        return self.seconds + time.perf_counter() - started

    def steps_done(self) -> int:
        """Environment steps trained so far, all stages together (TensorBoard's step)."""
        iterations = self.args.steps_per_game // self.args.ppo.batch_size
        return (self.game_index * iterations + self.iteration) * self.args.ppo.batch_size

    def log_update(self, logs: dict) -> None:
        """One update's scalars to TensorBoard under CleanRL's tags, at its global step."""
        if self.writer is None:
            return
        step = logs["global_step"]
        for r, n in zip(logs["charts/episodic_returns"], logs["charts/episodic_lengths"]):
            self.writer.add_scalar("charts/episodic_return", r, step)
            self.writer.add_scalar("charts/episodic_length", n, step)
        for key, value in logs.items():
            if "/" in key and isinstance(value, numbers.Real):
                self.writer.add_scalar(key, value, step)

    def log_evaluation(self, row: list[dict]) -> None:
        if self.writer is not None:
            for game, result in zip(self.args.games, row):
                self.writer.add_scalar(f"eval/{game}", result["score"], self.steps_done())

    # -- the protocol ---------------------------------------------------------------------
    def _on_every_game(self, play) -> list:
        """``play(env, game_index)`` on every game's evaluation env, in order."""
        results = []
        for game_index, game in enumerate(self.args.games):
            env = make_env(game, self.args.eval.episodes, self.args.eval.seed,
                           self.args.atari_env)
            try:
                results.append(play(env, game_index))
            finally:
                env.close()
        return results

    def evaluate_random(self) -> list[float]:
        """Random play's score on every game under the evaluation protocol (random among the
        actions the agent may take: the game's legal ones with ``action_mask="legal"``)."""
        masks = self.trainer.action_masks

        def play(env, game_index: int) -> float:
            actions = None if masks is None else masks[game_index].nonzero().flatten().tolist()
            return evaluate_random(env, self.args.eval, actions)["score"]
        return self._on_every_game(play)

    def evaluate_all(self) -> list[dict]:
        """Evaluate every game of the sequence (one row of the retention matrix)."""
        store = self.agent.store
        before = store.stats_by_phase() if store is not None else None
        row = self._on_every_game(lambda env, i: evaluate(self.trainer, env, i, self.args.eval))
        if store is not None:
            _add_counters(self.eval_counters, _counter_delta(store.stats_by_phase(), before))
        return row

    def train_stage(self, progress: bool, started: float, write) -> None:
        args, trainer, agent = self.args, self.trainer, self.agent
        game_index, game = self.game_index, self.args.games[self.game_index]
        iterations = args.steps_per_game // args.ppo.batch_size
        # a resumed stage starts its environments afresh (episodes in flight are not saved)
        seed = args.seed + 1000 * game_index + self.iteration + 1_000_000 * self.rank
        env = make_env(game, trainer.args.num_envs, seed, args.atari_env)  # this rank's share
        state = trainer.start(env, seed)
        bar = tqdm(range(self.iteration, iterations), desc=f"{game} ({args.baseline})",
                   disable=not progress, initial=self.iteration, total=iterations)
        try:
            for it in bar:
                if args.ppo.anneal_lr:
                    trainer.set_learning_rate(args.ppo.learning_rate * (1 - it / iterations))
                store = agent.store
                before = store.get_stats_summary() if store is not None else None
                before_phases = store.stats_by_phase() if store is not None else None
                if store is not None and store.trace is not None:
                    store.trace.begin_step(game_index)
                    self.updates_traced += 1
                logs = trainer.iteration(env, state, game_index)
                if self.world > 1:              # every rank's episodes; SPS of the whole job
                    for key in ("charts/episodic_returns", "charts/episodic_lengths"):
                        logs[key] = gather_lists(logs[key])
                    logs["charts/SPS"] *= self.world
                logs.update({"game": game, "game_index": game_index, "iteration": it,
                             "global_step": (game_index * iterations + it + 1)
                             * args.ppo.batch_size})
                if before is not None:
                    logs.update(_store_figures(store, before))
                    logs["store/phases"] = _counter_delta(store.stats_by_phase(), before_phases)
                    for phase, counters in logs["store/phases"].items():
                        logs[f"store/{phase}_hit_rate"] = cache_figures(counters)["hbm_hit_rate"]
                    table = sum(trainer.routing_counts)
                    logs["routing/mutual_information"] = normalized_mutual_information(
                        table[:game_index + 1])
                    logs["routing/router_entropy"] = float(np.mean(trainer.router_entropies[
                        -args.ppo.num_steps:]))
                if agent.routes_by_game:    # the detector's game while acting, as the update
                    logs["routing/routed_with_game"] = float(
                        (trainer.buffer.games == game_index).float().mean())
                self.history.append(logs)
                self.log_update(logs)
                self.iteration = it + 1
                if args.checkpoint_every and (self.iteration % args.checkpoint_every == 0
                                              or self.iteration == iterations):
                    self.checkpoint(started)
                write()
                returns = logs["charts/episodic_returns"]
                if returns:
                    bar.set_postfix(ret=f"{np.mean(returns):.1f}",
                                    sps=f"{logs['charts/SPS']:.0f}")
        finally:
            env.close()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(args: TrainArgs, progress: bool = True, *, resume: bool = False,
          command: str | None = None) -> dict:
    """Train on ``args.games`` in order, evaluating every game after each stage.

    With ``args.out``: a checkpoint after every stage (and every ``args.checkpoint_every``
    updates), ``metrics.json`` rewritten after every update, and at the end
    ``retention.csv`` and the plots. ``resume=True`` continues the run saved in ``args.out``
    from its checkpoint. Returns the metrics (as in ``metrics.json``) plus the ``agent``.
    Every rank of a ``torch.distributed`` job calls it; rank 0 writes the files.
    """
    run = _Run(args, resume)
    agent, started = run.agent, time.perf_counter()
    trace = RoutingTrace() if args.trace and agent.store is not None else None
    if trace is not None:
        agent.store.trace = trace
    out = Path(args.out) if args.out and run.rank == 0 else None
    progress = progress and run.rank == 0

    if out:                      # on resume, drop the events logged after the checkpoint
        run.writer = SummaryWriter(out, purge_step=run.steps_done() + 1 if resume else None)

    def write(finished: bool = False) -> dict:
        metrics = _metrics(run, run.seconds_now(started), command, finished)
        if out:
            _write_json(out / "metrics.json", metrics)
        return metrics

    try:
        if run.random_scores is None:
            run.random_scores = run.evaluate_random()
        if run.initial is None:
            row = run.evaluate_all()
            run.initial = [e["score"] for e in row]
            run.initial_returns = [e["returns"] for e in row]
            run.log_evaluation(row)
        while run.game_index < len(args.games):
            run.train_stage(progress, started, write)
            row = run.evaluate_all()
            run.log_evaluation(row)
            run.evaluations.append(row)
            run.retention.append([e["score"] for e in row])
            run.game_index, run.iteration = run.game_index + 1, 0
            run.checkpoint(started)
            write()
        if trace is not None:
            run.replays = {"belady": _replay(trace, agent.store, run.updates_traced, "belady"),
                           "lru": _replay(trace, agent.store, run.updates_traced, "lru",
                                          hints=False)}
    finally:
        if agent.store is not None:
            agent.store.trace = None
        if run.writer is not None:
            run.writer.close()
    metrics = write(finished=True)
    if out:
        _write_retention_csv(out / "retention.csv", metrics)
        if trace is not None:
            trace.save(out / "trace.npz")
        from ..viz import save_run_plots
        metrics["plots"] = save_run_plots(metrics, out)
        _write_json(out / "metrics.json", metrics)
    metrics["agent"] = agent
    return metrics


def train_run(args: TrainArgs, progress: bool = False) -> dict:
    """``train(args)`` with one torch thread (restored afterwards), as the notebooks run it:
    the models there are small, and extra threads only compete with the envs and the store."""
    with one_thread():
        return train(args, progress=progress)


def _metrics(run: _Run, seconds: float, command: str | None, finished: bool) -> dict:
    """What ``metrics.json`` holds: the config, the history, the retention matrix so far and
    the figures derived from it."""
    args, history = run.args, run.history
    games = list(args.games)
    metrics = {"args": args_to_json(args), "command": command, "device": _device_name(run.agent),
               "world": run.world,
               "date": time.strftime("%Y-%m-%d"), "finished": finished, "seconds": seconds,
               "params": run.agent.config.estimate_params(), "games": games,
               "initial": run.initial, "random_scores": run.random_scores,
               "retention": run.retention,
               "sps": float(np.mean([h["charts/SPS"] for h in history])) if history else None}
    metrics["eval_finished"] = [[e["finished"] for e in row] for row in run.evaluations]
    if run.initial_returns:     # [untrained + stages][game][episode]: behind each score
        metrics["eval_returns"] = [run.initial_returns] + [[e["returns"] for e in row]
                                                           for row in run.evaluations]
    if len(run.retention) == len(games):
        metrics["forgetting"] = forgetting(run.retention).tolist()
        randoms = run.random_scores or [None] * len(games)
        metrics["human_normalized"] = [[human_normalized(g, s, b)
                                        for g, s, b in zip(games, row, randoms)]
                                       for row in run.retention]
        metrics["average_final_score"] = average_final_score(run.retention, games,
                                                             run.random_scores)
    if run.evaluations and run.agent.moe_layers:   # [layer][game][expert], after the last stage
        routing = np.array([e["routing"] for e in run.evaluations[-1]]).transpose(1, 0, 2)
        metrics["eval_routing"] = routing.tolist()
        metrics["mutual_information"] = [normalized_mutual_information(t) for t in routing]
        metrics["experts_per_game"] = [experts_per_game(t) for t in routing]
    if history and "store/hit_rate" in history[-1]:
        metrics["hit_rate"] = [h["store/hit_rate"] for h in history]
        metrics["dram_hit_rate"] = [h["store/dram_hit_rate"] for h in history]
        metrics["prefetch_precision"] = [h["store/prefetch_precision"] for h in history]
        metrics["prefetch_coverage"] = [h["store/prefetch_coverage"] for h in history]
        metrics["router_entropy"] = [h["routing/router_entropy"] for h in history]
        metrics["bytes_moved"] = {link: float(sum(h[f"store/bytes_{link}"] for h in history))
                                  for link in LINKS}
        by_phase = {}
        for h in history:
            _add_counters(by_phase, h.get("store/phases", {}))
        metrics["cache"] = _cache_summary(_add_counters(by_phase, run.eval_counters),
                                          len(history))
    if history and "routing/routed_with_game" in history[-1]:
        metrics["routed_with_game"] = [h["routing/routed_with_game"] for h in history]
    metrics.update(run.replays)
    if run.planner is not None:
        metrics["planner"] = run.planner.summary()
    metrics["history"] = history
    return metrics


def _device_name(agent) -> str:
    device = next(agent.parameters()).device
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def _write_json(path: Path, data: dict) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)


def _write_retention_csv(path: Path, metrics: dict) -> None:
    games = metrics["games"]
    lines = ["after," + ",".join(games), "untrained," + ",".join(
        f"{s:.3f}" for s in metrics["initial"])]
    lines += [f"{games[i]}," + ",".join(f"{s:.3f}" for s in row)
              for i, row in enumerate(metrics["retention"])]
    path.write_text("\n".join(lines) + "\n")


def args_to_json(args: TrainArgs) -> dict:
    """``args`` as ``metrics.json["args"]`` holds them (``args_from_json`` reads them back)."""
    d = asdict(args)
    d["games"] = list(args.games)
    for derived in ("batch_size", "minibatch_size", "envs_per_minibatch"):
        d["ppo"].pop(derived)
    return d


def args_from_json(d: dict) -> TrainArgs:
    """The ``TrainArgs`` a run saved (``metrics.json["args"]`` or its checkpoint's)."""
    d = dict(d)
    ppo, evaluation = PPOArgs(**d.pop("ppo")), EvalArgs(**d.pop("eval"))
    return TrainArgs(**d, ppo=ppo, eval=evaluation)
