"""The MoE agent, its dense baseline and the cnn baseline: shapes, windows, parameter counts,
routing modes, and the cnn agent against CleanRL's own."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from ooc_moe.agent import (CNNAgent, CNNAgentConfig, ContextWindows, DenseRLAgent,
                           MoERLAgent, MoERLAgentConfig)

SMALL = dict(num_experts=16, expert_dim=32, expert_hidden=64, num_layers=2, num_heads=2,
             context_len=4, hbm_cap=4, dram_cap=8, num_envs=3)


def obs(batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 4, 84, 84), generator=g, dtype=torch.uint8)


def test_user_defaults_and_estimate_matches_the_module():
    cfg = MoERLAgentConfig()
    assert (cfg.num_experts, cfg.expert_dim, cfg.expert_hidden, cfg.num_layers, cfg.num_heads,
            cfg.top_k, cfg.context_len, cfg.hbm_cap, cfg.dram_cap) == \
        (256, 512, 2048, 6, 8, 2, 32, 32, 128)
    big = cfg.estimate_params()
    assert big["experts"] == 256 * (2 * 512 * 2048 + 2048 + 512)
    assert big["record_bytes"] == 4 * (4 * (2 * 512 * 2048 + 2048 + 512) + 1)
    for routing in ("token", "env"):
        small = MoERLAgentConfig(**SMALL, routing=routing)
        agent = small.create_agent("cpu")
        estimate = small.estimate_params()
        assert estimate["dense"] == sum(p.numel() for p in agent.parameters())
        assert estimate["experts"] == 16 * agent.store.layout.param_numel
        assert estimate["active_per_token"] == \
            estimate["dense"] + small.num_layers * 2 * agent.store.layout.param_numel
        agent.store.shutdown()


def test_the_layer_norms_can_be_switched_off_for_the_ablation():
    """``token_norm=False`` hands the encoder's output through unchanged and
    ``final_norm=False`` feeds the heads the last block's output; the parameter estimate
    follows both (each LayerNorm holds 2 x dim)."""
    torch.manual_seed(0)
    obs = torch.randint(0, 255, (3, 4, 84, 84), dtype=torch.uint8)
    both = MoERLAgentConfig(**SMALL)
    neither = MoERLAgentConfig(**SMALL, token_norm=False, final_norm=False)
    normed, plain = DenseRLAgent(both, "cpu"), DenseRLAgent(neither, "cpu")
    plain.load_state_dict(normed.state_dict(), strict=False)     # same weights otherwise
    raw = plain.encoder(obs)
    torch.testing.assert_close(plain.encode(obs), raw)
    tokens = normed.encode(obs)
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(3), atol=1e-5, rtol=0)
    windows = tokens[:, None].expand(-1, 2, -1)
    x = windows + plain.positions[:2]
    for block in plain.blocks:
        x, _ = block(x, plain.causal[:2, :2], None, None)
    logits, value, _ = plain(windows)
    torch.testing.assert_close(logits, plain.actor(x[:, -1]))
    torch.testing.assert_close(value, plain.critic(x[:, -1]).squeeze(-1))
    assert sum(p.numel() for p in normed.parameters()) - \
        sum(p.numel() for p in plain.parameters()) == 2 * 2 * SMALL["expert_dim"]
    agent = neither.create_agent("cpu")
    assert neither.estimate_params()["dense"] == sum(p.numel() for p in agent.parameters())
    agent.store.shutdown()


def test_forward_shapes_and_env_routing_changes_the_routing():
    torch.manual_seed(0)
    agent = MoERLAgentConfig(**SMALL, routing="env").create_agent("cpu")
    windows = ContextWindows(3, 4, 32).push(agent.encode(obs(3)), torch.ones(3, dtype=torch.bool))
    logits, values, aux = agent(windows, torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 18) and values.shape == (3,) and aux.dim() == 0
    first = agent.moe_layers[0].last_routing.expert_indices.clone()
    with torch.no_grad():
        agent.game_embedding.weight.mul_(100.0)
    agent(windows, torch.tensor([2, 2, 2]))
    assert not torch.equal(first, agent.moe_layers[0].last_routing.expert_indices)
    with pytest.raises(ValueError, match="games="):
        agent(windows)
    agent.store.shutdown()


def test_windows_fill_at_episode_start_and_roll():
    w = ContextWindows(2, 3, 1)
    w.push(torch.tensor([[1.0], [5.0]]), torch.tensor([False, False]))   # first push fills
    assert w.tokens[:, :, 0].tolist() == [[1, 1, 1], [5, 5, 5]]
    w.push(torch.tensor([[2.0], [6.0]]), torch.tensor([False, False]))
    w.push(torch.tensor([[3.0], [7.0]]), torch.tensor([False, True]))    # env 1 restarts
    assert w.tokens[:, :, 0].tolist() == [[1, 2, 3], [7, 7, 7]]


def test_the_last_output_depends_only_on_earlier_tokens():
    torch.manual_seed(0)
    for agent in (MoERLAgentConfig(**SMALL).create_agent("cpu"),
                  DenseRLAgent(MoERLAgentConfig(**SMALL), "cpu")):
        agent.eval()
        x = torch.randn(2, 4, 32)
        with torch.no_grad():
            full = agent(x)[0]
            shorter = agent(x[:, 1:])[0]          # a window of 3 with other positions
            changed = x.clone()
            changed[:, -1] += torch.randn(32)    # (a constant shift is lost in LayerNorm)
            assert not torch.allclose(agent(changed)[0], full)
        assert full.shape == shorter.shape
        if agent.store is not None:
            agent.store.shutdown()


@pytest.mark.parametrize("T", [1, 3, 4])
def test_the_dense_agents_last_block_on_the_newest_position_is_the_causal_forward(T):
    """The dense agent's last block computes only the newest position: its outputs and every
    gradient are those of all blocks run causally on every position, heads on the last."""
    torch.manual_seed(0)
    agent = DenseRLAgent(MoERLAgentConfig(**SMALL), "cpu")
    windows = torch.randn(5, T, 32, requires_grad=True)
    logits, values, _ = agent(windows)
    weights = torch.randn_like(logits)          # (a plain sum of the logits has no gradient)
    fast = torch.autograd.grad((logits * weights).sum() + values.sum(),
                               [windows, *agent.parameters()], allow_unused=True)
    x = windows + agent.positions[:T]
    for block in agent.blocks:                  # the reference: every position, causal mask
        x, _ = block(x, agent.causal[:T, :T])
    h = agent.norm(x[:, -1])
    torch.testing.assert_close(logits, agent.actor(h))
    torch.testing.assert_close(values, agent.critic(h).squeeze(-1))
    full = torch.autograd.grad((agent.actor(h) * weights).sum() + agent.critic(h).sum(),
                               [windows, *agent.parameters()], allow_unused=True)
    for a, b in zip(fast, full, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b)


def test_the_moe_agents_newest_only_last_block_acts_the_same_and_routes_the_newest_alone():
    """``newest_only`` (the default): the MoE agent's last block computes the newest position
    alone, so the same weights give the same logits and values as every position computed
    (each token is routed on its own), its last layer routes one token per window, and its
    balancing loss covers those tokens."""
    torch.manual_seed(0)
    cfg = MoERLAgentConfig(**SMALL, newest_only=False)
    full = cfg.create_agent("cpu")
    newest = MoERLAgent(MoERLAgentConfig(**SMALL), full.store)       # the same experts
    newest.load_state_dict(full.state_dict())
    windows = torch.randn(5, 3, 32)
    (logits, values, aux), (logits2, values2, aux2) = full(windows), newest(windows)
    torch.testing.assert_close(logits2, logits)
    torch.testing.assert_close(values2, values)
    first, last = (layer.last_routing.expert_indices for layer in newest.moe_layers)
    assert first.shape == (5 * 3, cfg.top_k) and last.shape == (5, cfg.top_k)
    assert full.moe_layers[-1].last_routing.expert_indices.shape == (5 * 3, cfg.top_k)
    torch.testing.assert_close(last, full.moe_layers[-1].last_routing.expert_indices
                               .view(5, 3, -1)[:, -1])
    assert not torch.allclose(aux2, aux)          # balanced over the newest tokens alone
    full.store.shutdown()


def test_dense_baseline_has_the_same_interface_and_similar_active_parameters():
    cfg = MoERLAgentConfig(**SMALL)
    dense = DenseRLAgent(cfg, "cpu")
    logits, values, aux = dense(torch.randn(5, 4, 32))
    assert logits.shape == (5, 18) and float(aux) == 0.0
    active = cfg.estimate_params()["active_per_token"]
    n_dense = sum(p.numel() for p in dense.parameters())
    # the same FFN units per token; the MoE agent also has, per layer, a router, a second
    # output bias (top_k of them) and the MoE LayerNorm (the dense FFN has its own)
    per_layer = cfg.expert_dim * cfg.num_experts + (cfg.top_k - 1) * cfg.expert_dim
    assert active - n_dense == cfg.num_layers * per_layer


@pytest.mark.parametrize("kw, match", [
    (dict(routing="game"), "routing must be one of"),
    (dict(top_k=17), "top_k=17"),
    (dict(expert_dim=33), "divisible by num_heads"),
    (dict(hbm_cap=9), "hbm_cap"),
    (dict(context_len=0), "context_len"),
])
def test_impossible_configurations(kw, match):
    with pytest.raises(ValueError, match=match):
        MoERLAgentConfig(**{**SMALL, **kw})


def test_wrong_observation_shape_is_a_clear_error():
    agent = DenseRLAgent(MoERLAgentConfig(**SMALL), "cpu")
    with pytest.raises(ValueError, match=r"\[batch, 4, 84, 84\]"):
        agent.encode(torch.zeros(2, 3, 84, 84, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at most context_len=4"):
        agent(torch.randn(1, 5, 32))


# -- the cnn baseline against CleanRL's ppo_atari.py, copied as it is written there ----------
def cleanrl_layer_init(layer, std=np.sqrt(2), bias_const=0.0):
    torch.nn.init.orthogonal_(layer.weight, std)
    torch.nn.init.constant_(layer.bias, bias_const)
    return layer


class CleanRLAgent(nn.Module):
    def __init__(self, num_actions):
        super().__init__()
        self.network = nn.Sequential(
            cleanrl_layer_init(nn.Conv2d(4, 32, 8, stride=4)), nn.ReLU(),
            cleanrl_layer_init(nn.Conv2d(32, 64, 4, stride=2)), nn.ReLU(),
            cleanrl_layer_init(nn.Conv2d(64, 64, 3, stride=1)), nn.ReLU(), nn.Flatten(),
            cleanrl_layer_init(nn.Linear(64 * 7 * 7, 512)), nn.ReLU())
        self.actor = cleanrl_layer_init(nn.Linear(512, num_actions), std=0.01)
        self.critic = cleanrl_layer_init(nn.Linear(512, 1), std=1)

    def get_action_and_value(self, x):
        hidden = self.network(x / 255.0)
        return self.actor(hidden), self.critic(hidden)


def test_cnn_agent_is_cleanrls_agent_weight_for_weight_and_output_for_output():
    torch.manual_seed(3)
    ours = CNNAgent(CNNAgentConfig(num_envs=2), "cpu")
    torch.manual_seed(3)
    theirs = CleanRLAgent(18)
    renamed = {k.replace("encoder.net.", "network."): v for k, v in ours.state_dict().items()}
    assert renamed.keys() == theirs.state_dict().keys()
    for name, value in theirs.state_dict().items():           # same seed, same init order
        assert torch.equal(renamed[name], value), name
    x = obs(5)
    windows = ContextWindows(5, ours.context_len, ours.token_dim).push(
        ours.encode(x), torch.ones(5, dtype=torch.bool))
    logits, values, aux = ours(windows)
    ref_logits, ref_values = theirs.get_action_and_value(x.float())
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(values, ref_values.squeeze(-1))
    assert torch.equal(x, obs(5))                         # the caller's frames are untouched
    (logits.sum() + values.sum()).backward()            # ours runs its convolutions channels
    (ref_logits.sum() + ref_values.sum()).backward()    # last, CleanRL's in the default layout
    ours_grads = {k.replace("encoder.net.", "network."): p.grad
                  for k, p in ours.named_parameters()}
    for name, p in theirs.named_parameters():
        torch.testing.assert_close(ours_grads[name], p.grad, msg=name)
    assert float(aux) == 0.0 and ours.store is None and ours.moe_layers == []
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in theirs.parameters()) == \
        CNNAgentConfig().estimate_params()["total"]


def test_cnn_agent_layers_are_orthogonal_with_cleanrls_gains_and_zero_biases():
    agent = CNNAgent(CNNAgentConfig(), "cpu")
    layers = [m for m in agent.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    gains = [np.sqrt(2)] * 4 + [0.01, 1.0]
    assert [m.weight.shape[0] for m in layers] == [32, 64, 64, 512, 18, 1]
    for layer, gain in zip(layers, gains):
        w = layer.weight.detach().flatten(1)          # [out, in], out <= in: orthonormal rows
        torch.testing.assert_close(w @ w.T, gain ** 2 * torch.eye(w.shape[0]), atol=1e-5,
                                   rtol=1e-4)
        assert torch.all(layer.bias == 0)
    with pytest.raises(ValueError, match=r"\[batch, 4, 84, 84\]"):
        agent.encode(torch.zeros(2, 3, 84, 84, dtype=torch.uint8))


def test_the_window_agents_encoder_has_cleanrls_init_unless_asked_for_torchs():
    """``encoder_init="cleanrl"``: every encoder layer orthogonal with gain sqrt 2 (its
    linear layer's rows orthogonal, of norm sqrt 2) and zero biases, as the cnn baseline;
    ``"torch"`` keeps torch's default init; anything else names the choices."""
    torch.manual_seed(0)
    small = dict(num_experts=8, expert_dim=16, expert_hidden=32, num_layers=1, num_heads=2,
                 context_len=2, hbm_cap=4, dram_cap=8, num_envs=2)
    cleanrl = DenseRLAgent(MoERLAgentConfig(**small), "cpu").encoder.net[-2]
    torch_default = DenseRLAgent(MoERLAgentConfig(**small, encoder_init="torch"),
                                 "cpu").encoder.net[-2]
    gram = cleanrl.weight @ cleanrl.weight.T
    torch.testing.assert_close(gram, 2 * torch.eye(16), atol=1e-4, rtol=0)
    assert not cleanrl.bias.any() and torch_default.bias.any()
    assert not torch.allclose(torch_default.weight @ torch_default.weight.T,
                              2 * torch.eye(16), atol=1e-2)
    with pytest.raises(ValueError, match="encoder_init must be one of"):
        MoERLAgentConfig(**small, encoder_init="xavier")
