"""``python -m ooc_moe gpu-check --out DIR``: everything a GPU machine can tell us, in one run.

1. ``pytest -m cuda`` over the checkout's tests (they exist only in a clone of the repository);
2. ``bench store`` and ``bench layer`` on the GPU: each link's throughput against the raw
   pinned copy of the same bytes (goal >= 0.9), and the share of copy time that prefetch
   hides when the copies are shorter than the compute (goal >= 0.9):
   ``hidden = (demand - prefetched) / (demand - all resident)``;
3. a short ``train-atari`` run (20k steps by default) through the store on the GPU.

It writes ``DIR/report.json`` (every figure, the device, the date, the command) and
``DIR/summary.txt`` (a line per check with its goal), and prints the summary. It is sized to
finish within about 8 minutes on one H100/H200; ``--quick`` shrinks every part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

import torch

from . import bench

__all__ = ["GpuCheckConfig", "gpu_check", "prefetch_hidden"]

REPO = Path(__file__).resolve().parent.parent


@dataclass
class GpuCheckConfig:
    out: str
    train_steps: int = 20_000
    quick: bool = False
    allow_cpu: bool = False      # run the same checks on the CPU (to test this command)
    timeout_s: int = 300         # per subprocess (the tests, the training run)


def prefetch_hidden(overlap: dict) -> float | None:
    """Share of the demand loop's copy time that prefetch hides (None: no copy time)."""
    copy_time = overlap["demand_s"] - overlap["resident_s"]
    if copy_time <= 0:
        return None
    return (overlap["demand_s"] - overlap["prefetch_s"]) / copy_time


def _cuda_tests(out: Path, cfg: GpuCheckConfig) -> dict:
    tests = REPO / "tests"
    if not tests.is_dir():
        return {"status": "not run: no tests/ beside the package (run from a clone)"}
    xml = out / "cuda-tests.xml"
    start = time.perf_counter()
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-m", "cuda", "-q", str(tests),
                              f"--junitxml={xml}", "-p", "no:cacheprovider"], cwd=REPO,
                             capture_output=True, text=True, timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {cfg.timeout_s} s"}
    (out / "cuda-tests.log").write_text(run.stdout + run.stderr)
    suite = ElementTree.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {"status": "passed" if run.returncode == 0 else "failed", **counts,
            "failed": failed, "seconds": time.perf_counter() - start}


def _train(out: Path, cfg: GpuCheckConfig, device: str) -> dict:
    run_dir = out / "train"
    steps = 1_024 if cfg.quick else cfg.train_steps
    command = [sys.executable, "-m", "ooc_moe", "train-atari", "--games", "pong",
               "--steps_per_game", str(steps), "--device", device, "--out", str(run_dir),
               "--eval_episodes", "1", "--eval_max_steps", "200"]
    start = time.perf_counter()
    try:
        run = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                             timeout=cfg.timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {cfg.timeout_s} s", "command": command}
    (out / "train.log").write_text(run.stdout + run.stderr)
    result = {"status": "passed" if run.returncode == 0 else "failed",
              "command": " ".join(command[1:]), "seconds": time.perf_counter() - start}
    metrics = run_dir / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        hit_rate = m.get("hit_rate") or [None]
        result.update(sps=m.get("sps"), device=m.get("device"), final_hit_rate=hit_rate[-1],
                      bytes_moved=m.get("bytes_moved"), finished=m.get("finished"))
    return result


def _summary(report: dict) -> str:
    lines = [f"gpu-check on {report['device']} ({report['date']}, torch {report['torch']})"]
    tests = report["cuda_tests"]
    lines.append(f"cuda tests: {tests['status']}" + (
        f" ({tests['tests']} run, {tests['failures'] + tests['errors']} failed, "
        f"{tests['skipped']} skipped)" if "tests" in tests else ""))
    for name in tests.get("failed", []):
        lines.append(f"  FAILED {name}")
    for link in report["bench_store"]["links"]:
        verdict = "ok" if link["ratio"] >= 0.9 else "BELOW GOAL"
        lines.append(f"store {link['link']}: {link['ratio']:.2f} of the raw copy "
                     f"(goal >= 0.90) {verdict}")
    hidden = report["prefetch_hidden"]
    lines.append("prefetch hides " + ("no copy time to hide" if hidden is None else
                 f"{hidden:.0%} of the copy time (goal >= 90%) "
                 f"{'ok' if hidden >= 0.9 else 'BELOW GOAL'}"))
    for key, run in report["bench_layer"]["runs"].items():
        lines.append(f"layer {key} (HBM {run['hbm']}): {run['ratio_to_resident']:.2f}x the "
                     f"all-resident step, hit rate {run['hit_rate']:.2f}")
    train = report["train"]
    lines.append(f"train-atari: {train['status']}" + (
        f", {train['sps']:.0f} steps/s" if train.get("sps") else ""))
    return "\n".join(lines) + "\n"


def gpu_check(cfg: GpuCheckConfig) -> dict:
    """Run the checks, write ``report.json`` and ``summary.txt`` under ``cfg.out``."""
    if not torch.cuda.is_available() and not cfg.allow_cpu:
        raise SystemExit("gpu-check needs a CUDA GPU and this machine has none "
                         "(torch.cuda.is_available() is False); run it on a GPU machine "
                         "(with a CUDA build of torch), or pass --allow-cpu to test the command")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    store_cfg = bench.StoreBenchConfig.quick if cfg.quick else bench.StoreBenchConfig
    layer_cfg = bench.LayerBenchConfig.quick if cfg.quick else bench.LayerBenchConfig
    report = {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} "
                                                                          "cores)",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "torch": torch.__version__,
        "cuda": torch.version.cuda, "command": " ".join(["python -m ooc_moe", *sys.argv[1:]]),
        "cuda_tests": _cuda_tests(out, cfg),
        "bench_store": bench.bench_store(store_cfg(device=device)),
        "bench_layer": bench.bench_layer(layer_cfg(device=device)),
    }
    report["prefetch_hidden"] = prefetch_hidden(report["bench_store"]["overlap"])
    report["train"] = _train(out, cfg, device)
    report["seconds"] = time.perf_counter() - started
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    summary = _summary(report)
    (out / "summary.txt").write_text(summary)
    print(summary, end="")
    return report
