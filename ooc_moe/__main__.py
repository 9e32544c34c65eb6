"""Command line: ``python -m ooc_moe COMMAND`` (``-h`` lists the commands and options).

test, train, train-atari, experiment, demo, bench, store-demo, gpu-check, dist-layer (under
torchrun; ``train`` and ``train-atari`` run under torchrun too, data-parallel). The training
commands' flags are grouped by the dataclass they set (``TrainArgs``, ``PPOArgs``,
``EvalArgs``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from . import bench
from .agent import MoERLAgentConfig
from .smoke import run_smoke
from .store import TieredExpertStore
from .store.stats import LINKS
from .train.evaluate import EvalArgs
from .train.ppo import OLDER_TOKENS, PPOArgs
from .train.run import ACTION_MASKS, ATARI_ENVS
from .workloads import access_pattern, game_blocks, replay


def _bench(args: argparse.Namespace) -> None:
    results, machine = {}, bench.machine()
    for name, config, run in (("store", bench.StoreBenchConfig, bench.bench_store),
                              ("layer", bench.LayerBenchConfig, bench.bench_layer),
                              ("sim", bench.SimBenchConfig, bench.bench_sim),
                              ("train", bench.TrainBenchConfig, bench.bench_train),
                              ("dist", bench.DistBenchConfig, bench.bench_dist)):
        if args.what in (name, "all"):
            make = config.quick if args.quick else config
            extra = ({"older_tokens": args.older_tokens, "newest_only": args.newest_only}
                     if name == "train" else {})
            results[name] = run(make(device=args.device, directory=args.dir, **extra))
    if args.json:
        bench.write_json({**results, "machine": machine, "command": _command(),
                          "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, args.json)
        print(f"figures written to {args.json}")


def _gpu_check(args: argparse.Namespace) -> None:
    from .gpu_check import GpuCheckConfig, gpu_check

    gpu_check(GpuCheckConfig(out=args.out, train_steps=args.train_steps, quick=args.quick,
                             allow_cpu=args.allow_cpu, timeout_s=args.timeout_s))


def _dist_layer(args: argparse.Namespace) -> None:
    """One rank of a torchrun job: train the expert-parallel layer, print this rank's figures
    and, with ``--out``, write them to ``OUT/rank-<rank>.json``."""
    from .distributed import init_from_env, leave_process_group, train_sharded_layer

    rank, world = init_from_env()
    finished = False
    try:
        figures = train_sharded_layer(args.num_experts, args.expert_dim, args.hidden_dim,
                                      args.top_k, args.tokens, args.hbm_capacity, args.steps,
                                      path=args.out and os.path.join(args.out, "experts"),
                                      seed=args.seed)
        s = figures["store"]
        print(f"rank {rank} of {world}: experts {figures['experts']}; rows sent to ranks "
              f"{figures['sent'][-1]} (last step); exchanges "
              f"{1e3 * sum(figures['exchange_s']) / args.steps:.1f} of "
              f"{1e3 * sum(figures['step_s']) / args.steps:.1f} ms per step; HBM hit rate "
              f"{s['hit_rate']:.2f}, DRAM -> HBM {s['bytes_dram_to_hbm'] / 1e6:.2f} MB; loss "
              f"{figures['loss'][0]:.4f} -> {figures['loss'][-1]:.4f}", flush=True)
        if args.out:
            with open(os.path.join(args.out, f"rank-{rank}.json"), "w") as f:
                json.dump(figures, f)
        finished = True
    finally:
        leave_process_group(finished)


def _store_demo(args: argparse.Namespace) -> None:
    """Sequential games vs random routing through a real store of prototype-sized experts."""
    steps_total = args.num_games * args.steps_per_game
    print(f"{args.num_experts} experts of {args.expert_dim}x{args.expert_hidden_dim}; HBM "
          f"{args.hbm_capacity}, DRAM {args.dram_capacity} slots; {args.num_games} games x "
          f"{args.steps_per_game} steps x {args.experts_per_step} experts per step")
    for kind in ("sequential_games", "random"):
        steps = access_pattern(kind, args.num_experts, steps_total, args.experts_per_step,
                               num_games=args.num_games, seed=args.seed)
        with TieredExpertStore(args.num_experts, args.expert_dim, args.expert_hidden_dim,
                               args.hbm_capacity, args.dram_capacity, args.device,
                               path=args.dir, seed=args.seed, overwrite=True) as store:
            started = time.perf_counter()
            records = replay(store, steps, mark_dirty=True)
            seconds = time.perf_counter() - started
            s = store.get_stats_summary()
        per_game = [sum(records[t]["hbm_hits"] for t in block) /
                    sum(records[t]["accesses"] for t in block)
                    for block in game_blocks(steps_total, args.num_games)]
        print(f"\n{kind}: HBM hit rate {s['hit_rate']:.1%} (DRAM hits "
              f"{s['dram_hits'] / s['accesses']:.1%}, file reads "
              f"{s['file_reads'] / s['accesses']:.1%}) on {store.device}, {seconds:.1f} s")
        print("  per game: " + "  ".join(f"{rate:.1%}" for rate in per_game))
        print("  moved: " + ", ".join(f"{link} {s['bytes_' + link] / 1e9:.2f} GB"
                                      for link in LINKS))


ATARI_GAMES = ("pong", "breakout", "boxing", "freeway", "beamrider", "qbert", "phoenix",
               "namethisgame", "battlezone", "doubledunk")


def _games(args: argparse.Namespace, atari: bool | None) -> list[str]:
    """The games of ``--games`` / ``--num_games`` (defaults: the first Atari or synthetic
    games); ALE names are normalised, so an unknown game fails here."""
    if args.games:
        games = [g.strip() for g in args.games.split(",") if g.strip()]
        if args.num_games is not None:
            if len(games) < args.num_games:
                raise ValueError(f"--num_games {args.num_games} but --games lists "
                                 f"{len(games)}")
            games = games[:args.num_games]
    else:
        count = args.num_games or (4 if atari else 2)
        games = list(ATARI_GAMES if atari else [f"synthetic-{i}" for i in range(count)])
        if count > len(games):
            raise ValueError(f"--num_games {count}: name the games with --games")
        games = games[:count]
    from .envs.atari import normalize_game_name
    return [g if g.startswith("synthetic") else normalize_game_name(g) for g in games]


def _train_args(args: argparse.Namespace, atari: bool) -> "TrainArgs":
    """Build and check the whole configuration before any work starts."""
    from .train import TrainArgs

    ppo = {f.name: getattr(args, f.name) for f in dataclasses.fields(PPOArgs) if f.init}
    train_args = TrainArgs(
        games=tuple(_games(args, atari)), steps_per_game=args.steps_per_game, seed=args.seed,
        device=args.device, out=args.out, baseline=args.baseline, routing=args.routing,
        num_experts=args.num_experts, expert_dim=args.expert_dim,
        expert_hidden_dim=args.expert_hidden_dim, num_layers=args.num_layers,
        num_heads=args.num_heads, top_k=args.top_k, context_len=args.context_len,
        hbm_capacity=args.hbm_capacity, dram_capacity=args.dram_capacity,
        load_balance_coef=args.load_balance_coef, balance=args.balance,
        balance_horizon=args.balance_horizon, cohort_size=args.cohort_size,
        encoder_init=args.encoder_init, token_norm=args.token_norm,
        final_norm=args.final_norm, newest_only=args.newest_only,
        action_mask=args.action_mask, atari_env=args.atari_env,
        detector=args.detector, trace=args.trace,
        checkpoint_every=args.checkpoint_every, ppo=PPOArgs(**ppo),
        eval=EvalArgs(episodes=args.eval_episodes, max_steps=args.eval_max_steps,
                      seed=args.eval_seed))
    train_args.agent_config()                                 # sizes and capacities
    return train_args


def _command() -> str:
    """The command line that started this process (the torchrun job's, for a rank of one)."""
    launcher = "python"
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        launcher = f"torchrun --standalone --nproc_per_node {os.environ['WORLD_SIZE']}"
    return f"{launcher} -m ooc_moe " + " ".join(sys.argv[1:])


def _train(args: argparse.Namespace, atari: bool) -> None:
    """A run in this process, or (under torchrun) this rank's part of a data-parallel job;
    a job torchrun restarts (``--max_restarts``) resumes from its last checkpoint."""
    from .train import args_from_json, find_checkpoint, load_checkpoint, train

    rank = 0
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:       # started by torchrun
        from .distributed import init_from_env

        rank = init_from_env()[0]
    resume = args.resume
    if (not resume and args.out and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) > 0
            and find_checkpoint(args.out) is not None):
        resume = args.out                   # a restarted job continues, it does not restart
    metrics = None
    try:
        try:
            if resume:
                train_args = args_from_json(load_checkpoint(resume)["args"])
                train_args.out = resume
            else:
                train_args = _train_args(args, atari)
            metrics = train(train_args, resume=bool(resume), command=_command())
        except (ValueError, FileNotFoundError) as err:   # bad flags, an earlier run's --out,
            raise SystemExit(f"error: {err}") from None  # a checkpoint of another world size
    finally:
        from .distributed import leave_process_group

        leave_process_group(finished=metrics is not None)
    if rank:
        return                              # rank 0 reports for the job
    history = metrics["history"]
    print(f"trained {train_args.baseline} on {', '.join(train_args.games)} in "
          f"{metrics['seconds']:.0f} s")
    for i, game in enumerate(train_args.games):
        returns = [r for h in history if h["game"] == game
                   for r in h["charts/episodic_returns"]]
        last = returns[-10:]
        print(f"  {game:<14} episodes {len(returns):5d}  mean return of the last "
              f"{len(last)}: {np.mean(last) if last else float('nan'):.2f}  evaluation: "
              f"untrained {metrics['initial'][i]:.1f}, after its stage "
              f"{metrics['retention'][i][i]:.1f}, at the end {metrics['retention'][-1][i]:.1f}")
    if "hit_rate" in metrics:
        print(f"  store: HBM hit rate {np.mean(metrics['hit_rate']):.1%} (mean per update), "
              f"game-expert NMI per layer (final agent) "
              f"{', '.join(f'{v:.3f}' for v in metrics['mutual_information'])}")
    if "routed_with_game" in metrics:
        routed = [np.mean([h["routing/routed_with_game"] for h in history if h["game"] == game])
                  for game in train_args.games]
        print("  routed with the game being played (the detector's game while acting): "
              + ", ".join(f"{game} {r:.1%}" for game, r in zip(train_args.games, routed)))
    if train_args.out:
        print(f"  metrics, retention.csv and plots in {train_args.out}/")


