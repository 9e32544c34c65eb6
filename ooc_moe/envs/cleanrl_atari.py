"""Atari as CleanRL's ``ppo_atari.py`` plays it: gymnasium's Python ``AtariEnv`` per environment
with its wrapper stack, for comparing this package's environments with CleanRL's.

``make_atari`` (ale-py's C++ ``AtariVectorEnv``) and CleanRL nearly agree on the frames (84x84
grey, max-pooled frameskip 4, up to 30 no-ops at reset, FIRE at reset, no sticky actions; the
grey comes from ALE's palette in both here, from RGB in CleanRL) but not on a lost life.
CleanRL's ``EpisodicLifeEnv`` ends the episode there, and the vector env's autoreset runs
``EpisodicLifeEnv.reset`` (one NOOP) and, in games with FIRE, ``FireResetEnv.reset`` (FIRE, then
the third action of the game's own set, RIGHT in Breakout), and ``FrameStack`` restarts its
stack from the new frame. So a CleanRL agent never has to press FIRE to relaunch the ball and
never sees the frames before the lost life. ``make_cleanrl_atari`` does the same steps at a
lost life without ending the episode (``PPOArgs.life_loss_terminal`` cuts the return there, as
``EpisodicLifeEnv`` does), so episode returns still count whole games; the rewards of those
extra steps (almost always 0) count in the step's reward. A stack starts as copies of its first
frame (AtariVectorEnv's starts from zeros). Resizing is OpenCV's ``INTER_AREA``, as in CleanRL.

It steps its environments one after another in Python, where ``AtariVectorEnv`` runs them in
C++ threads: use it for that comparison (``--atari_env cleanrl``), not by default.

References: CleanRL ``ppo_atari.py`` (Huang et al. 2022) and the stable-baselines3 Atari
wrappers it imports; gymnasium ``AtariPreprocessing``.
"""

from __future__ import annotations

from collections import deque

import gymnasium as gym
import numpy as np

from .atari import _env_seeds, minimal_actions, normalize_game_name

__all__ = ["LifeLossRestart", "make_cleanrl_atari"]

NOOP, FIRE = 0, 1                       # indices in the full 18-action space


class LifeLossRestart(gym.Wrapper):
    """Stack the last ``stack`` frames and, at reset and after a lost life, do what CleanRL's
    wrappers do: NOOP (a lost life only), then in a game with FIRE, FIRE and action 2 of the
    game's own action set (``minimal``, as full-space indices); then start the stack afresh
    from the newest frame. The episode ends only with the game."""

    def __init__(self, env: gym.Env, minimal: list[int], stack: int = 4,
                 clip_rewards: bool = False):
        super().__init__(env)
        self.serve = [FIRE, minimal[2]] if FIRE in minimal and len(minimal) >= 3 else []
        self.clip_rewards = clip_rewards
        self.frames: deque = deque(maxlen=stack)
        self.lives = 0
        low = np.zeros((stack, *env.observation_space.shape), np.uint8)
        self.observation_space = gym.spaces.Box(low, low + 255, dtype=np.uint8)

    def _restart(self, frame: np.ndarray) -> np.ndarray:
        self.frames.extend([frame] * self.frames.maxlen)
        return np.stack(self.frames)

    def _play(self, actions: list[int]) -> tuple:
        """Step ``actions`` until one ends the game; the last step's results, rewards summed."""
        total = 0.0
        for action in actions:
            frame, reward, terminated, truncated, info = self.env.step(action)
            total += reward
            if terminated or truncated:
                break
        return frame, total, terminated, truncated, info

    def reset(self, **kwargs):
        frame, info = self.env.reset(**kwargs)
        if self.serve:
            frame, _, terminated, truncated, info = self._play(self.serve)
            if terminated or truncated:
                frame, info = self.env.reset()
        self.lives = info["lives"]
        return self._restart(frame), info

    def step(self, action):
        frame, reward, terminated, truncated, info = self.env.step(action)
        lost_life = 0 < info["lives"] < self.lives
        if lost_life and not (terminated or truncated):
            frame, more, terminated, truncated, info = self._play([NOOP] + self.serve)
            reward += more
        self.lives = info["lives"]
        if lost_life and not (terminated or truncated):
            obs = self._restart(frame)
        else:
            self.frames.append(frame)
            obs = np.stack(self.frames)
        if self.clip_rewards:
            reward = float(np.sign(reward))
        return obs, reward, terminated, truncated, info


def _one_env(rom: str, clip_rewards: bool) -> LifeLossRestart:
    from ale_py import AtariEnv

    env = AtariEnv(rom, frameskip=1, repeat_action_probability=0.0, full_action_space=True,
                   max_num_frames_per_episode=108_000)
    env = gym.wrappers.AtariPreprocessing(env, noop_max=30, frame_skip=4, screen_size=84,
                                          terminal_on_life_loss=False, grayscale_obs=True)
    return LifeLossRestart(env, minimal_actions(rom), clip_rewards=clip_rewards)


def make_cleanrl_atari(game: str, num_envs: int, seed: int = 0, *,
                       autoreset_mode: str = "NextStep",
                       reward_clipping: bool = True) -> gym.vector.SyncVectorEnv:
    """``num_envs`` copies of ``game`` with CleanRL's wrappers (see the module docstring), as a
    gymnasium ``SyncVectorEnv``: the same observations (uint8 ``[num_envs, 4, 84, 84]``),
    18 actions, ``info["lives"]`` and seeding as ``make_atari``."""
    if not isinstance(num_envs, (int, np.integer)) or isinstance(num_envs, bool) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    rom = normalize_game_name(game)
    env = gym.vector.SyncVectorEnv(
        [lambda: _one_env(rom, reward_clipping) for _ in range(int(num_envs))],
        autoreset_mode=gym.vector.AutoresetMode(autoreset_mode))
    env.reset(seed=[int(s) for s in _env_seeds(seed, int(num_envs))])
    env.action_space.seed(seed)
    return env
