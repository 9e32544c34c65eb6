"""PPO training of the MoE agent (and its dense baseline) on games played in sequence."""

from .ppo import PPOArgs, PPOTrainer, RolloutBuffer
from .run import TrainArgs, build_agent, make_env, train

__all__ = ["PPOArgs", "PPOTrainer", "RolloutBuffer", "TrainArgs", "build_agent", "make_env",
           "train"]
