"""Environment detector on real Atari frames, its training targets, and the prefetch planner."""

import math
import time

import numpy as np
import pytest
import torch

from ooc_moe import TieredExpertStore, TieredMoELayer
from ooc_moe.detector import (DetectorTrainer, EnvironmentDetector, PrefetchPlanner,
                              evaluate_game_accuracy, used_expert_targets)
from ooc_moe.envs import collect_frames, make_synthetic
from ooc_moe.moe.router import CohortTable

FRAME = (1, 84, 84)


@pytest.fixture(scope="module")
def frames():
    """Real frames of two games: 160 per game to train on, then 64 later ones held out."""
    obs, game_ids = collect_frames(["pong", "breakout"], 224, num_envs=8, seed=0, stride=2)
    later = np.arange(len(obs)) % 224 >= 160
    return (torch.from_numpy(obs[~later]), torch.from_numpy(game_ids[~later]),
            torch.from_numpy(obs[later]), torch.from_numpy(game_ids[later]))


def make_detector(num_envs=2, num_experts=8, num_layers=1, seed=0):
    torch.manual_seed(seed)
    return EnvironmentDetector(FRAME, num_envs, num_experts, hidden_dim=64,
                               num_layers=num_layers)


# -- shapes and bad input --------------------------------------------------------------------
def test_forward_shapes():
    det = make_detector(num_envs=3, num_experts=8, num_layers=2)
    obs = torch.randint(0, 256, (5, 4, 84, 84), dtype=torch.uint8)
    game_logits, expert_logits = det(obs)
    assert game_logits.shape == (5, 3) and expert_logits.shape == (5, 2, 8)
    assert det(obs[0])[0].shape == (1, 3)                               # one observation
    assert torch.allclose(det(obs.view(5, 4, 1, 84, 84))[0], game_logits)  # [B, T, C, H, W]
    assert torch.allclose(det(obs.float() / 255)[0], game_logits, atol=1e-6)
    assert torch.allclose(det(obs.numpy())[0], game_logits)
    floats = obs.float() / 255                      # the same layers in the default layout
    hidden = det.proj(torch.flatten(det.encoder[:-1](floats), 1))
    torch.testing.assert_close(det.game_head(hidden), game_logits)
    assert torch.equal(floats, obs.float() / 255)                 # the caller's, untouched
    pred = det.predict(obs, top_k=3)
    assert pred.game_probs.shape == (5, 3) and pred.expert_probs.shape == (5, 2, 8)
    assert [len(s) for s in pred.prefetch_set] == [3, 3]
    assert 0 <= pred.game < 3 and 0.0 < pred.confidence <= 1.0
    assert det.get_prefetch_set(obs, 3) == pred.prefetch_set


@pytest.mark.parametrize("shape", [(5, 3, 84, 84), (5, 4, 84, 80), (4, 84), (0, 4, 84, 84)])
def test_wrong_obs_shape_names_the_expected_shape(shape):
    det = make_detector()
    with pytest.raises(ValueError, match=r"\[B, 4, 84, 84\]"):
        det(torch.zeros(shape, dtype=torch.uint8))


@pytest.mark.parametrize("top_k", [0, 9, -1])
def test_top_k_must_fit_the_experts(top_k):
    det = make_detector(num_experts=8)
    with pytest.raises(ValueError, match="top_k"):
        det.predict(torch.zeros(1, 4, 84, 84, dtype=torch.uint8), top_k)


@pytest.mark.parametrize("kwargs", [dict(obs_shape=(84, 84)), dict(num_envs=0),
                                    dict(num_experts=0), dict(obs_shape=(1, 20, 20))])
def test_bad_constructor_arguments(kwargs):
    args = dict(obs_shape=FRAME, num_envs=2, num_experts=4) | kwargs
    with pytest.raises(ValueError):
        EnvironmentDetector(**args)


