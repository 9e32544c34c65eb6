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
