"""PPO training of the MoE agent (and its dense baseline) on games played in sequence."""

from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .evaluate import EvalArgs, evaluate, evaluate_random
from .experiment import (RUN_KINDS, cache_table, early_learning, format_cache_table,
                         format_forgetting_table, format_learning_table, format_summary,
                         format_verdict, half_width_95, learning_table, load_results,
                         paired_changes, run_experiment, summarize)
from .ppo import PPOArgs, PPOTrainer, RolloutBuffer
from .run import (TrainArgs, action_masks, args_from_json, build_agent, make_env, train,
                  train_run)

__all__ = ["PPOArgs", "PPOTrainer", "RolloutBuffer", "TrainArgs", "EvalArgs", "build_agent",
           "make_env", "action_masks", "train", "train_run", "evaluate", "evaluate_random",
           "args_from_json",
           "save_checkpoint", "load_checkpoint", "find_checkpoint", "RUN_KINDS",
           "run_experiment", "summarize", "format_summary", "format_verdict",
           "format_forgetting_table", "load_results",
           "paired_changes", "half_width_95", "early_learning", "learning_table",
           "format_learning_table", "cache_table", "format_cache_table"]
