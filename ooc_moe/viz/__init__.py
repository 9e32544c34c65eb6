"""Plots and widgets for the notebooks: one module per notebook (``store`` 01, ``moe`` 02,
``detector`` 03, ``agent`` 04, ``sequential`` 05).

Every plot function returns its matplotlib ``Figure`` and never calls ``plt.show()``: in a
notebook the inline backend shows the figures a cell made; in a script, save and close them.
Widgets use only core ipywidgets that exist in both 7.7 (Colab) and 8, and are wired with
``interactive_output``. Widget callbacks swallow nothing; the tests call them directly because
a notebook run does not see errors raised inside a callback.
"""

from ..metrics import prefetch_scores  # notebook 03 scores plans with it beside the plots
from ._common import CLAIMED_HIT_RATE, TIER_COLOURS
from .agent import (last_episodes_return, layer_routing_counts, one_rollout, plot_layer_routing,
                    plot_learning_by_kind, plot_learning_curve, plot_param_budget,
                    plot_rollout_routing, plot_store_history, plot_tier_history,
                    position_routing_counts, summarize_history)
from .detector import (PREFETCH_CHOICES, detector_expert_map, frame_moe_run, frames_trace,
                       plot_cache_explorer, plot_confusion, plot_detector_experts, plot_frames,
                       plot_game_expert_maps, prefetch_sets, routing_summary, show_trace_cache,
                       simulate_steps, step_experts, step_slices, trace_cache_curves,
                       trace_cache_widget)
from .moe import (moe_layer_widget, moe_training_run, plot_dispatch, plot_expert_exchange,
                  plot_moe_training, plot_routing_losses, routing_loss_curves,
                  show_moe_training)
from .sequential import (plot_forgetting, plot_game_expert_usage, plot_game_over_stages,
                         plot_hit_rate_over_time, plot_retention, save_run_plots,
                         sequential_results_widget, show_sequential_run)
from .store import cache_explorer, cache_explorer_widget, plot_tier_map, show_cache_explorer

__all__ = ["TIER_COLOURS", "CLAIMED_HIT_RATE", "plot_tier_map", "cache_explorer",
           "show_cache_explorer", "cache_explorer_widget",
           "routing_loss_curves", "plot_routing_losses", "plot_dispatch", "moe_training_run",
           "plot_moe_training", "show_moe_training", "moe_layer_widget", "plot_expert_exchange",
           "plot_frames", "plot_confusion", "frame_moe_run", "step_experts", "step_slices",
           "frames_trace", "routing_summary", "plot_game_expert_maps", "detector_expert_map",
           "plot_detector_experts", "prefetch_scores", "PREFETCH_CHOICES", "prefetch_sets",
           "simulate_steps", "trace_cache_curves", "plot_cache_explorer", "show_trace_cache",
           "trace_cache_widget",
           "plot_param_budget", "layer_routing_counts", "position_routing_counts",
           "plot_layer_routing", "one_rollout", "plot_rollout_routing", "plot_tier_history",
           "plot_learning_curve", "plot_learning_by_kind", "last_episodes_return",
           "plot_store_history", "summarize_history",
           "plot_retention", "plot_forgetting", "plot_hit_rate_over_time",
           "plot_game_expert_usage", "save_run_plots", "show_sequential_run",
           "plot_game_over_stages", "sequential_results_widget"]