# -- targets from the router -------------------------------------------------------------------
def test_used_expert_targets_per_observation_and_per_batch():
    # 2 observations x 3 tokens, top-2; layer 1 routes differently
    layer0 = torch.tensor([[0, 1], [1, 2], [0, 2], [5, 6], [5, 6], [6, 7]])
    layer1 = torch.tensor([[3, 4]] * 3 + [[4, 0]] * 3)
    per_obs = used_expert_targets([layer0, layer1], 8, batch_size=2)
    assert per_obs.shape == (2, 2, 8)
    assert per_obs[0, 0].nonzero().flatten().tolist() == [0, 1, 2]
    assert per_obs[1, 0].nonzero().flatten().tolist() == [5, 6, 7]
    assert per_obs[0, 1].nonzero().flatten().tolist() == [3, 4]
    assert per_obs[1, 1].nonzero().flatten().tolist() == [0, 4]
    per_batch = used_expert_targets([layer0, layer1], 8)
    assert per_batch.shape == (1, 2, 8)
    assert torch.equal(per_batch[0], per_obs.amax(0))
    with pytest.raises(ValueError, match="multiple of batch_size"):
        used_expert_targets(layer0, 8, batch_size=4)
    with pytest.raises(ValueError, match="0..3"):
        used_expert_targets(layer0, 4)


def test_used_expert_targets_from_a_real_moe_layer(tmp_path):
    batch, seq, dim = 3, 5, 4
    with TieredExpertStore(8, dim, 8, 8, 8, "cpu", path=tmp_path) as store, torch.no_grad():
        torch.manual_seed(0)
        layer = TieredMoELayer(dim, 8, store, top_k=2, dropout=0.0)
        layer.router.router.weight.normal_(0, 1.0)
        layer(torch.randn(batch, seq, dim))
        indices = layer.last_routing.expert_indices                     # [batch * seq, 2]
    targets = used_expert_targets([indices], 8, batch_size=batch)
    for b in range(batch):
        used = set(indices[b * seq:(b + 1) * seq].flatten().tolist())
        assert set(targets[b, 0].nonzero().flatten().tolist()) == used


# -- training on real frames -------------------------------------------------------------------
def test_game_accuracy_on_held_out_real_frames(frames):
    x, y, x_test, y_test = frames
    det = make_detector()
    trainer = DetectorTrainer(det, batch_size=32)
    result = trainer.fit(x, y, steps=40)
    assert result["steps"] == 40 and trainer.steps == 40
    accuracy, confusion = evaluate_game_accuracy(det, x_test, y_test, batch_size=50)
    assert accuracy > 0.9
    assert confusion.shape == (2, 2) and confusion.sum() == len(y_test)
    assert confusion.sum(1).tolist() == [64, 64]                        # rows: true games
    assert math.isclose(accuracy, np.trace(confusion) / len(y_test))


def test_expert_head_learns_each_games_experts(frames):
    # game g's steps use experts {2g, 2g+1} in layer 0 and {7 - g} in layer 1
    x, y, x_test, y_test = frames
    targets = torch.zeros(len(y), 2, 8)
    for g in (0, 1):
        targets[y == g, 0, 2 * g] = targets[y == g, 0, 2 * g + 1] = 1
        targets[y == g, 1, 7 - g] = 1
    det = make_detector(num_layers=2)
    DetectorTrainer(det, lr=2e-3, batch_size=32).fit(x, y, targets, steps=60)
    for g in (0, 1):
        prediction = det.predict(x_test[y_test == g], top_k=2)
        assert prediction.game == g
        assert set(prediction.prefetch_set[0]) == {2 * g, 2 * g + 1}
        assert prediction.prefetch_set[1][0] == 7 - g


