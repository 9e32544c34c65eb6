"""Synthetic Atari stand-ins: the AtariVectorEnv interface side by side with a real one, the
autoreset modes, determinism, games that look different and reward different actions, the
oracle against random play, clear errors, speed."""

import inspect

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode
from gymnasium.wrappers.vector import RecordEpisodeStatistics

from ooc_moe.envs import (SyntheticAtari, make_atari, make_synthetic, optimal_policy_return,
                          oracle_action, parse_synthetic_game, random_policy_return,
                          synthetic_game_names)
from ooc_moe.envs.synthetic import BACKGROUND_MAX, _action_table


def play(env, steps, seed=0):
    """Uniformly random actions; every step's (obs, rewards, terminated, truncated, info)."""
    rng = np.random.default_rng(seed)
    return [env.step(rng.integers(0, 18, env.num_envs)) for _ in range(steps)]


def frames_of(game, seed, n=8, steps=12):
    """Newest frames of random play, the square dimmed to the backgrounds' brightest grey."""
    env = SyntheticAtari(game, n, seed=seed)
    frames = np.concatenate([obs[:, -1] for obs, *_ in play(env, steps, seed)])
    return np.minimum(frames, BACKGROUND_MAX).astype(np.float32)


# -- the interface, side by side with AtariVectorEnv ------------------------------------

@pytest.fixture(scope="module")
def atari_pair():
    """Pong truncated after 10 steps (40 frames) next to a 10-step synthetic game."""
    atari = make_atari("pong", 2, seed=0, max_num_frames_per_episode=40)
    synthetic = SyntheticAtari(0, 2, seed=0, episode_steps=10)
    yield atari, synthetic
    atari.close()


def test_spaces_match_atari(atari_pair):
    atari, synthetic = atari_pair
    for name in ("single_observation_space", "single_action_space", "observation_space",
                 "action_space", "num_envs", "batch_size", "autoreset_mode"):
        assert getattr(synthetic, name) == getattr(atari, name), name
    assert synthetic.single_observation_space.shape == (4, 84, 84)
    assert synthetic.single_action_space.n == 18


def test_signatures_match_atari(atari_pair):
    atari, synthetic = atari_pair
    for method in ("reset", "step", "close"):
        ours = inspect.signature(getattr(synthetic, method)).parameters
        theirs = inspect.signature(getattr(atari, method)).parameters
        assert [(p.name, p.kind) for p in ours.values()] == \
            [(p.name, p.kind) for p in theirs.values()], method


def test_outputs_match_atari(atari_pair):
    atari, synthetic = atari_pair
    (a_obs, a_info), (s_obs, s_info) = atari.reset(seed=0), synthetic.reset(seed=0)
    assert (s_obs.shape, s_obs.dtype) == (a_obs.shape, a_obs.dtype)
    actions = np.array([0, 5])
    for a_out, s_out in zip(atari.step(actions), synthetic.step(actions)):
        if isinstance(a_out, dict):
            assert set(a_out) <= set(s_out)                # Atari's keys, and a few more
            for key in a_out:
                assert (s_out[key].shape, s_out[key].dtype) == \
                    (a_out[key].shape, a_out[key].dtype), key
        else:
            assert (s_out.shape, s_out.dtype) == (a_out.shape, a_out.dtype)
    assert set(a_info) <= set(s_info)


def test_next_step_autoreset_matches_atari(atari_pair):
    """Same actions, same pattern: 10 scored steps, the last truncated, then a reset step
    that scores nothing and ends nothing."""
    atari, synthetic = atari_pair
    atari.reset(seed=0)
    synthetic.reset(seed=0)
    theirs, ours = play(atari, 25), play(synthetic, 25)
    for name, k in (("terminated", 2), ("truncated", 3)):
        assert [o[k].tolist() for o in ours] == [t[k].tolist() for t in theirs], name
    ended = [t for t, out in enumerate(ours) if out[3].any()]
    assert ended == [9, 20]                             # 10 steps, a reset step, 10 steps
    for t in (10, 21):                                  # reset steps
        assert (ours[t][1] == 0).all() and (theirs[t][1] == 0).all()
        assert (ours[t][4]["episode_frame_number"] == 0).all()


