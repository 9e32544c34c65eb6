"""Environments: real Atari games through ale-py's ``AtariVectorEnv``, and vectorised synthetic
games with the same interface for fast tests."""

from .atari import (ATARI_DEFAULTS, DEFAULT_GAMES, available_games, collect_frames, make_atari,
                    minimal_actions, normalize_game_name)
from .cleanrl_atari import make_cleanrl_atari
from .synthetic import (SyntheticAtari, make_synthetic, optimal_policy_return, oracle_action,
                        parse_synthetic_game, random_policy_return, synthetic_game_names)

__all__ = ["ATARI_DEFAULTS", "DEFAULT_GAMES", "available_games", "collect_frames", "make_atari",
           "make_cleanrl_atari", "minimal_actions", "normalize_game_name"]

__all__ += ["SyntheticAtari", "make_synthetic", "optimal_policy_return", "oracle_action",
            "parse_synthetic_game", "random_policy_return", "synthetic_game_names"]