def test_online_training_from_a_ring_buffer(frames):
    x, y, _, _ = frames
    det = make_detector()
    trainer = DetectorTrainer(det, batch_size=8, buffer_size=16)
    pong, breakout = x[y == 0], x[y == 1]
    trainer.add(pong[:10], torch.zeros(10, dtype=torch.long))   # game labels, no routing
    assert len(trainer) == 10
    routing = used_expert_targets(torch.tensor([[1, 2]]), 8)   # one per-batch target
    trainer.add(pong[10:20], torch.zeros(10, dtype=torch.long), routing)
    assert len(trainer) == 16                              # pong's oldest 4 were overwritten
    ring = trainer._obs[16:32]                              # game 0's ring (unknown: rows 0-15)
    assert torch.equal(ring[:4], pong[16:20]) and torch.equal(ring[4:10], pong[4:10])
    trainer.add(breakout[:40], torch.ones(40, dtype=torch.long))
    assert len(trainer) == 32                              # breakout's own ring: pong stays
    assert torch.equal(trainer._obs[16:20], pong[16:20])
    assert torch.equal(trainer._obs[32:48], breakout[24:40])   # its newest 16, in order
    drawn = []
    update = trainer._update
    trainer._update = lambda x, games, used, has_used: drawn.append(games) or {}
    for _ in range(20):
        trainer.step()
    trainer._update = update
    drawn = torch.cat(drawn)                                # uniform over the 32 frames
    assert 0.3 < (drawn == 0).float().mean() < 0.7 and set(drawn.tolist()) == {0, 1}
    losses = trainer.step()
    assert set(losses) >= {"loss", "game_loss", "expert_loss", "game_accuracy"}
    assert all(math.isfinite(v) for v in losses.values())
    before = [p.clone() for p in det.parameters()]
    unlabelled = trainer.train_step(x[:4])                 # no labels: no update at all
    assert unlabelled["loss"] == 0.0 and math.isnan(unlabelled["game_accuracy"])
    assert trainer.steps == 1 and all(torch.equal(a, b) for a, b in zip(before, det.parameters()))
    with pytest.raises(ValueError, match="uint8"):
        trainer.add(x[:2].float())
    with pytest.raises(ValueError, match=r"\[B or 1, 1, 8\]"):
        trainer.train_step(x[:2], y[:2], torch.zeros(2, 8, 1))
    with pytest.raises(RuntimeError, match="empty"):
        DetectorTrainer(det).step()


@pytest.mark.slow
def test_four_games_reach_99_percent_within_two_minutes():
    games = ["pong", "breakout", "boxing", "freeway"]
    x, y = collect_frames(games, 2000, seed=0)
    x_test, y_test = collect_frames(games, 1000, seed=1)         # other episodes entirely
    torch.manual_seed(0)
    det = EnvironmentDetector(FRAME, len(games), num_experts=32)
    trainer = DetectorTrainer(det, batch_size=64)
    started, accuracy = time.perf_counter(), 0.0
    while accuracy < 0.995 and time.perf_counter() - started < 120:
        trainer.fit(torch.from_numpy(x), torch.from_numpy(y), steps=50)
        accuracy, confusion = evaluate_game_accuracy(det, x_test, y_test)
    print(f"\n{trainer.steps} steps of 64, {time.perf_counter() - started:.1f} s (with "
          f"evaluation): held-out accuracy {accuracy:.4f}\n{confusion}")
    assert accuracy >= 0.99


# -- the prefetch planner ----------------------------------------------------------------------
def fixed_detector(probs_per_layer):
    """A real detector whose expert head ignores the frames and outputs ``probs_per_layer``."""
    probs = torch.tensor(probs_per_layer, dtype=torch.float32)
    det = make_detector(num_experts=probs.shape[1], num_layers=probs.shape[0])
    with torch.no_grad():
        det.expert_head.weight.zero_()
        det.expert_head.bias.copy_(torch.logit(probs).reshape(-1))
    return det


PROBS = [0.9, 0.8, 0.7, 0.6, 0.55, 0.1, 0.05, 0.01]
OBS = torch.zeros(2, 4, 84, 84, dtype=torch.uint8)


