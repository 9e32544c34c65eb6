"""The router's balance modes and the cohort table, against hand computations."""

import math

import pytest
import torch

from ooc_moe.agent import MoERLAgentConfig
from ooc_moe.moe.router import CohortTable, ExpertRouter

# logits = x (identity router): three tokens over two experts, top-1
X = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]], dtype=torch.float64)


def identity_router(num_experts=2, top_k=1, **kw):
    router = ExpertRouter(num_experts, num_experts, top_k, noise_std=0.0, **kw).double()
    with torch.no_grad():
        router.router.weight.copy_(torch.eye(num_experts))
    return router


def softmax0(a, b):
    return math.exp(a) / (math.exp(a) + math.exp(b))


Z_BY_HAND = (math.log(math.e + 1) ** 2 * 2 + math.log(math.e ** 2 + 1) ** 2) / 3


def test_batch_balance_is_the_switch_loss_by_hand():
    out = identity_router(balance="batch")(X)
    assert out.expert_indices[:, 0].tolist() == [0, 1, 0]
    f = [2 / 3, 1 / 3]
    p0 = (softmax0(1, 0) + softmax0(0, 1) + softmax0(2, 0)) / 3
    assert out.load_balancing_loss.item() == pytest.approx(2 * (f[0] * p0 + f[1] * (1 - p0)))
    assert out.z_loss.item() == pytest.approx(Z_BY_HAND)


@pytest.mark.parametrize("balance", ["none", "horizon"])
def test_none_and_horizon_have_no_balancing_loss_but_keep_the_z_loss(balance):
    out = identity_router(balance=balance)(X)
    assert out.load_balancing_loss.item() == 0.0
    assert out.z_loss.item() == pytest.approx(Z_BY_HAND)


def test_batch_balance_inside_a_cohort_counts_only_its_experts():
    # four experts; every token may choose experts 1 and 3 only: P over those two
    x = torch.tensor([[0.0, 1.0, 5.0, 0.0], [0.0, 0.0, 5.0, 2.0]], dtype=torch.float64)
    cohort = torch.tensor([[1, 3], [1, 3]])
    out = identity_router(4, 1, balance="batch")(x, cohort)
    assert out.expert_indices[:, 0].tolist() == [1, 3]
    p1 = (softmax0(1, 0) + softmax0(0, 2)) / 2
    assert out.load_balancing_loss.item() == pytest.approx(2 * (0.5 * p1 + 0.5 * (1 - p1)))
    z = (math.log(math.e + 1) ** 2 + math.log(1 + math.e ** 2) ** 2) / 2
    assert out.z_loss.item() == pytest.approx(z)
    assert torch.isinf(out.router_logits[:, [0, 2]]).all()


def test_horizon_bias_steps_toward_the_under_used_experts():
    router = identity_router(4, 1, balance="horizon", balance_horizon=8, balance_rate=0.5)
    x = torch.tensor([[3.2, 0, 0, 0]] * 4, dtype=torch.float64)     # all to expert 0
    with torch.no_grad():                        # acting: no update
        router(x)
    router.eval()
    router(x)                                    # evaluation: no update
    assert router.selection_bias.tolist() == [0, 0, 0, 0]
    router.train()
    router(x)
    # alpha = 4 tokens / 8 = 0.5: ema = 0.5 * 0.25 + 0.5 * [1, 0, 0, 0]; mean 0.25
    assert router.load_ema.tolist() == pytest.approx([0.625, 0.125, 0.125, 0.125])
    assert router.selection_bias.tolist() == [-0.5, 0.5, 0.5, 0.5]
    # each step narrows expert 0's lead of 3.2 - 1 by 1: gone at the fourth
    chosen = [router(x).expert_indices[0, 0].item() for _ in range(4)]
    assert chosen[:3] == [0, 0, 0] and chosen[3] != 0
    assert "selection_bias" in router.state_dict() and "load_ema" in router.state_dict()


def test_horizon_bias_chooses_but_does_not_weigh():
    router = identity_router(3, 2, balance="horizon")
    x = torch.tensor([[2.0, 1.0, 0.0]], dtype=torch.float64)
    with torch.no_grad():
        router.selection_bias.copy_(torch.tensor([0.0, -5.0, 0.0]))
        out = router(x)
    assert out.expert_indices[0].tolist() == [0, 2]            # expert 1 pushed out
    assert out.expert_weights[0].tolist() == pytest.approx([softmax0(2, 0), softmax0(0, 2)])


def test_cohorts_take_the_least_assigned_experts_and_overlap_only_when_full():
    table = CohortTable(num_games=3, num_layers=2, cohort_size=3, num_experts=8)
    cohorts = table.lookup(torch.tensor([1, 1]))                  # [layers, B, C]
    assert cohorts[:, 0].tolist() == [[0, 1, 2], [3, 4, 5]]
    table.lookup(torch.tensor([0]))           # 6, 7 unassigned, then the lowest ids of 1s
    assert table.table[0].tolist() == [[0, 6, 7], [1, 2, 3]]
    assert table.assignments.tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    assert table.table[2].tolist() == [[-1] * 3] * 2               # game 2 not seen yet
    assert table.lookup(torch.tensor([1]))[:, 0].tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("kw, match", [
    (dict(balance="global"), "balance must be one of"),
    (dict(balance_horizon=0), "--balance_horizon"),
    (dict(routing="cohort", cohort_size=0), "cohort_size=0 must be between"),
    (dict(routing="cohort", cohort_size=17), "cohort_size=17 must be between"),
    (dict(routing="cohort", hbm_cap=2, dram_cap=8), "give --cohort_size"),
    (dict(routing="cohort", balance="horizon"), "--balance batch"),
])
def test_bad_balance_and_cohort_settings_name_the_fix(kw, match):
    base = dict(num_experts=16, expert_dim=32, expert_hidden=64, num_layers=2, num_heads=2,
                hbm_cap=4, dram_cap=8, num_envs=3)
    with pytest.raises(ValueError, match=match):
        MoERLAgentConfig(**{**base, **kw})


def test_cohort_size_defaults_to_the_hbm_slots_of_a_layer():
    cfg = MoERLAgentConfig(num_experts=32, num_layers=2, hbm_cap=8, dram_cap=16,
                           routing="cohort")
    assert cfg.cohort_size == 4