def test_same_step_autoreset_matches_atari():
    atari = make_atari("pong", 2, seed=0, max_num_frames_per_episode=40,
                       autoreset_mode="SameStep")
    try:
        synthetic = make_synthetic("synthetic-0", 2, episode_steps=10, autoreset_mode="SameStep")
        assert synthetic.autoreset_mode == atari.autoreset_mode == AutoresetMode.SAME_STEP
        theirs, ours = play(atari, 21), play(synthetic, 21)
    finally:
        atari.close()
    assert [o[3].tolist() for o in ours] == [t[3].tolist() for t in theirs]
    assert [t for t, o in enumerate(ours) if "final_obs" in o[4]] == \
        [t for t, o in enumerate(theirs) if "final_obs" in o[4]] == [9, 19]
    assert ours[9][4]["final_obs"].shape == theirs[9][4]["final_obs"].shape == (2, 4, 84, 84)


# -- autoreset, in detail ---------------------------------------------------------------

def test_reset_step_ignores_its_action():
    outs = []
    for action in (0, 7):
        env = SyntheticAtari(1, 3, seed=4, episode_steps=3)
        play(env, 3)
        outs.append(env.step(np.full(3, action)))
    (obs_a, r_a, te_a, tr_a, info_a), (obs_b, r_b, *_) = outs
    assert (obs_a == obs_b).all() and (r_a == 0).all() and (r_b == 0).all()
    assert not te_a.any() and not tr_a.any() and np.isnan(info_a["episode_return"]).all()


def test_same_step_is_next_step_one_step_early():
    """SameStep returns at the ending step what NextStep returns one step later, and its
    final_obs is what NextStep returned at the ending step."""
    nxt = SyntheticAtari(2, 3, seed=1, episode_steps=4)
    same = SyntheticAtari(2, 3, seed=1, episode_steps=4, autoreset_mode="SameStep")
    action = np.zeros(3, np.int64)
    outs_next = [nxt.step(action) for _ in range(5)]
    outs_same = [same.step(action) for _ in range(4)]
    assert outs_same[3][3].all() and outs_next[3][3].all()
    assert (outs_same[3][4]["final_obs"] == outs_next[3][0]).all()
    assert (outs_same[3][0] == outs_next[4][0]).all()
    assert (outs_same[3][4]["episode_return"] == outs_next[3][4]["episode_return"]).all()
    assert "final_obs" not in outs_same[2][4]


def test_same_step_final_obs_only_where_an_episode_ended():
    env = SyntheticAtari(4, 3, seed=0, max_misses=1, autoreset_mode="SameStep")
    before = env.step(env.best_action())[0]
    good = env.best_action()
    obs, r, te, tr, info = env.step(np.where(np.arange(3) == 1, (good + 1) % 18, good))
    assert te.tolist() == [False, True, False] and r.tolist() == [1, 0, 1]
    final = info["final_obs"]
    assert (final[[0, 2]] == 0).all()                   # as AtariVectorEnv: zeros
    assert (final[1, :-1] == before[1, 1:]).all()       # the ended episode's last stack
    assert not (obs[1] == final[1]).all() and info["episode_frame_number"][1] == 0


def test_episode_statistics_and_misses():
    env = SyntheticAtari(5, 4, seed=0, episode_steps=6, max_misses=2)
    good = env.best_action()
    wrong = (good + 1) % 18
    obs, r, te, tr, info = env.step(np.where(np.arange(4) < 2, good, wrong))
    assert r.tolist() == [1, 1, 0, 0] and info["lives"].tolist() == [2, 2, 1, 1]
    obs, r, te, tr, info = env.step(np.where(np.arange(4) == 2, env.best_action(),
                                             (env.best_action() + 1) % 18))
    assert te.tolist() == [False, False, False, True] and not tr.any()
    assert info["episode_return"][3] == 0 and info["episode_length"][3] == 2
    assert np.isnan(info["episode_return"][:3]).all() and (info["episode_length"][:3] == 0).all()
    returns = np.zeros(4)
    for _ in range(12):
        obs, r, te, tr, info = env.step(env.best_action())
        ended = ~np.isnan(info["episode_return"])
        returns[ended] = info["episode_return"][ended]
    assert (returns[:2] == 6).all()                     # every step of 6 scored


