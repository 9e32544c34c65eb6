"""Notebook 02's teaching helpers, plots and widget, called directly: a notebook run does not
see errors raised inside widget callbacks."""

import matplotlib

matplotlib.use("Agg")

import math  # noqa: E402

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ooc_moe.moe.layer import Dispatch  # noqa: E402
from ooc_moe.viz import (moe_layer_widget, moe_training_run, plot_dispatch,  # noqa: E402
                         plot_moe_training, plot_routing_losses, routing_loss_curves,
                         show_moe_training)
from ooc_moe.store.stats import LINKS  # noqa: E402

SMALL = dict(tokens=64, steps=4)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.mark.parametrize("num_experts, top_k, hbm", [(8, 1, 2), (16, 2, 4), (12, 3, 12)])
def test_usage_counts_every_assignment_of_every_step(num_experts, top_k, hbm):
    result = moe_training_run(num_experts, top_k, hbm, **SMALL)
    usage = result["usage"]
    assert usage.shape == (SMALL["steps"], num_experts)
    assert list(usage.sum(axis=1)) == [SMALL["tokens"] * top_k] * SMALL["steps"]
    assert list(result["experts_used"]) == list((usage > 0).sum(axis=1))


@pytest.mark.parametrize("hbm, dram", [(2, None), (3, 5), (16, None)])
def test_per_step_counters_add_up_to_the_store_totals(hbm, dram):
    result = moe_training_run(16, 2, hbm, dram_capacity=dram, **SMALL)
    totals = result["totals"]
    for link in LINKS:
        assert result["bytes"][link].sum() == totals[f"bytes_{link}"], link
    for key in ("accesses", "hbm_hits", "prefetch_hits"):
        assert result[key].sum() == totals[key], key
    # forward, backward and the optimizer each access every expert the batch used
    assert list(result["accesses"]) == list(3 * result["experts_used"])
    assert result["hit_rate"] == pytest.approx(result["hbm_hits"] / result["accesses"])


def test_with_every_expert_in_hbm_only_the_first_step_moves_data():
    result = moe_training_run(16, 2, 16, tokens=256, steps=5)
    record = result["record_bytes"]
    assert result["experts_used"][0] == 16, "the first batch should touch every expert"
    assert result["bytes"]["file_to_dram"][0] == result["bytes"]["dram_to_hbm"][0] == 16 * record
    for link in LINKS:
        assert not result["bytes"][link][1:].any(), link
    assert list(result["waves"]) == [1] * 5
    assert result["hit_rate"][0] == pytest.approx(2 / 3)   # forward misses; backward, step hit
    assert list(result["hit_rate"][1:]) == [1.0] * 4


def test_a_tiny_hbm_streams_every_step_and_a_tiny_dram_reads_the_file_again():
    steady = slice(1, None)
    roomy_dram = moe_training_run(16, 2, 2, **SMALL)
    assert (roomy_dram["waves"] > 1).all()
    assert (roomy_dram["bytes"]["dram_to_hbm"][steady] > 0).all()
    assert (roomy_dram["bytes"]["hbm_to_dram"][steady] > 0).all()   # trained experts go down
    assert not roomy_dram["bytes"]["file_to_dram"][steady].any()   # DRAM holds all 16
    assert (roomy_dram["prefetch_hits"][steady] > 0).all()           # waves are prefetched
    tiny_dram = moe_training_run(16, 2, 2, dram_capacity=3, **SMALL)
    assert (tiny_dram["bytes"]["file_to_dram"][steady] > 0).all()
    assert (tiny_dram["bytes"]["dram_to_file"][steady] > 0).all()


def test_tiers_do_not_change_what_is_learned():
    tiered = moe_training_run(16, 2, 2, dram_capacity=3, **SMALL)
    in_hbm = moe_training_run(16, 2, 16, **SMALL)
    assert tiered["loss"] == pytest.approx(in_hbm["loss"], rel=1e-5)
    assert (tiered["usage"] == in_hbm["usage"]).all()
    assert tiered["loss"][-1] < tiered["loss"][0]


def test_runs_are_seeded_and_leave_the_global_rng_and_threads_alone():
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    a, b = moe_training_run(8, 2, 2, **SMALL), moe_training_run(8, 2, 2, **SMALL)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    assert (a["usage"] == b["usage"]).all() and list(a["loss"]) == list(b["loss"])
    c = moe_training_run(8, 2, 2, seed=1, **SMALL)
    assert (a["usage"] != c["usage"]).any()


def test_load_balancing_loss_cannot_tell_specialised_games_from_collapse():
    curves = routing_loss_curves(8, 2, 64)
    one, mixed = curves["balance_one_game"], curves["balance_mixed"]
    assert one[0] == pytest.approx(1.0, abs=0.1) and mixed[0] == pytest.approx(1.0, abs=0.1)
    assert mixed == pytest.approx(np.ones_like(mixed), abs=0.05)   # each game on its own 2
    assert (np.diff(one) > 0).all() and one[-1] > 0.95 * 8 / 2     # one game: the loss's max
    z = curves["z_loss"]
    assert z[0] == pytest.approx(math.log(8) ** 2, rel=1e-6) and (np.diff(z) > 0).all()


