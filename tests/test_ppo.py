"""PPO pieces: window reconstruction, GAE, and a first minibatch that reproduces the rollout."""

import numpy as np
import pytest
import torch

from ooc_moe.agent import CNNAgent, CNNAgentConfig, ContextWindows, MoERLAgentConfig
from ooc_moe.train import EvalArgs, PPOArgs, PPOTrainer, RolloutBuffer, evaluate
from ooc_moe.train.ppo import OLDER_TOKENS

SMALL = dict(num_experts=8, expert_dim=16, expert_hidden=32, num_layers=2, num_heads=2,
             context_len=3, hbm_cap=4, dram_cap=8, num_envs=2)


def test_window_index_clips_at_episode_starts_like_context_windows():
    args = PPOArgs(num_envs=2, num_steps=5, num_minibatches=1)
    b = RolloutBuffer(args, (1, 2, 2), context_len=3, device="cpu")
    # frames 0,1 are the prefix; env 0 starts an episode at frame 2 and at frame 5,
    # env 1 started before the prefix (frame 0) and again at frame 4
    b.starts[:] = False
    b.starts[[2, 5], 0] = True
    b.starts[[0, 4], 1] = True
    index = b.window_index(3)
    assert index[:, 0].tolist() == [[2, 2, 2], [2, 2, 3], [2, 3, 4], [5, 5, 5], [5, 5, 6]]
    assert index[:, 1].tolist() == [[0, 1, 2], [1, 2, 3], [4, 4, 4], [4, 4, 5], [4, 5, 6]]
    # the same windows, built step by step as the rollout builds them
    w = ContextWindows(2, 3, 1)
    for t in range(2, 7):
        tokens = w.push(torch.tensor([[float(t)], [float(t)]]), b.starts[t])
        if t >= 2:
            expected = index[t - 2].float()
            if t == 2:   # the rollout's windows start at the first rollout frame
                expected = torch.tensor([[2.0, 2, 2], [2, 2, 2]])
            assert tokens[0, :, 0].tolist() == expected[0].tolist()


def test_gae_matches_a_hand_computation():
    args = PPOArgs(num_envs=1, num_steps=3, num_minibatches=1, gamma=0.5, gae_lambda=0.5)
    agent = MoERLAgentConfig(**{**SMALL, "num_envs": 1}).create_agent("cpu")
    trainer = PPOTrainer(agent, args)
    b = trainer.buffer
    b.rewards[:, 0] = torch.tensor([1.0, 0.0, 2.0])
    b.values[:, 0] = torch.tensor([0.5, 1.0, 0.0])
    b.dones[:, 0] = torch.tensor([0.0, 0.0, 1.0])   # step 2 starts a new episode
    adv, ret = trainer.advantages(torch.tensor([4.0]), torch.tensor([0.0]))
    d2 = 2.0 + 0.5 * 4.0 - 0.0          # 4.0
    d1 = 0.0 + 0.0 - 1.0                # next step starts an episode: no bootstrap
    d0 = 1.0 + 0.5 * 1.0 - 0.5          # 1.0
    a1 = d1
    a0 = d0 + 0.25 * a1
    assert adv[:, 0].tolist() == pytest.approx([a0, a1, d2])
    assert ret[:, 0].tolist() == pytest.approx([a0 + 0.5, a1 + 1.0, d2])
    agent.store.shutdown()


def spy_on_logits(agent) -> list:
    """Make ``agent.forward`` also keep each call's logits (detached) in the returned list;
    ``del agent.forward`` undoes it."""
    seen, original = [], agent.forward

    def spy(windows, games=None):
        out = original(windows, games)
        seen.append(out[0].detach())
        return out

    agent.forward = spy
    return seen


