"""Atari environments through ale-py: names, preprocessing, and frames from random play."""

import numpy as np
import pytest
import torch

from ooc_moe.envs import (ATARI_DEFAULTS, collect_frames, make_atari, minimal_actions,
                          normalize_game_name)
from ooc_moe.train import action_masks


@pytest.mark.parametrize("game", ["pong", "breakout"])
def test_make_atari_obs_and_actions(game):
    env = make_atari(game, 2, seed=0)
    try:
        obs, info = env.reset()
        assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
        assert env.single_action_space.n == 18            # the full, shared action set
        obs, reward, terminated, truncated, info = env.step(np.zeros(2, dtype=np.int64))
        assert obs.shape == (2, 4, 84, 84) and reward.shape == (2,)
    finally:
        env.close()


def test_sticky_actions_are_stated_and_off_by_default():
    assert ATARI_DEFAULTS["repeat_action_probability"] == 0.0
    assert ATARI_DEFAULTS["full_action_space"] is True


@pytest.mark.parametrize("name, rom", [
    ("pong", "pong"), ("Pong", "pong"), ("ALE/Pong-v5", "pong"), ("PongNoFrameskip-v4", "pong"),
    ("breakout", "breakout"), ("ALE/Breakout-v5", "breakout"), ("BeamRider", "beam_rider"),
    ("beam-rider", "beam_rider"), ("MontezumaRevenge", "montezuma_revenge"),
])
def test_game_name_aliases(name, rom):
    assert normalize_game_name(name) == rom


@pytest.mark.parametrize("name, suggestion", [("pongg", "'pong'"), ("brekout", "'breakout'"),
                                              ("ALE/Boxxing-v5", "'boxing'")])
def test_unknown_game_lists_close_names(name, suggestion):
    with pytest.raises(ValueError, match="unknown Atari game") as err:
        make_atari(name, 1)
    assert suggestion in str(err.value)


def test_unknown_game_without_close_names():
    with pytest.raises(ValueError, match="no close name"):
        normalize_game_name("zzzzzzzz")


@pytest.fixture(scope="module")
def frames():
    return collect_frames(["pong", "breakout"], 20, num_envs=4, seed=0, warmup_steps=4,
                          stride=2)


def test_collect_frames_shapes_and_ids(frames):
    obs, game_ids = frames
    assert obs.shape == (40, 4, 84, 84) and obs.dtype == np.uint8
    assert game_ids.dtype == np.int64
    assert game_ids.tolist() == [0] * 20 + [1] * 20
    assert len(np.unique(obs.reshape(len(obs), -1), axis=0)) > 30   # frames are not copies


def test_collect_frames_is_deterministic_and_per_game(frames):
    obs, _ = frames
    # the same seed gives the same frames, whatever else is in the list
    again, ids = collect_frames(["breakout"], 20, num_envs=4, seed=0, warmup_steps=4, stride=2)
    assert np.array_equal(again, obs[20:]) and ids.tolist() == [0] * 20
    other, _ = collect_frames(["breakout"], 20, num_envs=4, seed=1, warmup_steps=4, stride=2)
    assert not np.array_equal(other, obs[20:])


@pytest.mark.parametrize("kwargs, message", [
    (dict(games="pong"), "list of names"), (dict(games=[]), "empty"),
    (dict(games=["pong", "Pong"]), "same game twice"), (dict(frames_per_game=0), ">= 1"),
    (dict(stride=0), "stride"),
])
def test_collect_frames_bad_input(kwargs, message):
    args = dict(games=["pong"], frames_per_game=4) | kwargs
    with pytest.raises(ValueError, match=message):
        collect_frames(args.pop("games"), args.pop("frames_per_game"), **args)


def test_minimal_actions_are_the_games_own_action_set_in_the_full_space():
    """ALE's action meanings: Breakout plays NOOP, FIRE, RIGHT, LEFT (0, 1, 3, 4), Pong adds
    RIGHTFIRE, LEFTFIRE (11, 12); as many as the env offers without the full action space."""
    assert minimal_actions("Breakout") == [0, 1, 3, 4]
    assert minimal_actions("ALE/Pong-v5") == [0, 1, 3, 4, 11, 12]
    for game in ("breakout", "pong", "freeway"):
        env = make_atari(game, 1, full_action_space=False)
        assert len(minimal_actions(game)) == env.single_action_space.n
        env.close()


def test_action_masks_hold_each_games_legal_actions_and_all_of_a_synthetic_one():
    masks = action_masks(["breakout", "synthetic-0"], 18)
    assert masks.dtype == torch.bool and masks.shape == (2, 18)
    assert masks[0].nonzero().flatten().tolist() == [0, 1, 3, 4]
    assert masks[1].all()


# -- CleanRL's wrappers (--atari_env cleanrl) ------------------------------------------------
def _noop_until_game_over(env, steps: int) -> tuple[list, bool]:
    """Play NOOP only in env 0 (the reset's FIRE launched the ball); the lives seen after
    each step and whether the game ended."""
    lives = []
    for _ in range(steps):
        _, _, terminated, truncated, info = env.step(np.zeros(env.num_envs, np.int64))
        if terminated[0] or truncated[0]:
            return lives, True
        lives.append(int(info["lives"][0]))
    return lives, False