def _learning(args: argparse.Namespace) -> None:
    from .train import format_learning_table, learning_table

    runs = {Path(d).name: json.loads((Path(d) / "metrics.json").read_text())
            for d in args.dirs if (Path(d) / "metrics.json").is_file()}
    table = learning_table(runs, args.at)
    if not table:
        raise SystemExit(f"error: no run under {args.dirs} reached step {args.at}")
    print(format_learning_table(table, args.at))
    for kind, entry in table.items():
        print(f"{kind}: {entry['command']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"at": args.at, "kinds": table}, indent=1))


def _experiment(args: argparse.Namespace) -> None:
    from .train import (cache_table, format_cache_table, format_summary, format_verdict,
                        load_results, run_experiment)

    try:
        kinds = [k.strip() for k in args.runs.split(",") if k.strip()]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        base = _train_args(args, atari=True)
        from .train import RUN_KINDS
        if not kinds or any(k not in RUN_KINDS for k in kinds):
            raise ValueError(f"--runs must list some of {', '.join(RUN_KINDS)}, got "
                             f"{args.runs!r}")
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if base.out is None:
        raise SystemExit("error: give --out DIR (each run writes DIR/<run>-seed<seed>/)")
    try:
        summary = run_experiment(base, kinds, seeds, base.out, command=_command(),
                                 jobs=args.jobs)
    except ValueError as err:         # e.g. a kind whose configuration is impossible
        raise SystemExit(f"error: {err}") from None
    print()
    print(format_summary(summary))
    print("\n" + format_verdict(summary))
    if base.trace:
        table = cache_table(load_results(base.out))
        if table:
            print("\nthe cache, per kind of MoE run (its trace replayed by plain LRU and "
                  "Belady):\n" + format_cache_table(table))
    print(f"\nplots: {base.out}/<run>/retention.png, hit_rate.png, game_expert.png; "
          f"summary: {base.out}/summary.json")
    if args.command == "demo":
        print("\nReal Atari games take hours on a CPU; the committed runs are under "
              f"results/ ({ATARI_RESULTS}), shown in README's Results and notebook 05.")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds ``(default: X)`` to help lines that do not speak of their default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default" in (action.help or "") or any(action.default is v for v in (None, False)):
            return action.help
        return super()._get_help_string(action)


# PPOArgs' fields, each a flag of the same name (type and default from the dataclass)
PPO_HELP = {
    "num_envs": "parallel environments",
    "num_steps": "rollout steps per environment per update",
    "learning_rate": "Adam learning rate of dense parameters and experts",
    "anneal_lr": "anneal the learning rate linearly to 0 over each game (the presets do, "
                 "as the runs they made; off by default since 2026-12-06)",
    "gamma": "discount factor",
    "gae_lambda": "GAE lambda",
    "num_minibatches": "minibatches per epoch",
    "minibatches": "random: CleanRL's random steps (a window's older tokens without the "
                   "encoder's gradient); env: whole rollouts of num_envs/num_minibatches envs",
    "older_tokens": "with random minibatches and a window, its older tokens in the epochs "
                    "after the first: recycled (the newest tokens the epoch before "
                    "encoded) or fresh (encoded again each epoch: one more encoder forward "
                    "per frame; the presets' and every run's before 2026-12-06)",
    "update_epochs": "PPO epochs per update",
    "norm_adv": "normalise advantages per minibatch",
    "clip_coef": "surrogate (and value) clipping coefficient",
    "clip_vloss": "use the clipped value loss",
    "ent_coef": "entropy bonus coefficient",
    "vf_coef": "value loss coefficient",
    "max_grad_norm": "clip the global gradient norm (dense parameters and experts) to this",
    "target_kl": "stop an update's epochs early past this approximate KL (default: never)",
    "life_loss_terminal": "a lost life ends the episode for GAE (CleanRL's EpisodicLifeEnv)",
}


def _add_dataclass_flags(group, cls, help: dict) -> None:
    """One flag per init field of ``cls``, its default the dataclass's."""
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if isinstance(f.default, bool):
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction,
                               default=f.default, help=help[f.name])
        else:
            group.add_argument(f"--{f.name}", type=float if f.default is None
                               else type(f.default), default=f.default, help=help[f.name])


