"""The frame MoE trains game after game through a store and records a replayable trace."""

import numpy as np
import torch

from ooc_moe import TieredExpertStore
from ooc_moe.envs import collect_frames
from ooc_moe.frame_moe import FrameMoE, routing_per_frame, train_sequentially
from ooc_moe.trace import simulate


def test_sequential_training_records_a_trace_the_simulator_reproduces():
    frames, games = collect_frames(["pong", "breakout"], 48, num_envs=4, seed=0)
    torch.manual_seed(0)
    with TieredExpertStore(16, 16, 32, 4, 8, "cpu", optimizer_state=True) as store:
        model = FrameMoE(store, num_games=2, num_layers=2, top_k=2)
        run = train_sequentially(model, frames, games, steps_per_game=4, batch_size=8)
        assert run.trace.games == [0] * 4 + [1] * 4
        assert all(len(step) == 2 for step in run.trace.layers)
        stats = store.get_stats_summary()
        result = simulate(run.trace, 4, 8, "lru")
        assert (result.accesses, result.hbm_hits, result.file_reads) == (
            stats["accesses"], stats["hbm_hits"], stats["file_reads"])
        assert store.trace is None  # recording stops with the run
        hot = routing_per_frame(model, frames)
        assert hot.shape == (len(frames), 2, 16)
        per_frame = hot.sum(-1)
        assert ((per_frame >= 2) & (per_frame <= 9 * 2)).all()   # 9 tokens, top-2 each
        assert np.isfinite(run.losses).all() and len(run.accuracy) == 8


def test_online_detector_and_planner_during_a_sequential_run():
    from ooc_moe.detector import DetectorTrainer, EnvironmentDetector, PrefetchPlanner

    frames, games = collect_frames(["pong", "breakout"], 48, num_envs=4, seed=0)
    torch.manual_seed(0)
    with TieredExpertStore(16, 16, 32, 8, 16, "cpu", optimizer_state=True) as store:
        model = FrameMoE(store, num_games=2, num_layers=2, top_k=2)
        detector = EnvironmentDetector((1, 84, 84), 2, 16, hidden_dim=32, num_layers=2)
        trainer = DetectorTrainer(detector, batch_size=16)
        planner = PrefetchPlanner(store, detector, min_prob=0.3)
        run = train_sequentially(model, frames, games, steps_per_game=6, batch_size=8,
                                 planner=planner, detector_trainer=trainer)
        assert len(trainer) == 12 * 8                     # every step's frames were added
        assert planner.summary()["steps"] == 12
        assert len(run.trace.prefetch) == 12
        planned = [ids for ids in run.trace.prefetch if ids]
        assert planned, "a trained detector should predict some experts"
        assert any(kind == "prefetch_hbm" for kind, _, _ in run.trace.events)
        assert simulate(run.trace, 8, 16).accesses == store.stats.accesses