def test_cleanrl_atari_matches_make_atari_frames_and_actions():
    from ooc_moe.envs.cleanrl_atari import make_cleanrl_atari

    env = make_cleanrl_atari("breakout", 2, seed=3, autoreset_mode="SameStep")
    vector = make_atari("breakout", 2, seed=3, noop_max=0)
    try:
        obs, info = env.reset(seed=3)
        first, _ = vector.reset(seed=3)
        assert obs.shape == first.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
        assert env.single_action_space.n == 18 and info["lives"].tolist() == [5, 5]
        assert all((obs[:, k] == obs[:, -1]).all() for k in range(4))  # the stack starts full
        # the same emulator, grey-scaling and 84x84 area resize: the newest frames agree
        # (up to the no-ops at reset, which move nothing in Breakout before the serve)
        assert np.abs(obs[0, -1].astype(int) - first[0, -1].astype(int)).mean() < 1.0
    finally:
        env.close()
        vector.close()


def test_cleanrl_atari_relaunches_the_ball_and_restarts_the_stack_after_a_lost_life():
    """Breakout needs FIRE to serve after a lost life: with NOOPs only, make_atari's game
    stalls after the first lost life, while CleanRL's wrappers serve for the agent (NOOP,
    FIRE, action 2), so the game runs through all five lives as one episode."""
    from ooc_moe.envs.cleanrl_atari import make_cleanrl_atari

    vector = make_atari("breakout", 1, seed=0)
    try:
        lives, ended = _noop_until_game_over(vector, 3000)
        assert not ended and lives[-1] == 4                     # one life lost, then nothing
    finally:
        vector.close()
    env = make_cleanrl_atari("breakout", 1, seed=0, autoreset_mode="SameStep")
    try:
        env.reset(seed=0)
        lives = [5]
        while True:
            obs, _, terminated, truncated, info = env.step(np.zeros(1, np.int64))
            if terminated[0] or truncated[0]:
                break
            if info["lives"][0] < lives[-1]:                    # the stack starts afresh
                assert all((obs[0, k] == obs[0, -1]).all() for k in range(4))
            lives.append(int(info["lives"][0]))
            assert len(lives) < 3000, "the game should end: the wrappers serve each ball"
        assert lives[-1] == 1 and sorted(set(lives)) == [1, 2, 3, 4, 5]
    finally:
        env.close()


def test_cleanrl_atari_clips_rewards_only_when_asked():
    """Space Invaders pays 5 to 30 points an invader: raw rewards, or their sign."""
    from ooc_moe.envs.cleanrl_atari import make_cleanrl_atari

    for clip in (False, True):
        env = make_cleanrl_atari("space_invaders", 2, seed=1, reward_clipping=clip)
        rng = np.random.default_rng(1)
        rewards = np.concatenate([env.step(rng.integers(0, 18, 2))[1] for _ in range(400)])
        env.close()
        if clip:
            assert set(rewards.tolist()) == {0.0, 1.0}
        else:
            assert rewards.max() >= 5.0


def test_cleanrl_atari_serves_as_cleanrl_does_and_only_in_games_with_fire():
    """CleanRL's FireResetEnv steps FIRE, then the game's own action 2 (RIGHT in Breakout,
    not the full set's UP); Freeway has no FIRE, so nothing is pressed for the agent."""
    from ooc_moe.envs.cleanrl_atari import _one_env

    breakout, freeway = _one_env("breakout", False), _one_env("freeway", False)
    assert breakout.serve == [1, 3] and freeway.serve == []
    breakout.close()
    freeway.close()


def test_train_args_name_the_atari_envs():
    from ooc_moe.train import TrainArgs, args_from_json
    from ooc_moe.train.run import args_to_json

    saved = args_to_json(TrainArgs())
    del saved["atari_env"]                                      # a run from before the flag
    assert args_from_json(saved).atari_env == "vector"
    with pytest.raises(ValueError, match="atari_env must be one of"):
        TrainArgs(atari_env="gym")


def test_training_with_cleanrl_atari_plays_and_evaluates_through_its_wrappers(monkeypatch,
                                                                             tmp_path):
    from ooc_moe.envs import cleanrl_atari
    from ooc_moe.train import EvalArgs, PPOArgs, TrainArgs, train

    made = []

    def spy(game, num_envs, seed=0, **kw):
        made.append((game, num_envs))
        return make_cleanrl(game, num_envs, seed, **kw)

    make_cleanrl = cleanrl_atari.make_cleanrl_atari
    monkeypatch.setattr(cleanrl_atari, "make_cleanrl_atari", spy)
    args = TrainArgs(games=("breakout",), steps_per_game=32, baseline="cnn", device="cpu",
                     atari_env="cleanrl", out=str(tmp_path),
                     ppo=PPOArgs(num_envs=2, num_steps=16, num_minibatches=1, update_epochs=1),
                     eval=EvalArgs(episodes=3, max_steps=8))
    metrics = train(args, progress=False)
    assert metrics["args"]["atari_env"] == "cleanrl"
    assert made.count(("breakout", 2)) == 1               # the stage's training envs
    assert made.count(("breakout", 3)) == 3               # random play, before and after
