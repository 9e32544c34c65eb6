"""The committed results under results/: complete, consistent with their own runs, and small.

Notebook 05 and the README show these files; a summary edited by hand, a run without its
command, or a missing plot would show figures nobody can reproduce.
"""

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from ooc_moe.scores import HUMAN_SCORES, forgetting, run_kind
from ooc_moe.train import (PPOArgs, cache_table, format_cache_table, format_forgetting_table,
                           format_learning_table, format_summary, format_verdict, learning_table,
                           load_results, summarize)

RESULTS = Path(__file__).resolve().parent.parent / "results"
EXPERIMENTS = sorted(p.parent for p in RESULTS.glob("*/summary.json"))


def readme_text(flat: bool = False) -> str:
    """README's text; ``flat``: every run of whitespace one space (prose across line breaks)."""
    text = (RESULTS.parent / "README.md").read_text()
    return " ".join(text.split()) if flat else text


def test_there_are_committed_results_for_notebook_05():
    assert EXPERIMENTS, "no results/*/summary.json: run `python -m ooc_moe demo --out " \
                        "results/<name>` (or `experiment`) and commit its JSON and PNG files"


@pytest.mark.parametrize("experiment", EXPERIMENTS, ids=lambda p: p.name)
def test_summary_is_what_its_runs_give(experiment):
    committed = json.loads((experiment / "summary.json").read_text())
    recomputed = json.loads(json.dumps(summarize(load_results(experiment)), default=float))
    assert committed == recomputed
    assert "retention" in format_summary(committed)