@pytest.fixture
def store(tmp_path):
    with TieredExpertStore(8, 4, 8, hbm_capacity=4, dram_capacity=8, device="cpu",
                           path=tmp_path) as s:
        yield s


def test_planner_grades_its_prediction_and_copies_what_fits(store):
    planner = PrefetchPlanner(store, fixed_detector([PROBS]))      # predicts 0..4 (p >= 0.5)
    store.pin([7])                                   # 3 of the 4 HBM slots stay free
    assert planner.plan(OBS) == [0, 1, 2]            # the likeliest that fit are copied
    store.synchronize()
    assert [store.where(e) for e in (0, 1, 2)] == ["hbm"] * 3
    assert planner.history == [] and planner._pending.planned == [0, 1, 2, 3, 4]
    assert planner.observe([0, 3, 7]) == {"precision": 2 / 5, "coverage": 2 / 3}
    store.unpin([7])
    # 7, unpinned, is still the store's last get_experts result: 3 slots are free; but the
    # game is the same, so the last step's experts in HBM (0, 7) are kept and 3 finds none
    assert store.prefetch_slots == 3 and store.room_for_prefetch([0, 1, 2, 7]) == 0
    assert planner.plan(OBS) == [0, 1, 2, 7]
    assert store.where(3) != "hbm" and store.where(7) == "hbm"
    store.get_experts([1, 2, 3, 5])
    step = planner.observe(torch.tensor([[1, 2], [3, 5]]))  # an expert_indices tensor
    assert step == {"precision": 3 / 5, "coverage": 3 / 4}
    assert planner.precision == 5 / 10 and planner.coverage == 5 / 7
    summary = planner.summary()
    assert (summary["steps"], summary["planned"], summary["used"], summary["hits"]) == (
        2, 10, 7, 5)
    assert [r.hits for r in planner.history] == [2, 3]
    assert summary["dropped"] == 0 and summary["switches"] == 0
    assert math.isnan(summary["switch_precision"])
    assert store.get_stats_summary()["prefetch_hits"] == 2                # 1 and 2 waited
    planner.reset()
    assert planner.summary()["steps"] == 0 and math.isnan(planner.precision)


@pytest.mark.parametrize("pinned", [0, 1, 2, 3])
@pytest.mark.parametrize("top_k, min_prob", [(None, 0.0), (2, 0.0), (8, 0.5), (None, 0.75)])
def test_planner_never_copies_more_than_the_free_slots(store, pinned, top_k, min_prob):
    planner = PrefetchPlanner(store, fixed_detector([PROBS]), top_k, min_prob=min_prob)
    if pinned:
        store.pin(list(range(8 - pinned, 8)))
    predicted = [e for e, p in enumerate(PROBS) if p >= min_prob][:top_k or 8]
    resident = [e for e in predicted if e >= 8 - pinned]          # pinned: touched, not copied
    copied = [e for e in predicted if e not in resident][:4 - pinned]
    assert planner.plan(OBS) == resident + copied
    assert planner._pending.planned == predicted
    stats = store.get_stats_summary()
    assert stats["prefetches_issued"] == len(copied)
    assert planner.summary()["dropped"] == stats["prefetches_dropped"] == 0


