"""Command line: ``python -m ooc_moe {bench,demo} ...``."""

from __future__ import annotations

import argparse
import sys

from . import bench


def _bench(args: argparse.Namespace) -> None:
    make = bench.StoreBenchConfig.quick if args.quick else bench.StoreBenchConfig
    results = {"store": bench.bench_store(make(device=args.device, directory=args.dir))}
    if args.json:
        bench.write_json(results, args.json)
        print(f"figures written to {args.json}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ooc_moe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="benchmarks, each a ratio against a same-run baseline")
    b.add_argument("what", choices=["store", "all"], help="which benchmark")
    b.add_argument("--quick", action="store_true", help="small sizes (seconds, for CI)")
    b.add_argument("--device", default=None, help="cuda / cpu (default: cuda if available)")
    b.add_argument("--dir", default=None, help="directory for the expert file (an NVMe disk)")
    b.add_argument("--json", default=None, help="also write the figures to this JSON file")
    b.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