def _add_train_flags(p: argparse.ArgumentParser, atari: bool, **defaults) -> None:
    run = p.add_argument_group("run (TrainArgs)")
    run.add_argument("--games", default=None, help="comma-separated games, played in order "
                     "(ALE names, or synthetic-N)")
    run.add_argument("--num_games", type=int, default=None,
                     help=f"the first N of --games (default: all of them, or "
                          f"{4 if atari else 2})")
    run.add_argument("--steps_per_game", type=int, default=100_000 if atari else 20_000,
                     help="environment steps per game, all environments together")
    run.add_argument("--baseline", choices=["moe", "dense", "cnn"], default="moe",
                     help="moe: the MoE agent; dense: its dense twin (same active "
                          "parameters); cnn: CleanRL's ppo_atari.py agent (no window)")
    run.add_argument("--action_mask", choices=list(ACTION_MASKS), default="none",
                     help="none: the policy picks from all 18 actions in every game; legal: "
                          "from the played game's minimal action set (as CleanRL plays it)")
    run.add_argument("--atari_env", choices=list(ATARI_ENVS), default="vector",
                     help="vector: ale-py's C++ AtariVectorEnv; cleanrl: CleanRL's Python "
                          "wrappers (FIRE and a fresh frame stack after a lost life; slower)")
    run.add_argument("--seed", type=int, default=1,
                     help="seeds python, numpy, torch and the environments")
    run.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    run.add_argument("--out", default=None, help="directory for metrics.json, TensorBoard "
                     "events, checkpoints and plots")
    run.add_argument("--checkpoint_every", type=int, default=0,
                     help="also checkpoint every N updates (always after each stage)")
    run.add_argument("--trace", action="store_true",
                     help="record every store call (OUT/trace.npz)")
    agent = p.add_argument_group("agent and store (TrainArgs; ignored by --baseline cnn)")
    agent.add_argument("--num_experts", type=int, default=64,
                       help="experts in the one pool all MoE layers share")
    agent.add_argument("--expert_dim", type=int, default=128, help="model width")
    agent.add_argument("--expert_hidden_dim", type=int, default=256,
                       help="hidden width of each expert (and of the dense FFN per top_k)")
    agent.add_argument("--num_layers", type=int, default=2, help="transformer blocks")
    agent.add_argument("--num_heads", type=int, default=4, help="attention heads per block")
    agent.add_argument("--top_k", type=int, default=2, help="experts per token")
    agent.add_argument("--context_len", type=int, default=8,
                       help="observations in the window the transformer reads")
    agent.add_argument("--routing", choices=["token", "env", "cohort"], default="token",
                       help="token: the router sees the token; env: also the detected game; "
                            "cohort: each game routed inside its own --cohort_size experts")
    agent.add_argument("--cohort_size", type=int, default=None,
                       help="experts per game and layer with --routing cohort (default: "
                            "HBM slots per layer, hbm_capacity // num_layers)")
    agent.add_argument("--balance", choices=["batch", "none", "horizon"], default="batch",
                       help="batch: Switch loss per batch; none: no balancing loss; "
                            "horizon: loss-free bias balancing over --balance_horizon tokens")
    agent.add_argument("--balance_horizon", type=int, default=1_000_000,
                       help="tokens over which --balance horizon averages each expert's load")
    agent.add_argument("--load_balance_coef", type=float, default=0.01,
                       help="weight of the router's load-balancing loss (--balance batch)")
    agent.add_argument("--encoder_init", choices=["cleanrl", "torch"], default="cleanrl",
                       help="the window agents' Nature-CNN init: cleanrl (orthogonal, gain "
                            "sqrt 2, as the cnn baseline) or torch's default (an ablation)")
    agent.add_argument("--token_norm", action=argparse.BooleanOptionalAction, default=True,
                       help="LayerNorm on each frame's token before the transformer "
                            "(--no-token_norm: an ablation)")
    agent.add_argument("--final_norm", action=argparse.BooleanOptionalAction, default=True,
                       help="LayerNorm on the newest position before the actor and critic "
                            "(--no-final_norm: an ablation)")
    agent.add_argument("--newest_only", action=argparse.BooleanOptionalAction,
                       default=MoERLAgentConfig.newest_only,
                       help="the MoE agent's last block routes and computes the newest "
                            "position alone, the one the heads read (the dense agent's "
                            "always does: the same outputs there); --no-newest_only: every "
                            "position, as the presets and every run before 2026-12-06")
    agent.add_argument("--hbm_capacity", type=int, default=16, help="expert slots in HBM")
    agent.add_argument("--dram_capacity", type=int, default=64,
                       help="expert slots in DRAM (>= hbm_capacity)")
    agent.add_argument("--detector", action=argparse.BooleanOptionalAction, default=True,
                       help="train the environment detector online and prefetch with it "
                            "(MoE only)")
    _add_dataclass_flags(p.add_argument_group("PPO (PPOArgs)"), PPOArgs, PPO_HELP)
    evaluation = p.add_argument_group("evaluation (EvalArgs)")
    evaluation.add_argument("--eval_episodes", type=int, default=8,
                            help="episodes per game in each evaluation (fixed seeds)")
    evaluation.add_argument("--eval_max_steps", type=int, default=2000,
                            help="cap on an evaluation episode's steps (its score so far "
                                 "counts)")
    evaluation.add_argument("--eval_seed", type=int, default=EvalArgs.seed,
                            help="seed of the evaluation's environments and actions")
    p.set_defaults(**defaults)


