"""The sequential protocol: scores, evaluation, checkpoints and resume, the experiment runner."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import matplotlib
import numpy as np
import pytest
import torch
from gymnasium.spaces import Discrete

matplotlib.use("Agg")

from ooc_moe.envs import normalize_game_name  # noqa: E402
from ooc_moe.scores import (HUMAN_SCORES, aggregate_scores, average_final_score,  # noqa: E402
                            forgetting, human_normalized)
from ooc_moe.train import (EvalArgs, PPOArgs, PPOTrainer, TrainArgs, args_from_json,  # noqa: E402
                           build_agent, early_learning, evaluate, evaluate_random,
                           find_checkpoint, format_forgetting_table, format_learning_table,
                           format_summary, format_verdict, half_width_95, learning_table,
                           load_checkpoint, make_env, paired_changes, run_experiment,
                           save_checkpoint, summarize, train)
from ooc_moe.train import RUN_KINDS, cache_table, format_cache_table, load_results  # noqa: E402
from ooc_moe.train import run as run_module  # noqa: E402
from ooc_moe.viz import (plot_forgetting, plot_game_expert_usage,  # noqa: E402
                         plot_game_over_stages, plot_retention, sequential_results_widget,
                         show_sequential_run)

TINY = dict(games=("synthetic-0", "synthetic-1"), steps_per_game=64, device="cpu",
            num_experts=8, expert_dim=16, expert_hidden_dim=32, num_heads=2, context_len=2,
            hbm_capacity=4, dram_capacity=8,
            ppo=PPOArgs(num_envs=4, num_steps=16, num_minibatches=2, update_epochs=2),
            eval=EvalArgs(episodes=2, max_steps=12))


def tiny(**kw) -> TrainArgs:
    return replace(TrainArgs(**TINY), **kw)


# -- scores ----------------------------------------------------------------------------------
def test_forgetting_is_own_stage_minus_last_row():
    r = [[5.0, 1.0, 0.0], [3.0, 7.0, 1.0], [2.0, 4.0, 9.0]]
    assert forgetting(r).tolist() == [5.0 - 2.0, 7.0 - 4.0, 0.0]
    with pytest.raises(ValueError, match="one stage per game"):
        forgetting([[1.0, 2.0]])


def test_human_normalized_scores_follow_the_table():
    assert human_normalized("pong", -20.7) == pytest.approx(0.0)
    assert human_normalized("pong", 14.6) == pytest.approx(100.0)
    assert human_normalized("boxing", 6.1) == pytest.approx(50.0)
    assert np.isnan(human_normalized("space-war", 3.0))                   # not in the table
    # synthetic games: random play's expected return is 0, the optimum (every step) 100
    assert human_normalized("synthetic-2", 200 / 18) == pytest.approx(0.0)
    assert human_normalized("synthetic-2", 200.0) == pytest.approx(100.0)
    assert human_normalized("synthetic-0", 50.0, random_score=10.0) == pytest.approx(
        100 * 40 / (200 - 200 / 18))
    assert all(human < random or human > random for random, human in HUMAN_SCORES.values())
    assert all(normalize_game_name(game) == game for game in HUMAN_SCORES)   # ALE's ROM ids
    # random play under the run's own protocol replaces the table's random score
    assert human_normalized("pong", -10.0, random_score=-12.0) == pytest.approx(
        100 * 2.0 / (14.6 + 20.7))
    assert average_final_score([[-10.0]], ["pong"], [-12.0]) == pytest.approx(
        100 * 2.0 / (14.6 + 20.7))


def test_an_untrained_agent_scores_about_zero_under_a_capped_evaluation():
    """Capped at 150 agent steps, Pong loses few points whatever the policy: normalised with
    the table's whole-game random score an untrained agent gains tens of points from the cap
    alone; against random play under the same cap and seeds it scores about 0."""
    args = tiny(games=("pong",), eval=EvalArgs(episodes=8, max_steps=150))
    agent = build_agent(args)
    trainer = PPOTrainer(agent, PPOArgs(num_envs=8, num_steps=8, num_minibatches=1))
    scores = {}
    for name, play in (("untrained", lambda env: evaluate(trainer, env, 0, args.eval)),
                       ("random", lambda env: evaluate_random(env, args.eval))):
        env = make_env("pong", args.eval.episodes, args.eval.seed)
        try:
            scores[name] = play(env)["score"]
        finally:
            env.close()
    assert human_normalized("pong", scores["untrained"]) > 25             # the cap's gift
    assert abs(human_normalized("pong", scores["untrained"], scores["random"])) < 10
    if agent.store is not None:
        agent.store.shutdown()
    r = [[0.0, 0.0], [-20.7, 12.1]]
    assert average_final_score(r, ["pong", "boxing"]) == pytest.approx(50.0)
    assert average_final_score(r, ["pong", "no-such-game"]) == pytest.approx(0.0)
    assert np.isnan(average_final_score(r, ["no-such-game", "nor-this"]))
    # a synthetic game: random play earns 200/18 a 200-step episode, the optimum 200
    assert average_final_score(r, ["pong", "synthetic-1"]) == pytest.approx(
        (0.0 + 100 * (12.1 - 200 / 18) / (200 - 200 / 18)) / 2)


def test_random_play_picks_among_the_actions_it_is_given():
    """All of the env's actions by default; with ``actions`` (a masked agent's legal set)
    only those, uniformly."""
    class Recorder:
        single_action_space = Discrete(18)

        def __init__(self):
            self.actions, self.t = [], 0

        def reset(self):
            return None, {}

        def step(self, action):
            self.actions.extend(action.tolist())
            self.t += 1
            done = np.full(len(action), self.t == 400)
            return None, np.zeros(len(action)), done, np.zeros(len(action), bool), {}

    args = EvalArgs(episodes=4, max_steps=500)
    for actions, expected in ((None, set(range(18))), ([0, 1, 3, 4], {0, 1, 3, 4})):
        env = Recorder()
        result = evaluate_random(env, args, actions)
        assert set(env.actions) == expected and result["steps"] == 400


def test_aggregate_scores_are_rliables_iqm_and_mean_with_repeatable_intervals():
    # 4 runs x 2 games; by hand: the IQM is the mean of the middle half of all 8 scores
    scores = np.array([[0.0, 10.0], [1.0, 20.0], [2.0, 30.0], [100.0, 40.0]])
    middle = np.sort(scores.ravel())[2:6]                      # 2, 10, 20, 30
    a = aggregate_scores(scores)
    assert a["iqm"] == pytest.approx(middle.mean())
    assert a["mean"] == pytest.approx(scores.mean())
    for key in ("iqm", "mean"):
        low, high = a[f"{key}_interval"]
        assert scores.min() <= low <= a[key] <= high <= scores.max()
    assert aggregate_scores(scores) == a                       # seeded: the same again
    with pytest.raises(ValueError, match="without nan"):
        aggregate_scores([[1.0, float("nan")]])


# -- evaluation ------------------------------------------------------------------------------
class RecordingEnv:
    """Passes calls to a synthetic env and keeps each environment's first finished
    episode's return as the env itself reports it (``info['episode_return']``)."""

    def __init__(self, env):
        self.env, self.first = env, np.full(env.num_envs, np.nan)

    def reset(self, **kw):
        return self.env.reset(**kw)

    def step(self, action):
        out = self.env.step(action)
        new = np.isnan(self.first) & ~np.isnan(out[4]["episode_return"])
        self.first[new] = out[4]["episode_return"][new]
        return out