def test_record_episode_statistics_wrapper_agrees():
    env = RecordEpisodeStatistics(SyntheticAtari(0, 3, seed=0, episode_steps=5))
    env.reset(seed=0)
    for _ in range(5):
        obs, r, te, tr, info = env.step(env.unwrapped.best_action())
    assert info["_episode"].all() and (info["episode"]["l"] == 5).all()
    assert (info["episode"]["r"] == info["episode_return"]).all()


# -- determinism ------------------------------------------------------------------------

def test_same_seed_same_trajectory_other_seed_other():
    runs = [play(SyntheticAtari(3, 4, seed=s, episode_steps=20), 45) for s in (7, 7, 8)]
    for a, b in zip(runs[0], runs[1]):
        assert all(np.array_equal(x, y) for x, y in zip(a[:4], b[:4]))
        assert all(np.array_equal(a[4][k], b[4][k], equal_nan=True) for k in a[4])
    assert not all(np.array_equal(a[0], b[0]) for a, b in zip(runs[0], runs[2]))


def test_reset_seed_reproduces_and_mask_leaves_others():
    env = SyntheticAtari(3, 4, seed=0)
    first, _ = env.reset(seed=11)
    play(env, 5)
    again, _ = env.reset(seed=11)
    assert (first == again).all()
    before, *_ = env.step(np.zeros(4, np.int64))
    mask = np.array([True, False, True, False])
    after, _ = env.reset(seed=np.array([11, 12]), options={"reset_mask": mask})
    assert (after[~mask] == before[~mask]).all()
    assert (after[0] == first[0]).all() and (after[2] == first[1]).all()   # seeds 11, 12


# -- games: look, rules, baselines ------------------------------------------------------

def test_games_look_different():
    """Nearest mean frame (fitted on seed 0) names the game of every seed-1 frame (the
    square, the same in every game, is dimmed: 100 pixels of it can outweigh the texture)."""
    games = range(8)
    means = np.stack([frames_of(g, seed=0).mean(0) for g in games])
    gaps = np.abs(means[:, None] - means[None]).mean(axis=(2, 3))
    assert gaps[~np.eye(8, dtype=bool)].min() > 10         # grey levels, per pixel
    for g in games:
        test = frames_of(g, seed=1, n=4, steps=4)
        distances = ((test[:, None] - means[None]) ** 2).sum(axis=(2, 3))
        assert (distances.argmin(1) == g).all()


@pytest.mark.parametrize("motion", [False, True])
@pytest.mark.parametrize("autoreset_mode", ["NextStep", "SameStep"])
def test_oracle_reads_the_action_from_pixels(motion, autoreset_mode):
    env = SyntheticAtari(6, 8, seed=2, episode_steps=15, motion=motion,
                         autoreset_mode=autoreset_mode)
    obs, _ = env.reset()
    rng = np.random.default_rng(0)
    for _ in range(40):
        assert (oracle_action(obs, 6, motion=motion) == env.best_action()).all()
        obs, *_ = env.step(rng.integers(0, 18, 8))


def test_the_optimal_policy_is_linear_in_the_pixels():
    """Ridge regression from the (downsampled) newest frame to the oracle's action, fitted on
    seed 0, is right on > 90% of seed-1 observations: a small network learns this fast."""
    def data(seed):
        env = SyntheticAtari(0, 16, seed=seed)
        obs, _ = env.reset()
        frames, actions = [], []
        for _ in range(48):
            frames.append(obs[:, -1, ::3, ::3].reshape(16, -1) / 255.0)   # 28 x 28
            actions.append(env.best_action())
            obs, *_ = env.step(np.zeros(16, np.int64))
        return np.concatenate(frames), np.concatenate(actions)
    (x, y), (x_test, y_test) = data(0), data(1)
    mean = x.mean(0)
    x, x_test = x - mean, x_test - mean
    targets = np.eye(18)[y]
    alpha = np.linalg.solve(x @ x.T + np.eye(len(x)), targets - targets.mean(0))  # dual form
    accuracy = ((x_test @ (x.T @ alpha)).argmax(1) == y_test).mean()
    assert accuracy > 0.9


def test_oracle_far_above_random():
    random_return = random_policy_return("synthetic-1", episodes=64, seed=0)
    optimal = optimal_policy_return("synthetic-1", episodes=8, seed=0)
    assert optimal == 200.0
    assert abs(random_return - 200 / 18) < 2.5              # 11.1 expected
    assert optimal > 10 * random_return