# Named configurations of ``experiment --preset NAME`` (flags given as well win). The
# window agents' sizes are the demo's: 32 experts of 64 -> 128 -> 64, HBM 8, DRAM 16.
DEMO_SIZES = {"num_experts": 32, "expert_dim": 64, "expert_hidden_dim": 128,
              "hbm_capacity": 8, "dram_capacity": 16, "context_len": 4,
              # the defaults before 2026-12-06, with which every preset's committed runs
              # were made: the learning rate annealed over each game, fresh older tokens,
              # the MoE agent's last block on every position
              "anneal_lr": True, "older_tokens": "fresh", "newest_only": False}
# Forgetting in minutes: three synthetic games (contextual bandits whose action tables
# clash, ``ooc_moe.envs.synthetic``) learnt with gamma 0, short rollouts and a larger
# learning rate; four kinds x five seeds, two runs at a time (~15 min on 2 CPU cores).
SYNTHETIC = {**DEMO_SIZES, "games": "synthetic-0,synthetic-1,synthetic-2",
             "steps_per_game": 3072, "gamma": 0.0, "num_steps": 32, "learning_rate": 1e-3,
             "eval_episodes": 8, "eval_max_steps": 200, "runs": "cnn,dense,token,cohort",
             "seeds": "1,2,3,4,5", "jobs": 2, "out": "runs/synthetic"}
