"""Atari games through ale-py's ``AtariVectorEnv``, and frames from random play.

``make_atari`` builds one game's vector environment with the preprocessing every experiment in
this package assumes: 84x84 grey frames, a stack of 4, frameskip 4 with max-pooling, up to 30
no-ops and FIRE on reset, rewards clipped to [-1, 1], and the **full 18-action space** so that
one policy head serves every game (``minimal_actions`` names the actions a game really uses,
which ``TrainArgs.action_mask="legal"`` restricts the policy to). Sticky actions are **off**
(``repeat_action_probability=0.0``, the ``AtariVectorEnv`` default; the ``ALE/...-v5``
registrations use 0.25, Machado et al. 2018): pass ``repeat_action_probability=0.25`` to
compare with v5 results. A lost life does not end the episode here: ``AtariVectorEnv``'s
``episodic_life=True`` restarts the whole game at every lost life (Breakout then never shows
fewer than 5 lives), unlike baselines' ``EpisodicLifeEnv``, which CleanRL uses and which only
cuts the return there; ``PPOArgs.life_loss_terminal`` does that cut in the trainer instead.

``collect_frames`` plays each game with uniformly random actions and keeps a strided sample of
the stacked observations: labelled real frames for training and testing the environment
detector (``ooc_moe.detector``). Everything here runs the real emulator; synthetic stand-in
games for fast tests are not part of this module.

References: Bellemare et al., *The Arcade Learning Environment* (2013); Machado et al.,
*Revisiting the Arcade Learning Environment* (2018); ale-py ``vector_env.AtariVectorEnv``.
"""

from __future__ import annotations

import difflib
import re
import zlib
from typing import Sequence

import numpy as np
from ale_py import ALEInterface, LoggerMode, roms
from ale_py.vector_env import AtariVectorEnv

__all__ = ["DEFAULT_GAMES", "ATARI_DEFAULTS", "available_games", "normalize_game_name",
           "minimal_actions", "make_atari", "collect_frames"]

DEFAULT_GAMES = ("pong", "breakout", "boxing", "freeway")  # games PPO learns quickly

# Keyword arguments of AtariVectorEnv that make_atari sets (any can be overridden by **kw).
ATARI_DEFAULTS = dict(
    full_action_space=True,          # 18 actions shared by every game
    repeat_action_probability=0.0,   # no sticky actions (AtariVectorEnv default; v5 uses 0.25)
    img_height=84, img_width=84, grayscale=True, stack_num=4,
    frameskip=4, maxpool=True, noop_max=30, use_fire_reset=True, reward_clipping=True,
)


def available_games() -> list[str]:
    """The ROM ids ale-py ships, e.g. ``['adventure', 'air_raid', ...]``."""
    return list(roms.get_all_rom_ids())


def _collapse(name: str) -> str:
    return name.replace("_", "")


def normalize_game_name(game: str) -> str:
    """The ale-py ROM id for ``game``: "pong", "Pong", "ALE/Pong-v5", "PongNoFrameskip-v4"
    all give "pong"; "BeamRider" and "beam-rider" give "beam_rider".

    Raises ValueError, listing the closest ROM ids, for a name ale-py does not know.
    """
    if not isinstance(game, str) or not game.strip():
        raise ValueError(f"game must be a non-empty string such as 'pong', got {game!r}")
    name = game.strip()
    name = re.sub(r"^ALE/", "", name, flags=re.IGNORECASE)
    name = re.sub(r"-v\d+$", "", name)                          # gym version suffix
    name = re.sub(r"(NoFrameskip|Deterministic)$", "", name)    # old gym variants
    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name)         # CamelCase -> snake_case
    name = re.sub(r"[\s\-]+", "_", name).lower()
    ids = available_games()
    by_collapsed = {_collapse(rom): rom for rom in ids}
    if name in ids:
        return name
    if _collapse(name) in by_collapsed:                           # "beamrider", "Beam_Rider"
        return by_collapsed[_collapse(name)]
    close = difflib.get_close_matches(name, ids, n=5, cutoff=0.6)
    hint = (f"did you mean {', '.join(repr(c) for c in close)}?" if close
            else "no close name found")
    raise ValueError(f"unknown Atari game {game!r}: {hint} (ale_py.roms.get_all_rom_ids() "
                     f"lists all {len(ids)} ROM ids)")


def minimal_actions(game: str) -> list[int]:
    """The game's minimal action set (the actions that do something in it, the ones
    ``full_action_space=False`` would offer) as indices into the full 18-action space,
    e.g. ``[0, 1, 3, 4]`` (NOOP, FIRE, RIGHT, LEFT) for Breakout."""
    ALEInterface.setLoggerMode(LoggerMode.Error)      # as AtariVectorEnv sets it: no banner
    ale = ALEInterface()
    ale.loadROM(roms.get_rom_path(normalize_game_name(game)))
    return [action.value for action in ale.getMinimalActionSet()]