class FixedEnv:
    """Random frames and rewards; episodes of 4 steps (enough for windows and GAE)."""

    def __init__(self, n):
        self.n, self.t, self.rng = n, 0, np.random.default_rng(0)

    def reset(self, seed=None):
        return self.rng.integers(0, 255, (self.n, 4, 84, 84), dtype=np.uint8), self._info()

    def step(self, actions):
        self.t += 1
        done = np.full(self.n, self.t % 4 == 0)
        obs = self.rng.integers(0, 255, (self.n, 4, 84, 84), dtype=np.uint8)
        return obs, self.rng.normal(size=self.n), done, np.zeros(self.n, bool), self._info()

    def _info(self):
        """Two lives per episode: the second is lost after step 2 of each episode."""
        return {"lives": np.full(self.n, 2 if self.t % 4 < 2 else 1, np.int32)}


@pytest.mark.parametrize("life_loss_terminal", [True, False])
def test_a_lost_life_ends_the_episode_for_gae_only(life_loss_terminal):
    """As CleanRL's EpisodicLifeEnv: ``dones`` marks the step after a lost life, the windows
    (``starts``) and the reported returns run on to the end of the game."""
    args = PPOArgs(num_envs=2, num_steps=8, num_minibatches=1,
                   life_loss_terminal=life_loss_terminal)
    agent = MoERLAgentConfig(**SMALL).create_agent("cpu")
    trainer = PPOTrainer(agent, args)
    env = FixedEnv(2)
    state = trainer.start(env, 0)
    finished = trainer.collect(env, state, 0)
    b = trainer.buffer
    # obs t is the one seen at step t: a game ends after steps 3 and 7, a life after step 1, 5
    new_game = [1, 0, 0, 0, 1, 0, 0, 0]
    lost_life = [0, 0, 1, 0, 0, 0, 1, 0]
    assert b.starts[b.prefix:, 0].int().tolist() == new_game
    expected = [max(g, l) for g, l in zip(new_game, lost_life)] if life_loss_terminal \
        else new_game
    assert b.dones[:, 0].int().tolist() == expected
    assert [length for _, length in finished] == [4, 4, 4, 4]      # whole games of 4 steps
    agent.store.shutdown()


def test_the_first_minibatch_reproduces_the_rollout_policy(monkeypatch):
    """Same parameters, same windows (rebuilt from frames, re-encoded): ratio exactly 1."""
    import ooc_moe.train.ppo as ppo
    monkeypatch.setattr(ppo.torch, "randperm", lambda n: torch.arange(n))  # envs in order
    torch.manual_seed(0)
    args = PPOArgs(num_envs=2, num_steps=6, num_minibatches=1, update_epochs=1)
    agent = MoERLAgentConfig(**SMALL).create_agent("cpu")
    trainer = PPOTrainer(agent, args)
    env = FixedEnv(2)
    state = trainer.start(env, 0)
    trainer.collect(env, state, 0)
    trainer.collect(env, state, 0)    # a second rollout: windows reach into the prefix
    adv, ret = trainer.advantages(state["next_value"], state["new_episode"].float())
    seen = spy_on_logits(agent)
    trainer.update(adv, ret)
    logits = seen[0]                                     # [S * n, A], step-major
    b = trainer.buffer
    newlogprob = torch.distributions.Categorical(logits=logits).log_prob(b.actions.flatten())
    assert torch.allclose(newlogprob, b.logprobs.flatten(), atol=1e-6)
    agent.store.shutdown()


