"""``python -m ooc_moe test``: every component once, at toy sizes, in seconds.

Not a replacement for ``make test`` (the pytest suite): a quick check that an installation
works end to end, from the expert file to one PPO update.
"""

from __future__ import annotations

import tempfile
import time
from typing import Callable

import torch

__all__ = ["run_smoke"]


def _store(tmp: str) -> None:
    from .store import TieredExpertStore

    with TieredExpertStore(8, 4, 8, 2, 4, path=tmp) as store:
        store.get_experts([0])[0].b2.fill_(3.0)
        store.mark_dirty([0])
        store.prefetch([1, 2])
        for e in range(1, 8):
            store.get_experts([e])
    with TieredExpertStore.open(tmp, hbm_capacity=2, dram_capacity=4) as store:
        assert torch.all(store.read_expert(0)["b2"] == 3.0), "a written-back expert was lost"


def _moe_and_simulator() -> None:
    from .moe import ExpertOptimizer, TieredMoELayer
    from .store import TieredExpertStore
    from .trace import RoutingTrace, simulate

    trace = RoutingTrace()
    with TieredExpertStore(8, 8, 16, 2, 4, optimizer_state=True) as store:
        store.trace = trace
        layer = TieredMoELayer(8, 16, store).to(store.device)
        y, aux = layer(torch.randn(2, 6, 8, device=store.device))
        (y.square().mean() + aux).backward()
        assert ExpertOptimizer(store).step() > 0, "no expert received a gradient"
        result = simulate(trace, 2, 4)
        assert result.accesses == store.stats.accesses, "the simulator disagrees with the store"


def _detector_and_planner() -> None:
    from .detector import EnvironmentDetector, PrefetchPlanner
    from .store import TieredExpertStore

    with TieredExpertStore(8, 4, 8, 4, 8) as store:
        detector = EnvironmentDetector((1, 84, 84), 2, 8, hidden_dim=16).to(store.device)
        obs = torch.zeros(2, 4, 84, 84, dtype=torch.uint8, device=store.device)
        PrefetchPlanner(store, detector, min_prob=0.0).plan(obs)


def _ppo_on_a_synthetic_game() -> None:
    from .train import EvalArgs, PPOArgs, TrainArgs, train

    args = TrainArgs(games=("synthetic-0",), steps_per_game=64, num_experts=8, expert_dim=16,
                     expert_hidden_dim=32, num_heads=2, hbm_capacity=4, dram_capacity=8,
                     context_len=2, ppo=PPOArgs(num_envs=4, num_steps=16, num_minibatches=2),
                     eval=EvalArgs(episodes=2, max_steps=8))
    result = train(args, progress=False)
    assert len(result["history"]) == 1 and len(result["retention"]) == 1
    result["agent"].store.shutdown()


def run_smoke(report: Callable[[str], None] = print) -> None:
    """Run each check, reporting its time; raises on the first failure."""
    with tempfile.TemporaryDirectory(prefix="ooc-moe-smoke-") as tmp:
        checks = [("tiered store: fetch, write-back, reopen", lambda: _store(tmp)),
                  ("MoE layer + ExpertOptimizer + simulator", _moe_and_simulator),
                  ("environment detector + prefetch planner", _detector_and_planner),
                  ("agent + one PPO update (synthetic game)", _ppo_on_a_synthetic_game)]
        for name, check in checks:
            started = time.perf_counter()
            check()
            report(f"ok  {name}  ({time.perf_counter() - started:.2f} s)")