def test_a_wrong_prediction_never_evicts_the_last_steps_experts_until_the_game_switches(store):
    """The detector predicts 0..4 but the step uses 5 and 6: while the game stays, the next
    plans keep 5 and 6 in HBM (the collapse of an untrained prediction onto the step's own
    experts cost a run most of its hits); at a switch the new game's prediction may take
    their slots."""
    planner = PrefetchPlanner(store, fixed_detector([PROBS]))
    same, other = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    for _ in range(3):
        planner.plan(OBS, same)
        store.synchronize()
        store.get_experts([5, 6])
        planner.observe([5, 6])
        store.get_experts([0])                     # another layer: 5 and 6 not "in use"
        assert store.where(5) == store.where(6) == "hbm"
    # a switch: 0 (in use) and 3 are there, 1 and 2 go where the old game's 5 and 6 were
    assert planner.plan(OBS, other) == [0, 3, 1, 2]
    store.synchronize()
    assert {store.where(5), store.where(6)} != {"hbm"}
    planner.observe([0, 1])
    summary = planner.summary()      # a switch is graded over the steps until the next one
    assert summary["switches"] == 1
    assert (summary["switch_precision"], summary["switch_coverage"]) == (2 / 5, 1.0)
    for used in ([2], [7], [3], [4]):      # all of them count: the game is still the same
        planner.plan(OBS, other)
        planner.observe(used)
    summary = planner.summary()
    assert summary["switches"] == 1
    assert (summary["switch_precision"], summary["switch_coverage"]) == (5 / 5, 5 / 6)
    assert (summary["precision"], summary["coverage"]) == (5 / 40, 5 / 12)  # per step
    with store.in_phase("eval"):          # the next switch closes the window and opens one
        planner.plan(OBS, same)
        planner.observe([5])
    summary = planner.summary()
    assert summary["switches"] == 2
    assert (summary["switch_precision"], summary["switch_coverage"]) == (5 / 10, 5 / 7)
    # graded by the phase each switch happened in: the first in "other", the second in "eval"
    assert summary["switch_phases"] == {
        "other": {"switches": 1, "switch_precision": 5 / 5, "switch_coverage": 5 / 6},
        "eval": {"switches": 1, "switch_precision": 0 / 5, "switch_coverage": 0 / 1}}


def test_planner_over_layers_sharing_one_store(store):
    # expert 4 is unlikely in each layer alone but likely in at least one (1 - 0.6^2 = 0.64)
    det = fixed_detector([[0.9, 0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.1],
                          [0.1, 0.1, 0.1, 0.1, 0.4, 0.1, 0.1, 0.8]])
    assert PrefetchPlanner(store, det).plan(OBS) == [0, 7, 4]
    assert PrefetchPlanner(store, det, layer=1).plan(OBS) == [7]


def test_a_cohort_planner_follows_the_game_the_detector_sees(store):
    """Cohort routing: the plan is the seen game's cohort (every layer) until it has been
    played, then what it used of late; copies go into the free slots; a game switch brings the
    new game's cohort in."""
    det = make_detector(num_envs=2, num_experts=8, num_layers=2)
    cohorts = CohortTable(2, 2, 2, 8)               # 2 games x 2 layers x 2 experts
    planner = PrefetchPlanner(store, det, cohorts=cohorts)

    def sees(game):
        with torch.no_grad():
            det.game_head.weight.zero_()
            det.game_head.bias.copy_(torch.tensor([5.0, -5.0][::1 if game == 0 else -1]))

    sees(1)
    assert sorted(planner.plan(OBS)) == [0, 1, 2, 3]     # game 1, new: the first cohort
    assert cohorts.table[1].tolist() == [[0, 1], [2, 3]] and cohorts.table[0, 0, 0] == -1
    store.get_experts([0, 1])                            # 2 slots in use, 2 free
    sees(0)
    assert sorted(planner.plan(OBS)) == [4, 5]           # game 0's cohort, as far as it fits
    store.get_experts([4, 5])
    assert planner.plan(OBS) == [4, 5, 6, 7]             # still game 0: 4, 5 kept, the rest
    assert planner.observe([6, 7]) == {"precision": 0.5, "coverage": 1.0}
    assert planner.plan(OBS) == [6, 7]                   # what game 0 used of late
    assert [r.switch for r in planner.history] == [False, True, False]       # 1 -> 0
    assert planner.summary()["switches"] == 0            # the switch's step was not observed
    planner.observe([6])
    sees(1)
    planner.plan(OBS)
    planner.observe([0])
    sees(0)                              # back to game 0: its whole cohort, not just 6 and 7
    planner.plan(OBS)
    assert planner._pending.planned == [4, 5, 6, 7] and planner._pending.switch