@pytest.mark.parametrize("run", [m.parent for m in sorted(RESULTS.glob("*/*/metrics.json"))],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_run_says_how_it_was_made_and_has_its_plots(run):
    metrics = json.loads((run / "metrics.json").read_text())
    assert re.match(r"(python|torchrun --standalone --nproc_per_node \d+) -m ooc_moe ",
                    metrics["command"])
    assert metrics["device"] and metrics["date"]
    if not metrics["finished"]:      # stopped on purpose: only an early-learning comparison
        table = run.parent / "learning.json"
        assert table.is_file(), f"{run} is unfinished and no learning.json says why it is here"
        kinds = json.loads(table.read_text())["kinds"]
        assert run.name.rsplit("-seed", 1)[0] in kinds, f"{run.name} is in no row of {table}"
        return
    n = len(metrics["games"])
    assert np.array(metrics["retention"]).shape == (n, n) and len(metrics["initial"]) == n
    assert metrics["forgetting"] == pytest.approx(forgetting(metrics["retention"]).tolist())
    for name in metrics["plots"]:
        assert (run / name).stat().st_size > 0, name
    csv = (run / "retention.csv").read_text().splitlines()
    assert csv[0] == "after," + ",".join(metrics["games"]) and len(csv) == n + 2


def test_results_commit_no_weights():
    """Checkpoints and expert files stay on disk (.gitignore), out of the repository."""
    try:
        listed = subprocess.run(["git", "ls-files", "results"], cwd=RESULTS.parent, check=True,
                                capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    big = [name for name in listed if (RESULTS.parent / name).stat().st_size > 2_000_000]
    assert not big, f"keep checkpoints and expert files out of results/: {big}"


@pytest.mark.parametrize("table", sorted(RESULTS.glob("*/learning.json")), ids=lambda p: p.parent.name)
def test_each_early_learning_table_is_what_its_runs_give(table):
    """``python -m ooc_moe learning DIR... --at STEP --json learning.json`` over the runs
    beside it gives the committed table again."""
    committed = json.loads(table.read_text())
    runs = {p.parent.name: json.loads(p.read_text())
            for p in sorted(table.parent.glob("*/metrics.json"))}
    assert learning_table(runs, committed["at"]) == committed["kinds"]


def test_the_synthetic_preset_is_what_readme_states_and_made_its_results():
    """README's section on ``results/synthetic`` names every flag of ``--preset synthetic``
    with its value, and every committed run of it was made with those values."""
    from ooc_moe.__main__ import PRESETS
    from ooc_moe.train import RUN_KINDS

    preset = PRESETS["synthetic"]
    readme = readme_text()
    section = readme[readme.index("(`results/synthetic/`)"):]
    section = " ".join(section[:section.index("\n### ")].split())
    for key, value in preset.items():
        flag = (f"--{key} {value}" if not isinstance(value, bool) else
                f"--{key}" if value else f"--no-{key}")
        if key != "out":
            assert flag in section, f"README does not state {flag}"
    runs = load_results(RESULTS / "synthetic")
    assert sorted(runs) == sorted(f"{k}-seed{s}" for k in preset["runs"].split(",")
                                  for s in preset["seeds"].split(","))
    for name, metrics in runs.items():
        args = metrics["args"]
        assert ",".join(args["games"]) == preset["games"]
        assert args["steps_per_game"] == preset["steps_per_game"]
        assert (args["ppo"]["gamma"], args["ppo"]["num_steps"], args["ppo"]["learning_rate"],
                args["ppo"]["anneal_lr"]) == (preset["gamma"], preset["num_steps"],
                                              preset["learning_rate"], preset["anneal_lr"])
        assert (args["eval"]["episodes"], args["eval"]["max_steps"]) == (
            preset["eval_episodes"], preset["eval_max_steps"])
        for key in ("num_experts", "expert_dim", "expert_hidden_dim", "hbm_capacity",
                    "dram_capacity", "context_len"):
            assert args[key] == preset[key], (name, key)
        kind = name.rsplit("-seed", 1)[0]
        assert all(args[k] == v for k, v in RUN_KINDS[kind].items()), name


@pytest.mark.parametrize("experiment", ["synthetic", "cpu-demo", "atari", "atari2"])
def test_the_tables_and_verdict_in_readme_are_what_the_summary_gives(experiment):
    """README shows ``experiment``'s retention tables and verdict as ``experiment`` prints them
    from the committed summary (which test_summary_is_what_its_runs_give checks against the
    runs), so no figure there is typed by hand."""
    summary = json.loads((RESULTS / experiment / "summary.json").read_text())
    readme = readme_text()
    assert format_summary(summary) in readme, f"README's {experiment} tables differ from its " \
        "summary: paste the output of its command"
    assert format_verdict(summary) in readme, f"README's {experiment} verdict differs"
    if experiment == "atari":
        assert format_forgetting_table(summary) in readme, "README's forgetting table differs"


def test_the_routing_table_in_readme_is_what_the_runs_give():
    """README's table of ``results/routing`` is ``format_cache_table`` of the committed runs,
    every one of them traced."""
    runs = load_results(RESULTS / "routing")
    assert runs and all("belady" in m and "lru" in m for m in runs.values())
    table = format_cache_table(cache_table(runs))
    assert table in readme_text(), \
        "README's routing table differs from the runs: paste format_cache_table's output"


def test_cohort_routing_meets_the_cache_targets_the_readme_states():
    """README: cohort routing's rollout hit rate is Belady's (within 2 points) and its bytes per
    update are within 1.2 times Belady's on the same traces; at training's game switches the
    planner's prediction is all used and covers all that is used, at the evaluation's switches
    precision is lower and coverage whole; no kind's final score differs from token's beyond
    the paired noise."""
    table = cache_table(load_results(RESULTS / "routing"))
    cohort = table["cohort"]
    assert cohort["cache_rollout_hit_rate"] >= 0.95
    assert cohort["cache_rollout_hit_rate"] >= cohort["belady_rollout_hit_rate"] - 0.02
    assert cohort["cache_bytes_per_update"] <= 1.2 * cohort["belady_bytes_per_update"]
    assert cohort["rollout_switch_precision"] == cohort["rollout_switch_coverage"] == 1.0
    assert cohort["eval_switch_precision"] < 1.0 and cohort["eval_switch_coverage"] == 1.0
    for kind, row in table.items():
        if kind != "token":
            assert abs(row["score_vs_token"]) <= row["score_vs_token_noise"], kind


@pytest.mark.parametrize("name", ["atari", "atari2"])
def test_the_atari_presets_play_games_the_pilot_or_the_learning_check_found_learned(name):
    """README's pilot lines are the committed runs' verdicts; every game of the Atari presets
    was learned beyond the noise in the pilot, at the preset's budget and evaluation, except
    Breakout, whose evidence is the learning check."""
    from ooc_moe.__main__ import PRESETS

    preset = PRESETS[name]
    readme = readme_text()
    learned = set()
    for path in sorted((RESULTS / "atari-pilot").glob("*/summary.json")):
        summary = json.loads(path.read_text())
        assert format_verdict(summary) in readme, path.parent.name
        args = load_results(path.parent)["cnn-seed1"]["args"]
        assert args["steps_per_game"] == preset["steps_per_game"]
        assert (args["eval"]["episodes"], args["eval"]["max_steps"]) == (
            preset["eval_episodes"], preset["eval_max_steps"])
        s = summary["cnn"]
        game = s["games"][0]
        assert (f"{game}: untrained {s['initial'][0]:.1f}; after {game} "
                f"{s['retention'][0][0]:.1f}; rise in own stage {s['rise'][0]:.1f}; noise (95%) "
                f"{s['rise_noise'][0]:.1f}; SPS {s['sps']:.0f} {s['seconds'] / 60:.1f} "
                "min/run") in readme, game
        if s["rise"][0] > s["rise_noise"][0]:
            learned.add(game)
    assert set(preset["games"].split(",")) <= learned | {"breakout"}


def test_freeway_is_all_or_nothing_as_notebook_05_says():
    """Notebook 05's conclusion: a run's Freeway score after its own stage is either near the
    pilot's or exactly 0; a run at 0 scored in at most one training episode of the stage, a
    run that learned it in most of them."""
    pilot = load_results(RESULTS / "atari-pilot" / "freeway")["cnn-seed1"]["retention"][-1][0]
    for name, run in load_results(RESULTS / "atari").items():
        stage = run["games"].index("freeway")
        own = run["retention"][stage][stage]
        assert own == 0.0 or own >= 0.75 * pilot, (name, own, pilot)
        returns = [r for h in run["history"] if h["game"] == "freeway"
                   for r in h["charts/episodic_returns"]]
        scored = sum(r > 0 for r in returns)
        assert returns and (scored <= 1 if own == 0.0 else scored > len(returns) / 2), \
            (name, own, scored, len(returns))


def test_freeway_in_the_atari_runs_is_what_readme_says():
    """README on results/atari: Freeway learned (own-stage score above 0) by the cnn in one
    seed, dense in none, token and cohort in two each; at the end the cnn's and one cohort run
    had lost it all, the other MoE runs still scored; no kind forgot a learned game beyond the
    noise; the twelve runs took the core hours README states."""
    runs = load_results(RESULTS / "atari")
    learned, kept = {}, {}
    for name, run in runs.items():
        stage = run["games"].index("freeway")
        if run["retention"][stage][stage] > 0:
            kind = run_kind(name)
            learned[kind] = learned.get(kind, 0) + 1
            kept.setdefault(kind, []).append(run["retention"][-1][stage] > 0)
    assert learned == {"cnn": 1, "token": 2, "cohort": 2}
    assert {kind: sorted(v) for kind, v in kept.items()} == {
        "cnn": [False], "token": [True, True], "cohort": [False, True]}
    verdict = format_verdict(json.loads((RESULTS / "atari" / "summary.json").read_text()))
    assert verdict.count("forgotten beyond noise by the end: none") == 4
    readme = readme_text()
    stated = int(re.search(r"The twelve runs took (\d+) hours of one core", readme).group(1))
    assert stated == round(sum(m["seconds"] for m in runs.values()) / 3600)


def test_readme_states_the_synthetic_runs_core_minutes():
    """The core minutes README gives for ``results/synthetic`` are the sum of the runs' own
    ``seconds``."""
    readme = readme_text()
    stated = int(re.search(r"The runs took (\d+) minutes of one core", readme).group(1))
    runs = load_results(RESULTS / "synthetic")
    assert stated == round(sum(m["seconds"] for m in runs.values()) / 60)


def test_the_bench_train_tables_in_readme_are_what_the_json_files_hold():
    """README's `bench train` rows are the committed figures, rounded as printed there."""
    readme = readme_text()

    def cells(train: dict) -> str:
        sps, ratios = {k: a["sps"] for k, a in train["agents"].items()}, train["ratios"]
        return (f"{sps['cnn']:.1f} | {sps['dense']:.1f} | {sps['moe']:.1f} | "
                f"{ratios['moe/dense']:.2f} | {ratios['dense/cnn']:.2f} |")

    main = json.loads((RESULTS / "bench-train" / "bench-train.json").read_text())["train"]
    sps = {k: a["sps"] for k, a in main["agents"].items()}
    assert (f"| {main['env']['sps']:.0f} | {sps['cnn']:.0f} | {sps['dense']:.0f} | "
            f"{sps['moe']:.0f} ({main['agents']['moe']['hit_rate']:.1%}) | "
            f"{main['ratios']['moe/dense']:.2f} | {main['ratios']['dense/cnn']:.2f} |") in readme
    assert main["config"]["older_tokens"] == PPOArgs().older_tokens and main["config"][
        "newest_only"]                                      # the package's defaults
    assert main["ratios"]["moe/dense"] >= 0.8 and main["ratios"]["dense/cnn"] >= 1.0  # issue 11
    cnn = []
    for tokens in ("fresh", "recycled"):
        for block in ("every", "newest"):
            train = json.loads((RESULTS / "bench-train" / "defaults" / f"{tokens}-{block}.json")
                               .read_text())["train"]
            assert (train["config"]["older_tokens"], train["config"]["newest_only"]) == (
                tokens, block == "newest")
            label = (f"| {tokens}{' (the default)' if tokens == 'recycled' else ''} | "
                     f"{'newest position (the default)' if block == 'newest' else 'every position'}"
                     " | ")
            assert label + cells(train) in readme, (tokens, block)
            assert (train["ratios"]["dense/cnn"] > 1) == (tokens == "recycled")   # the prose
            cnn.append(train["agents"]["cnn"]["sps"])
    flat = readme_text(flat=True)
    assert f"runs between {min(cnn):.0f} and {max(cnn):.0f} SPS here" in flat


def test_readme_lists_the_second_atari_series_runs_and_they_are_all_of_its_preset():
    from ooc_moe.__main__ import PRESETS

    preset = PRESETS["atari2"]
    readme = readme_text(flat=True)
    listed = re.search(r"All twelve are in: ([a-z0-9, -]+)\.", readme).group(1)
    runs = sorted(load_results(RESULTS / "atari2"))
    assert listed.split(", ") == runs
    assert runs == sorted(f"{kind}-seed{seed}" for kind in preset["runs"].split(",")
                          for seed in preset["seeds"].split(","))


def test_the_second_series_prose_in_readme_is_what_its_verdict_says():
    """README: both anchors learn every game in its own stage; the cnn forgets Kung-Fu Master
    beyond the noise, dense both earlier games; paired by seed they do not differ."""
    verdict = format_verdict(json.loads((RESULTS / "atari2" / "summary.json").read_text()))
    text = readme_text(flat=True)
    assert "both anchors learn every game beyond the noise in its own stage" in text
    for kind, forgotten in (("cnn", "kung_fu_master"), ("dense", "road_runner, kung_fu_master")):
        assert (f"{kind}: learned beyond noise during its own stage: road_runner, "
                f"kung_fu_master, seaquest; of those, forgotten beyond noise by the end: "
                f"{forgotten}") in verdict
    assert "road_runner no different" in verdict and "kung_fu_master no different" in verdict
    assert "the cnn's forgetting does not differ from the dense agent's beyond the noise" in text


def test_the_cohort_prose_of_the_second_series_is_what_its_runs_give():
    """README: cohort learns Kung-Fu Master and Seaquest beyond the noise, not Road Runner (one
    seed at 0 after its stage, the others learned it); it forgets nothing beyond the noise, and
    its Kung-Fu Master forgetting is dense's (no different, about the same on average); its
    experts are the game's own and HBM served nearly every access."""
    summary = json.loads((RESULTS / "atari2" / "summary.json").read_text())
    assert ("cohort: learned beyond noise during its own stage: kung_fu_master, seaquest; of "
            "those, forgotten beyond noise by the end: none; game-expert NMI 1.00; forgetting "
            "against dense, paired over seeds 1,2,3, on the games both learned: kung_fu_master "
            "no different") in format_verdict(summary)
    runs = load_results(RESULTS / "atari2")
    after_road_runner = sorted(m["retention"][0][0] for name, m in runs.items()
                               if run_kind(name) == "cohort")
    cohort, dense = summary["cohort"], summary["dense"]
    assert after_road_runner[0] == 0 and after_road_runner[1] > 10 * cohort["initial"][0]
    assert abs(cohort["vs_dense"]["forgetting_difference"][1]) < 0.1 * dense["forgetting"][1]
    assert cohort["mutual_information"] == 1.0 and cohort["hit_rate"] > 0.999
    text = readme_text(flat=True)
    for claim in ("one of its seeds scored 0 after the Road Runner stage",
                  "the two lose about the same",
                  "per-game experts did not make the agent forget less than a dense one"):
        assert claim in text, claim


def test_the_token_prose_of_the_second_series_is_what_its_runs_give():
    """README: token learns only Seaquest beyond the noise (seed 2 at 0 after Road Runner, as
    cohort's; Kung-Fu Master raised about tenfold by every seed, its mean rise inside the
    noise); it loses less of Kung-Fu Master than dense on average, neither beyond the noise;
    NMI about a half, about 13 experts per game, more HBM misses and bytes than cohort."""
    summary = json.loads((RESULTS / "atari2" / "summary.json").read_text())
    assert ("token: learned beyond noise during its own stage: seaquest; of those, forgotten "
            "beyond noise by the end: none") in format_verdict(summary)
    token, dense, cohort = summary["token"], summary["dense"], summary["cohort"]
    runs = load_results(RESULTS / "atari2")
    assert runs["token-seed2"]["retention"][0][0] == runs["cohort-seed2"]["retention"][0][0] == 0
    for name in ("token-seed1", "token-seed2", "token-seed3"):
        m = runs[name]
        assert 7 < m["retention"][1][1] / m["initial"][1] < 20, name   # about tenfold
    assert 0 < token["rise"][1] < token["rise_noise"][1]
    assert token["forgetting"][1] < dense["forgetting"][1] and token["rise"][1] < dense["rise"][1]
    difference = token["vs_dense"]["forgetting_difference"][1]
    assert abs(difference) < token["vs_dense"]["forgetting_difference_noise"][1]
    assert 0.4 < token["mutual_information"] < 0.6
    assert all(12.5 <= e < 13.5 for e in token["experts_per_game"])
    assert runs["token-seed1"]["args"]["num_experts"] == 32
    moved = {kind: sum(summary[kind]["bytes_moved"].values()) for kind in ("token", "cohort")}
    assert token["hit_rate"] < cohort["hit_rate"] and moved["token"] > 1000 * moved["cohort"]
    text = readme_text(flat=True)
    for claim in ("With `token` routing the MoE agent learns only Seaquest beyond the noise",
                  "Its seed 2 scored 0 after the Road Runner stage, as `cohort`'s seed 2 did",
                  "every seed raised Kung-Fu Master about tenfold in its stage",
                  "it loses less of Kung-Fu Master on average, but it had learned less of it",
                  "NMI about a half, each game using about 13 of the 32 experts in a layer",
                  "the answer is negative: per-game experts did not make the agent forget less",
                  "For a learned router it gives no answer"):
        assert claim in text, claim


def test_each_learning_table_in_readme_is_what_its_command_prints():
    """Every ``python -m ooc_moe learning DIR... --at STEP`` in README's code blocks is followed
    by the table that command prints over the committed runs (globs expanded as a shell does)."""
    readme = readme_text()
    commands = re.findall(r"^python -m ooc_moe learning ((?:[^\n]|\\\n)+?) --at (\d+)$",
                          readme, flags=re.M)
    assert len(commands) >= 4
    for dirs, at in commands:
        paths = [p for pattern in dirs.replace("\\\n", " ").split()
                 for p in sorted(RESULTS.parent.glob(pattern))]
        runs = {p.name: json.loads((p / "metrics.json").read_text()) for p in paths
                if (p / "metrics.json").is_file()}
        table = format_learning_table(learning_table(runs, int(at)), int(at))
        assert table in readme, (dirs, at)


def test_readme_distributed_figures_are_the_committed_ones():
    """README's paragraph on what scales: the layer bench and the whole-agent runs."""
    text = readme_text(flat=True)
    two = json.loads((RESULTS / "bench-dist" / "bench-dist.json").read_text())["dist"]["runs"]["2"]
    assert (f"2 gloo ranks train it {two['speedup']:.2f} times as fast as one, the exchanges "
            f"take {two['exchange_share']:.0%} of a 2-rank step and send "
            f"{two['bytes_per_step']['between_ranks'] / 1e6:.1f} MB between the ranks") in text
    sps = {run: json.loads((RESULTS / "dist-atari" / run / "metrics.json").read_text())["sps"]
           for run in ("dense-two", "dense-one", "two-ranks", "one-rank")}
    assert (f"runs at {sps['dense-two']:.0f} steps/s on 2 ranks against {sps['dense-one']:.0f} "
            f"on one ({sps['dense-two'] / sps['dense-one']:.1f}x)") in text
    assert (f"at {sps['two-ranks']:.0f} against {sps['one-rank']:.0f} "
            f"({sps['two-ranks'] / sps['one-rank']:.2f}x)") in text


def test_the_learning_check_table_in_readme_is_what_its_runs_give():
    """README's first learning-check table: training returns over the first and last 100
    episodes, the evaluation before and after, and the minutes of each seed-1 run."""
    readme = readme_text()
    for run, label in (("moe-seed1", "MoE (`token`)"), ("dense-seed1", "dense")):
        m = json.loads((RESULTS / "breakout-learning" / run / "metrics.json").read_text())
        returns = [r for h in m["history"] for r in h["charts/episodic_returns"]]
        assert (f"| {label} | {np.mean(returns[:100]):.1f} | {np.mean(returns[-100:]):.1f} | "
                f"{m['initial'][0]:.1f} -> {m['retention'][0][0]:.1f} | "
                f"{m['seconds'] / 60:.0f} min |") in readme, run


def test_readme_states_what_the_cap_is_worth_on_pong():
    """The cpu-demo paragraph: random play under the 600-step cap (the routing runs, the same
    evaluation) against the table's whole-game random score, in normalised points."""

    text = readme_text(flat=True)
    run = load_results(RESULTS / "routing")["token-seed1"]
    demo = next(iter(load_results(RESULTS / "cpu-demo").values()))
    assert run["args"]["eval"] == demo["args"]["eval"] and run["games"][0] == "pong"
    capped, (random, human) = run["random_scores"][0], HUMAN_SCORES["pong"]
    assert (f"random play on Pong scores {capped:.1f} under this evaluation") in text
    assert (f"against the table's {random:.1f}, which alone is worth "
            f"{100 * (capped - random) / (human - random):.0f} normalised points") in text


def test_readme_learning_check_prose_is_what_its_runs_give():
    """The MoE learning-check run's hit rate (mean over updates, and after 100,000 steps), and
    the three-seed runs meeting issue 11's bar of 0.8x the cnn on the last 100 episodes."""
    text = readme_text(flat=True)
    moe = load_results(RESULTS / "breakout-learning")["moe-seed1"]
    later = [h["store/hit_rate"] for h in moe["history"] if h["global_step"] > 100_000]
    assert (f"HBM served {np.mean(moe['hit_rate']):.0%} of the MoE run's expert accesses "
            f"({np.mean(later):.0%} after the first 100,000 steps)") in text
    last = learning_table({**load_results(RESULTS / "breakout-cnn"),
                           **load_results(RESULTS / "breakout-learning")}, 409_600)
    measure = {kind: last[kind]["return_last"]
               for kind in ("cnn", "dense-cleanrl", "moe-cleanrl")}
    assert "both window agents meet issue 11's bar of 0.8x CleanRL's agent" in text
    assert measure["dense-cleanrl"] > measure["cnn"] > measure["moe-cleanrl"] >= 0.8 * \
        measure["cnn"], measure


def last_100(name: str, run: dict) -> float:
    """A Breakout run's mean return over its last 100 training episodes at 409,600 steps (the
    learning tables' measure)."""
    return learning_table({name: run}, 409_600)[run_kind(name)]["return_last"]


LEARNING_COLUMNS = ("explained_variance", "entropy", "return", "return_last")


def ranges_overlap(a: dict, b: dict, key: str) -> bool:
    """Whether two kinds' seed ranges of one learning-table column overlap."""
    return a[f"{key}_min"] <= b[f"{key}_max"] and b[f"{key}_min"] <= a[f"{key}_max"]


def test_readme_compares_the_cleanrl_environment_runs_with_the_vector_env_ones():
    """The runs through CleanRL's wrappers against the cnn's on ``AtariVectorEnv``, same seed:
    the measure of the learning tables (the mean of the last 100 training episodes)."""
    text = readme_text(flat=True)
    cleanrl = load_results(RESULTS / "breakout-cleanrlenv")
    vector = load_results(RESULTS / "breakout-cnn")
    for name, run in cleanrl.items():
        assert run["args"]["atari_env"] == "cleanrl" and run_kind(name) == "cnn-cleanrlenv"
        seed = run["args"]["seed"]
        last = {k: last_100(k, m)
                for k, m in ((name, run), (f"cnn-seed{seed}", vector[f"cnn-seed{seed}"]))}
        assert (f"seed {seed}'s last 100 training episodes average {last[name]:.2f}, against "
                f"{last[f'cnn-seed{seed}']:.2f} for the same seed on `AtariVectorEnv`") in text


def test_a_constant_learning_rate_lifts_every_cnn_seed_as_readme_says():
    """README: with ``--no-anneal_lr`` every seed ends higher than the same seed annealed, and
    the mean over seeds of the last 100 training episodes passes issue 11's 10."""
    constant = {name: run for name, run in load_results(RESULTS / "breakout-lr").items()
                if run_kind(name) == "cnn-constlr"}
    annealed = load_results(RESULTS / "breakout-cnn")
    assert sorted(constant) == [f"cnn-constlr-seed{s}" for s in (1, 2, 3)]
    last = []
    for name, run in constant.items():
        assert run["args"]["ppo"]["anneal_lr"] is False and run["args"]["baseline"] == "cnn"
        seed = run["args"]["seed"]
        pair = {k: last_100(k, m)
                for k, m in ((name, run), (f"cnn-seed{seed}", annealed[f"cnn-seed{seed}"]))}
        assert pair[name] > pair[f"cnn-seed{seed}"], seed
        last.append(pair[name])
    assert np.mean(last) >= 10
    assert "every seed of the cnn ends higher than the same seed annealed, and the mean " \
           "over seeds passes issue 11's 10" in readme_text(flat=True)


def test_the_window_agents_at_a_constant_rate_are_what_readme_says():
    """README: with ``--no-anneal_lr`` every dense seed ends higher than the same seed
    annealed and two of the MoE's three (seed 2 most); both window agents reach 0.8x the
    constant-rate cnn, every kind averages >= 10, dense ends highest, MoE level with the cnn,
    and the three kinds' ranges overlap."""
    constant = load_results(RESULTS / "breakout-lr")
    annealed = load_results(RESULTS / "breakout-learning")
    gains = {}
    for kind in ("dense", "moe"):
        for seed in (1, 2, 3):
            name, before = f"{kind}-constlr-seed{seed}", f"{kind}-cleanrl-seed{seed}"
            run = constant[name]
            assert run["args"]["ppo"]["anneal_lr"] is False and run["args"]["baseline"] == kind
            assert annealed[before]["args"]["ppo"]["anneal_lr"] is True
            gains[kind, seed] = last_100(name, run) - last_100(before, annealed[before])
    assert all(gains["dense", seed] > 0 for seed in (1, 2, 3)), gains
    moe = {seed: gains["moe", seed] for seed in (1, 2, 3)}
    assert sum(g > 0 for g in moe.values()) == 2 and max(moe, key=moe.get) == 2, moe
    table = learning_table(constant, 409_600)
    last = {kind: table[f"{kind}-constlr"] for kind in ("cnn", "dense", "moe")}
    means = {kind: entry["return_last"] for kind, entry in last.items()}
    assert min(means.values()) >= 10 and max(means, key=means.get) == "dense", means
    assert min(means["dense"], means["moe"]) >= 0.8 * means["cnn"]
    assert abs(means["moe"] / means["cnn"] - 1) < 0.05, means
    assert max(e["return_last_min"] for e in last.values()) <= \
        min(e["return_last_max"] for e in last.values())
    text = readme_text(flat=True)
    for claim in ("every dense seed ends higher than the same seed annealed, and two of the "
                  "MoE's three (its seed 2, which had barely left random play, most of all)",
                  "both window agents pass issue 11's bar of 0.8x the cnn at the same rate, and "
                  "all three kinds average 10 or more",
                  "the dense agent ends highest, the MoE agent level with the cnn, and the "
                  "ranges of all three overlap"):
        assert claim in text, claim


def test_recycled_tokens_at_a_constant_rate_are_what_readme_says():
    """README: at the constant rate the dense agent with recycled older tokens averages 1.17x
    the cnn (1.13x fresh), every seed inside the fresh range; the MoE agent 0.71x, its seed 2
    near random play with a critic explaining nearly everything, as the annealed fresh seed 2,
    its seeds 1 and 3 inside the fresh range; so the default stays fresh."""
    constant = load_results(RESULTS / "breakout-lr")
    recycled = load_results(RESULTS / "breakout-recycled-constlr")
    assert sorted(recycled) == [f"{kind}-recycled-constlr-seed{seed}"
                                for kind in ("dense", "moe") for seed in (1, 2, 3)]
    for name, run in recycled.items():
        ppo = run["args"]["ppo"]
        assert ppo["older_tokens"] == "recycled" and ppo["anneal_lr"] is False, name
        assert run["args"]["baseline"] == name.split("-")[0]
    table = learning_table({**constant, **recycled}, 409_600)
    cnn = table["cnn-constlr"]["return_last"]
    ratio = {kind: table[kind]["return_last"] / cnn for kind in table}
    assert ratio["dense-recycled-constlr"] >= 0.8 > ratio["moe-recycled-constlr"]
    assert min(ratio["dense-constlr"], ratio["moe-constlr"]) >= 0.8
    fresh = {kind: table[f"{kind}-constlr"] for kind in ("dense", "moe")}
    seeds = {(kind, seed): last_100(f"{kind}-recycled-constlr-seed{seed}",
                                    recycled[f"{kind}-recycled-constlr-seed{seed}"])
             for kind in ("dense", "moe") for seed in (1, 2, 3)}
    inside = {key: fresh[key[0]]["return_last_min"] <= last <= fresh[key[0]]["return_last_max"]
              for key, last in seeds.items()}
    assert inside == {key: key != ("moe", 2) for key in seeds}, seeds
    collapsed = learning_table({"moe-recycled-constlr-seed2":
                                recycled["moe-recycled-constlr-seed2"]}, 409_600)
    annealed = learning_table({"moe-cleanrl-seed2": load_results(
        RESULTS / "breakout-learning")["moe-cleanrl-seed2"]}, 409_600)
    before, now = annealed["moe-cleanrl"], collapsed["moe-recycled-constlr"]
    random = HUMAN_SCORES["breakout"][0]                                # random play
    assert max(now["return_last"], before["return_last"]) < 2 * random
    text = readme_text(flat=True)
    for claim in (f"the dense agent's last 100 episodes average "
                  f"{ratio['dense-recycled-constlr']:.2f}x the cnn's "
                  f"({ratio['dense-constlr']:.2f}x with fresh tokens), every seed inside the "
                  "fresh runs' range",
                  f"The MoE agent's last 100 episodes average "
                  f"{ratio['moe-recycled-constlr']:.2f}x the cnn's, under the bar: its seed 2 "
                  f"ended near random play ({now['return_last']:.2f}) with a critic explaining "
                  f"nearly all of the returns' variance ({now['explained_variance']:.2f})",
                  f"(`moe-cleanrl`, {before['return_last']:.2f} and "
                  f"{before['explained_variance']:.2f}), while its seeds 1 and 3 end inside the "
                  "fresh runs' range",
                  "so the default stays `fresh` at this point"):
        assert claim in text, claim


def test_the_defaults_since_2026_12_06_are_what_readme_says():
    """README: the MoE agent with its last block on the newest position and recycled tokens
    averages over 0.8x the constant-rate cnn, its seed 2 no longer near random play, so the
    defaults are recycled tokens and ``newest_only``; under them the cnn passes 10 and both
    window agents 0.8x."""
    from ooc_moe.agent import MoERLAgentConfig
    from ooc_moe.train import TrainArgs

    assert PPOArgs().older_tokens == "recycled" and PPOArgs().anneal_lr is False
    assert MoERLAgentConfig().newest_only and TrainArgs(games=("breakout",)).newest_only
    newest = {name: run for name, run in load_results(RESULTS / "breakout-newest").items()
              if name.startswith("moe-newest-recycled-constlr")}
    assert sorted(newest) == [f"moe-newest-recycled-constlr-seed{s}" for s in (1, 2, 3)]
    for name, run in newest.items():
        args = run["args"]
        assert (args["baseline"], args["newest_only"], args["ppo"]["older_tokens"],
                args["ppo"]["anneal_lr"]) == ("moe", True, "recycled", False), name
    runs = {**load_results(RESULTS / "breakout-lr"),
            **load_results(RESULTS / "breakout-recycled-constlr"), **newest}
    table = learning_table(runs, 409_600)
    cnn = table["cnn-constlr"]["return_last"]
    moe, dense = table["moe-newest-recycled-constlr"], table["dense-recycled-constlr"]
    seed2 = last_100("moe-newest-recycled-constlr-seed2",
                     newest["moe-newest-recycled-constlr-seed2"])
    assert cnn >= 10 and min(moe["return_last"], dense["return_last"]) >= 0.8 * cnn
    assert seed2 > 2 * HUMAN_SCORES["breakout"][0]                     # not near random play
    text = readme_text(flat=True)
    for claim in (f"the MoE agent's last 100 episodes average {moe['return_last'] / cnn:.2f}x "
                  f"the cnn's with recycled tokens, every seed between "
                  f"{moe['return_last_min']:.2f} and {moe['return_last_max']:.2f}",
                  f"ends here at {seed2:.2f}",
                  f"under them CleanRL's agent averages {cnn:.2f}, the dense agent "
                  f"{dense['return_last'] / cnn:.2f}x and the MoE agent "
                  f"{moe['return_last'] / cnn:.2f}x the cnn's"):
        assert claim in text, claim


def test_the_layer_norm_ablation_is_what_readme_says():
    """README: without the token LayerNorm every column's range overlaps the default's; without
    the final one the explained variance and both returns lie above the default's range, while
    every kind still scores about random play (under 1.7 over its last 100 episodes)."""

    kinds = json.loads((RESULTS / "breakout-norms" / "learning.json").read_text())["kinds"]
    default = json.loads((RESULTS / "breakout-context" / "learning.json").read_text()
                         )["kinds"]["dense-ctx4"]
    token, final = kinds["dense-no-token-norm"], kinds["dense-no-final-norm"]
    assert default["seeds"] == token["seeds"] == final["seeds"] == [1, 2, 3]
    for key in LEARNING_COLUMNS:
        assert ranges_overlap(token, default, key), key
    for key in ("explained_variance", "return", "return_last"):
        assert final[f"{key}_min"] > default[f"{key}_max"], key
    random = HUMAN_SCORES["breakout"][0]
    assert all(kind["return_last"] < random for kind in (default, token, final))
    runs = [json.loads(p.read_text()) for p in (RESULTS / "breakout-norms").glob("*/metrics.json")]
    assert len(runs) == 6
    for run in runs:
        assert run["args"]["token_norm"] != run["args"]["final_norm"]
    text = readme_text(flat=True)
    for claim in ("Without the token LayerNorm every column's range overlaps the default's",
                  "Without the final LayerNorm the critic explains more of the returns' "
                  "variance and the returns are higher, each outside the default's range",
                  f"about random play's score on Breakout ({random} in the table"):
        assert claim in text, claim


def test_the_auxiliary_loss_ablation_overlaps_in_every_column_as_readme_says():
    """README: the MoE agent with and without its load-balancing loss, three seeds each at
    20,480 steps, overlaps in every column of the learning table."""
    kinds = json.loads((RESULTS / "breakout-aux" / "learning.json").read_text())["kinds"]
    with_loss, without = kinds["moe-aux0.01"], kinds["moe-aux0"]
    assert with_loss["seeds"] == without["seeds"] == [1, 2, 3]
    for key in LEARNING_COLUMNS:
        assert ranges_overlap(with_loss, without, key), key
    coefs = {json.loads(p.read_text())["args"]["load_balance_coef"]
             for p in (RESULTS / "breakout-aux").glob("*/metrics.json")}
    assert coefs == {0.0, 0.01}
    assert "Every column's ranges overlap: at this budget the balancing loss neither helps " \
           "nor holds back" in readme_text(flat=True)


def test_road_runner_in_the_second_series_is_what_readme_says():
    """The cnn's seeds kept very different shares of their Road Runner score by the end (one
    nothing, one most of it)."""
    runs = load_results(RESULTS / "atari2")
    kept = [m["retention"][-1][0] / m["retention"][1][0] for name, m in runs.items()
            if run_kind(name) == "cnn"]
    assert len(kept) == 3 and min(kept) < 0.1 and max(kept) > 0.5, kept


# README's tables of `bench store`, `bench layer` and `bench sim`, rebuilt from their JSON.
STORE_LINKS = {"file -> DRAM (page cache)": "file -> DRAM, page cache",
               "file -> DRAM (cold)": "file -> DRAM, cold (page cache dropped with "
                                      "`posix_fadvise`)",
               "DRAM -> HBM": "DRAM -> HBM (on the CPU: a memcpy)"}
LAYER_RUNS = {"all resident": "tiered, all {hbm} experts in HBM",
              "working set fits": "tiered, working set fits (HBM {hbm})",
              "2x, prefetch": "working set 2x HBM ({hbm}), prefetch",
              "2x, demand": "working set 2x HBM ({hbm}), demand",
              "8x, prefetch": "working set 8x HBM ({hbm}), prefetch",
              "8x, demand": "working set 8x HBM ({hbm}), demand"}


def bench_rows(bench: str, figures: dict) -> list[str]:
    """The README rows (for ``sim`` a sentence) that ``figures``, one bench's JSON, gives."""
    if bench == "store":
        s = figures["store"]
        links = {link["link"]: link for link in s["links"]}
        rows = [f"| {label} | {links[key]['bytes'] / links[key]['store_s'] / 1e9:.2f} GB/s | "
                f"{links[key]['bytes'] / links[key]['raw_s'] / 1e9:.2f} GB/s | "
                f"{links[key]['ratio']:.2f} |" for key, label in STORE_LINKS.items()]
        o, steps = s["overlap"], s["config"]["steps"]
        return rows + [f"| {label} | {o[key] * 1e3 / steps:.0f} | {o[key] / o['resident_s']:.2f} |"
                       for key, label in (("resident_s", "all resident"),
                                          ("prefetch_s", "prefetched one step ahead"),
                                          ("demand_s", "demand fetches only"))]
    if bench == "layer":
        s = figures["layer"]
        rows = [f"| plain PyTorch MoE, `torch.optim.Adam` | {s['plain_step_s'] * 1e3:.0f} | | "
                "1.00 | |"]
        for key, label in LAYER_RUNS.items():
            run = s["runs"][key]
            moved = sum(run["bytes_per_step"].values())
            rows.append(f"| {label.format(hbm=run['hbm'])} | {run['step_s'] * 1e3:.0f} | "
                        f"{run['ratio_to_resident']:.2f} | {run['ratio_to_plain']:.2f} | "
                        f"{f'{moved / 1e9:.1f} GB' if moved else '0'} |")
        return rows
    rate = {p: r["accesses_per_s"] / 1e6 for p, r in figures["sim"]["policies"].items()}
    return [f"LRU {rate['lru']:.2f} M accesses/s (goal 1 M/s), Belady {rate['belady']:.2f} M/s, "
            f"LFU {rate['lfu']:.2f} M/s"]


@pytest.mark.parametrize("bench", ["store", "layer", "sim"])
def test_readme_bench_tables_are_what_the_committed_json_gives(bench):
    text = readme_text(flat=True)
    figures = json.loads((RESULTS / f"bench-{bench}" / f"bench-{bench}.json").read_text())
    assert figures["command"] == f"python -m ooc_moe bench {bench} --json results/bench-{bench}/" \
                                 f"bench-{bench}.json"
    assert f"`{figures['command']}` ({figures['date'][:10]}, " \
           f"{figures['machine']['torch_threads']} torch thread" in text
    for row in bench_rows(bench, figures):
        assert " ".join(row.split()) in text, row
    if bench == "layer":      # README: on the CPU the prefetching layer takes as long as demand
        runs = figures["layer"]["runs"]
        for size in ("2x", "8x"):
            ratio = runs[f"{size}, prefetch"]["step_s"] / runs[f"{size}, demand"]["step_s"]
            assert abs(ratio - 1) < 0.05, (size, ratio)


def test_the_context_length_ranges_overlap_in_every_column_as_readme_says():
    """README: windows of 1 and 4 frames, three seeds each at 20,480 steps, overlap in every
    column of the learning table."""
    kinds = json.loads((RESULTS / "breakout-context" / "learning.json").read_text())["kinds"]
    one, four = kinds["dense-ctx1"], kinds["dense-ctx4"]
    assert one["seeds"] == four["seeds"] == [1, 2, 3]
    for key in LEARNING_COLUMNS:
        assert ranges_overlap(one, four, key), key
    assert "The ranges of the two overlap in every column" in readme_text(flat=True)
