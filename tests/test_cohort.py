"""Cohort routing: the layer against a plain masked MoE, nothing outside a game's cohort is
touched while it plays, the update routes as the rollout did, cohorts survive resume."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from ooc_moe import TieredExpertStore, TieredMoELayer
from ooc_moe.train import PPOArgs, TrainArgs, build_agent, make_env, train
from ooc_moe.train.run import build_trainer
from reference_moe import ReferenceExperts
from test_sequential import train_cut_at_second_stage

E, DIM, HIDDEN, TOP_K, TOKENS, C = 8, 6, 10, 2, 40, 3
PARAMS = ("w1", "b1", "w2", "b2")


def masked_reference(experts, layer, x, allowed):
    """A plain MoE whose router may pick expert e for token t only where ``allowed[t, e]``."""
    h = F.layer_norm(x, x.shape[-1:], layer["ln_w"], layer["ln_b"])
    logits = (h @ layer["router"].T).masked_fill(~allowed, float("-inf"))
    top, idx = logits.topk(TOP_K, dim=-1)
    w = top.softmax(-1)
    y = torch.zeros_like(h)
    for t in range(x.shape[0]):
        for k in range(TOP_K):
            y[t] = y[t] + w[t, k] * experts.ffn(int(idx[t, k]), h[t:t + 1])[0]
    counts = torch.stack([(idx == e).sum() for e in range(E)]).to(x.dtype)
    probs = logits.softmax(-1)
    lb = allowed.sum(1)[0] * (counts / idx.numel() * probs.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    return x + y, 0.01 * lb + 1e-3 * z, idx


@pytest.mark.parametrize("hbm", [1, E])
def test_cohort_layer_matches_a_plain_masked_moe(tmp_path, hbm):
    store = TieredExpertStore(E, DIM, HIDDEN, hbm, E, "cpu", path=tmp_path, seed=3,
                              dtype=torch.float64, optimizer_state=True)
    torch.manual_seed(0)
    layer = TieredMoELayer(DIM, HIDDEN, store, TOP_K, dropout=0.0, noise_std=0.0).double()
    with torch.no_grad():
        layer.layer_norm.weight.normal_(1.0, 0.1)
        layer.layer_norm.bias.normal_(0.0, 0.1)
        layer.router.router.weight.normal_(0.0, 0.5)
    experts = ReferenceExperts([store.read_expert(e) for e in range(E)])
    params = {"router": layer.router.router.weight.detach().clone().requires_grad_(),
              "ln_w": layer.layer_norm.weight.detach().clone().requires_grad_(),
              "ln_b": layer.layer_norm.bias.detach().clone().requires_grad_()}
    # the first half plays one game (cohort 0, 2, 5), the rest another (1, 2, 6)
    cohort = torch.tensor([[0, 2, 5]] * (TOKENS // 2) + [[1, 2, 6]] * (TOKENS // 2))
    allowed = torch.zeros(TOKENS, E, dtype=torch.bool).scatter(1, cohort, True)
    x = torch.randn(TOKENS, DIM, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, aux = layer(x, cohort=cohort)
    y_ref, aux_ref, idx = masked_reference(experts, params, x_ref, allowed)
    assert torch.equal(layer.last_routing.expert_indices, idx)
    assert allowed.gather(1, idx).all()
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(aux, aux_ref, rtol=1e-10, atol=1e-12)
    target = torch.randn_like(y)
    ((y - target).pow(2).sum() + aux).backward()
    ((y_ref - target).pow(2).sum() + aux_ref).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(layer.router.router.weight.grad, params["router"].grad,
                               rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(layer.layer_norm.weight.grad, params["ln_w"].grad,
                               rtol=1e-5, atol=1e-8)
    assert store.experts_with_grad == set(idx.unique().tolist()) <= {0, 1, 2, 5, 6}
    for e in range(E):
        record = store.read_expert(e)
        for name, param in zip(PARAMS, experts.expert_params(e)):
            expected = torch.zeros_like(record[name]) if param.grad is None else param.grad
            torch.testing.assert_close(record[f"grad_{name}"], expected, rtol=1e-5, atol=1e-8)
    store.shutdown()


TINY = dict(games=("synthetic-0", "synthetic-1"), steps_per_game=64, device="cpu",
            routing="cohort", num_experts=16, expert_dim=16, expert_hidden_dim=32,
            num_heads=2, context_len=2, hbm_capacity=4, dram_capacity=8, detector=False,
            ppo=PPOArgs(num_envs=4, num_steps=16, num_minibatches=2, update_epochs=2))


def test_no_expert_outside_the_games_cohort_is_fetched_trained_or_stepped():
    args = TrainArgs(**TINY)
    agent = build_agent(args)
    trainer = build_trainer(args, agent)
    store = agent.store
    fetched, stepped = set(), set()
    get, step = store.get_experts, trainer.expert_opt.step

    def spy_get(ids, *a, **kw):
        fetched.update(ids)
        return get(ids, *a, **kw)

    def spy_step(*a, **kw):
        stepped.update(store.experts_with_grad)
        return step(*a, **kw)

    store.get_experts, trainer.expert_opt.step = spy_get, spy_step
    env = make_env("synthetic-1", args.ppo.num_envs, 0)
    state = trainer.start(env, 0)
    trainer.iteration(env, state, game=1)          # the first game seen: the first experts
    cohort = set(agent.cohorts.table[1].flatten().tolist())
    assert cohort == set(range(4)) and agent.cohorts.table[0, 0, 0] == -1
    assert fetched <= cohort and stepped <= cohort and stepped
    store.synchronize()
    before = {e: store.read_expert(e) for e in range(16)}
    fetched.clear()
    trainer.iteration(env, state, game=1)
    assert fetched <= cohort
    for e in set(range(16)) - cohort:              # weights, moments and step untouched
        after = store.read_expert(e)
        assert all(torch.equal(before[e][k], after[k]) for k in after), e
    assert trainer.buffer.games.eq(1).all()
    env.close()
    store.shutdown()


def test_a_new_game_is_routed_inside_its_own_cohort_before_the_detector_knows_it():
    """With the online detector, three games in turn: every rollout of a game the detector
    does not name reliably yet (``known_games``) is routed with that game, so no expert
    outside its cohort is fetched, trained or stepped; the detector comes to know each game."""
    games = ("synthetic-0", "synthetic-1", "synthetic-2")
    args = TrainArgs(**{**TINY, "games": games, "detector": True})
    agent = build_agent(args)
    trainer = build_trainer(args, agent)
    store, det = agent.store, trainer.detector_trainer
    fetched, stepped = set(), set()
    get, step = store.get_experts, trainer.expert_opt.step
    store.get_experts = lambda ids, *a, **kw: fetched.update(ids) or get(ids, *a, **kw)
    trainer.expert_opt.step = lambda *a, **kw: stepped.update(store.experts_with_grad) or step(
        *a, **kw)
    unknown_rollouts = 0
    for game in range(3):
        env = make_env(games[game], args.ppo.num_envs, 0)
        state = trainer.start(env, game)
        for _ in range(6):
            known = bool(det.known_games()[game])
            fetched.clear(), stepped.clear()
            trainer.iteration(env, state, game=game)
            if not known:
                unknown_rollouts += 1
                cohort = set(agent.cohorts.table[game].flatten().tolist())
                assert trainer.buffer.games.eq(game).all(), game
                assert fetched <= cohort and stepped <= cohort and stepped, game
        env.close()
    assert unknown_rollouts > 3                 # the new games' first rollouts at least
    assert len(set(agent.cohorts.table.flatten().tolist())) == 12        # disjoint cohorts
    assert det.known_games()[:2].all()          # learnt while the next game was played
    store.shutdown()


def test_a_detector_that_cannot_tell_the_games_apart_never_routes_a_game_elsewhere():
    """A detector stuck on game 0 (its game head fixed, no learning to speak of) sees the
    second game's frames in every minibatch but never names them: every rollout of that
    game stays inside its own cohort."""
    args = TrainArgs(**{**TINY, "detector": True})
    agent = build_agent(args)
    trainer = build_trainer(args, agent)
    det = trainer.detector_trainer
    with torch.no_grad():
        det.detector.game_head.weight.zero_()
        det.detector.game_head.bias.copy_(torch.tensor([5.0, -5.0]))
    for group in det.optimizer.param_groups:
        group["lr"] = 1e-12
    for game in range(2):
        env = make_env(args.games[game], args.ppo.num_envs, 0)
        state = trainer.start(env, game)
        for _ in range(4):
            trainer.iteration(env, state, game=game)
            assert trainer.buffer.games.eq(game).all(), game
        env.close()
    assert det.known_games().tolist() == [True, False]
    agent.store.shutdown()


def test_the_update_routes_with_the_game_the_rollout_used():
    args = TrainArgs(**TINY)
    agent = build_agent(args)
    trainer = build_trainer(args, agent)
    wrong = torch.tensor(0)
    trainer.routing_games = lambda obs, games: torch.full_like(games, int(wrong))  # a detector
    env = make_env("synthetic-1", args.ppo.num_envs, 0)                            # that errs
    seen = []
    forward = agent.forward

    def spy(windows, games=None):
        seen.append(games.unique().tolist())
        return forward(windows, games)

    agent.forward = spy
    trainer.iteration(env, trainer.start(env, 0), game=1)
    assert trainer.buffer.games.eq(0).all()
    assert all(g == [0] for g in seen)              # rollout, bootstrap and every minibatch
    env.close()
    agent.store.shutdown()


def test_each_update_logs_the_share_of_observations_routed_with_the_game(monkeypatch):
    """``routing/routed_with_game``: 1 while routing names the game being played; a detector
    that sends environment 0 to game 0 throughout costs the second game a quarter of 4."""
    from ooc_moe.train.ppo import PPOTrainer

    def first_env_to_game_0(self, obs, games):
        routed = games.clone()
        routed[0] = 0
        return routed

    monkeypatch.setattr(PPOTrainer, "routing_games", first_env_to_game_0)
    metrics = train(TrainArgs(**TINY), progress=False)
    per_game = {g: [h["routing/routed_with_game"] for h in metrics["history"] if h["game"] == g]
                for g in TINY["games"]}
    assert per_game == {"synthetic-0": [1.0] * 1, "synthetic-1": [0.75] * 1}
    assert metrics["routed_with_game"] == [1.0, 0.75]
    metrics["agent"].store.shutdown()


def test_cohorts_survive_checkpoint_and_resume(tmp_path, monkeypatch):
    args = replace(TrainArgs(**TINY), games=("synthetic-1", "synthetic-0"))
    whole = train(replace(args, out=str(tmp_path / "whole")), progress=False)
    train_cut_at_second_stage(replace(args, out=str(tmp_path / "cut")), monkeypatch)
    resumed = train(replace(args, out=str(tmp_path / "cut")), progress=False, resume=True)
    table = whole["agent"].cohorts.table
    assert table[0].flatten().tolist() == [0, 1, 2, 3]    # game 0 = synthetic-1, seen first
    assert torch.equal(resumed["agent"].cohorts.table, table)
    assert torch.equal(resumed["agent"].cohorts.assignments, whole["agent"].cohorts.assignments)
    assert resumed["retention"] == whole["retention"]
    assert len(whole["experts_per_game"]) == 2
    assert all(1 <= v <= 2 for v in whole["experts_per_game"])  # inside cohorts of 2
    for run in (whole, resumed):
        run["agent"].store.shutdown()