# The first Atari series: three real games the cnn learns beyond the noise in 204,800 steps
# each on a CPU (the pilot, results/atari-pilot); four kinds x three seeds, hours per run
ATARI = {**DEMO_SIZES, "games": "breakout,freeway,seaquest", "steps_per_game": 204_800,
         "runs": "cnn,dense,token,cohort", "seeds": "1,2,3", "eval_episodes": 8,
         "eval_max_steps": 4000, "checkpoint_every": 25, "jobs": 2, "out": "runs/atari"}
PRESETS = {
    "synthetic": SYNTHETIC,
    # `make demo`: the synthetic tier, smaller (<= 15 min on 2 CPU cores)
    "synthetic-demo": {**SYNTHETIC, "runs": "dense,cohort", "seeds": "1,2,3",
                       "out": "runs/demo"},
    "atari": ATARI,
    # the second series: the two games the pilot's cnn learnt furthest beyond the noise in
    # every seed, most reliable first, then Seaquest (learnt by most kinds in "atari")
    "atari2": {**ATARI, "games": "road_runner,kung_fu_master,seaquest", "out": "runs/atari2"},
    # three real games at a budget where the agents barely learn (results/cpu-demo)
    "atari-demo": {**DEMO_SIZES, "games": "pong,breakout,boxing", "steps_per_game": 12_288,
                   "runs": "token,dense", "seeds": "1", "eval_episodes": 4,
                   "eval_max_steps": 600, "out": "runs/atari-demo"},
}
ATARI_RESULTS = ("results/atari and results/atari2: the two series on real games; "
                 "results/atari-pilot: the games a CPU budget teaches; results/cpu-demo: three "
                 "games at demo size; results/breakout-learning")


