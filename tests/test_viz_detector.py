"""Notebook 03's helpers, plots and trace explorer, called directly: a notebook run does not see
errors raised inside widget callbacks."""

import matplotlib

matplotlib.use("Agg")

import math  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ooc_moe.detector import EnvironmentDetector  # noqa: E402
from ooc_moe.trace import POLICIES, RoutingTrace, simulate  # noqa: E402
from ooc_moe.viz import (CLAIMED_HIT_RATE, PREFETCH_CHOICES, frame_moe_run,  # noqa: E402
                         frames_trace, plot_cache_explorer, plot_confusion,
                         plot_detector_experts, plot_frames, plot_game_expert_maps,
                         prefetch_scores, prefetch_sets, routing_summary, show_trace_cache,
                         simulate_steps, step_experts, step_slices, trace_cache_curves,
                         trace_cache_widget)

GAMES = ["a", "b", "c"]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def game_trace(steps_per_game=12, num_experts=16, seed=0, prefetch=False) -> RoutingTrace:
    """Three games played in turn; each game's two layers draw from its own 5 experts (games
    overlap in one expert), 1 to 4 experts per layer and step."""
    rng = np.random.default_rng(seed)
    trace = RoutingTrace()
    for game in range(3):
        own = [(5 * game + i) % num_experts for i in range(6)]
        for _ in range(steps_per_game):
            trace.begin_step(game)
            for _layer in range(2):
                trace.record_layer(rng.choice(own, int(rng.integers(1, 5)), replace=False))
            if prefetch:
                trace.record_prefetch(own[:3])
    return trace


def random_steps(seed):
    rng = np.random.default_rng(seed)
    num_experts, num_steps = int(rng.integers(4, 16)), int(rng.integers(5, 30))
    return num_experts, [rng.choice(num_experts, int(rng.integers(1, num_experts)),
                                    replace=False).tolist() for _ in range(num_steps)]


# -- the step view and the simulator ---------------------------------------------------------
def test_step_experts_is_the_union_over_layers():
    trace = RoutingTrace()
    trace.begin_step(0)
    trace.record_layer([3, 1])
    trace.record_layer([1, 7])
    trace.begin_step(1)
    trace.record_layer([2])
    assert step_experts(trace) == [[1, 3, 7], [2]]
    assert step_experts([[5, 2, 5], (np.int64(1),)]) == [[2, 5], [1]]


def test_simulate_steps_equals_simulate_when_every_step_fits():
    trace = game_trace()
    steps = step_experts(trace)
    for policy in POLICIES:
        for prefetch in (False, steps):
            ours = simulate_steps(trace, 8, 12, policy, prefetch)
            plain = simulate(steps, 8, 12, policy, prefetch)
            assert (ours.hbm_hits, ours.dram_hits, ours.file_reads, ours.prefetch_hits) == (
                plain.hbm_hits, plain.dram_hits, plain.file_reads, plain.prefetch_hits)
            assert ours.hit_rate_per_step == plain.hit_rate_per_step


def test_steps_larger_than_hbm_stream_in_waves():
    steps = [list(range(10)), list(range(10))]
    with pytest.raises(ValueError, match="must fit in HBM"):
        simulate(steps, 3)                       # the plain simulator refuses such steps
    result = simulate_steps(steps, 3)            # waves of 3, 3, 3, 1
    assert result.accesses == 20 and len(result.hit_rate_per_step) == 2
    # the first wave of a step fills all of HBM, so nothing survives from the step before,
    # whatever the policy; the second step is served by DRAM
    for policy in POLICIES:
        result = simulate_steps(steps, 3, policy=policy)
        assert (result.hbm_hits, result.dram_hits, result.file_reads) == (0, 10, 10)
    with pytest.raises(ValueError, match="hbm_capacity"):
        simulate_steps(steps, 0)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dram", [None, 6])
