"""Command line: ``python -m ooc_moe {bench,demo} ...`` (``-h`` lists the options)."""

from __future__ import annotations

import argparse
import sys
import time

from . import bench
from .store import TieredExpertStore
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
        print("  moved: " + ", ".join(f"{link} {s['bytes_' + link] / 1e9:.2f} GB" for link in
                                      ("file_to_dram", "dram_to_hbm", "hbm_to_dram",
                                       "dram_to_file")))


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
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