def test_masked_actions_stay_in_the_played_games_set_in_rollout_and_update(monkeypatch):
    """With ``action_masks`` the rollout samples only the played game's actions, its
    log-probabilities are the softmax over those actions alone (a hand computation), the
    update sees the same policy (ratio 1) and its entropy is at most log(legal actions)."""
    import ooc_moe.train.ppo as ppo
    monkeypatch.setattr(ppo.torch, "randperm", lambda n: torch.arange(n))
    torch.manual_seed(0)
    legal = [0, 1, 3, 4]
    masks = torch.zeros(2, 18, dtype=torch.bool)
    masks[0, legal] = True
    masks[1] = True
    args = PPOArgs(num_envs=2, num_steps=16, num_minibatches=1, update_epochs=1)
    agent = CNNAgent(CNNAgentConfig(num_envs=2), "cpu")
    with torch.no_grad():
        agent.actor.bias[5] = 20.0            # unmasked, nearly every action would be 5
    trainer = PPOTrainer(agent, args, action_masks=masks)
    env = FixedEnv(2)
    state = trainer.start(env, 0)
    trainer.collect(env, state, 0)
    b = trainer.buffer
    assert set(b.actions.flatten().tolist()) <= set(legal)
    assert (b.played == 0).all()
    seen = spy_on_logits(agent)
    adv, ret = trainer.advantages(state["next_value"], state["new_episode"].float())
    b.games[:] = 1                    # routed as another game: the mask is the played one's
    logs = trainer.update(adv, ret)
    del agent.forward
    by_hand = torch.log_softmax(seen[0][:, legal], -1)
    position = torch.tensor([legal.index(a) for a in b.actions.flatten().tolist()])
    torch.testing.assert_close(by_hand[torch.arange(len(position)), position],
                               b.logprobs.flatten())
    assert logs["losses/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert 0 < logs["losses/entropy"] <= np.log(len(legal)) + 1e-6
    played = torch.ones(len(seen[0]), dtype=torch.long)       # game 1: every action
    torch.testing.assert_close(trainer.policy(seen[0], played).logits,
                               torch.distributions.Categorical(logits=seen[0]).logits)

    class Recording(FixedEnv):
        def step(self, actions):
            self.actions = getattr(self, "actions", []) + list(actions)
            return super().step(actions)

    env = Recording(2)
    evaluate(trainer, env, 0, EvalArgs(episodes=2, max_steps=8))
    assert len(env.actions) == 2 * 4 and set(env.actions) <= set(legal)   # one game each
    with pytest.raises(ValueError, match="at least one action per game"):
        PPOTrainer(agent, args, action_masks=torch.zeros(1, 18, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"\[games, 18\]"):
        PPOTrainer(agent, args, action_masks=torch.ones(1, 4, dtype=torch.bool))


def test_cnn_minibatches_are_cleanrls_random_steps_and_reproduce_the_rollout(monkeypatch):
    """Without a window, each epoch's minibatches are a random partition of all (step, env)
    pairs, as CleanRL's; in rollout order, the first update sees the rollout's policy."""
    torch.manual_seed(0)
    args = PPOArgs(num_envs=2, num_steps=6, num_minibatches=2, update_epochs=1)
    agent = CNNAgent(CNNAgentConfig(num_envs=2), "cpu")
    trainer = PPOTrainer(agent, args)
    env = FixedEnv(2)
    state = trainer.start(env, 0)
    trainer.collect(env, state, 0)
    assert trainer.buffer.prefix == 0
    batches = list(trainer.minibatches())
    assert [len(i) for i, _ in batches] == [6, 6]
    inds = torch.cat([i for i, _ in batches])
    assert sorted(inds.tolist()) == list(range(12))
    assert inds.tolist() != list(range(12))                  # shuffled over steps and envs
    frames = trainer.buffer.frames.flatten(0, 1)             # step-major, as the b_* buffers
    for mb_inds, windows in batches:
        assert windows.shape == (6, 1, 512)
        torch.testing.assert_close(windows[:, 0], agent.encode(frames[mb_inds]))

    import ooc_moe.train.ppo as ppo
    monkeypatch.setattr(ppo.torch, "randperm", lambda n: torch.arange(n))
    seen = spy_on_logits(agent)
    adv, ret = trainer.advantages(state["next_value"], state["new_episode"].float())
    logs = trainer.update(adv, ret)
    newlogprob = torch.distributions.Categorical(logits=seen[0]).log_prob(
        trainer.buffer.actions.flatten()[:6])
    assert torch.allclose(newlogprob, trainer.buffer.logprobs.flatten()[:6], atol=1e-6)
    assert logs["losses/grad_norm"] > 0


def test_the_logged_gradient_norm_is_the_global_one_before_clipping():
    """An MoE agent: ``losses/grad_norm`` is the norm over dense and expert gradients before
    clipping (recomputed here from the parameters' and records' gradients)."""
    torch.manual_seed(0)
    args = PPOArgs(num_envs=2, num_steps=4, num_minibatches=1, update_epochs=1,
                   max_grad_norm=1e9)                         # nothing clipped
    agent = MoERLAgentConfig(**SMALL).create_agent("cpu")
    trainer = PPOTrainer(agent, args)
    env = FixedEnv(2)
    state = trainer.start(env, 0)
    trainer.collect(env, state, 0)
    adv, ret = trainer.advantages(state["next_value"], state["new_episode"].float())
    seen = {}
    step = trainer.expert_opt.step

    def spy():                # just before the update: every gradient, dense and expert
        store = agent.store
        dense = sum(float(p.grad.pow(2).sum()) for p in agent.parameters()
                    if p.grad is not None)
        experts = sum(float(store.read_expert(e)["grad"].pow(2).sum())
                      for e in store.experts_with_grad)
        seen["norm"], seen["experts"] = (dense + experts) ** 0.5, experts
        return step()

    trainer.expert_opt.step = spy
    logs = trainer.update(adv, ret)
    assert seen["experts"] > 0
    assert logs["losses/grad_norm"] == pytest.approx(seen["norm"], rel=1e-5)
    agent.store.shutdown()


def test_minibatches_must_split_the_envs_or_the_batch():
    with pytest.raises(ValueError, match="num_envs=6 must be divisible by num_minibatches"):
        PPOArgs(num_envs=6, num_minibatches=4, minibatches="env")
    with pytest.raises(ValueError, match="= 15 must be divisible by num_minibatches=2"):
        PPOArgs(num_envs=3, num_steps=5, num_minibatches=2)
    assert PPOArgs(num_envs=6, num_minibatches=4).minibatch_size == 192


def two_rollouts(**ppo) -> tuple:
    """A small MoE agent and its trainer (2 envs x 6 steps, 3 minibatches, or ``ppo``) after two
    rollouts of ``FixedEnv``, so that windows reach into the prefix."""
    torch.manual_seed(0)
    agent = MoERLAgentConfig(**SMALL).create_agent("cpu")
    trainer = PPOTrainer(agent, PPOArgs(**{"num_envs": 2, "num_steps": 6, "num_minibatches": 3,
                                           **ppo}))
    env = FixedEnv(2)
    state = trainer.start(env, 0)
    trainer.collect(env, state, 0)
    trainer.collect(env, state, 0)
    return agent, trainer


def test_random_minibatches_with_a_window_gather_every_steps_window(monkeypatch):
    """A windowed agent's random minibatches: a random partition of all (step, env) pairs,
    each with the window the environment-ordered path rebuilds for it; only the newest token
    carries the encoder's gradient; the first epoch takes the older tokens from the rollout
    (encoding just the prefix frames again), later epochs with ``older_tokens="fresh"`` encode
    every frame again, and in rollout order the first update sees the rollout's policy."""
    agent, trainer = two_rollouts(update_epochs=1, minibatches="random", older_tokens="fresh")
    encoded = []                              # batch sizes the encoder sees
    original = agent.encode
    agent.encode = lambda obs: encoded.append(len(obs)) or original(obs)
    first = list(trainer.minibatches(first_epoch=True))
    assert encoded == [2 * 2] + [4] * 3       # the 2 prefix frames of 2 envs, then the newest
    encoded.clear()
    batches = list(trainer.minibatches())
    # the first minibatch's newest with their gradient, every other frame again without it
    # (the first minibatch's tokens serve as older tokens too), then the others' newest
    assert encoded[0] == 4 and sum(encoded) == 8 * 2 + 12 - 4
    agent.encode = original
    inds = torch.cat([i for i, _ in batches])
    assert [len(i) for i, _ in batches] == [4, 4, 4]
    assert sorted(inds.tolist()) == list(range(12)) and inds.tolist() != list(range(12))
    trainer.args.minibatches = "env"
    with monkeypatch.context() as m:
        import ooc_moe.train.ppo as ppo
        m.setattr(ppo.torch, "randperm", lambda n: torch.arange(n))
        trainer.args.num_minibatches, trainer.args.envs_per_minibatch = 1, 2
        (env_inds, reference), = trainer.minibatches()   # every step, step-major
    trainer.args.minibatches = "random"
    assert env_inds.tolist() == list(range(12))
    for mb_inds, windows in batches + first:  # the rollout's tokens are today's encodings
        assert windows.shape == (4, 3, 16)
        torch.testing.assert_close(windows, reference[mb_inds])
    mb_inds, windows = batches[0]
    encoder = list(agent.encoder.parameters())
    weights = torch.randn_like(windows)       # (a plain sum of LayerNorm'd tokens is 0)
    older = torch.autograd.grad((windows[:, :-1] * weights[:, :-1]).sum(), encoder,
                                allow_unused=True, retain_graph=True)
    assert all(g is None or not g.any() for g in older)
    newest = torch.autograd.grad((windows[:, -1] * weights[:, -1]).sum(), encoder,
                                 allow_unused=True)
    assert any(g is not None and g.any() for g in newest)
    agent.store.shutdown()


def test_an_unknown_minibatch_mode_names_the_choices():
    with pytest.raises(ValueError, match="random"):
        PPOArgs(minibatches="steps")


def test_recycled_older_tokens_are_the_epoch_befores_newest_tokens():
    """``older_tokens="recycled"``: after the first epoch, a window's older tokens of rollout
    frames are the newest tokens the epoch before encoded for those frames' own steps (here
    with the encoder changed between the epochs, so a fresh encoding would differ), the
    prefix frames are encoded again, and the encoder sees only the prefix and the newest."""
    agent, trainer = two_rollouts(update_epochs=2, older_tokens="recycled")
    newest = torch.zeros(12, 16)      # by step (step-major), as the first epoch encoded it
    for mb_inds, windows in trainer.minibatches(first_epoch=True):
        newest[mb_inds] = windows[:, -1].detach()
    with torch.no_grad():
        for p in agent.encoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    encoded, original = [], agent.encode
    agent.encode = lambda obs: encoded.append(len(obs)) or original(obs)
    batches = list(trainer.minibatches())
    agent.encode = original
    assert encoded == [2 * 2] + [4] * 3          # the prefix frames, then each newest
    b, P = trainer.buffer, trainer.buffer.prefix
    index = b.window_index(3)                    # [S, N, T] frame of each window position
    with torch.no_grad():
        fresh = agent.encode(b.frames.flatten(0, 1))  # frame-major, today's encoder
    for mb_inds, windows in batches:
        for row, i in enumerate(mb_inds.tolist()):
            step, env_i = divmod(i, 2)
            for t, frame in enumerate(index[step, env_i, :-1].tolist()):
                expected = (fresh[frame * 2 + env_i] if frame < P
                            else newest[(frame - P) * 2 + env_i])
                torch.testing.assert_close(windows[row, t].detach(), expected)
    assert not torch.allclose(fresh[P * 2:], newest)   # a fresh encoding would differ
    with pytest.raises(ValueError, match="fresh"):
        PPOArgs(older_tokens="stale")
    agent.store.shutdown()


def test_minibatches_by_environment_encode_every_token_whatever_older_tokens_says():
    """``minibatches="env"`` encodes every token of a window with the encoder's gradient, so
    ``older_tokens`` (recycled by default) changes nothing there, in any epoch."""
    assert PPOArgs().older_tokens == "recycled"
    drawn = {}
    for older_tokens in OLDER_TOKENS:
        agent, trainer = two_rollouts(update_epochs=2, minibatches="env", num_minibatches=2,
                                      older_tokens=older_tokens)
        torch.manual_seed(1)
        drawn[older_tokens] = [(i, w.detach()) for i, w in trainer.minibatches(True)]
        with torch.no_grad():             # as an epoch's steps would (recycling would show)
            for p in agent.encoder.parameters():
                p.add_(0.1 * torch.randn_like(p))
        drawn[older_tokens] += [(i, w.detach()) for i, w in trainer.minibatches()]
        agent.store.shutdown()
    for (i, w), (j, v) in zip(drawn["fresh"], drawn["recycled"], strict=True):
        assert torch.equal(i, j)
        torch.testing.assert_close(w, v)
