"""The notebook plots and the cache-explorer widget, called directly: a notebook run does not
see errors raised inside widget callbacks."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from ooc_moe import TieredExpertStore  # noqa: E402
from ooc_moe.viz import (CLAIMED_HIT_RATE, cache_explorer, cache_explorer_widget,  # noqa: E402
                         plot_tier_map, show_cache_explorer)
from ooc_moe.workloads import KINDS, replay_pattern  # noqa: E402

SMALL = dict(num_experts=32, num_steps=120, experts_per_step=4)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def vertical_lines(ax):
    return [line for line in ax.get_lines() if np.ptp(line.get_xdata()) == 0]


@pytest.mark.parametrize("pattern", KINDS)
@pytest.mark.parametrize("prefetch, training", [(False, False), (True, False), (False, True)])
def test_cache_explorer_plots_the_replayed_counters(pattern, prefetch, training):
    fig = cache_explorer(8, 16, pattern, prefetch=prefetch, training=training, **SMALL)
    _, summary = replay_pattern(pattern, 8, 16, prefetch_next=prefetch, mark_dirty=training,
                                **SMALL)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    shares_ax, links_ax, time_ax = fig.axes
    shares = [bar.get_height() for bar in shares_ax.patches]
    assert shares == pytest.approx([summary[k] / summary["accesses"]
                                    for k in ("hbm_hits", "dram_hits", "file_reads")])
    kib = [bar.get_height() for bar in links_ax.patches]
    writes = summary["bytes_hbm_to_dram"] + summary["bytes_dram_to_file"]
    assert sum(kib) * 1024 == pytest.approx(summary["bytes_file_to_dram"]
                                            + summary["bytes_dram_to_hbm"] + writes)
    assert (writes > 0) == training
    assert f"{summary['hit_rate']:.1%}" in fig._suptitle.get_text()
    boundaries = [line.get_xdata()[0] for line in vertical_lines(time_ax)]
    assert boundaries == ([0, 30, 60, 90] if pattern == "sequential_games" else [])
    claim = [line for line in time_ax.get_lines() if np.ptp(line.get_ydata()) == 0]
    assert [line.get_ydata()[0] for line in claim] == [CLAIMED_HIT_RATE]


def test_cache_explorer_rejects_dram_smaller_than_hbm():
    with pytest.raises(ValueError, match="inclusive"):
        cache_explorer(8, 4, "random", **SMALL)


def test_callback_explains_an_impossible_setting_instead_of_raising(capsys):
    show_cache_explorer(8, 4, "zipf", **SMALL)
    assert "Raise the DRAM slider" in capsys.readouterr().out
    assert plt.get_fignums() == []
    show_cache_explorer(8, 8, "zipf", prefetch=True, **SMALL)
    assert len(plt.get_fignums()) == 1


def test_widget_drives_the_callback_and_keeps_dram_at_least_hbm():
    box = cache_explorer_widget(**SMALL)
    top, switches, _ = box.children
    (hbm, dram, pattern), (prefetch, training) = top.children, switches.children
    assert hbm.min == SMALL["experts_per_step"] and hbm.max == dram.max == 32
    drawn = len(plt.get_fignums())
    assert drawn == 1                        # interactive_output drew the first setting
    hbm.value = dram.value + 4               # the observer raises DRAM's minimum (and value)
    assert dram.min == hbm.value == dram.value
    for kind in pattern.options:             # every control change re-runs the callback here,
        pattern.value = kind                 # where errors propagate (no kernel to catch them)
    prefetch.value = training.value = True
    assert len(plt.get_fignums()) > drawn + len(KINDS)
    show_cache_explorer(hbm.value, dram.value, pattern.value, prefetch.value, training.value,
                        **SMALL)


def test_tier_map_colours_each_expert_by_its_tier():
    with TieredExpertStore(12, 4, 8, hbm_capacity=2, dram_capacity=5, device="cpu") as store:
        for ids in ([0, 1], [2, 3], [4, 5], [6]):
            store.get_experts(ids)
        fig = plot_tier_map(store)
        codes = fig.axes[0].images[0].get_array()[0]
        expected = [["hbm", "dram", "file"].index(store.where(e)) for e in range(12)]
    assert list(codes) == expected
    assert expected.count(0) == 2 and expected.count(1) == 3
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["HBM (2/2)", "DRAM (3/5)", "file (7/12)"]