def _env_seeds(seed: int, num_envs: int) -> np.ndarray:
    """Distinct per-environment seeds. AtariVectorEnv.reset(seed=s) would seed the envs with
    s, s+1, ..., so seeds 0 and 1 would share all but one environment; hashing avoids that."""
    state = np.random.SeedSequence(seed).generate_state(num_envs, np.uint32)
    return (state % np.uint32(2**31 - 1)).astype(np.int64)


def make_atari(game: str, num_envs: int, seed: int = 0, **kw) -> AtariVectorEnv:
    """One Atari game as an ``AtariVectorEnv`` of ``num_envs`` copies, seeded by ``seed``.

    Observations are uint8 ``[num_envs, 4, 84, 84]``; actions come from the full 18-action
    set; ``repeat_action_probability`` is 0.0 (no sticky actions). ``kw`` overrides any of
    ``ATARI_DEFAULTS`` or passes other ``AtariVectorEnv`` arguments (e.g. ``num_threads``).

    The environment is reset once here with per-environment seeds derived from ``seed`` (and
    its action space seeded), so a later ``env.reset()`` without a seed is deterministic;
    ``env.reset(seed=...)`` reseeds as usual.
    """
    if not isinstance(num_envs, (int, np.integer)) or isinstance(num_envs, bool) or num_envs < 1:
        raise ValueError(f"num_envs must be an int >= 1, got {num_envs!r}")
    rom = normalize_game_name(game)
    env = AtariVectorEnv(rom, int(num_envs), **{**ATARI_DEFAULTS, **kw})
    env.reset(seed=_env_seeds(seed, int(num_envs)))
    env.action_space.seed(seed)
    return env


def collect_frames(games: Sequence[str], frames_per_game: int, *, num_envs: int = 8,
                   seed: int = 0, warmup_steps: int = 32, stride: int = 4,
                   **env_kwargs) -> tuple[np.ndarray, np.ndarray]:
    """Stacked observations of each game under uniformly random play, labelled by game.

    Per game: ``num_envs`` environments, ``warmup_steps`` random steps after the seeded reset
    (the first frames of every episode look alike), then one observation of every environment
    every ``stride`` steps until ``frames_per_game`` are kept. Episodes that end restart on
    their own (ale-py autoreset), so long collections span many episodes. ``env_kwargs`` go to
    ``make_atari`` (e.g. ``repeat_action_probability=0.25``).

    Returns ``obs`` uint8 ``[len(games) * frames_per_game, 4, 84, 84]`` (game after game) and
    ``game_ids`` int64, the position of each frame's game in ``games``. The same ``seed``
    gives the same frames; different seeds give unrelated environment seeds, so a held-out set
    is ``collect_frames(games, n, seed=1)`` next to a training set from ``seed=0``. A game's
    frames depend on the game, the seed and the other arguments, not on its place in ``games``.
    """
    if isinstance(games, str):
        raise ValueError(f"games must be a list of names, e.g. [{games!r}], not a string")
    games = list(games)
    if not games:
        raise ValueError("games is empty: name at least one game, e.g. ['pong']")
    rom_ids = [normalize_game_name(g) for g in games]
    if len(set(rom_ids)) != len(rom_ids):
        raise ValueError(f"games {games} name the same game twice; game ids would be ambiguous")
    for name, value, low in (("frames_per_game", frames_per_game, 1), ("num_envs", num_envs, 1),
                             ("warmup_steps", warmup_steps, 0), ("stride", stride, 1)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")

    steps_kept = -(-frames_per_game // num_envs)        # ceil
    all_obs, all_ids = [], []
    for game_id, rom in enumerate(rom_ids):
        env = make_atari(rom, num_envs, seed=seed, **env_kwargs)
        try:
            # actions depend on (seed, game) only: a game's frames do not depend on the list
            rng = np.random.default_rng([seed, zlib.crc32(rom.encode())])
            n_actions = env.single_action_space.n
            obs = np.empty((steps_kept * num_envs, *env.single_observation_space.shape),
                           dtype=np.uint8)
            kept = 0
            for t in range(warmup_steps + steps_kept * stride):
                o, *_ = env.step(rng.integers(0, n_actions, size=num_envs))
                if t >= warmup_steps and (t - warmup_steps) % stride == stride - 1:
                    obs[kept * num_envs:(kept + 1) * num_envs] = o
                    kept += 1
        finally:
            env.close()
        all_obs.append(obs[:frames_per_game])
        all_ids.append(np.full(frames_per_game, game_id, dtype=np.int64))
    return np.concatenate(all_obs), np.concatenate(all_ids)