def test_routing_loss_plot_draws_the_curves():
    curves = routing_loss_curves(8, 2, 32, biases=[0, 3, 6], scales=[0, 1, 2])
    fig = plot_routing_losses(curves)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    lb, z = fig.axes
    drawn = [list(line.get_ydata()) for line in lb.get_lines()]
    assert drawn[:2] == [list(curves["balance_one_game"]), list(curves["balance_mixed"])]
    assert [line.get_ydata()[0] for line in lb.get_lines()[2:]] == [1.0, 4.0]
    assert list(z.get_lines()[0].get_ydata()) == list(curves["z_loss"])


def test_dispatch_plot_shows_the_sorted_slices():
    indices = torch.tensor([[2, 0], [1, 2], [0, 1], [2, 1]])
    fig = plot_dispatch(indices, 3)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    routed, grouped = fig.axes
    assert (routed.images[0].get_array() == indices.T.numpy()).all()
    assert list(grouped.images[0].get_array()[0]) == [0, 0, 1, 1, 1, 2, 2, 2]
    texts = [t.get_text() for t in grouped.texts]
    tokens = Dispatch.from_indices(indices).token.tolist()
    assert texts[:8] == [f"t{t}" for t in tokens] == ["t0", "t2", "t1", "t2", "t3", "t0",
                                                       "t1", "t3"]
    assert texts[8:] == ["e0\n0:2", "e1\n2:5", "e2\n5:8"]


def test_training_plot_shows_the_run():
    result = moe_training_run(8, 2, 2, **SMALL)
    fig = plot_moe_training(result)
    assert isinstance(fig, Figure) and len(fig.axes) == 4
    usage, traffic, hits, loss = fig.axes
    assert [bar.get_height() for bar in usage.patches] == list(result["usage"].sum(axis=0))
    total = sum(result["totals"][f"bytes_{link}"] for link in LINKS)
    assert sum(bar.get_height() for bar in traffic.patches) * 1024 == pytest.approx(total)
    assert len(traffic.patches) == len(LINKS) * SMALL["steps"]
    assert list(hits.get_lines()[0].get_ydata()) == list(result["hit_rate"])
    assert list(loss.get_lines()[0].get_ydata()) == list(result["loss"])
    assert f"{result['totals']['hit_rate']:.1%}" in fig._suptitle.get_text()


def test_callback_explains_an_impossible_setting_instead_of_raising(capsys):
    show_moe_training(4, 2, 8, **SMALL)
    assert "at most the number of experts" in capsys.readouterr().out
    assert plt.get_fignums() == []
    show_moe_training(4, 2, 4, **SMALL)
    assert len(plt.get_fignums()) == 1


def test_widget_drives_the_callback_and_clamps_top_k_and_hbm():
    box = moe_layer_widget(max_experts=32, **SMALL)
    sliders, _ = box.children
    experts, top_k, hbm = sliders.children
    assert (experts.min, experts.max, top_k.max, hbm.max) == (2, 32, 4, experts.value)
    assert len(plt.get_fignums()) == 1          # interactive_output drew the first setting
    hbm.value, top_k.value = 12, 4              # each change re-runs the callback here, where
    drawn = len(plt.get_fignums())              # errors propagate (no kernel to catch them)
    assert drawn == 3
    experts.value = 3                           # clamps both, then redraws
    assert (top_k.value, top_k.max, hbm.value, hbm.max) == (3, 3, 3, 3)
    assert len(plt.get_fignums()) > drawn
    experts.value = 32                          # raising the experts keeps the values
    assert (top_k.value, top_k.max, hbm.value, hbm.max) == (3, 4, 3, 32)
    hbm.value = 1
    show_moe_training(experts.value, top_k.value, hbm.value, **SMALL)


def test_the_exchange_plot_shows_each_ranks_rows_and_times():
    from ooc_moe.viz import plot_expert_exchange

    ranks = [{"rank": r, "experts": [r, r + 2], "sent": [[1, 2], sent],
              "step_s": [0.04, 0.06], "exchange_s": [0.01, 0.01]}
             for r, sent in enumerate(([5, 7], [3, 9]))]
    fig = plot_expert_exchange(ranks)
    matrix, times = fig.axes[:2]
    assert [t.get_text() for t in matrix.texts] == ["5", "7", "3", "9"]   # the last step's
    rest, exchange = times.containers
    assert [b.get_width() for b in exchange] == pytest.approx([10, 10])   # ms per step
    assert [b.get_width() for b in rest] == pytest.approx([40, 40])
    plt.close(fig)
