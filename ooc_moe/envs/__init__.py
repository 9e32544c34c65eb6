"""Environments: Atari games through ale-py's ``AtariVectorEnv``."""

from .atari import (ATARI_DEFAULTS, DEFAULT_GAMES, available_games, collect_frames, make_atari,
                    normalize_game_name)

__all__ = ["ATARI_DEFAULTS", "DEFAULT_GAMES", "available_games", "collect_frames", "make_atari",
           "normalize_game_name"]