def test_curves_belady_is_monotone_and_bounds_lru_and_lfu(seed, dram):
    num_experts, steps = random_steps(seed)
    sizes = list(range(1, num_experts + 1))
    curves = trace_cache_curves(steps, sizes, dram)
    assert set(curves) == set(POLICIES) and all(len(c) == len(sizes) for c in curves.values())
    assert np.all(np.diff(curves["belady"]) >= -1e-12)
    for policy in ("lru", "lfu"):
        assert np.all(curves[policy] <= curves["belady"] + 1e-12), policy
    assert curves["lru"][-1] == pytest.approx(1 - len({e for s in steps for e in s})
                                              / sum(len(s) for s in steps))  # cold misses only


def test_curves_with_prefetch_sets_get_their_own_keys():
    trace = game_trace()
    oracle = prefetch_sets(trace, "oracle")
    curves = trace_cache_curves(trace, [4, 8, 16], policies=("lru",),
                                prefetch_sets={"oracle": oracle})
    assert set(curves) == {"lru", "lru+oracle"}
    assert np.all(curves["lru+oracle"] >= curves["lru"])
    assert curves["lru+oracle"][-1] == 1.0      # room for everything: every access prefetched


def test_prefetch_sets_for_each_choice():
    trace = game_trace(prefetch=True)
    steps = step_experts(trace)
    assert prefetch_sets(trace, "none") is False
    assert prefetch_sets(trace, "recorded") == trace.prefetch
    assert prefetch_sets(trace, "oracle") == steps
    plans = [[0]] * len(steps)
    assert prefetch_sets(trace, "detector", plans) == plans
    bare = game_trace()
    with pytest.raises(ValueError, match="recorded no prefetches"):
        prefetch_sets(bare, "recorded")
    with pytest.raises(ValueError, match="no detector prefetch sets"):
        prefetch_sets(bare, "detector")
    with pytest.raises(ValueError, match="one per step"):
        prefetch_sets(bare, "detector", plans[:-1])
    with pytest.raises(ValueError, match="prefetch must be one of"):
        prefetch_sets(bare, "psychic")


# -- frames, routing and prefetch scores -----------------------------------------------------
def test_step_slices_and_frames_trace():
    game_ids = np.array([0] * 5 + [1] * 3)
    slices = step_slices(game_ids, 2)
    assert [s.tolist() for s in slices] == [[0, 1], [2, 3], [4], [5, 6], [7]]
    used = torch.zeros(8, 2, 6)
    for frame in range(8):
        used[frame, 0, frame % 6] = 1
        used[frame, 1, 5] = 1
    trace = frames_trace(used, game_ids, 2)
    assert trace.games == [0, 0, 0, 1, 1]
    assert trace.layers[0] == [[0, 1], [5]] and trace.layers[3] == [[0, 5], [5]]
    assert step_experts(trace)[2] == [4, 5]


def test_routing_summary_separates_specialised_from_shared_routing():
    specialised, shared = RoutingTrace(), RoutingTrace()
    for game in range(4):
        for _ in range(6):
            specialised.begin_step(game)
            specialised.record_layer([2 * game, 2 * game + 1])
            shared.begin_step(game)
            shared.record_layer([0, 1])
    s = routing_summary(specialised, 8)
    assert s["nmi"] == pytest.approx(1.0) and s["experts_per_step"] == 2
    assert s["working_set"] == 2 and s["usage"].shape == (4, 8)
    assert np.array_equal(s["usage"], np.kron(np.eye(4), np.ones(2)))
    assert routing_summary(shared, 8)["nmi"] == pytest.approx(0.0)


def test_prefetch_scores_by_hand():
    scores = prefetch_scores([[1, 2], [3], []], [[2, 4], [3], [5]])
    assert scores["precision"] == pytest.approx(2 / 3)      # 1 of 2, 1 of 1, nothing planned
    assert scores["coverage"] == pytest.approx(2 / 4)
    assert scores["planned_per_step"] == 1 and scores["used_per_step"] == pytest.approx(4 / 3)
    assert math.isnan(prefetch_scores([[]], [[1]])["precision"])
    with pytest.raises(AssertionError, match="plans for"):
        prefetch_scores([[1]], [[1], [2]])


