"""Command line: ``python -m ooc_moe COMMAND`` (``-h`` lists the commands and options).

test, train, train-atari, experiment, demo, bench, store-demo.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from . import bench
from .smoke import run_smoke
from .store import TieredExpertStore
from .store.stats import LINKS
from .workloads import access_pattern, game_blocks, replay


def _bench(args: argparse.Namespace) -> None:
    results = {}
    for name, config, run in (("store", bench.StoreBenchConfig, bench.bench_store),
                              ("layer", bench.LayerBenchConfig, bench.bench_layer),
                              ("sim", bench.SimBenchConfig, bench.bench_sim)):
        if args.what in (name, "all"):
            make = config.quick if args.quick else config
            results[name] = run(make(device=args.device, directory=args.dir))
    if args.json:
        bench.write_json(results, args.json)
        print(f"figures written to {args.json}")


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
    from .train import EvalArgs, PPOArgs, TrainArgs

    train_args = TrainArgs(
        games=tuple(_games(args, atari)), steps_per_game=args.steps_per_game, seed=args.seed,
        device=args.device, out=args.out, baseline=args.baseline, routing=args.routing,
        num_experts=args.num_experts, expert_dim=args.expert_dim,
        expert_hidden_dim=args.expert_hidden_dim, num_layers=args.num_layers,
        num_heads=args.num_heads, top_k=args.top_k, context_len=args.context_len,
        hbm_capacity=args.hbm_capacity, dram_capacity=args.dram_capacity, trace=args.trace,
        checkpoint_every=args.checkpoint_every,
        ppo=PPOArgs(num_envs=args.num_envs, num_steps=args.num_steps),
        eval=EvalArgs(episodes=args.eval_episodes, max_steps=args.eval_max_steps))
    train_args.agent_config()                                 # sizes and capacities
    return train_args


def _command() -> str:
    return "python -m ooc_moe " + " ".join(sys.argv[1:])


def _train(args: argparse.Namespace, atari: bool) -> None:
    from .train import args_from_json, load_checkpoint, train

    try:
        if args.resume:
            train_args = args_from_json(load_checkpoint(args.resume)["args"])
            train_args.out = args.resume
        else:
            train_args = _train_args(args, atari)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"error: {err}") from None
    try:
        metrics = train(train_args, resume=bool(args.resume), command=_command())
    except ValueError as err:              # e.g. --out holds an earlier run's checkpoint
        raise SystemExit(f"error: {err}") from None
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
    if train_args.out:
        print(f"  metrics, retention.csv and plots in {train_args.out}/")


def _experiment(args: argparse.Namespace) -> None:
    from .train import format_summary, format_verdict, run_experiment

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
    summary = run_experiment(base, kinds, seeds, base.out, command=_command())
    print()
    print(format_summary(summary))
    print("\n" + format_verdict(summary))
    print(f"\nplots: {base.out}/<run>/retention.png, hit_rate.png, game_expert.png; "
          f"summary: {base.out}/summary.json")


def _add_train_flags(p: argparse.ArgumentParser, atari: bool, **defaults) -> None:
    p.add_argument("--games", default=None, help="comma-separated games, played in order")
    p.add_argument("--num_games", type=int, default=None,
                   help=f"the first N of --games (default: all of them, or {4 if atari else 2})")
    p.add_argument("--steps_per_game", type=int, default=100_000 if atari else 20_000)
    p.add_argument("--num_experts", type=int, default=64)
    p.add_argument("--expert_dim", type=int, default=128)
    p.add_argument("--expert_hidden_dim", type=int, default=256)
    p.add_argument("--num_layers", type=int, default=2)
    p.add_argument("--num_heads", type=int, default=4)
    p.add_argument("--top_k", type=int, default=2)
    p.add_argument("--hbm_capacity", type=int, default=16)
    p.add_argument("--dram_capacity", type=int, default=64)
    p.add_argument("--context_len", type=int, default=8)
    p.add_argument("--routing", choices=["token", "env"], default="token")
    p.add_argument("--baseline", choices=["moe", "dense"], default="moe")
    p.add_argument("--num_envs", type=int, default=8)
    p.add_argument("--num_steps", type=int, default=128, help="rollout steps per env")
    p.add_argument("--eval_episodes", type=int, default=8,
                   help="episodes per game in each evaluation (fixed seeds)")
    p.add_argument("--eval_max_steps", type=int, default=2000,
                   help="cap on an evaluation episode's steps (its score so far counts)")
    p.add_argument("--checkpoint_every", type=int, default=0,
                   help="also checkpoint every N updates (always after each stage)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="directory for metrics.json, checkpoints, plots")
    p.add_argument("--trace", action="store_true", help="record every store call")
    p.set_defaults(**defaults)


# `make demo`: three real games, MoE and dense, sized to finish in ~10 minutes on 2 CPU cores
DEMO = {"games": "pong,breakout,boxing", "steps_per_game": 12_288, "runs": "token,dense",
        "seeds": "1", "num_experts": 32, "expert_dim": 64, "expert_hidden_dim": 128,
        "hbm_capacity": 8, "dram_capacity": 16, "context_len": 4, "eval_episodes": 4,
        "eval_max_steps": 600, "out": "runs/demo"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ooc_moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmarks, each a ratio against a same-run baseline")
    b.add_argument("what", choices=["store", "layer", "sim", "all"], help="which benchmark")
    b.add_argument("--quick", action="store_true", help="small sizes (seconds, for CI)")
    b.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    b.add_argument("--dir", default=None, help="directory for the expert file (an NVMe disk)")
    b.add_argument("--json", default=None, help="also write the figures to this JSON file")
    b.set_defaults(func=_bench)
    d = sub.add_parser("store-demo", help="replay sequential-game and random expert accesses "
                                          "through a real tiered store (every used expert "
                                          "dirty)")
    d.add_argument("--num_experts", type=int, default=256)
    d.add_argument("--expert_dim", type=int, default=512)
    d.add_argument("--expert_hidden_dim", type=int, default=2048)
    d.add_argument("--hbm_capacity", type=int, default=32)
    d.add_argument("--dram_capacity", type=int, default=128)
    d.add_argument("--num_games", type=int, default=4)
    d.add_argument("--steps_per_game", type=int, default=200)
    d.add_argument("--experts_per_step", type=int, default=8)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    d.add_argument("--dir", default=None, help="directory for the expert file (default: temp)")
    d.set_defaults(func=_store_demo)
    sub.add_parser("test", help="a smoke run of every component, in seconds").set_defaults(
        func=lambda a: run_smoke())
    for name, atari in (("train", False), ("train-atari", True)):
        t = sub.add_parser(name, help=("PPO on real ALE games, one after another" if atari
                                       else "PPO on synthetic games, one after another"))
        _add_train_flags(t, atari)
        t.add_argument("--resume", default=None, metavar="DIR",
                       help="continue the run saved in DIR (its other flags are kept)")
        t.set_defaults(func=lambda a, atari=atari: _train(a, atari))
    for name, defaults, text in (
            ("experiment", {}, "the sequential experiment: each --runs kind x --seeds, same "
                               "games and active parameters; resumes what is unfinished"),
            ("demo", DEMO, "the experiment at demo size: 3 Atari games, MoE and dense, "
                           "~10 min on 2 CPU cores")):
        e = sub.add_parser(name, help=text)
        _add_train_flags(e, True, **defaults)
        e.add_argument("--runs", default=defaults.get("runs", "token,env,dense"),
                       help="kinds of run: token, env (MoE routings), dense (baseline)")
        e.add_argument("--seeds", default=defaults.get("seeds", "1"),
                       help="comma-separated seeds")
        e.set_defaults(func=_experiment)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