def test_evaluate_scores_whole_episodes_and_disturbs_nothing():
    args = tiny()
    agent = build_agent(args)
    trainer = PPOTrainer(agent, args.ppo)
    windows_before = trainer.windows.tokens.clone()
    eval_args = EvalArgs(episodes=3, max_steps=500)      # synthetic episodes last 200 steps
    env = RecordingEnv(make_env("synthetic-1", 3, eval_args.seed))
    torch.manual_seed(7)
    result = evaluate(trainer, env, 1, eval_args)
    after_eval = torch.rand(1)
    torch.manual_seed(7)
    assert torch.equal(after_eval, torch.rand(1))         # the global RNG stream is untouched
    assert torch.equal(trainer.windows.tokens, windows_before)
    assert result["finished"] == 3 and result["steps"] == 200
    assert result["returns"] == pytest.approx(env.first.tolist())
    assert result["score"] == pytest.approx(env.first.mean())
    tokens = 3 * 200 * args.top_k                         # envs x steps x top_k x positions:
    assert [sum(c) for c in result["routing"]] == (       # the window's, the last layer's newest
        [tokens * args.context_len] * (args.num_layers - 1) + [tokens])
    again = evaluate(trainer, make_env("synthetic-1", 3, eval_args.seed), 1, eval_args)
    assert again["returns"] == result["returns"]           # same seeds, same episodes
    capped = evaluate(trainer, make_env("synthetic-1", 3, eval_args.seed), 1,
                      replace(eval_args, max_steps=50))
    assert capped["finished"] == 0 and capped["steps"] == 50
    assert capped["score"] <= result["score"]              # rewards are >= 0 in this game
    agent.store.shutdown()


@pytest.mark.parametrize("field, value", [("episodes", 0), ("max_steps", 2.5)])
def test_eval_args_reject_nonsense(field, value):
    with pytest.raises(ValueError, match=field):
        EvalArgs(**{field: value})