# -- plots -----------------------------------------------------------------------------------
def test_frame_and_confusion_plots():
    frames = np.random.default_rng(0).integers(0, 256, (12, 4, 84, 84), dtype=np.uint8)
    fig = plot_frames(frames, np.repeat([0, 1, 2], 4), GAMES, per_game=2)
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    confusion = np.array([[5, 1, 0], [0, 6, 0], [0, 2, 4]])
    fig = plot_confusion(confusion, GAMES)
    assert len(fig.axes) == 1
    assert sorted(int(t.get_text()) for t in fig.axes[0].texts) == sorted(confusion.ravel())
    assert fig.axes[0].get_title() == f"accuracy {15 / 18:.1%}"


def test_game_expert_maps_and_detector_plot():
    maps = {"x": np.zeros((3, 8)), "y": np.ones((3, 8))}
    fig = plot_game_expert_maps(maps, GAMES)
    assert len(fig.axes) == 3                                  # two maps and a colour bar
    torch.manual_seed(0)
    detector = EnvironmentDetector((1, 84, 84), 3, 8, hidden_dim=16, num_layers=2)
    frames = np.random.default_rng(1).integers(0, 256, (9, 4, 84, 84), dtype=np.uint8)
    used = torch.zeros(9, 2, 8)
    used[:, 0, 3] = 1
    fig = plot_detector_experts(detector, frames, np.repeat([0, 1, 2], 3), used, GAMES)
    predicted, actual = (ax.images[0].get_array() for ax in fig.axes[:2])
    assert predicted.shape == actual.shape == (3, 8)
    assert 0 <= predicted.min() and predicted.max() <= 1
    assert np.array_equal(actual, np.eye(8)[[3, 3, 3]])


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("prefetch", PREFETCH_CHOICES)
def test_cache_explorer_plots_the_simulated_shares(policy, prefetch):
    trace = game_trace(prefetch=True)
    plans = [[0, 1]] * trace.num_steps
    fig = plot_cache_explorer(trace, 4, 8, policy, prefetch, plans, game_names=GAMES)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    served, over_time = fig.axes
    result = simulate_steps(trace, 4, 8, policy, prefetch_sets(trace, prefetch, plans))
    bound = simulate_steps(trace, 4, 8, "belady")
    heights = [bar.get_height() for bar in served.patches]
    expected = [n / result.accesses for n in (result.hbm_hits, result.dram_hits,
                                              result.file_reads)]
    assert heights[:3] == pytest.approx(expected)
    assert heights[3:] == pytest.approx([bound.hbm_hits / bound.accesses,
                                         bound.dram_hits / bound.accesses,
                                         bound.file_reads / bound.accesses])
    lines = over_time.get_lines()
    claim = [ln for ln in served.get_lines() if list(ln.get_ydata()) == [CLAIMED_HIT_RATE] * 2]
    assert claim and claim[0].get_linestyle() == "--"
    boundaries = [ln for ln in lines if np.ptp(ln.get_xdata()) == 0]
    assert [ln.get_xdata()[0] for ln in boundaries] == [0, 12, 24]
    assert [t.get_text() for t in over_time.texts] == GAMES
    assert f"{result.hit_rate:.1%}" in fig.get_suptitle()


def test_cache_explorer_accepts_a_list_of_steps_and_rejects_impossible_settings():
    fig = plot_cache_explorer([[0, 1], [1, 2], [0, 2]], 2)
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="inclusive"):
        plot_cache_explorer(game_trace(), 8, 4)
    with pytest.raises(ValueError, match="recorded no prefetches"):
        plot_cache_explorer(game_trace(), 4, 8, prefetch="recorded")


