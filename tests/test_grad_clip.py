"""Global gradient-norm clipping over dense parameters and experts together, against a hand
computation and ``torch.nn.utils.clip_grad_norm_`` on a plain PyTorch MoE (every expert an
``nn.Parameter``): two layers sharing one store of HBM 2, so the records with their gradients
are evicted and fetched again between and within the layers."""

import math

import pytest
import torch
import torch.nn as nn

from ooc_moe import ExpertOptimizer, TieredExpertStore, TieredMoELayer
from ooc_moe.moe.optim import clip_grad_norm_
from reference_moe import ReferenceExperts, ReferenceMoELayer

E, DIM, HIDDEN, TOP_K, TOKENS = 6, 4, 8, 2, 24
PARAMS = ("w1", "b1", "w2", "b2")


def tiny_model(tmp_path):
    store = TieredExpertStore(E, DIM, HIDDEN, 2, E, "cpu", path=tmp_path, seed=5,
                              dtype=torch.float64, optimizer_state=True)
    torch.manual_seed(0)
    layers = [TieredMoELayer(DIM, HIDDEN, store, TOP_K, dropout=0.0, noise_std=0.0).double()
              for _ in range(2)]
    for layer in layers:
        with torch.no_grad():
            layer.router.router.weight.normal_(0.0, 0.5)
    head = nn.Linear(DIM, 1).double()
    pool = ReferenceExperts([store.read_expert(e) for e in range(E)])
    refs = [ReferenceMoELayer(pool, l.router.router.weight.detach(),
                              l.layer_norm.weight.detach(), l.layer_norm.bias.detach(), TOP_K)
            for l in layers]
    ref_head = nn.Linear(DIM, 1).double()
    ref_head.load_state_dict(head.state_dict())
    return store, layers, head, pool, refs, ref_head


def forward(layers, head, x):
    aux = 0.0
    for layer in layers:
        x, a = layer(x)[:2]
        aux = aux + a
    return 10 * head(x).pow(2).sum() + aux


@pytest.mark.parametrize("max_norm", [0.5, 1e6])          # clipped, and left alone
def test_global_norm_over_dense_and_expert_gradients(tmp_path, max_norm):
    store, layers, head, pool, refs, ref_head = tiny_model(tmp_path)
    x = torch.randn(TOKENS, DIM, dtype=torch.float64)
    forward(layers, head, x).backward()
    forward(refs, ref_head, x).backward()
    dense = [p for m in (*layers, head) for p in m.parameters()]
    ref_dense = [p for m in (*refs, ref_head) for p in m.parameters()]
    assert store.experts_with_grad == set(range(E)), "every expert should get a gradient"
    # by hand: the norm of every gradient, dense and expert, as one vector
    ref_grads = [p.grad.clone() for p in ref_dense + list(pool.parameters())]
    total = math.sqrt(sum(float(g.pow(2).sum()) for g in ref_grads))
    coef = min(1.0, max_norm / (total + 1e-6))
    assert (coef < 1.0) == (max_norm == 0.5)

    opt = ExpertOptimizer(store, lr=1e-2)
    got = clip_grad_norm_(dense, max_norm, opt)
    assert float(got) == pytest.approx(total, rel=1e-9)
    # torch's clip over every parameter of the plain model is the reference for the values
    torch_total = nn.utils.clip_grad_norm_(ref_dense + list(pool.parameters()), max_norm)
    assert float(torch_total) == pytest.approx(total, rel=1e-9)
    for p, ref, before in zip(dense, ref_dense, ref_grads):
        torch.testing.assert_close(p.grad, ref.grad, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(ref.grad, before * coef)
    clipped_sq = sum(float(p.grad.pow(2).sum()) for p in dense)
    for e in range(E):
        record = store.read_expert(e)
        for name, param in zip(PARAMS, pool.expert_params(e)):
            scaled = record[f"grad_{name}"] * opt.grad_scale
            torch.testing.assert_close(scaled, param.grad, rtol=1e-6, atol=1e-9)
            clipped_sq += float(scaled.pow(2).sum())
    assert math.sqrt(clipped_sq) <= max_norm * (1 + 1e-9)
    assert math.sqrt(clipped_sq) == pytest.approx(min(total, max_norm), rel=1e-6)

    # the next step applies the scale: Adam on the clipped gradients (the moments show it;
    # a first Adam step alone hardly depends on the gradient's scale)
    ref_opt = torch.optim.Adam(pool.parameters(), lr=1e-2)
    assert opt.step() == E
    ref_opt.step()
    for e in range(E):
        record, params = store.read_expert(e), pool.expert_params(e)
        for moment in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(
                record[moment], torch.cat([ref_opt.state[p][moment].flatten() for p in params]),
                rtol=1e-6, atol=1e-12)
        for name, param in zip(PARAMS, params):
            torch.testing.assert_close(record[name], param.detach(), rtol=1e-6, atol=1e-9)
            assert torch.all(record[f"grad_{name}"] == 0)
    assert opt.grad_scale == 1.0 and float(opt.grad_sq_norm()) == 0.0
    store.shutdown()


def test_zero_grad_forgets_the_norms_and_the_scale(tmp_path):
    store, layers, head, *_ = tiny_model(tmp_path)
    forward(layers, head, torch.randn(TOKENS, DIM, dtype=torch.float64)).backward()
    opt = ExpertOptimizer(store)
    assert float(opt.grad_sq_norm()) > 0
    clip_grad_norm_(head.parameters(), 1e-3, opt)
    assert opt.grad_scale < 1.0
    opt.zero_grad()
    assert float(opt.grad_sq_norm()) == 0.0 and opt.grad_scale == 1.0
    store.shutdown()