# -- checkpoints -----------------------------------------------------------------------------
def test_checkpoint_swap_never_exposes_a_partial_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path)
    save_checkpoint(tmp_path, {"n": 1})
    save_checkpoint(tmp_path, {"n": 2})
    assert load_checkpoint(tmp_path)["n"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    # killed while writing the next one: the half-written tmp is never read
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "state.pt").write_bytes(b"\0garbage")
    assert load_checkpoint(tmp_path)["n"] == 2
    # killed between the two renames: the old one is complete and found
    os.replace(tmp_path / "checkpoint", tmp_path / "checkpoint.old")
    assert find_checkpoint(tmp_path).name == "checkpoint.old"
    assert load_checkpoint(tmp_path)["n"] == 2
    save_checkpoint(tmp_path, {"n": 3})                   # and the next save cleans up
    assert load_checkpoint(tmp_path)["n"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_checkpoint_copies_the_flushed_expert_file(tmp_path):
    args = tiny(out=str(tmp_path / "run"))
    agent = build_agent(args, tmp_path / "store")
    store = agent.store
    ex = store.get_experts([3])[3]
    ex.params.fill_(0.25)
    store.mark_dirty([3])                               # dirty in HBM, not yet in the file
    save_checkpoint(tmp_path / "run", {"n": 1}, store)
    store.shutdown()
    load_checkpoint(tmp_path / "run", tmp_path / "restored")
    from ooc_moe.store import TieredExpertStore
    with TieredExpertStore.open(tmp_path / "restored", "cpu", hbm_capacity=4,
                                dram_capacity=8) as restored:
        assert torch.all(restored.read_expert(3)["w1"] == 0.25)


class Interrupt(Exception):
    pass


def train_cut_at_second_stage(args: TrainArgs, monkeypatch) -> None:
    """Train ``args`` (with ``out``) until the second stage starts, then stop as a crash
    would: the checkpoint of the stage boundary is all that remains."""
    original = run_module._Run.train_stage

    def stop_at_second_stage(self, *a):
        if self.game_index == 1:
            raise Interrupt
        return original(self, *a)

    monkeypatch.setattr(run_module._Run, "train_stage", stop_at_second_stage)
    with pytest.raises(Interrupt):
        train(args, progress=False)
    monkeypatch.setattr(run_module._Run, "train_stage", original)


@pytest.mark.parametrize("baseline", ["moe", "dense", "cnn"])
def test_resume_at_a_stage_boundary_matches_an_uninterrupted_run(tmp_path, monkeypatch,
                                                                 baseline):
    # no detector: its replay buffer is not checkpointed (the agent's math never reads it)
    args = tiny(baseline=baseline, detector=False)
    whole = train(replace(args, out=str(tmp_path / "whole")), progress=False)
    train_cut_at_second_stage(replace(args, out=str(tmp_path / "cut")), monkeypatch)
    with pytest.raises(ValueError, match="--resume"):    # a fresh start would overwrite it
        train(replace(args, out=str(tmp_path / "cut")), progress=False)
    resumed = train(replace(args, out=str(tmp_path / "cut")), progress=False, resume=True)
    assert resumed["retention"] == whole["retention"]
    assert resumed["initial"] == whole["initial"]
    key = "losses/value_loss"
    assert [h[key] for h in resumed["history"]] == [h[key] for h in whole["history"]]
    assert resumed["params"] == whole["agent"].config.estimate_params()
    for run in (whole, resumed):
        if run["agent"].store is not None:
            run["agent"].store.shutdown()


CLEANRL_TAGS = {"charts/episodic_return", "charts/episodic_length", "charts/SPS",
                "charts/learning_rate", "losses/value_loss", "losses/policy_loss",
                "losses/entropy", "losses/old_approx_kl", "losses/approx_kl", "losses/clipfrac",
                "losses/explained_variance"}


def tensorboard_scalars(run_dir, tag=None):
    """The run's TensorBoard scalars read back by TensorBoard itself: all tags, or ``tag``'s
    ``(step, value)`` events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run_dir))
    events.Reload()
    if tag is None:
        return set(events.Tags()["scalars"])
    return [(e.step, e.value) for e in events.Scalars(tag)]


@pytest.mark.parametrize("baseline", ["moe", "cnn"])
def test_tensorboard_files_hold_cleanrls_tags_and_the_store_figures(tmp_path, baseline):
    # episodes of the synthetic games last 200 steps: 13 rollouts of 16 steps finish some;
    # the MoE run anneals its learning rate, the cnn keeps the default constant rate
    ppo = replace(TINY["ppo"], anneal_lr=baseline == "moe")
    args = tiny(baseline=baseline, games=("synthetic-0",), steps_per_game=13 * 64,
                out=str(tmp_path), ppo=ppo)
    metrics = train(args, progress=False)
    tags = tensorboard_scalars(tmp_path)
    assert CLEANRL_TAGS <= tags
    assert {"losses/grad_norm", "eval/synthetic-0"} <= tags
    store_tags = {"store/hit_rate", "store/prefetch_precision", "store/bytes_dram_to_hbm",
                  "routing/mutual_information", "routing/router_entropy"}
    assert store_tags <= tags if baseline == "moe" else not tags & store_tags
    history = metrics["history"]
    assert tensorboard_scalars(tmp_path, "charts/SPS") == [
        (h["global_step"], pytest.approx(h["charts/SPS"])) for h in history]
    returns = [r for h in history for r in h["charts/episodic_returns"]]
    assert returns and [v for _, v in tensorboard_scalars(
        tmp_path, "charts/episodic_return")] == pytest.approx(returns)
    assert [s for s, _ in tensorboard_scalars(tmp_path, "eval/synthetic-0")] == [0, 13 * 64]
    lrs = [v for _, v in tensorboard_scalars(tmp_path, "charts/learning_rate")]
    if args.ppo.anneal_lr:                         # linearly to 0 over the game's 13 updates
        assert lrs == pytest.approx([args.ppo.learning_rate * (1 - i / 13) for i in range(13)])
    else:
        assert lrs == pytest.approx([args.ppo.learning_rate] * 13)
    if metrics["agent"].store is not None:
        metrics["agent"].store.shutdown()


def test_the_cache_table_averages_traced_moe_runs_over_seeds_and_leaves_out_the_rest(tmp_path):
    for name, kw in (("token-seed1", {"trace": True}), ("token-seed2", {"trace": True}),
                     ("dense-seed1", {"baseline": "dense"}), ("env-seed1", {"routing": "env"})):
        seed = int(name[-1])
        metrics = train(tiny(out=str(tmp_path / name), seed=seed, **kw), progress=False)
        if metrics["agent"].store is not None:
            metrics["agent"].store.shutdown()
    runs = load_results(tmp_path)
    table = cache_table(runs)
    assert list(table) == ["token"]                  # untraced and storeless runs left out
    row, one, two = table["token"], runs["token-seed1"], runs["token-seed2"]
    assert row["seeds"] == [1, 2]
    for key, get in (("belady_bytes_per_update", lambda m: m["belady"]["bytes_per_update"]),
                     ("lru_bytes_per_update", lambda m: m["lru"]["bytes_per_update"]),
                     ("cache_update_hit_rate",
                      lambda m: m["cache"]["phases"]["update"]["hbm_hit_rate"]),
                     ("nmi", lambda m: np.mean(m["mutual_information"])),
                     ("eval_switch_coverage",      # the planner's, graded per phase
                      lambda m: m["planner"]["switch_phases"]["eval"]["switch_coverage"])):
        assert row[key] == pytest.approx((get(one) + get(two)) / 2), key
    text = format_cache_table(table)
    assert len(text.splitlines()) == 3 and text.splitlines()[2].startswith("| token | 1,2 |")


def test_metrics_report_every_phase_and_belady_and_lru_on_the_runs_own_trace(tmp_path):
    metrics = train(tiny(out=str(tmp_path), trace=True), progress=False)
    store = metrics["agent"].store
    cache, belady = metrics["cache"]["phases"], metrics["belady"]["phases"]
    assert {"rollout", "update", "optimizer", "eval"} <= set(cache)
    # the phases of the history and evaluations add up to the store's own counters
    totals = store.stats_by_phase()
    for phase in ("rollout", "update", "optimizer", "eval"):
        assert cache[phase]["accesses"] == totals[phase]["accesses"] > 0, phase
        assert belady[phase]["accesses"] == cache[phase]["accesses"], phase  # same accesses
        assert metrics["lru"]["phases"][phase]["accesses"] == cache[phase]["accesses"], phase
        for key in ("hbm_hit_rate", "prefetch_precision", "prefetch_coverage"):
            assert 0 <= cache[phase][key] <= 1 and 0 <= belady[phase][key] <= 1
    assert cache["rollout"]["stall_seconds"] > 0
    moved = sum(v for p in ("update", "optimizer") for k, v in totals[p].items()
                if k.startswith("bytes_"))
    assert metrics["cache"]["bytes_per_update"] == pytest.approx(
        moved / len(metrics["history"]))
    assert "store/rollout_hit_rate" in metrics["history"][-1]
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["belady"] == metrics["belady"]              # floats survive JSON exactly
    assert saved["lru"] == metrics["lru"]
    store.shutdown()


TINY_CLI = ["--num_experts", "8", "--expert_dim", "16", "--expert_hidden_dim", "32",
            "--num_heads", "2", "--hbm_capacity", "4", "--dram_capacity", "8",
            "--context_len", "2", "--num_envs", "4", "--num_steps", "16",
            "--eval_episodes", "2", "--eval_max_steps", "12"]


def test_a_run_killed_mid_stage_resumes_and_loses_only_work_since_its_checkpoint(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "ooc_moe", "train", "--games", "synthetic-0,synthetic-1",
           "--steps_per_game", "512", "--checkpoint_every", "2", "--out", str(out), *TINY_CLI]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 900                             # generous: a loaded machine
    saved = None
    while time.time() < deadline and proc.poll() is None:
        state = out / "checkpoint" / "state.pt"
        if state.exists():
            try:
                saved = torch.load(state, weights_only=False)
            except Exception:                              # caught mid-swap: look again
                saved = None
            if saved is not None and saved["game_index"] == 0 and saved["iteration"] >= 2:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed mid-stage"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    checkpoint = load_checkpoint(out)                       # complete, whatever the timing
    assert checkpoint["game_index"] == 0 and 0 < checkpoint["iteration"] < 8
    before = [h["losses/value_loss"] for h in checkpoint["history"]]
    result = subprocess.run([sys.executable, "-m", "ooc_moe", "train", "--resume", str(out)],
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and len(metrics["retention"]) == 2
    iterations = [(h["game_index"], h["iteration"]) for h in metrics["history"]]
    assert iterations == [(g, i) for g in range(2) for i in range(8)]    # no gap, no repeat
    assert [h["losses/value_loss"] for h in metrics["history"][:len(before)]] == before
    assert args_from_json(metrics["args"]).checkpoint_every == 2
    # TensorBoard: the killed run's events after its checkpoint are purged, one per update
    events = tensorboard_scalars(out, "losses/value_loss")
    assert [step for step, _ in events] == [h["global_step"] for h in metrics["history"]]
    assert [v for _, v in events] == pytest.approx([h["losses/value_loss"]
                                                    for h in metrics["history"]])


def test_cli_refuses_to_resume_nothing_and_to_overwrite_a_checkpoint(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ooc_moe", *args], capture_output=True,
                              text=True, timeout=900)
    result = cli("train", "--resume", str(tmp_path / "nothing"))
    assert result.returncode != 0 and "no checkpoint" in result.stderr
    save_checkpoint(tmp_path, {"n": 1})
    result = cli("train", "--steps_per_game", "64", "--out", str(tmp_path), *TINY_CLI)
    assert result.returncode != 0 and f"--resume {tmp_path}" in result.stderr
    assert load_checkpoint(tmp_path) == {"n": 1}                # untouched
    result = cli("experiment", "--runs", "token,moe", "--out", str(tmp_path / "x"))
    assert result.returncode != 0 and "--runs" in result.stderr


# -- the experiment and its plots ---------------------------------------------------------------
@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    summary = run_experiment(tiny(), ["token", "dense"], [1, 2], out, progress=False)
    return out, summary


def test_experiment_writes_every_run_and_a_summary(experiment):
    out, summary = experiment
    assert list(summary) == ["token", "dense"]
    for name in ("token-seed1", "token-seed2", "dense-seed1", "dense-seed2"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        assert metrics["finished"] and np.array(metrics["retention"]).shape == (2, 2)
        assert metrics["forgetting"] == pytest.approx(forgetting(metrics["retention"]))
        assert (out / name / "retention.csv").read_text().startswith(
            "after,synthetic-0,synthetic-1\nuntrained,")
        assert (out / name / "retention.png").stat().st_size > 0
    token = [json.loads((out / f"token-seed{s}" / "metrics.json").read_text()) for s in (1, 2)]
    np.testing.assert_allclose(summary["token"]["retention"],
                               np.mean([m["retention"] for m in token], 0))
    assert summary["token"]["forgetting_min"] == pytest.approx(
        np.min([m["forgetting"] for m in token], 0).tolist())
    assert summary["token"]["seeds"] == [1, 2]
    assert 0 <= summary["token"]["hit_rate"] <= 1 and "hit_rate" not in summary["dense"]
    assert summary["token"]["prefetch_precision"] == pytest.approx(
        np.mean([m["planner"]["precision"] for m in token]))
    assert summary["token"]["bytes_moved"]["file_to_dram"] == pytest.approx(
        np.mean([m["bytes_moved"]["file_to_dram"] for m in token]))
    assert len(token[0]["eval_routing"]) == 2                # [layer][game][expert]
    assert np.array(token[0]["eval_routing"]).shape == (2, 2, 8)
    text = format_summary(summary)
    assert "after synthetic-1" in text and "token (seeds 1,2)" in text and "NMI" in text
    assert "prefetch precision" in text and "rise in own stage" in text
    assert "IQM" in text                    # synthetic games: normalised by their optimum
    assert "capped at 12 steps; 0% of them finished" in text      # 200-step episodes
    assert json.loads((out / "summary.json").read_text())["dense"]["seeds"] == [1, 2]


def test_noise_of_rises_and_forgetting_is_a_t_interval_over_episodes_or_seeds():
    """Two games, three episodes; with one seed the noise pairs each episode with itself in
    the other evaluations, with several seeds it is the spread over seeds."""
    returns = [[[0.0, 2.0, 1.0], [1.0, 1.0, 1.0]],      # untrained
               [[4.0, 8.0, 6.0], [1.0, 3.0, 2.0]],      # after game a
               [[0.0, 0.0, 0.0], [5.0, 5.0, 5.0]]]      # after game b
    metrics = {"eval_returns": returns, "games": ["a", "b"],
               "args": {"seed": 1, "eval": {"episodes": 3}},
               "initial": [1.0, 1.0], "retention": [[6.0, 2.0], [0.0, 5.0]],
               "forgetting": [6.0, 0.0], "average_final_score": float("nan"), "sps": 1.0,
               "human_normalized": [[float("nan")] * 2] * 2,
               "seconds": 1.0, "device": "cpu", "date": "today", "eval_finished": [[3, 3]]}
    rise, forgot = paired_changes(metrics)
    assert rise.tolist() == [[4.0, 6.0, 5.0], [4.0, 4.0, 4.0]]
    assert forgot.tolist() == [[4.0, 8.0, 6.0], [0.0, 0.0, 0.0]]
    t_975_2 = 4.302652729911275          # Student's t, 2 degrees of freedom, two-sided 95%
    assert half_width_95(np.array([4.0, 6.0, 5.0])) == pytest.approx(t_975_2 / np.sqrt(3))
    assert np.isnan(half_width_95(np.array([1.0])))
    one = summarize({"moe-seed1": metrics})["moe"]
    assert one["rise"] == [5.0, 4.0]
    np.testing.assert_allclose(one["rise_noise"], [t_975_2 / np.sqrt(3), 0.0])
    np.testing.assert_allclose(one["forgetting_noise"], [t_975_2 * 2 / np.sqrt(3), 0.0])
    verdict = format_verdict({"moe": one})
    assert "learned beyond noise during its own stage: a, b" in verdict   # 5 > 2.48, 4 > 0
    assert "forgotten beyond noise by the end: a" in verdict              # 6 > 4.97
    seed2 = {**metrics, "args": {**metrics["args"], "seed": 2},
             "initial": [3.0, 1.0], "forgetting": [2.0, 0.0]}             # rises 3 and 4
    two = summarize({"moe-seed1": metrics, "moe-seed2": seed2})["moe"]
    assert two["rise"] == [4.0, 4.0]
    t_975_1 = 12.706204736174707         # Student's t, 1 degree of freedom
    np.testing.assert_allclose(two["rise_noise"], [t_975_1 * np.std([5, 3], ddof=1) / np.sqrt(2),
                                                   0.0])
    np.testing.assert_allclose(two["forgetting_noise"], [t_975_1 * np.std([6, 2], ddof=1) / np.sqrt(2),
                                                         0.0])
    assert "learned beyond noise during its own stage: b;" in format_verdict({"moe": two})
    quiet = format_verdict({"moe": {**one, "rise": [1.0, 0.0]}})
    assert "own stage: no game" in quiet and "by the end: none" in quiet
    blind = {**metrics, "eval_returns": [[[r[0]] for r in row] for row in returns]}
    assert "no verdict" in format_verdict(summarize({"moe-seed1": blind}))


def test_verdict_compares_each_kind_with_dense_paired_by_seed():
    """Hand-made runs of three games: forgetting of a and b per seed is dense (4, 1), (5, 2),
    (6, 0) and cohort (1, 1), (2, 3), (2, 0): paired differences (-3, -3, -4) on a, beyond
    their t interval, and (0, 1, 0) on b, inside it."""
    def run(seed: int, forgot: tuple[float, float]) -> dict:
        retention = [[6.0, 1.0, 1.0], [3.0, 7.0, 1.0], [6.0 - forgot[0], 7.0 - forgot[1], 9.0]]
        return {"games": ["a", "b", "c"], "args": {"seed": seed, "eval": {"episodes": 3}},
                "initial": [1.0, 1.0, 1.0], "retention": retention,
                "forgetting": forgetting(retention).tolist(), "average_final_score": 0.0,
                "human_normalized": [[float("nan")] * 3] * 3, "sps": 1.0, "seconds": 1.0,
                "device": "cpu", "date": "today", "eval_finished": [3, 3, 3]}
    dense = {1: (4, 1), 2: (5, 2), 3: (6, 0)}
    cohort = {1: (1, 1), 2: (2, 3), 3: (2, 0)}
    runs = {**{f"dense-seed{k}": run(k, f) for k, f in dense.items()},
            **{f"cohort-seed{k}": run(k, f) for k, f in cohort.items()},
            "token-seed2": run(2, (5, 2))}
    summary = summarize(runs)
    paired = summary["cohort"]["vs_dense"]
    assert paired["seeds"] == [1, 2, 3] and "vs_dense" not in summary["dense"]
    t_975_2 = 4.302652729911275
    np.testing.assert_allclose(paired["forgetting_difference"], [-10 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(paired["forgetting_difference_noise"],
                               [t_975_2 * np.std([-3, -3, -4], ddof=1) / np.sqrt(3),
                                t_975_2 * np.std([0, 1, 0], ddof=1) / np.sqrt(3), 0.0])
    verdict = format_verdict(summary)
    assert "forgetting against dense, paired over seeds 1,2,3, on the games both learned: " \
           "a less (-3.3 +- 1.4), b no different (+0.3 +- 1.4)" in verdict
    flat = {k: {**v, "rise": [0.0, 6.0, 8.0]} if k == "dense" else v for k, v in summary.items()}
    assert "on the games both learned: b no different" in format_verdict(flat)  # a: not by dense
    assert summary["token"]["vs_dense"]["seeds"] == [2]           # one pair: no interval
    assert np.isnan(summary["token"]["vs_dense"]["forgetting_difference_noise"]).all()
    assert "token: no noise estimate" in verdict
    table = format_forgetting_table(summary)          # the verdict's figures, one row a kind
    assert ("| `cohort` | 1,2,3 | 1.7 ± 1.4 (-3.3 ± 1.4) | 1.3 ± 3.8 (+0.3 ± 1.4) | "
            "8.0 ± 0.0 |") in table
    assert "| `dense` | 1,2,3 | 5.0 ± 2.5 | 1.0 ± 2.5 | 8.0 ± 0.0 |" in table
    assert ("| `token` | 2 | 5.0 ± ? † (+0.0, one seed) | 2.0 ± ? † (+0.0, one seed) |"
            in table)
    assert table.endswith("Forgot less than `dense` beyond the noise: `cohort` on a. "
                          "More: no kind.")


def test_experiment_reads_finished_runs_back_instead_of_retraining(experiment):
    out, summary = experiment
    stamp = (out / "token-seed1" / "metrics.json").stat().st_mtime_ns
    again = run_experiment(tiny(), ["token", "dense"], [1, 2], out, progress=False)
    assert (out / "token-seed1" / "metrics.json").stat().st_mtime_ns == stamp
    for kind in ("token", "dense"):
        for key in ("retention", "initial", "forgetting", "sps", "seconds"):
            assert again[kind][key] == summary[kind][key]
    with pytest.raises(ValueError, match="runs must be among"):
        run_experiment(tiny(), ["moe"], [1], out)
    other = replace(tiny(), action_mask="legal", ppo=replace(tiny().ppo, ent_coef=0.02))
    with pytest.raises(ValueError, match=r"token-seed1 holds a run of another configuration "
                       r"\(action_mask: 'none' -> 'legal'; ppo.ent_coef: 0.01 -> 0.02\)"):
        run_experiment(other, ["token"], [1], out, progress=False)
    assert (out / "token-seed1" / "metrics.json").stat().st_mtime_ns == stamp  # untouched


def test_experiment_jobs_train_runs_in_processes_as_they_train_one_by_one(experiment, tmp_path,
                                                                        capsys):
    """``jobs=2``: two spawned processes (one torch thread each, as this suite) give every
    run exactly what the same run gives in this process, and say when each ends."""
    out, _ = experiment
    with pytest.raises(ValueError, match="jobs must be an int >= 1"):
        run_experiment(tiny(), ["dense"], [1], tmp_path, jobs=0)
    assert not any(tmp_path.iterdir())                              # nothing started
    summary = run_experiment(tiny(), ["dense"], [1, 2], tmp_path, progress=False, jobs=2)
    printed = capsys.readouterr().out
    assert "2 runs, 2 at a time" in printed
    assert "dense-seed1 finished in" in printed and "dense-seed2 finished in" in printed
    for seed in (1, 2):
        here, there = (json.loads((d / f"dense-seed{seed}" / "metrics.json").read_text())
                       for d in (out, tmp_path))
        assert there["retention"] == here["retention"]
        assert ([h["losses/value_loss"] for h in there["history"]]
                == [h["losses/value_loss"] for h in here["history"]])
    assert summary["dense"]["seeds"] == [1, 2]


def test_sequential_plots_draw_from_the_results(experiment):
    out, summary = experiment
    results = {p.name: json.loads((p / "metrics.json").read_text())
               for p in sorted(out.iterdir()) if p.is_dir()}
    fig = plot_retention(results)
    assert len(fig.axes) == 4
    assert len(plot_retention(summary).axes) == 2
    fig = plot_forgetting(summary)                       # two seeds: t intervals
    assert "95% intervals" in fig.get_suptitle()
    assert [ax.get_title() for ax in fig.axes] == summary["token"]["games"][:-1]
    bar_and_error = 2 * list(summary).index("token") + 1   # each kind: a bar, then its error
    (_, caps, _) = fig.axes[0].containers[bar_and_error]   # token's error bar on synthetic-0
    low, high = sorted(c.get_ydata()[0] for c in caps)
    assert (low, high) == pytest.approx((summary["token"]["forgetting"][0] - summary["token"][
        "forgetting_noise"][0], summary["token"]["forgetting"][0] + summary["token"][
        "forgetting_noise"][0]))
    blind = {k: {**v, "forgetting_noise": [float("nan")] * 2} for k, v in summary.items()}
    assert "min-max" in plot_forgetting(blind).get_suptitle()
    fig = plot_game_expert_usage(results["token-seed1"], layer=1, game="synthetic-1")
    assert "layer 1" in fig.axes[0].get_title()
    assert len(plot_game_expert_usage(results["token-seed1"]).axes) == 4   # 2 + colour bars
    with pytest.raises(ValueError, match="no expert routing"):
        plot_game_expert_usage(results["dense-seed1"])
    with pytest.raises(ValueError, match="layer must lie"):
        plot_game_expert_usage(results["token-seed1"], layer=5)
    plot_game_over_stages(results, "synthetic-0")
    with pytest.raises(ValueError, match="not one of"):
        plot_game_over_stages(results, "pong")
    show_sequential_run(results, "token-seed2", 1, "synthetic-1")
    show_sequential_run(results, "dense-seed1", 0, "synthetic-0")
    sequential_results_widget(results)


@pytest.mark.parametrize("kind, routing, balance", [
    ("token", "token", "batch"), ("cohort", "cohort", "batch"),
    ("token-none", "token", "none"), ("token-horizon", "token", "horizon")])
def test_run_kinds_set_routing_and_balance(kind, routing, balance):
    config = replace(tiny(), **RUN_KINDS[kind]).agent_config()
    assert (config.routing, config.balance) == (routing, balance)


def test_early_learning_reads_the_updates_up_to_a_step():
    history = [{"global_step": 1024 * (i + 1), "losses/explained_variance": 0.1 * i,
                "losses/entropy": 2.0 - 0.1 * i, "charts/episodic_returns": [float(i)] * (i % 2)}
               for i in range(10)]
    e = early_learning(history, at=1024 * 6, last=2)        # updates 0..5, the last two: 4, 5
    assert e["explained_variance"] == pytest.approx(0.45)
    assert e["entropy"] == pytest.approx(1.55)
    assert e["return"] == pytest.approx(3.0) and e["episodes"] == 3       # returns 1, 3, 5
    assert e["return_last"] == pytest.approx(3.0)                        # fewer than 100
    assert early_learning(history, at=1024 * 6, last_episodes=2)["return_last"] == 4.0
    with pytest.raises(ValueError, match="reached step 10240, not 20480"):
        early_learning(history, at=20480)
    run = {"history": history, "args": {"seed": 1}, "command": "python -m ooc_moe x"}
    short = {**run, "history": history[:3], "args": {"seed": 3}}
    table = learning_table({"a-seed1": run, "a-seed2": {**run, "args": {"seed": 2}},
                            "a-seed3": short}, at=1024 * 6)
    assert list(table) == ["a"] and table["a"]["seeds"] == [1, 2]         # seed 3 stopped early
    assert table["a"]["explained_variance"] == pytest.approx(0.3)         # last 5: 0.1..0.5
    text = format_learning_table(table, 1024 * 6)
    assert "| a | 1,2 | 0.30 [0.30, 0.30]" in text
    assert "(uniform: 2.89) |" in text and table["a"]["uniform_entropy"] == pytest.approx(
        np.log(18))
    masked = {"history": [{**h, "game": "breakout"} for h in history],
              "args": {"seed": 1, "action_mask": "legal"}, "command": "python -m ooc_moe y"}
    table = learning_table({"a-seed1": run, "b-seed1": masked}, at=1024 * 6)
    assert table["b"]["uniform_entropy"] == pytest.approx(np.log(4))   # Breakout's 4 actions
    assert "(uniform: 2.89; b 1.39) |" in format_learning_table(table, 1024 * 6)