def test_callback_explains_impossible_settings_instead_of_raising(capsys):
    traces = {"t": game_trace()}
    show_trace_cache(traces, "t", 8, 4, "lru", "none")
    assert "Raise the DRAM slider" in capsys.readouterr().out
    show_trace_cache(traces, "t", 4, 8, "lru", "detector")
    assert "no detector prefetch sets" in capsys.readouterr().out
    show_trace_cache(traces, "t", 4, 8, "lru", "recorded")
    assert "recorded no prefetches" in capsys.readouterr().out
    assert plt.get_fignums() == []
    show_trace_cache(traces, "t", 4, 8, "belady", "oracle")
    assert len(plt.get_fignums()) == 1


def test_widget_drives_the_callback_for_every_choice_and_keeps_dram_at_least_hbm(capsys):
    traces = {"play": game_trace(), "recorded": game_trace(seed=1, prefetch=True)}
    plans = {"play": [[0]] * traces["play"].num_steps}
    box = trace_cache_widget(traces, plans, num_experts=16, hbm_capacity=4, game_names=GAMES)
    menus, sliders, _ = box.children
    (trace, policy, prefetch), (hbm, dram) = menus.children, sliders.children
    assert (hbm.min, hbm.max, dram.max, hbm.value, dram.value) == (1, 16, 16, 4, 16)
    assert len(plt.get_fignums()) == 1           # interactive_output drew the first setting
    dram.value = 6
    hbm.value = 10                               # the observer raises DRAM's minimum and value
    assert dram.min == dram.value == 10
    dram.value = 3                               # clamped by the slider itself
    assert dram.value == 10
    hbm.value = 4
    drawn = 0
    for name in trace.options:                   # every control change re-runs the callback
        trace.value = name                       # here, where errors propagate
        for choice in policy.options:
            policy.value = choice
            for source in prefetch.options:
                prefetch.value = source
                drawn += len(plt.get_fignums())
                plt.close("all")
    out = capsys.readouterr().out
    assert "recorded no prefetches" in out and "no detector prefetch sets" in out
    # each trace lacks one of the four prefetch sources; the other 3 draw (changing the trace
    # or the policy redraws too)
    assert drawn >= 2 * len(POLICIES) * 3


def test_widget_sizes_its_sliders_from_the_trace():
    box = trace_cache_widget(RoutingTrace([], [0], [[[3, 9]]], [[]]))
    hbm, dram = box.children[1].children
    assert hbm.max == dram.max == 10 and hbm.value == 2


# -- one small run on real frames ------------------------------------------------------------
def test_frame_moe_run_on_real_frames():
    from ooc_moe.envs import collect_frames
    frames, game_ids = collect_frames(["pong", "breakout"], 16, num_envs=4, seed=0)
    threads = torch.get_num_threads()
    run = frame_moe_run(frames, game_ids, frames[::2], num_experts=8, batch_size=4,
                        steps_per_game=3, load_balance_coef=0.0, noise_std=0.0)
    assert torch.get_num_threads() == threads
    assert run["trace"].games == [0] * 3 + [1] * 3 and len(run["losses"]) == 6
    assert run["routing"].shape == (32, 2, 8) and run["eval_routing"].shape == (16, 2, 8)
    assert run["predicted"].shape == (16,) and set(run["predicted"]) <= {0, 1}
    assert run["entropy"].shape == (2,) and np.all((0 <= run["entropy"]) & (run["entropy"] <= 1))
    again = frame_moe_run(frames, game_ids, frames[::2], num_experts=8, batch_size=4,
                          steps_per_game=3, load_balance_coef=0.0, noise_std=0.0)
    assert again["trace"].layers == run["trace"].layers               # seeded
    play = frames_trace(run["routing"], game_ids, 4)
    assert play.num_steps == 8
    assert all(2 <= len(step) <= 8 for step in step_experts(play))
    assert simulate_steps(play, 8).hit_rate > 0
