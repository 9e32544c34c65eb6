"""Synthetic stand-ins for Atari games: numpy-only, fast, with the ``AtariVectorEnv`` interface.

``SyntheticAtari`` has the spaces, dtypes, ``reset``/``step`` signatures, ``info`` keys and
autoreset modes of the ``AtariVectorEnv`` that ``make_atari`` returns (uint8
``[num_envs, 4, 84, 84]`` observations, 18 actions, int32 rewards), so a PPO loop, the
environment detector and the sequential multi-game experiments run on it unchanged, in seconds
and without ROMs. Games are named ``"synthetic-0"``, ``"synthetic-1"``, ...

**The game.** A bright 10x10 square bounces around a game-specific background (an oriented
grating, a few rectangles, a brightness level, fresh noise every frame: each game looks
different, as real games do, so a CNN can tell them apart). The square's horizontal position,
in one of ``buckets`` vertical bands, is the *context*; with ``motion=True`` the direction of
its last horizontal move (left or right, visible only across the stacked frames) is part of the
context too. Each game maps every context to one rewarded action among the 18: the action
taken on an observation scores +1 if it is that context's action, 0 otherwise. Actions do not
move anything (a contextual bandit, with episodes), so learning is fast; still, the policy must
read the observation (a constant action scores about ``1 / contexts`` of the optimum) and
games interfere: the action tables are rows of one Latin square, so within a block of
``num_actions`` games (ids ``0..17`` for 18 actions) no two games reward the same action for
the same context, and no game rewards one action in two contexts. A network trained on one
game must unlearn its action for every position to play another, unless it keys on the
background.

Episodes last ``episode_steps`` steps (``truncated=True`` on the last one); with
``max_misses`` set an episode also ends (``terminated=True``) on its ``max_misses``-th wrong
action, and ``info["lives"]`` counts the misses left. A uniformly random policy scores
``episode_steps / num_actions`` on average (11.1 for 200 steps and 18 actions), the optimal
one ``episode_steps``. ``SyntheticAtari.best_action`` is the oracle (from the game state);
``oracle_action`` recovers the same actions from the observations alone.

**How fast it is learnt** (CPU, a two-layer CNN, reward per step; random 0.056, optimum 1):
an actor-critic with gamma 0 updated every step on 16 environments averages 0.3-0.5 over its
first 8k steps and 0.9-0.96 over the next 8k (0.1-0.2, then 0.5-0.65 with ``motion``).
CleanRL's Atari PPO (gamma 0.99, lr 2.5e-4) is slower, since discounting adds the noise of
future rewards that no action changes: 0.12 after 12k steps, 0.2 after 40k; with gamma 0 it
reaches 0.6 by 18k.

**Autoreset**, as ``AtariVectorEnv`` (gymnasium's ``AutoresetMode``):

- ``NEXT_STEP`` (the default): the step on which an episode ends returns its last observation
  with ``terminated`` or ``truncated`` set; the **next** ``step`` ignores that environment's
  action and returns the reset observation with reward 0 and ``terminated = truncated =
  False``;
- ``SAME_STEP``: the ending step already returns the reset observation (with the ending
  step's reward and flags) and, at steps where some episode ended, ``info["final_obs"]``:
  uint8 ``[num_envs, 4, 84, 84]`` whose rows for the ended environments hold their last
  observations and the other rows zeros. Like ``AtariVectorEnv``'s, this ``info`` has no
  ``_final_obs`` mask and no ``final_info``: use ``terminated | truncated``.

**Differences from ``AtariVectorEnv``**, all deliberate:

- a reset observation shows the square's three previous positions where ``AtariVectorEnv``
  zero-fills the three older frames, so every observation determines its rewarded action;
- no frameskip: ``info["frame_number"]`` (since construction) and
  ``info["episode_frame_number"]`` count steps, where ``AtariVectorEnv`` counts emulator
  frames (4 per step, plus its reset no-ops);
- ``info`` also carries ``episode_return`` (float64, NaN except for environments whose
  episode ended at this step) and ``episode_length`` (int32, steps of that episode, the reset
  step of next-step autoreset not included; 0 elsewhere). ``AtariVectorEnv`` reports neither,
  and its rewards are clipped to [-1, 1] unless ``make_atari(..., reward_clipping=False)``, so
  returns summed from them are not game scores. Here rewards are 0 or 1, clipping changes
  nothing, and summed rewards are the raw score;
- ``metadata`` belongs to the instance (``AtariVectorEnv`` writes its mode into the
  ``metadata`` dict that every ``VectorEnv`` shares, so ``env.metadata["autoreset_mode"]`` of
  an Atari env tells the mode of the last one built: read ``env.autoreset_mode``);
- bad actions raise ``ValueError``: not an int32/int64 array of shape ``(num_envs,)`` (an
  ``AssertionError`` in ``AtariVectorEnv``) or outside ``0..num_actions - 1``
  (``AtariVectorEnv`` hangs).

References: ale-py ``vector_env.AtariVectorEnv``; gymnasium ``vector.AutoresetMode``;
Osband et al., *Behaviour Suite for Reinforcement Learning* (2020), for small diagnostic
environments of this kind.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Callable

import numpy as np
from gymnasium.spaces import Box, Discrete
from gymnasium.vector import AutoresetMode, VectorEnv
from gymnasium.vector.utils import batch_space

__all__ = ["SyntheticAtari", "make_synthetic", "parse_synthetic_game", "is_synthetic",
           "synthetic_game_names", "EPISODE_STEPS", "NUM_ACTIONS",
           "oracle_action", "random_policy_return", "optimal_policy_return"]

SIZE, STACK = 84, 4            # frame side and stack depth, as make_atari's frames
OBJECT = 10                    # side of the bouncing square, pixels
OBJECT_VALUE = 255             # the square's pixels; backgrounds stay <= BACKGROUND_MAX
BACKGROUND_MAX = 120           # dim backgrounds, a salient square: learnt in ~10k steps
OBJECT_THRESHOLD = 200         # pixels above this are the square's
NOISE_FRAMES = 64              # per-game bank of noisy backgrounds (a power of two)
WORLD_SEED = 0x5EEDA7A1        # fixes every game's look and rules, whatever the env seeds
DEFAULT_NUM_GAMES = 8
EPISODE_STEPS = 200            # an episode's steps (its optimal return), by default
NUM_ACTIONS = 18               # ALE's full action space
_NAME = re.compile(r"^\s*synthetic[-_ ]?(\d+)\s*$", re.IGNORECASE)


def _check_int(name: str, value, low: int, high: int | None = None) -> int:
    if (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low
            or (high is not None and value > high)):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"{name} must be an int {bounds}, got {value!r}")
    return int(value)


def _env_seeds(seed: int, num_envs: int) -> np.ndarray:
    """Distinct per-environment seeds from one seed (``make_atari``'s recipe: seeds 0 and 1
    share no environment seed, as ``seed, seed + 1, ...`` would)."""
    state = np.random.SeedSequence(seed).generate_state(num_envs, np.uint32)
    return (state % np.uint32(2**31 - 1)).astype(np.int64)


# -- a game's look and rules ---------------------------------------------------------------

@lru_cache(maxsize=None)
def _backgrounds(game: int) -> np.ndarray:
    """``[NOISE_FRAMES, 84, 84]`` uint8: game ``game``'s texture under fresh noise in each."""
    rng = np.random.default_rng([WORLD_SEED, 1, game])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    angle, cycles = rng.uniform(0, np.pi), rng.uniform(2.0, 9.0)    # periods across the frame
    phase = (np.cos(angle) * xx + np.sin(angle) * yy) * (2 * np.pi * cycles / SIZE)
    texture = rng.uniform(25, 65) + rng.uniform(10, 25) * np.sin(phase + rng.uniform(0, 6.3))
    for _ in range(rng.integers(3, 7)):                  # a few flat rectangles
        y0, x0 = rng.integers(0, SIZE - 8, size=2)
        h, w = rng.integers(8, 30, size=2)
        texture[y0:y0 + h, x0:x0 + w] += rng.choice([-1, 1]) * rng.uniform(15, 35)
    noise = rng.normal(0.0, 5.0, size=(NOISE_FRAMES, SIZE, SIZE))
    bank = np.clip(texture + noise, 0, BACKGROUND_MAX).astype(np.uint8)
    bank.setflags(write=False)
    return bank