def test_planner_bad_use(store):
    planner = PrefetchPlanner(store, fixed_detector([PROBS]))
    with pytest.raises(RuntimeError, match="plan"):
        planner.observe([0])
    with pytest.raises(ValueError, match="16 per layer"):
        PrefetchPlanner(store, make_detector(num_experts=16))
    with pytest.raises(ValueError, match="top_k"):
        PrefetchPlanner(store, fixed_detector([PROBS]), top_k=9)
    with pytest.raises(ValueError, match="layer"):
        PrefetchPlanner(store, fixed_detector([PROBS]), layer=1)


def synthetic_frames(game: int, steps: int, seed: int) -> torch.Tensor:
    env = make_synthetic(game, 8, seed=seed)
    obs, _ = env.reset()
    frames = [obs]
    for _ in range(steps - 1):
        obs, *_ = env.step(np.zeros(8, dtype=np.int64))
        frames.append(obs)
    return torch.from_numpy(np.concatenate(frames))


def test_a_game_is_known_once_the_detector_names_it_over_a_full_window():
    """``known_games``: a game's frames in the minibatches are not enough; the detector must
    name them right (``known_accuracy``) over its last ``known_window`` minibatches. A
    detector stuck on game 0 (no learning to speak of) knows game 0 only."""
    det = make_detector(num_envs=2)
    with torch.no_grad():
        det.game_head.weight.zero_()
        det.game_head.bias.copy_(torch.tensor([5.0, -5.0]))
    trainer = DetectorTrainer(det, lr=1e-12, seed=0, known_window=4)
    for game in range(2):
        frames = synthetic_frames(game, 32, seed=game)
        trainer.add(frames, torch.full((len(frames),), game))
    for step in range(6):
        assert trainer.known_games().tolist() == ([True, False] if step >= 4 else
                                                  [False, False]), step
        trainer.step()
    assert [len(w) for w in trainer.named] == [4, 4]
    assert all(right == 0 for right, _ in trainer.named[1])
    with pytest.raises(ValueError, match="known_accuracy"):
        DetectorTrainer(det, known_accuracy=0.0)


def test_online_detector_waits_for_a_second_game_and_names_only_games_it_was_trained_on():
    """Games come one at a time (three synthetic games, as in a sequential run). While the
    buffer holds one game, step() leaves the detector as it is: fitting one class saturated
    it, its ReLUs died and it named game 0 for every game after all three were played. Once
    a second game arrives it learns both; predict_games names only the games it was trained
    on (``known_games``): a game whose frames only wait in the buffer is not one of them."""
    det = make_detector(num_envs=3)
    trainer = DetectorTrainer(det, seed=0)
    held_out = [synthetic_frames(g, 8, seed=9) for g in range(3)]
    assert trainer.predict_games(held_out[0]) is None                  # nothing seen yet
    before = [p.clone() for p in det.parameters()]
    for game in range(3):
        frames = synthetic_frames(game, 32, seed=game)
        trainer.add(frames, torch.full((len(frames),), game))
        for _ in range(100):
            losses = trainer.step()
        if game == 0:
            assert math.isnan(losses["game_accuracy"]) and trainer.steps == 0
            assert all(torch.equal(a, b) for a, b in zip(before, det.parameters()))
            assert trainer.seen_games().tolist() == [True, False, False]
            assert not trainer.known_games().any()                   # it can name none
            assert trainer.predict_games(held_out[0]) is None
            continue
        assert trainer.known_games().tolist() == [g <= game for g in range(3)]
        seen = trainer.predict_games(torch.cat(held_out))
        assert set(seen.tolist()) <= set(range(game + 1))            # only games known
        for g in range(game + 1):
            assert (trainer.predict_games(held_out[g]) == g).all(), (game, g)
