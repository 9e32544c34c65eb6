"""Every CLI command runs, with tiny arguments, as a user would run it."""

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from ooc_moe.__main__ import PRESETS, _preset_of, build_parser
from ooc_moe.bench import TrainBenchConfig
from ooc_moe.train import EvalArgs, PPOArgs


def run(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ooc_moe", *args], capture_output=True,
                          text=True, timeout=1200, cwd=cwd)


def test_bench_store_quick_prints_ratios_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "store", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "file -> DRAM (page cache)" in result.stdout and "ratio" in result.stdout
    figures = json.loads(out.read_text())["store"]
    links = {link["link"]: link for link in figures["links"]}
    assert {"file -> DRAM (page cache)", "DRAM -> HBM"} <= set(links)
    for link in links.values():
        assert link["ratio"] > 0 and link["bytes"] > 0
    assert figures["overlap"]["prefetch_hits_per_access"] == pytest.approx(1.0)


def test_unknown_command_is_an_error():
    result = run("bogus")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_store_demo_with_tiny_sizes_reports_both_patterns(tmp_path):
    result = run("store-demo", "--num_experts", "32", "--expert_dim", "8", "--expert_hidden_dim",
                 "16", "--hbm_capacity", "8", "--dram_capacity", "16", "--num_games", "2",
                 "--steps_per_game", "20", "--experts_per_step", "4", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "sequential_games: HBM hit rate" in result.stdout and "random:" in result.stdout
    assert (tmp_path / "experts.bin").stat().st_size > 0


def test_store_demo_rejects_impossible_capacities():
    result = run("store-demo", "--num_experts", "8", "--hbm_capacity", "16")
    assert result.returncode != 0 and "larger than num_experts" in result.stderr


def test_bench_layer_quick_reports_every_configuration(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "layer", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    runs = json.loads(out.read_text())["layer"]["runs"]
    assert set(runs) == {"all resident", "working set fits", "2x, prefetch", "2x, demand",
                         "8x, prefetch", "8x, demand"}
    assert runs["all resident"]["experts_used"] == 16
    for name in ("all resident", "working set fits"):     # nothing moves once warm
        assert sum(runs[name]["bytes_per_step"].values()) == 0 and runs[name]["hit_rate"] == 1
    for name in ("2x, demand", "8x, demand"):
        assert runs[name]["bytes_per_step"]["dram_to_hbm"] > 0
        assert runs[name]["prefetch_hits"] == 0
    assert runs["2x, prefetch"]["prefetch_hits"] > 0
    assert runs["8x, demand"]["bytes_per_step"]["dram_to_hbm"] > \
        runs["2x, demand"]["bytes_per_step"]["dram_to_hbm"]


def test_bench_sim_quick_reports_each_policy(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "sim", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert written["machine"]["cpus"] == os.cpu_count()      # what shaped the figures
    assert written["machine"]["torch_threads"] >= 1 and written["machine"]["load_before"] >= 0
    policies = written["sim"]["policies"]
    assert set(policies) == {"lru", "lfu", "belady"}
    assert policies["belady"]["hit_rate"] >= policies["lru"]["hit_rate"]
    assert all(p["accesses_per_s"] > 0 for p in policies.values())


def test_smoke_command_checks_every_component():
    result = run("test")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == 4


TINY = ["--num_experts", "8", "--expert_dim", "16", "--expert_hidden_dim", "32",
        "--num_heads", "2", "--hbm_capacity", "4", "--dram_capacity", "8", "--context_len", "2",
        "--num_envs", "4", "--num_steps", "16", "--eval_episodes", "2", "--eval_max_steps", "20"]


def test_train_two_synthetic_games_writes_metrics(tmp_path):
    result = run("train", "--num_games", "2", "--steps_per_game", "64", "--out",
                 str(tmp_path), "--trace", *TINY)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert [h["game"] for h in metrics["history"]] == ["synthetic-0", "synthetic-1"]
    first = metrics["history"][0]
    for key in ("charts/SPS", "losses/policy_loss", "store/hit_rate",
                "store/prefetch_precision", "routing/mutual_information",
                "routing/router_entropy", "store/bytes_dram_to_hbm"):
        assert key in first
    assert (tmp_path / "trace.npz").stat().st_size > 0


@pytest.mark.parametrize("baseline", ["dense", "cnn"])
def test_baselines_train_too(tmp_path, baseline):
    result = run("train", "--games", "synthetic-3", "--steps_per_game", "64",
                 "--baseline", baseline, "--out", str(tmp_path), *TINY)
    assert result.returncode == 0, result.stderr
    assert f"trained {baseline} on synthetic-3" in result.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["args"]["baseline"] == baseline and "store/hit_rate" not in \
        metrics["history"][0]
    assert not (tmp_path / "checkpoint" / "store" / "experts.bin").exists()
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_ppo_and_evaluation_flags_reach_the_run(tmp_path):
    result = run("train", "--games", "synthetic-0", "--steps_per_game", "64", "--baseline",
                 "cnn", "--learning_rate", "1e-3", "--no-anneal_lr", "--update_epochs", "1",
                 "--max_grad_norm", "0.25", "--target_kl", "0.02", "--eval_seed", "7",
                 "--action_mask", "legal", "--out", str(tmp_path), *TINY)
    assert result.returncode == 0, result.stderr
    args = json.loads((tmp_path / "metrics.json").read_text())["args"]
    assert args["action_mask"] == "legal"
    assert (args["ppo"]["learning_rate"], args["ppo"]["anneal_lr"], args["ppo"]["update_epochs"],
            args["ppo"]["max_grad_norm"], args["ppo"]["target_kl"], args["eval"]["seed"]) == \
        (1e-3, False, 1, 0.25, 0.02, 7)


def test_experiment_runs_the_cnn_anchor_beside_dense_and_moe(tmp_path):
    result = run("experiment", "--games", "synthetic-0", "--steps_per_game", "64", "--runs",
                 "cnn,dense,token", "--out", str(tmp_path), *TINY)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary) == ["cnn", "dense", "token"]
    assert "hit_rate" in summary["token"] and "hit_rate" not in summary["cnn"]
    assert "cnn (seeds 1)" in result.stdout


SUBCOMMANDS = ["bench", "store-demo", "test", "train", "train-atari", "experiment", "demo",
               "gpu-check", "learning", "dist-layer"]


def subparsers() -> dict:
    return next(a for a in build_parser()._actions
                if isinstance(a, argparse._SubParsersAction)).choices


def test_every_flag_of_every_command_has_a_help_line():
    commands = subparsers()
    assert sorted(commands) == sorted(SUBCOMMANDS)
    for name, sub in commands.items():
        for action in sub._actions:
            assert action.help and action.help.strip(), (name, action.option_strings)
    train = commands["train"]
    flags = {o for a in train._actions for o in a.option_strings}
    assert {f"--{f.name}" for f in dataclasses.fields(PPOArgs) if f.init} <= flags
    assert {f"--eval_{f.name}" for f in dataclasses.fields(EvalArgs)} <= flags
    groups = {g.title for g in train._action_groups}
    assert {"run (TrainArgs)", "PPO (PPOArgs)", "evaluation (EvalArgs)"} <= groups


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_of_each_command_documents_every_option(command):
    """In ``--help`` itself: every option's line carries a description."""
    result = run(command, "--help")
    assert result.returncode == 0, result.stderr
    for action in subparsers()[command]._actions:
        for option in action.option_strings:
            assert option in result.stdout
        assert action.help.split()[0] in result.stdout, (command, action.option_strings)


def test_gpu_check_without_a_gpu_says_what_to_do():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    result = run("gpu-check", "--out", "unused")
    assert result.returncode != 0 and "needs a CUDA GPU" in result.stderr
    assert "--allow-cpu" in result.stderr


def test_bench_train_quick_reports_sps_and_ratios(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "train", "--quick", "--older_tokens", "recycled", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "moe/dense" in result.stdout and "dense/cnn" in result.stdout
    written = json.loads(out.read_text())
    assert written["command"] == ("python -m ooc_moe bench train --quick --older_tokens "
                                  f"recycled --json {out}")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", written["date"])
    figures = written["train"]
    assert figures["config"]["older_tokens"] == "recycled" and "older tokens recycled" in \
        result.stdout
    assert figures["cpus"] == os.cpu_count() and figures["load_before"] >= 0
    assert f"load average before {figures['load_before']:.2f}" in result.stdout
    assert set(figures["agents"]) == {"cnn", "dense", "moe"}
    for agent in figures["agents"].values():          # quick: 2 iterations of 4 envs x 32
        assert len(agent["iteration_seconds"]) == 2 and agent["steps"] == 2 * 4 * 32
        assert agent["sps"] == pytest.approx(4 * 32 / np.median(agent["iteration_seconds"]))
    assert figures["ratios"]["moe/dense"] == pytest.approx(
        figures["agents"]["moe"]["sps"] / figures["agents"]["dense"]["sps"])
    assert 0 <= figures["agents"]["moe"]["hit_rate"] <= 1
    assert "env    SPS" in result.stdout and "cnn/env" in result.stdout
    assert figures["ratios"]["cnn/env"] == pytest.approx(         # training cannot outrun
        figures["agents"]["cnn"]["sps"] / figures["env"]["sps"])  # the env it steps


def test_bench_dist_quick_runs_one_and_two_gloo_ranks(tmp_path):
    out = tmp_path / "bench.json"
    result = run("bench", "dist", "--quick", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "1 rank " in result.stdout and "2 ranks" in result.stdout
    runs = json.loads(out.read_text())["dist"]["runs"]
    assert runs["1"]["exchange_s"] < runs["1"]["step_s"]     # one rank: copies to itself
    assert runs["2"]["speedup"] == pytest.approx(runs["2"]["tokens_per_s"]
                                                 / runs["1"]["tokens_per_s"])
    for r in runs.values():          # every expert of both shards streamed (HBM 4 per rank)
        assert r["bytes_per_step"]["dram_to_hbm"] > 0 and 0 < r["exchange_share"] < 1
    # between ranks: none from one; from two, at most every assignment of the 256 tokens'
    # top-2 (32 float32 values), out and back, forward and backward
    assert runs["1"]["bytes_per_step"]["between_ranks"] == 0
    assert 0 < runs["2"]["bytes_per_step"]["between_ranks"] <= 4 * 256 * 2 * 32 * 4


def parse(*argv: str) -> dict:
    """The flags as ``python -m ooc_moe`` reads them (a preset's defaults included)."""
    return vars(build_parser(_preset_of(list(argv))).parse_args(list(argv)))


def test_presets_are_the_experiments_defaults_and_given_flags_win():
    for name, preset in PRESETS.items():
        flags = parse("experiment", "--preset", name)
        assert {k: flags[k] for k in preset} == preset, name
    synthetic = parse("experiment", "--preset", "synthetic")
    assert (synthetic["games"], synthetic["gamma"], synthetic["jobs"]) == (
        "synthetic-0,synthetic-1,synthetic-2", 0.0, 2)
    assert synthetic["runs"] == "cnn,dense,token,cohort" and synthetic["seeds"] == "1,2,3,4,5"
    mine = parse("experiment", "--seeds", "7", "--preset=synthetic", "--gamma", "0.5")
    assert (mine["seeds"], mine["gamma"], mine["steps_per_game"]) == ("7", 0.5, 3072)
    demo, same = parse("demo"), parse("experiment", "--preset", "synthetic-demo")
    for flags in (demo, same):
        for key in ("command", "preset", "func"):
            flags.pop(key, None)
    assert demo == same
    plain = parse("experiment")
    assert (plain["gamma"], plain["jobs"], plain["preset"]) == (0.99, 1, None)
    help_text = run("experiment", "--preset", "synthetic", "--help").stdout
    assert "discount factor (default: 0.0)" in " ".join(help_text.split())


def test_bench_train_uses_the_demo_sizes():
    demo = parse("experiment", "--preset", "atari-demo")
    cfg = TrainBenchConfig()
    for key in ("num_experts", "expert_dim", "expert_hidden_dim", "num_layers", "num_heads",
                "top_k", "context_len", "hbm_capacity", "dram_capacity", "num_envs",
                "num_steps", "detector"):
        assert getattr(cfg, key) == demo[key], key


@pytest.mark.parametrize("args, message", [
    (["train-atari", "--games", "pongg"], "did you mean 'pong'"),
    (["train", "--top_k", "99"], "top_k=99"),
    (["train", "--hbm_capacity", "99"], "hbm_cap"),
    (["train", "--num_envs", "6", "--minibatches", "env"], "divisible by num_minibatches"),
    (["train", "--minibatches", "steps"], "minibatches must be one of"),
    (["train", "--steps_per_game", "10"], "less than one rollout"),
    (["train", "--games", "synthetic-1,synthetic-1"], "name a game twice"),
    (["experiment", "--games", "synthetic-0", "--jobs", "0", "--out", "unused"],
     "jobs must be an int >= 1"),
    (["experiment", "--games", "pong", "--runs", "dense,sparse"], "--runs must list"),
    (["train", "--routing", "cohort", "--cohort_size", "0"], "cohort_size=0 must be between"),
    (["train", "--routing", "cohort", "--cohort_size", "65"], "num_experts=64"),
    (["train", "--balance", "global"], "invalid choice: 'global'"),
    (["train", "--routing", "games"], "invalid choice: 'games'"),
    (["train", "--balance", "horizon", "--balance_horizon", "0"], "--balance_horizon 1000000"),
    (["experiment", "--games", "pong", "--runs", "token,cohort", "--balance", "horizon",
      "--out", "unused"], "--balance batch"),
])
def test_impossible_training_configurations_stop_before_any_work(args, message):
    result = run(*args)
    assert result.returncode != 0 and message in result.stderr
    assert "it/s" not in result.stderr   # no training progress bar was started


def test_learning_prints_each_kinds_early_figures(tmp_path):
    """``learning DIR... --at STEP`` on two finished tiny runs: a markdown row per kind with
    the seeds, and each kind's command; a step no run reached is a clear error."""
    for seed in (1, 2):
        out = tmp_path / f"dense-seed{seed}"
        result = run("train", "--games", "synthetic-0", "--steps_per_game", "64",
                     "--baseline", "dense", "--seed", str(seed), "--out", str(out), *TINY)
        assert result.returncode == 0, result.stderr
    dirs = [str(tmp_path / "dense-seed1"), str(tmp_path / "dense-seed2")]
    result = run("learning", *dirs, "--at", "64", "--json", str(tmp_path / "t.json"))
    assert result.returncode == 0, result.stderr
    assert "| dense | 1,2 |" in result.stdout and "dense: python -m ooc_moe train" in result.stdout
    saved = json.loads((tmp_path / "t.json").read_text())
    assert saved["at"] == 64 and saved["kinds"]["dense"]["seeds"] == [1, 2]
    result = run("learning", *dirs, "--at", "10000000")
    assert result.returncode != 0 and "reached step 10000000" in result.stderr