@lru_cache(maxsize=None)
def _action_table(game: int, num_actions: int, buckets: int, motion: bool) -> np.ndarray:
    """``[buckets, 2]`` int64: the rewarded action per (position bucket, last move right).

    Row ``game % num_actions`` of a Latin square ``L[i, j] = p[(q[i] + r[j]) % A]`` (one
    square per block of ``num_actions`` games): rows differ in every column, so two games of
    a block never reward the same action for a context; a row's entries differ, so a game
    never rewards one action in two contexts. Without ``motion`` both columns are equal.
    """
    rng = np.random.default_rng([WORLD_SEED, 2, game // num_actions, num_actions])
    p, q, r = (rng.permutation(num_actions) for _ in range(3))
    contexts = buckets * (2 if motion else 1)
    row = p[(q[game % num_actions] + r[:contexts]) % num_actions]
    table = row.reshape(buckets, 2) if motion else np.repeat(row[:, None], 2, axis=1)
    table.setflags(write=False)
    return table


def _bucket(x: np.ndarray, buckets: int) -> np.ndarray:
    """Horizontal band of the square whose left column is ``x``."""
    return (x + OBJECT // 2) * buckets // SIZE


def _move(pos: np.ndarray, vel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One move inside the frame. At a wall the square stops there and turns round, so every
    move changes its position (|velocity| >= 1): the last move's direction is always visible."""
    pos = pos + vel
    hit = (pos < 0) | (pos > SIZE - OBJECT)
    return np.clip(pos, 0, SIZE - OBJECT), np.where(hit, -vel, vel)


def oracle_action(obs: np.ndarray, game: int, *, num_actions: int = NUM_ACTIONS, buckets: int = 4,
                  motion: bool = False) -> np.ndarray:
    """The rewarded action for each observation of game ``game``, read from the pixels alone.

    ``obs`` is uint8 ``[N, 4, 84, 84]``; the square is the only thing above
    ``OBJECT_THRESHOLD``. Its leftmost column in the newest frame gives the bucket, the change
    from the frame before gives the direction. Returns int64 ``[N]``.
    """
    obs = np.asarray(obs)
    if obs.ndim != 4 or obs.shape[1:] != (STACK, SIZE, SIZE):
        raise ValueError(f"obs must be [N, {STACK}, {SIZE}, {SIZE}], got {obs.shape}")
    columns = (obs[:, -2:] > OBJECT_THRESHOLD).any(axis=2)           # (N, 2 frames, 84)
    if not columns.any(axis=2).all():
        raise ValueError("no square in the last two frames: not a SyntheticAtari observation")
    x_prev, x_now = columns.argmax(axis=2).T                          # leftmost columns
    table = _action_table(game, num_actions, buckets, motion)
    return table[_bucket(x_now, buckets), (x_now > x_prev).astype(np.int64)]


# -- names -----------------------------------------------------------------------------------

def is_synthetic(game: str) -> bool:
    """Whether ``game`` names a synthetic game (``"synthetic-3"`` and its spellings)."""
    return isinstance(game, str) and _NAME.match(game) is not None


def parse_synthetic_game(game: int | str) -> int:
    """The game id of ``3``, ``"synthetic-3"``, ``"Synthetic_3"`` or ``"synthetic3"``."""
    if isinstance(game, (int, np.integer)) and not isinstance(game, bool):
        if game < 0:
            raise ValueError(f"synthetic game ids are >= 0, got {game}")
        return int(game)
    match = _NAME.match(game) if isinstance(game, str) else None
    if match is None:
        raise ValueError(f"not a synthetic game: {game!r}; use an id >= 0 or a name like "
                         f"'synthetic-3'")
    return int(match.group(1))


def synthetic_game_names(num_games: int = DEFAULT_NUM_GAMES) -> list[str]:
    """``['synthetic-0', ..., f'synthetic-{num_games - 1}']``."""
    return [f"synthetic-{g}" for g in range(_check_int("num_games", num_games, 1))]


# -- the vector environment ------------------------------------------------------------------

class SyntheticAtari(VectorEnv):
    """``num_envs`` copies of synthetic game ``game`` behind ``AtariVectorEnv``'s interface.

    ``num_games`` is the size of the suite the game belongs to and is only checked
    (``0 <= game < num_games``): a game's look and rules depend on ``game`` and the rule
    arguments (``num_actions``, ``buckets``, ``motion``) alone. ``buckets`` is the number of
    horizontal bands of the context, ``motion`` adds the direction of the last move to it
    (harder: the stack must be read); ``max_misses`` (default: none) ends an episode on that
    many wrong actions. Like ``make_atari``, the constructor resets with per-environment
    seeds derived from ``seed``; ``reset(seed=s)`` seeds environment ``i`` with ``s + i``, as
    ``AtariVectorEnv`` does.
    """

    def __init__(self, game: int, num_envs: int, seed: int = 0, *,
                 num_games: int = DEFAULT_NUM_GAMES, episode_steps: int = EPISODE_STEPS,
                 num_actions: int = NUM_ACTIONS, buckets: int = 4, motion: bool = False,
                 max_misses: int | None = None,
                 autoreset_mode: AutoresetMode | str = AutoresetMode.NEXT_STEP):
        self.num_envs = _check_int("num_envs", num_envs, 1)
        self.num_games = _check_int("num_games", num_games, 1)
        self.game = _check_int("game", game, 0)
        if self.game >= self.num_games:
            raise ValueError(f"game must be in 0..{self.num_games - 1} for num_games="
                             f"{self.num_games}, got {game}; pass a larger num_games")
        self.episode_steps = _check_int("episode_steps", episode_steps, 1)
        self.buckets = _check_int("buckets", buckets, 1, SIZE // OBJECT)
        if not isinstance(motion, (bool, np.bool_)):
            raise ValueError(f"motion must be True or False, got {motion!r}")
        self.motion = bool(motion)
        contexts = self.buckets * (2 if self.motion else 1)
        self.num_actions = _check_int("num_actions", num_actions, contexts)
        self.max_misses = None if max_misses is None else _check_int("max_misses",
                                                                      max_misses, 1)
        _check_int("seed", seed, 0)
        try:
            self.autoreset_mode = AutoresetMode(autoreset_mode)
        except ValueError:
            self.autoreset_mode = None
        if self.autoreset_mode not in (AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP):
            raise ValueError(f"autoreset_mode must be 'NextStep' or 'SameStep' (or "
                             f"AutoresetMode.NEXT_STEP / SAME_STEP), got {autoreset_mode!r}")
        self.metadata = {"autoreset_mode": self.autoreset_mode}   # this instance's own
        self.game_name = f"synthetic-{self.game}"
        self.batch_size = self.num_envs                            # AtariVectorEnv has it

        self.single_observation_space = Box(0, 255, (STACK, SIZE, SIZE), np.uint8)
        self.single_action_space = Discrete(self.num_actions)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self.action_space = batch_space(self.single_action_space, self.num_envs)

        self._backgrounds = _backgrounds(self.game)
        self._table = _action_table(self.game, self.num_actions, self.buckets, self.motion)
        n = self.num_envs
        self._rngs = [np.random.default_rng(s) for s in _env_seeds(seed, n)]
        self._frames = np.zeros((n, STACK, SIZE, SIZE), np.uint8)   # (B, stack, H, W)
        self._pos = np.zeros((n, 2), np.int64)                      # (y, x), top-left corner
        self._vel = np.zeros((n, 2), np.int64)
        self._right = np.zeros(n, np.int64)          # 1 where the last move went right
        self._noise = np.zeros(n, np.int64)          # background index: noise + t * stride
        self._stride = np.ones(n, np.int64)
        self._t = np.zeros(n, np.int64)              # steps into the episode
        self._misses = np.zeros(n, np.int64)
        self._return = np.zeros(n, np.float64)
        self._frame_number = np.zeros(n, np.int32)   # steps since construction
        self._needs_reset = np.zeros(n, bool)        # NEXT_STEP: ended, resets on next step
        self.reset(seed=_env_seeds(seed, n))
        self.action_space.seed(seed)

    # -- state -> pixels ----------------------------------------------------------------
    def _render(self, envs: np.ndarray) -> np.ndarray:
        """The newest frame of each environment in ``envs``: ``[len(envs), 84, 84]``."""
        index = (self._noise[envs] + self._t[envs] * self._stride[envs]) % NOISE_FRAMES
        frames = self._backgrounds[index]                               # a fresh copy
        span = np.arange(OBJECT)
        rows = self._pos[envs, 0, None] + span                          # (B, OBJECT)
        cols = self._pos[envs, 1, None] + span
        frames[np.arange(len(envs))[:, None, None], rows[:, :, None], cols[:, None, :]] = \
            OBJECT_VALUE
        return frames

    def _advance(self, envs: np.ndarray) -> None:
        """Move the square and push the new frame onto the stacks of ``envs``."""
        old_x = self._pos[envs, 1]
        self._pos[envs], self._vel[envs] = _move(self._pos[envs], self._vel[envs])
        self._right[envs] = self._pos[envs, 1] > old_x
        self._frames[envs, :-1] = self._frames[envs, 1:]
        self._frames[envs, -1] = self._render(envs)

    def _reset_envs(self, envs: np.ndarray, seeds: np.ndarray | None) -> None:
        """A new episode in each of ``envs``; its stack shows the square's last 4 positions."""
        for k, i in enumerate(envs):
            if seeds is not None:
                self._rngs[i] = np.random.default_rng(int(seeds[k]))
            rng = self._rngs[i]
            self._pos[i] = rng.integers(0, SIZE - OBJECT + 1, size=2)
            vx = rng.integers(2, 5) * rng.choice([-1, 1])     # crosses a band in a few steps
            vy = rng.integers(1, 4) * rng.choice([-1, 1])
            self._vel[i] = vy, vx
            self._noise[i] = rng.integers(NOISE_FRAMES)
            self._stride[i] = 2 * rng.integers(NOISE_FRAMES // 2) + 1  # odd: visits every frame
        self._t[envs] = -STACK                  # the stack's frames come before the start
        for _ in range(STACK):
            self._t[envs] += 1
            self._advance(envs)
        self._misses[envs] = 0
        self._return[envs] = 0.0
        self._needs_reset[envs] = False

    def _info(self, ended: np.ndarray, returns: np.ndarray, lengths: np.ndarray) -> dict:
        lives = (np.zeros(self.num_envs, np.int32) if self.max_misses is None
                 else (self.max_misses - self._misses).astype(np.int32))
        return {"env_id": np.arange(self.num_envs, dtype=np.int32), "lives": lives,
                "frame_number": self._frame_number.copy(),
                "episode_frame_number": self._t.astype(np.int32),
                "episode_return": np.where(ended, returns, np.nan),
                "episode_length": np.where(ended, lengths, 0).astype(np.int32)}

    # -- the gymnasium vector API -------------------------------------------------------
    def reset(self, *, seed: int | np.ndarray | None = None,
              options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        """Reset every environment, or those in ``options["reset_mask"]`` (bool
        ``[num_envs]``; the others keep their state and report their current observation).

        ``seed``: an int seeds the environments being reset with ``seed, seed + 1, ...``; an
        int array gives one seed each; ``None`` continues their random streams.
        """
        mask = (options or {}).get("reset_mask", np.ones(self.num_envs, bool))
        if not (isinstance(mask, np.ndarray) and mask.dtype == np.bool_
                and mask.shape == (self.num_envs,)):
            raise ValueError(f"options['reset_mask'] must be a bool numpy array of shape "
                             f"({self.num_envs},), got {mask!r}")
        envs = np.flatnonzero(mask)
        if seed is None:
            seeds = None
        elif isinstance(seed, (int, np.integer)) and not isinstance(seed, bool) and seed >= 0:
            seeds = np.arange(len(envs)) + int(seed)
        elif (isinstance(seed, np.ndarray) and seed.shape == (len(envs),)
              and np.issubdtype(seed.dtype, np.integer) and (seed >= 0).all()):
            seeds = seed
        else:
            raise ValueError(f"seed must be None, an int >= 0, or an int array of seeds >= 0, "
                             f"one per environment being reset ({len(envs)}), got {seed!r}")
        self._reset_envs(envs, seeds)
        nothing = np.zeros(self.num_envs, bool)
        return self._frames.copy(), self._info(nothing, self._return, self._t)

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                 np.ndarray, dict]:
        """Score ``actions`` (int ``[num_envs]``) on the current observations, then move on.

        Returns ``obs`` uint8 ``[num_envs, 4, 84, 84]``, ``rewards`` int32 (as
        ``AtariVectorEnv``'s), ``terminated`` and ``truncated`` bool ``[num_envs]``, ``info``.
        """
        if not (isinstance(actions, np.ndarray) and actions.dtype in (np.int32, np.int64)
                and actions.shape == (self.num_envs,)):
            raise ValueError(f"actions must be an int32 or int64 numpy array of shape "
                             f"({self.num_envs},) (AtariVectorEnv asserts the same), got "
                             f"{type(actions).__name__} {getattr(actions, 'dtype', '')} "
                             f"{getattr(actions, 'shape', '')}")
        if actions.min() < 0 or actions.max() >= self.num_actions:
            raise ValueError(f"actions must be in 0..{self.num_actions - 1}, got "
                             f"{actions.tolist()}")
        resetting = self._needs_reset.copy()        # NEXT_STEP: these ignore their action
        active = np.flatnonzero(~resetting)
        hit = np.zeros(self.num_envs, bool)
        hit[active] = actions[active] == self.best_action()[active]
        rewards = hit.astype(np.int32)
        self._misses[active] += ~hit[active]
        self._return += rewards
        self._t[active] += 1
        self._frame_number[active] += 1
        self._advance(active)

        terminated = np.zeros(self.num_envs, bool)
        if self.max_misses is not None:
            terminated[active] = self._misses[active] >= self.max_misses
        truncated = np.zeros(self.num_envs, bool)
        truncated[active] = self._t[active] >= self.episode_steps
        ended = terminated | truncated
        returns, lengths = self._return.copy(), self._t.copy()    # before any reset
        final_obs = None
        if resetting.any():                      # next-step autoreset
            self._reset_envs(np.flatnonzero(resetting), None)
        if self.autoreset_mode == AutoresetMode.NEXT_STEP:
            self._needs_reset = ended
        elif ended.any():                        # same-step autoreset
            final_obs = np.where(ended[:, None, None, None], self._frames, np.uint8(0))
            self._reset_envs(np.flatnonzero(ended), None)
        info = self._info(ended, returns, lengths)
        if final_obs is not None:
            info["final_obs"] = final_obs
        return self._frames.copy(), rewards, terminated, truncated, info

    # -- oracle ---------------------------------------------------------------------------
    def best_action(self) -> np.ndarray:
        """The rewarded action for each current observation (int64 ``[num_envs]``), from the
        game state; ``oracle_action(obs, game, ...)`` finds the same from the pixels."""
        return self._table[_bucket(self._pos[:, 1], self.buckets), self._right]

    def __repr__(self) -> str:
        return (f"SyntheticAtari({self.game_name!r}, num_envs={self.num_envs}, "
                f"episode_steps={self.episode_steps}, num_actions={self.num_actions}, "
                f"buckets={self.buckets}, motion={self.motion}, "
                f"autoreset_mode={self.autoreset_mode.value!r})")


def make_synthetic(game: int | str, num_envs: int, seed: int = 0, **kw) -> SyntheticAtari:
    """``SyntheticAtari`` for ``game`` given as ``3`` or ``"synthetic-3"``. ``kw`` go to it;
    ``num_games`` defaults to the larger of 8 and ``game + 1``, so every name is valid."""
    game = parse_synthetic_game(game)
    kw.setdefault("num_games", max(DEFAULT_NUM_GAMES, game + 1))
    return SyntheticAtari(game, num_envs, seed, **kw)


# -- baselines ---------------------------------------------------------------------------

def _policy_return(policy: Callable[[SyntheticAtari, np.ndarray, np.random.Generator],
                                    np.ndarray],
                   game: int | str, episodes: int, seed: int, **kw) -> float:
    """Mean return of ``policy(env, obs, rng)`` over ``episodes`` episodes, one per env."""
    episodes = _check_int("episodes", episodes, 1)
    env = make_synthetic(game, episodes, seed=seed, **kw)
    rng = np.random.default_rng([seed, 3])
    returns = np.full(episodes, np.nan)
    obs, _ = env.reset()
    while np.isnan(returns).any():
        obs, _, _, _, info = env.step(policy(env, obs, rng))
        first = np.isnan(returns) & ~np.isnan(info["episode_return"])
        returns[first] = info["episode_return"][first]
    env.close()
    return float(returns.mean())


def random_policy_return(game: int | str, episodes: int = 32, seed: int = 0, **kw) -> float:
    """Mean episode return of uniformly random actions (``episode_steps / num_actions`` in
    expectation without ``max_misses``); ``kw`` go to ``make_synthetic``."""
    return _policy_return(lambda env, obs, rng: rng.integers(0, env.num_actions, env.num_envs),
                          game, episodes, seed, **kw)


def optimal_policy_return(game: int | str, episodes: int = 32, seed: int = 0, **kw) -> float:
    """Mean episode return of ``oracle_action`` on the observations (``episode_steps``)."""
    return _policy_return(
        lambda env, obs, rng: oracle_action(obs, env.game, num_actions=env.num_actions,
                                            buckets=env.buckets, motion=env.motion),
        game, episodes, seed, **kw)
