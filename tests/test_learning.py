"""The learning check: the MoE agent, its experts trained out of core, learns a real Atari game
on a CPU budget. About an hour on a 2-core machine: ``OOC_MOE_SLOW=1 pytest tests/test_learning.py``.

The same run from the command line (committed: ``results/breakout-learning/moe-seed1/``):
``python -m ooc_moe train-atari --games breakout --steps_per_game 409600 --num_experts 32
--expert_dim 64 --expert_hidden_dim 128 --hbm_capacity 8 --dram_capacity 16 --context_len 4
--eval_episodes 8 --eval_max_steps 4000 --checkpoint_every 50 --out runs/learn-breakout``
"""

import numpy as np
import pytest

from ooc_moe.train import EvalArgs, TrainArgs, summarize, train

LEARNING_CHECK = TrainArgs(games=("breakout",), steps_per_game=409_600, device="cpu",
                           num_experts=32, expert_dim=64, expert_hidden_dim=128,
                           hbm_capacity=8, dram_capacity=16, context_len=4,
                           eval=EvalArgs(episodes=8, max_steps=4000))


@pytest.mark.slow
def test_the_moe_agent_learns_breakout_within_a_cpu_budget():
    metrics = train(LEARNING_CHECK, progress=False)
    metrics["agent"].store.shutdown()
    returns = [r for h in metrics["history"] for r in h["charts/episodic_returns"]]
    first, last = np.mean(returns[:100]), np.mean(returns[-100:])
    assert last > 2 * first, f"training returns {first:.2f} -> {last:.2f}"
    own = summarize({"breakout-seed1": metrics})["breakout"]      # noise: paired episodes
    assert own["rise"][0] > own["rise_noise"][0], f"evaluation rose by {own['rise'][0]:.2f}"