def test_games_reward_different_actions_for_the_same_position():
    """Same seed: the square moves the same way in every game, the rewarded action differs."""
    best = np.stack([SyntheticAtari(g, 32, seed=3).best_action() for g in range(8)])
    for g in range(8):
        for h in range(g):
            assert (best[g] != best[h]).all()
    for motion, buckets in ((False, 4), (True, 4), (True, 9), (False, 18)):
        tables = np.stack([_action_table(g, 18, buckets, motion) for g in range(18)])
        flat = tables.reshape(18, -1)[:, :: 1 if motion else 2]   # one column per context
        assert all(len(set(col)) == 18 for col in flat.T)        # games differ per context
        assert all(len(set(row)) == flat.shape[1] for row in flat)  # contexts differ per game


def test_motion_makes_the_direction_matter():
    assert (_action_table(0, 18, 4, True)[:, 0] != _action_table(0, 18, 4, True)[:, 1]).all()
    assert (_action_table(0, 18, 4, False)[:, 0] == _action_table(0, 18, 4, False)[:, 1]).all()


# -- names and errors ---------------------------------------------------------------------

@pytest.mark.parametrize("name", [3, np.int64(3), "synthetic-3", "Synthetic_3", " synthetic3 "])
def test_game_names(name):
    env = make_synthetic(name, 1)
    assert env.game == 3 and env.game_name == "synthetic-3" and parse_synthetic_game(name) == 3


def test_names_beyond_eight_games():
    assert make_synthetic("synthetic-12", 1).game_name == "synthetic-12"
    assert synthetic_game_names(3) == ["synthetic-0", "synthetic-1", "synthetic-2"]


@pytest.mark.parametrize("kwargs, match", [
    (dict(game=8), "game must be in 0..7"), (dict(game=-1), "game must be"),
    (dict(num_envs=0), "num_envs"), (dict(num_envs=True), "num_envs"),
    (dict(episode_steps=0), "episode_steps"), (dict(buckets=9), "buckets"),
    (dict(num_actions=3), "num_actions"), (dict(motion=True, num_actions=7), "num_actions"),
    (dict(max_misses=0), "max_misses"), (dict(motion="yes"), "motion"),
    (dict(autoreset_mode="Disabled"), "autoreset_mode"),
    (dict(autoreset_mode="sometimes"), "autoreset_mode"), (dict(seed=-1), "seed"),
])
def test_bad_arguments(kwargs, match):
    args = dict(game=0, num_envs=2) | kwargs
    with pytest.raises(ValueError, match=match):
        SyntheticAtari(args.pop("game"), args.pop("num_envs"), **args)


@pytest.mark.parametrize("name", ["pong", "synthetic-", "synthetic-x", "-3", None, True, -2])
def test_bad_names(name):
    with pytest.raises(ValueError, match="synthetic"):
        parse_synthetic_game(name)


@pytest.mark.parametrize("actions, match", [
    ([0, 1], "numpy array"), (np.zeros(2), "int32 or int64"), (np.zeros(3, np.int64), "shape"),
    (np.array([0, 18]), r"0\.\.17"), (np.array([-1, 0]), r"0\.\.17"),
])
def test_bad_actions(actions, match):
    with pytest.raises(ValueError, match=match):
        SyntheticAtari(0, 2).step(actions)


@pytest.mark.parametrize("kwargs", [
    dict(seed=-1), dict(seed=1.5), dict(seed=np.array([1, 2, 3])),
    dict(options={"reset_mask": [True, False]}),
    dict(options={"reset_mask": np.array([1, 0])}),
])
def test_bad_reset_arguments(kwargs):
    with pytest.raises(ValueError, match="seed|reset_mask"):
        SyntheticAtari(0, 2).reset(**kwargs)


def test_oracle_rejects_other_arrays():
    with pytest.raises(ValueError, match=r"\[N, 4, 84, 84\]"):
        oracle_action(np.zeros((2, 84, 84), np.uint8), 0)
    with pytest.raises(ValueError, match="no square"):
        oracle_action(np.zeros((2, 4, 84, 84), np.uint8), 0)


def test_close():
    env = SyntheticAtari(0, 2)
    env.close()
    assert env.closed
