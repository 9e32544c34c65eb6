"""Notebook 04's helpers and plots (the agent, its parameter budget, PPO runs), called directly
on tiny agents and hand-made histories: every number a figure shows is checked against the
source it was drawn from."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.collections import PolyCollection  # noqa: E402

from ooc_moe.agent import DenseRLAgent, MoERLAgentConfig  # noqa: E402
from ooc_moe.envs import make_synthetic  # noqa: E402
from ooc_moe.train import EvalArgs, PPOArgs, TrainArgs, train_run  # noqa: E402
from ooc_moe.viz import (last_episodes_return, layer_routing_counts,  # noqa: E402
                         one_rollout, plot_layer_routing, plot_learning_by_kind,
                         plot_learning_curve, plot_param_budget, plot_rollout_routing,
                         plot_store_history, position_routing_counts, summarize_history)
from ooc_moe.store.stats import LINKS  # noqa: E402

TINY = dict(num_experts=8, expert_dim=16, expert_hidden=32, num_layers=2, num_heads=2,
            context_len=3, hbm_cap=4, dram_cap=8, num_envs=2)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def agent():
    torch.manual_seed(0)
    agent = MoERLAgentConfig(**TINY).create_agent("cpu")
    yield agent
    agent.store.shutdown()


def forward(agent, batch=5, window=None):
    window = window or agent.config.context_len
    with torch.no_grad():
        agent(torch.randn(batch, window, agent.config.expert_dim))


def history(game="synthetic-0", updates=4, batch=100, offset=0, store=True, seed=0):
    """A hand-made ``train`` history: update i finishes i episodes of return 10 * (i + 1)
    (none in update 0); the store figures are simple functions of i."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(updates):
        row = {"game": game, "global_step": offset + (i + 1) * batch, "charts/SPS": 100.0 + i,
               "charts/episodic_returns": [10.0 * (i + 1) + d for d in rng.normal(0, 1, i)]}
        if store:
            hit = 0.2 * i
            row.update({"store/hit_rate": hit, "store/dram_hit_rate": 0.5 * (1 - hit),
                        "store/file_read_rate": 0.5 * (1 - hit),
                        "store/prefetch_precision": 0.1 * i, "store/prefetch_coverage": 0.05 * i,
                        "routing/router_entropy": 1 - 0.1 * i,
                        "routing/mutual_information": 0.0,
                        **{f"store/bytes_{link}": (j + 1) * 2**20 * (i + 1)
                           for j, link in enumerate(LINKS)}})
        rows.append(row)
    return rows


# -- the parameter budget --------------------------------------------------------------------
def test_param_budget_bars_are_estimate_params():
    configs = {"user default": MoERLAgentConfig(), "tiny": MoERLAgentConfig(**TINY)}
    fig = plot_param_budget(configs)
    params, tiers = fig.axes[:2]
    for ax, keys in ((params, ("total", "active_per_token", "dense")),
                     (tiers, ("bytes_hbm", "bytes_dram", "bytes_file"))):
        assert len(ax.containers) == len(keys)
        for bars, key in zip(ax.containers, keys):
            heights = [bar.get_height() for bar in bars]
            assert heights == [c.estimate_params()[key] for c in configs.values()]
        assert [t.get_text() for t in ax.get_xticklabels()] == list(configs)


def test_param_budget_takes_one_config():
    config = MoERLAgentConfig(**TINY)
    fig = plot_param_budget(config)
    assert fig.axes[0].containers[0][0].get_height() == config.estimate_params()["total"]
    assert fig.axes[1].containers[2][0].get_height() == config.estimate_params()["bytes_file"]


# -- routing of the last forward pass --------------------------------------------------------
def test_layer_counts_are_the_routing(agent):
    forward(agent, batch=5)
    counts = layer_routing_counts(agent)
    assert counts.shape == (2, 8)
    for row, layer in zip(counts, agent.moe_layers):
        expected = np.zeros(8, dtype=int)
        for e in layer.last_routing.expert_indices.flatten().tolist():
            expected[e] += 1
        assert row.tolist() == expected.tolist()
    # tokens x top_k per layer: every position, then the newest alone (newest_only)
    assert counts.sum(1).tolist() == [5 * 3 * 2, 5 * 2]


def test_position_counts_split_the_layer_counts_by_window_position(agent):
    forward(agent, batch=4)
    by_position = position_routing_counts(agent)
    assert by_position.shape == (2, 3, 8)
    np.testing.assert_array_equal(by_position.sum(1), layer_routing_counts(agent))
    for layer, table in zip(agent.moe_layers, by_position):   # the last: the newest alone
        indices = layer.last_routing.expert_indices.view(4, -1, 2)    # [B, T or 1, top_k]
        positions = range(3 - indices.shape[1], 3)
        for t in range(3):
            expected = (np.bincount(indices[:, t - positions[0]].flatten().numpy(),
                                    minlength=8) if t in positions else np.zeros(8))
            assert table[t].tolist() == expected.tolist()
    assert by_position[1, :2].sum() == 0 and by_position[0, :2].sum() > 0
    forward(agent, batch=4, window=2)
    assert position_routing_counts(agent, window_len=2).shape == (2, 2, 8)
    forward(agent, batch=3, window=2)                          # 6 tokens: not windows of 4
    with pytest.raises(AssertionError, match="window_len"):
        position_routing_counts(agent, window_len=4)