def _describe(preset: dict) -> str:
    return f"{preset['runs']} on {preset['games']}, seeds {preset['seeds']}"


def build_parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The command line; ``preset`` (a key of ``PRESETS``) sets ``experiment``'s defaults."""
    parser = argparse.ArgumentParser(prog="python -m ooc_moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    formatter = _DefaultsFormatter
    b = sub.add_parser("bench", help="benchmarks, each a ratio against a same-run baseline",
                       formatter_class=formatter)
    b.add_argument("what", choices=["store", "layer", "sim", "train", "dist", "all"],
                   help="which benchmark (train: cnn, dense and MoE agents' SPS; dist: the "
                        "expert-parallel layer on 1 and 2 gloo ranks)")
    b.add_argument("--quick", action="store_true", help="small sizes (seconds, for CI)")
    b.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    b.add_argument("--dir", default=None, help="directory for the expert file (an NVMe disk)")
    b.add_argument("--json", default=None, help="also write the figures to this JSON file")
    b.add_argument("--older_tokens", choices=list(OLDER_TOKENS), default=PPOArgs.older_tokens,
                   help="train: the window agents' older tokens after the first epoch "
                        "(PPOArgs.older_tokens)")
    b.add_argument("--newest_only", action=argparse.BooleanOptionalAction,
                   default=MoERLAgentConfig.newest_only,
                   help="train: the MoE agent's last block computes the newest position "
                        "alone (MoERLAgentConfig.newest_only)")
    b.set_defaults(func=_bench)
    p = sub.add_parser("dist-layer", help="under torchrun: train an expert-parallel MoE layer "
                                          "(experts sharded over the ranks, each with its own "
                                          "store) and print each rank's figures",
                       formatter_class=formatter)
    p.add_argument("--num_experts", type=int, default=16, help="experts over all ranks")
    p.add_argument("--expert_dim", type=int, default=32, help="each expert's input and output")
    p.add_argument("--hidden_dim", type=int, default=64, help="each expert's hidden width")
    p.add_argument("--top_k", type=int, default=2, help="experts per token")
    p.add_argument("--tokens", type=int, default=256, help="tokens per step over all ranks")
    p.add_argument("--hbm_capacity", type=int, default=2, help="HBM slots per rank")
    p.add_argument("--steps", type=int, default=5, help="training steps")
    p.add_argument("--seed", type=int, default=0, help="experts, router and tokens")
    p.add_argument("--out", default=None, help="directory for the expert files and the "
                                               "ranks' figures (rank-<rank>.json)")
    p.set_defaults(func=_dist_layer)
    d = sub.add_parser("store-demo", help="replay sequential-game and random expert accesses "
                                          "through a real tiered store (every used expert "
                                          "dirty)", formatter_class=formatter)
    d.add_argument("--num_experts", type=int, default=256, help="experts in the store")
    d.add_argument("--expert_dim", type=int, default=512, help="expert input/output width")
    d.add_argument("--expert_hidden_dim", type=int, default=2048, help="expert hidden width")
    d.add_argument("--hbm_capacity", type=int, default=32, help="expert slots in HBM")
    d.add_argument("--dram_capacity", type=int, default=128, help="expert slots in DRAM")
    d.add_argument("--num_games", type=int, default=4, help="games played one after another")
    d.add_argument("--steps_per_game", type=int, default=200, help="steps of each game")
    d.add_argument("--experts_per_step", type=int, default=8,
                   help="experts each step fetches")
    d.add_argument("--seed", type=int, default=0, help="seed of the access patterns")
    d.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    d.add_argument("--dir", default=None, help="directory for the expert file (default: temp)")
    d.set_defaults(func=_store_demo)
    sub.add_parser("test", help="a smoke run of every component, in seconds").set_defaults(
        func=lambda a: run_smoke())
    g = sub.add_parser("gpu-check", help="on a GPU machine: the CUDA tests, bench store and "
                                         "layer on the GPU, a short train-atari; one report",
                       formatter_class=formatter)
    g.add_argument("--out", default="results/gpu-check",
                   help="directory for report.json, summary.txt and the logs")
    g.add_argument("--train_steps", type=int, default=20_000,
                   help="steps of the train-atari run (pong)")
    g.add_argument("--quick", action="store_true", help="small sizes everywhere (seconds)")
    g.add_argument("--allow-cpu", action="store_true",
                   help="run the same checks without a GPU (to test the command)")
    g.add_argument("--timeout_s", type=int, default=300,
                   help="limit for each subprocess (the tests, the training run)")
    g.set_defaults(func=_gpu_check)
    for name, atari in (("train", False), ("train-atari", True)):
        t = sub.add_parser(name, help=("PPO on real ALE games, one after another" if atari
                                       else "PPO on synthetic games, one after another"),
                           formatter_class=formatter)
        _add_train_flags(t, atari)
        t.add_argument("--resume", default=None, metavar="DIR",
                       help="continue the run saved in DIR (its other flags are kept)")
        t.set_defaults(func=lambda a, atari=atari: _train(a, atari))
    for name, defaults, text in (
            ("experiment", PRESETS.get(preset, {}),
             "the sequential experiment: each --runs kind x --seeds, same games and active "
             "parameters; resumes what is unfinished"),
            ("demo", PRESETS["synthetic-demo"],
             "forgetting in minutes: experiment --preset synthetic-demo (dense and MoE "
             "cohort on three synthetic games, 3 seeds, <= 15 min on 2 CPU cores)")):
        e = sub.add_parser(name, help=text, formatter_class=formatter)
        _add_train_flags(e, True, **defaults)
        runs = e.add_argument_group("experiment (run_experiment)")
        if name == "experiment":
            runs.add_argument("--preset", choices=list(PRESETS), default=preset,
                              help="start from a named configuration (its flags are listed "
                                   "as this help's defaults when given); flags given win: "
                                   + "; ".join(f"{k}: {_describe(v)}" for k, v in
                                               PRESETS.items()))
        runs.add_argument("--runs", default=defaults.get("runs", "token,env,dense"),
                          help="kinds of run: token, env, cohort (MoE routings), token-none, "
                               "token-horizon (token routing, other balance), dense (its dense "
                               "twin), cnn (CleanRL's agent)")
        runs.add_argument("--seeds", default=defaults.get("seeds", "1"),
                          help="comma-separated seeds, one run of each kind per seed")
        runs.add_argument("--jobs", type=int, default=defaults.get("jobs", 1),
                          help="runs trained at once, each in its own process with one torch "
                               "thread (2 on a 2-core machine)")
        e.set_defaults(func=_experiment)
    lt = sub.add_parser("learning", help="how far runs had got by a step: the critic's "
                                         "explained variance, policy entropy and training "
                                         "return per kind of run (a markdown table)",
                        formatter_class=formatter)
    lt.add_argument("dirs", nargs="+", help="run directories (each with its metrics.json; "
                                            "unfinished runs count up to --at)")
    lt.add_argument("--at", type=int, default=20_480, help="the global_step to compare at")
    lt.add_argument("--json", default=None, help="also write the table to this JSON file "
                                                 "({'at': STEP, 'kinds': {kind: figures}})")
    lt.set_defaults(func=_learning)
    return parser


def _preset_of(argv: list[str]) -> str | None:
    """The known preset that ``experiment ... --preset NAME`` names (argparse rejects others)."""
    if not argv or argv[0] != "experiment":
        return None
    for i, arg in enumerate(argv):
        name = (arg.split("=", 1)[1] if arg.startswith("--preset=") else
                argv[i + 1] if arg == "--preset" and i + 1 < len(argv) else None)
        if name in PRESETS:
            return name
    return None


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_preset_of(argv)).parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
