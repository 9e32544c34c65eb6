"""Command line: ``python -m ooc_moe {bench,demo} ...`` (``-h`` lists the options)."""

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


def _demo(args: argparse.Namespace) -> None:
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


def _train_args(args: argparse.Namespace, atari: bool) -> "TrainArgs":
    """Build and check the whole configuration before any work starts."""
    from .train import PPOArgs, TrainArgs

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
    if atari:
        from .envs.atari import normalize_game_name
        games = [normalize_game_name(g) for g in games]       # unknown names fail here
    ppo = PPOArgs(num_envs=args.num_envs, num_steps=args.num_steps)
    train_args = TrainArgs(
        games=tuple(games), steps_per_game=args.steps_per_game, seed=args.seed,
        device=args.device, out=args.out, baseline=args.baseline, routing=args.routing,
        num_experts=args.num_experts, expert_dim=args.expert_dim,
        expert_hidden_dim=args.expert_hidden_dim, num_layers=args.num_layers,
        num_heads=args.num_heads, top_k=args.top_k, context_len=args.context_len,
        hbm_capacity=args.hbm_capacity, dram_capacity=args.dram_capacity, trace=args.trace,
        ppo=ppo)
    train_args.agent_config()                                 # sizes and capacities
    return train_args


def _train(args: argparse.Namespace, atari: bool) -> None:
    from .train import train

    try:
        train_args = _train_args(args, atari)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    result = train(train_args)
    history = result["history"]
    print(f"trained {train_args.baseline} on {', '.join(train_args.games)} in "
          f"{result['seconds']:.0f} s")
    for game in train_args.games:
        returns = [r for h in history if h["game"] == game
                   for r in h["charts/episodic_returns"]]
        last = returns[-10:]
        print(f"  {game:<14} episodes {len(returns):5d}  mean return of the last "
              f"{len(last)}: {np.mean(last) if last else float('nan'):.2f}")
    if "store/hit_rate" in history[-1]:
        print(f"  store: HBM hit rate (last update) {history[-1]['store/hit_rate']:.1%}, "
              f"game-expert NMI {history[-1]['routing/mutual_information']:.3f}")
    if train_args.out:
        print(f"  metrics written to {train_args.out}/metrics.json")


def _add_train_flags(p: argparse.ArgumentParser, atari: bool) -> None:
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
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--device", default=None)
    p.add_argument("--out", default=None, help="directory for metrics.json (and trace.npz)")
    p.add_argument("--trace", action="store_true", help="record every store call")


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
    d = sub.add_parser("demo", help="replay sequential-game and random expert accesses "
                                    "through a real tiered store (every used expert dirty)")
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
    d.set_defaults(func=_demo)
    sub.add_parser("test", help="a smoke run of every component, in seconds").set_defaults(
        func=lambda a: run_smoke())
    for name, atari in (("train", False), ("train-atari", True)):
        t = sub.add_parser(name, help=("PPO on real ALE games, one after another" if atari
                                       else "PPO on synthetic games, one after another"))
        _add_train_flags(t, atari)
        t.set_defaults(func=lambda a, atari=atari: _train(a, atari))
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