def test_layer_heatmap_shows_the_counts(agent):
    forward(agent)
    counts = layer_routing_counts(agent)
    ax = plot_layer_routing(agent).axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), counts)
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(counts.flatten().tolist())
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [f"layer {i} ({(row > 0).sum()} used)" for i, row in enumerate(counts)]


def test_heatmap_of_a_table_with_row_labels():
    table = np.arange(12).reshape(3, 4)
    ax = plot_layer_routing(table, "t", row_label="position").axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), table)
    assert ax.get_title() == "t"
    assert ax.get_yticklabels()[0].get_text() == "position 0 (3 used)"
    with pytest.raises(AssertionError, match="rows, experts"):
        plot_layer_routing(np.arange(4))


def test_routing_needs_a_forward_pass_and_moe_layers(agent):
    with pytest.raises(AssertionError, match="run agent"):
        layer_routing_counts(agent)
    with pytest.raises(AssertionError, match="run agent"):
        layer_routing_counts(DenseRLAgent(MoERLAgentConfig(**TINY), "cpu"))


# -- one rollout -----------------------------------------------------------------------------
def test_one_rollout_records_every_step(agent):
    env = make_synthetic("synthetic-0", 2, seed=0, autoreset_mode="SameStep")
    threads = torch.get_num_threads()
    rollout = one_rollout(agent, env, steps=6, seed=0)
    assert torch.get_num_threads() == threads
    routing = rollout["routing"]
    assert routing.shape == (6, 2, 8) and rollout["waves"].shape == (6, 2)
    # envs x window x top_k, then envs x top_k in the last layer (newest_only)
    assert (routing.sum(2) == [2 * 3 * 2, 2 * 2]).all()
    np.testing.assert_array_equal(routing[-1], layer_routing_counts(agent))
    assert rollout["rewards"].shape == rollout["actions"].shape == (6, 2)
    # each layer's forward fetches each expert it uses once
    assert rollout["store"]["accesses"] == (routing > 0).sum()
    assert rollout["sps"] == pytest.approx(12 / rollout["seconds"])
    env.close()


def test_rollout_plot_shows_each_layer(agent):
    env = make_synthetic("synthetic-1", 2, seed=0, autoreset_mode="SameStep")
    rollout = one_rollout(agent, env, steps=5, seed=1)
    env.close()
    fig = plot_rollout_routing(rollout, "title")
    images = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(images) == 2
    for layer, image in enumerate(images):
        np.testing.assert_array_equal(image.get_array(), rollout["routing"][:, layer].T)
    assert fig.get_suptitle() == "title"


def test_dense_agent_has_no_rollout_routing():
    dense = DenseRLAgent(MoERLAgentConfig(**TINY), "cpu")
    with pytest.raises(AssertionError, match="MoERLAgent"):
        one_rollout(dense, make_synthetic(0, 2, autoreset_mode="SameStep"), steps=1)


# -- learning curves and store figures -------------------------------------------------------
def line_data(ax, label_start):
    [line] = [ln for ln in ax.get_lines() if ln.get_label().startswith(label_start)]
    return line.get_xdata(), line.get_ydata()


def test_learning_curve_shows_returns_and_references():
    h = history()
    fig = plot_learning_curve(h, random_return=5.0, optimal_return=1000.0,
                              references={"human": 20.0})
    curve, tiers = fig.axes[:2]
    x, y = line_data(curve, "MoE")
    assert x.tolist() == [200, 300, 400]                       # update 0 finished nothing
    assert y == pytest.approx([np.mean(u["charts/episodic_returns"]) for u in h[1:]])
    dots = curve.collections[0].get_offsets()
    assert len(dots) == 1 + 2 + 3
    assert line_data(curve, "random")[1][0] == 5.0
    assert line_data(curve, "human")[1][0] == 20.0
    assert not [ln for ln in curve.get_lines() if ln.get_label().startswith("optimal")]
    assert any("optimal = 1000" in t.get_text() for t in curve.texts)   # far off: a note
    # (b) the three tiers stacked: the top of the stack is 1 at every update
    polys = [c for c in tiers.collections if isinstance(c, PolyCollection)]
    assert len(polys) == 3
    top = polys[-1].get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(1.0)
    labels = [t.get_text() for t in tiers.get_legend().get_texts()]
    assert labels[0] == f"HBM ({np.mean([u['store/hit_rate'] for u in h]):.0%} mean)"


def test_learning_curve_of_several_runs_and_games():
    two_games = history() + history("synthetic-1", offset=400)
    fig = plot_learning_curve({"MoE": two_games, "dense": history(store=False)}, 10.0)
    curve, tiers = fig.axes[:2]
    assert line_data(curve, "dense")[0].tolist() == [200, 300, 400]
    boundaries = [ln.get_xdata()[0] for ln in curve.get_lines() if ln.get_linestyle() == ":"]
    assert boundaries == [0, 400]
    assert [t.get_text().strip() for t in curve.texts] == ["synthetic-0", "synthetic-1"]
    assert "MoE" in tiers.get_title()


def test_learning_curve_of_a_dense_run_says_there_is_no_store():
    fig = plot_learning_curve(history(store=False))
    assert "no expert store" in fig.axes[1].texts[0].get_text()


def test_last_episodes_return_is_the_learning_tables_measure_along_the_run():
    h = history(updates=5)                  # 0, 1, 2, 3, 4 episodes: 10 of them
    returns = [r for u in h for r in u["charts/episodic_returns"]]
    steps, means = last_episodes_return(h, last=4)
    assert steps.tolist() == [200, 300, 400, 500]
    assert means == pytest.approx([returns[0], np.mean(returns[:3]), np.mean(returns[2:6]),
                                   np.mean(returns[6:])])


def test_learning_by_kind_averages_the_seeds_of_each_kind():
    runs = {"cnn-seed1": {"history": history(seed=1)},
            "cnn-seed2": {"history": history(updates=3, seed=2)},   # stopped early
            "dense-cleanrl-seed1": {"history": history(batch=50, seed=3)}}
    ax = plot_learning_by_kind(runs, random_return=1.5, last=2).axes[0]
    one, two = (last_episodes_return(runs[f"cnn-seed{s}"]["history"], 2) for s in (1, 2))
    x, y = line_data(ax, "cnn (2 seeds)")
    assert x.tolist() == [200, 300]                             # the steps both reached
    assert y == pytest.approx((one[1][:2] + two[1]) / 2)
    x, y = line_data(ax, "dense-cleanrl (1 seed)")
    assert x.tolist() == [100, 150, 200]
    assert y == pytest.approx(last_episodes_return(runs["dense-cleanrl-seed1"]["history"],
                                                   2)[1])
    assert line_data(ax, "random")[1][0] == 1.5
    [band, _] = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert band.get_paths()[0].vertices[:, 1].max() == pytest.approx(max(one[1][:2].max(),
                                                                         two[1].max()))


def test_store_history_panels():
    h = history()
    prefetch, moved, routing = plot_store_history(h).axes[:3]
    assert line_data(prefetch, "precision")[1] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert line_data(prefetch, "coverage")[1] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert line_data(routing, "router entropy")[1] == pytest.approx([1.0, 0.9, 0.8, 0.7])
    # (b) one stacked bar per update and link, in MiB
    assert len(moved.containers) == len(LINKS)
    for j, bars in enumerate(moved.containers):
        assert [b.get_height() for b in bars] == pytest.approx([(j + 1) * (i + 1)
                                                                for i in range(4)])
    with pytest.raises(AssertionError, match="dense"):
        plot_store_history(history(store=False))


def test_summary_of_a_history():
    h = history()
    s = summarize_history(h, last=2)
    assert s["steps"] == 400
    assert s["first_return"] == pytest.approx(h[1]["charts/episodic_returns"][0])
    assert s["last_return"] == pytest.approx(np.mean(h[2]["charts/episodic_returns"]
                                                     + h[3]["charts/episodic_returns"]))
    assert s["sps"] == pytest.approx(101.5)
    assert s["hit_rate"] == pytest.approx(0.3)
    assert s["bytes_file_to_dram"] == 2**20 * (1 + 2 + 3 + 4)
    dense = summarize_history(history(store=False))
    assert "hit_rate" not in dense and dense["last_return"] > dense["first_return"]


# -- a real (tiny) run -----------------------------------------------------------------------
def test_train_run_feeds_the_plots():
    args = TrainArgs(games=("synthetic-0", "synthetic-1"), steps_per_game=32, seed=0,
                     device="cpu", num_experts=8, expert_dim=16, expert_hidden_dim=32,
                     num_heads=2, context_len=2, hbm_capacity=4, dram_capacity=8,
                     ppo=PPOArgs(num_envs=2, num_steps=8, num_minibatches=1, update_epochs=1),
                     eval=EvalArgs(episodes=2, max_steps=8))
    threads = torch.get_num_threads()
    run = train_run(args)
    assert torch.get_num_threads() == threads
    assert [h["global_step"] for h in run["history"]] == [16, 32, 48, 64]
    fig = plot_learning_curve(run["history"])
    assert len([c for c in fig.axes[1].collections if isinstance(c, PolyCollection)]) == 3
    plot_store_history(run["history"])
    assert summarize_history(run["history"])["steps"] == 64
    run["agent"].store.shutdown()
