"""The tiered MoE layer against a plain PyTorch MoE: forward, backward, and 50 Adam steps."""

import pytest
import torch

from ooc_moe import (DenseFFN, DenseTransformerBlock, ExpertOptimizer, ExpertRouter,
                     MoETransformerBlock, TieredExpertStore, TieredMoELayer)
from reference_moe import ReferenceExperts, ReferenceMoELayer

E, DIM, HIDDEN, TOP_K, TOKENS = 8, 6, 10, 2, 48
PARAMS = ("w1", "b1", "w2", "b2")


def make_store(path, hbm, dram=None):
    return TieredExpertStore(E, DIM, HIDDEN, hbm, dram or E, "cpu", path=path, seed=3,
                             dtype=torch.float64, optimizer_state=True)


def make_layer(store, seed):
    torch.manual_seed(seed)
    layer = TieredMoELayer(DIM, HIDDEN, store, TOP_K, dropout=0.0, noise_std=0.0).double()
    with torch.no_grad():  # a non-trivial LayerNorm, so its gradients are checked too
        layer.layer_norm.weight.normal_(1.0, 0.1)
        layer.layer_norm.bias.normal_(0.0, 0.1)
        layer.router.router.weight.normal_(0.0, 0.5)
    return layer


def reference_for(store, layers):
    experts = ReferenceExperts([store.read_expert(e) for e in range(E)])
    return experts, [reference_layer(experts, l) for l in layers]


def reference_layer(experts, layer):
    return ReferenceMoELayer(experts, layer.router.router.weight.detach(),
                             layer.layer_norm.weight.detach(), layer.layer_norm.bias.detach(),
                             TOP_K)


def close(a, b, rtol):
    assert torch.allclose(a, b, rtol=rtol, atol=rtol * 1e-3), (a - b).abs().max()


@pytest.mark.parametrize("hbm", [1, 2, 3, E])
def test_forward_and_backward_match_a_plain_moe(tmp_path, hbm):
    store = make_store(tmp_path, hbm)
    layer = make_layer(store, 0)
    experts, (ref,) = reference_for(store, [layer])
    x = torch.randn(TOKENS, DIM, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, aux = layer(x)
    y_ref, aux_ref, idx = ref(x_ref)
    assert idx.unique().numel() == E, "the batch should touch every expert"
    assert torch.equal(layer.last_routing.expert_indices, idx)
    close(y, y_ref, 1e-10)
    close(aux, aux_ref, 1e-10)
    target = torch.randn_like(y)
    ((y - target).pow(2).sum() + aux).backward()
    ((y_ref - target).pow(2).sum() + aux_ref).backward()
    close(x.grad, x_ref.grad, 1e-5)
    close(layer.router.router.weight.grad, ref.router.grad, 1e-5)
    close(layer.layer_norm.weight.grad, ref.ln_weight.grad, 1e-5)
    close(layer.layer_norm.bias.grad, ref.ln_bias.grad, 1e-5)
    assert store.experts_with_grad == set(range(E))
    for e in range(E):
        record = store.read_expert(e)
        for name, param in zip(PARAMS, experts.expert_params(e)):
            close(record[f"grad_{name}"], param.grad, 1e-5)
    store.shutdown()


def test_a_batch_that_fits_fetches_each_expert_once(tmp_path):
    store = make_store(tmp_path, E)
    layer = make_layer(store, 0)
    y, aux = layer(torch.randn(TOKENS, DIM, dtype=torch.float64))
    (y.sum() + aux).backward()
    used = layer.last_routing.expert_indices.unique().numel()
    s = store.get_stats_summary()
    assert s["file_reads"] == used and s["bytes_file_to_dram"] == used * store.record_bytes
    assert s["hbm_hits"] == used  # backward found every expert still in HBM
    store.shutdown()


def test_a_tiny_hbm_tier_streams_in_waves_and_reloads_for_backward(tmp_path):
    store = make_store(tmp_path, 2, dram=2)
    layer = make_layer(store, 0)
    y, aux = layer(torch.randn(TOKENS, DIM, dtype=torch.float64))
    (y.sum() + aux).backward()
    s = store.get_stats_summary()
    assert s["accesses"] == 2 * E                     # every expert, in forward and backward
    assert s["bytes_file_to_dram"] > E * store.record_bytes  # backward re-reads from the file
    assert s["prefetch_hits"] > 0                      # the next wave was prefetched
    assert s["bytes_dram_to_file"] > 0                 # gradients were written back
    store.shutdown()


def train(layers, parameters, x, target, steps, expert_opt=None, ref_experts=None):
    """The same loop for the tiered and the reference model; returns losses and optimizer."""
    opt = torch.optim.Adam(parameters, lr=1e-2)
    losses = []
    for t in range(steps):
        h, aux_total = x[t % len(x)], 0.0
        for layer in layers:
            h, aux = layer(h)[:2]
            aux_total = aux_total + aux
        loss = (h - target[t % len(x)]).pow(2).mean() + aux_total
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if expert_opt is not None:
            expert_opt.step()
        losses.append(loss.item())
    return losses, opt


@pytest.mark.parametrize("hbm, dram", [(2, 3), (E, E)])
def test_fifty_adam_steps_match_torch_adam_with_a_shared_store(tmp_path, hbm, dram):
    """Two layers share one pool of experts; HBM of 2 forces constant evictions."""
    store = make_store(tmp_path / "experts", hbm, dram)
    layers = [make_layer(store, 1), make_layer(store, 2)]
    experts, refs = reference_for(store, layers)
    torch.manual_seed(5)
    x = torch.randn(4, TOKENS, DIM, dtype=torch.float64)
    target = torch.randn_like(x)
    dense = [p for l in layers for p in l.parameters()]
    losses, _ = train(layers, dense, x, target, 50, ExpertOptimizer(store, lr=1e-2))
    ref_opt_params = [p for r in refs for p in (r.router, r.ln_weight, r.ln_bias)]
    ref_opt_params += list(experts.parameters())
    ref_losses, _ = train(refs, ref_opt_params, x, target, 50)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert losses[-1] < losses[0]
    store.flush()
    reopened = TieredExpertStore.open(tmp_path / "experts", "cpu")
    for s in (store, reopened):
        for e in range(E):
            record = s.read_expert(e)
            for name, param in zip(PARAMS, experts.expert_params(e)):
                close(record[name], param.detach(), 1e-4)
    reopened.shutdown()
    store.shutdown()


def test_adam_moments_and_step_counts_match_torch(tmp_path):
    store = make_store(tmp_path, 2, 3)
    layer = make_layer(store, 1)
    experts, (ref,) = reference_for(store, [layer])
    torch.manual_seed(5)
    x = torch.randn(3, 12, DIM, dtype=torch.float64)  # few tokens: some experts sit out steps
    target = torch.randn_like(x)
    train([layer], list(layer.parameters()), x, target, 20, ExpertOptimizer(store, lr=1e-2))
    params = [ref.router, ref.ln_weight, ref.ln_bias, *experts.parameters()]
    _, opt = train([ref], params, x, target, 20)
    steps = set()
    for e in range(E):
        record = store.read_expert(e)
        params = experts.expert_params(e)
        state = [opt.state[p] for p in params]
        if not state[0]:
            assert record["step"].item() == 0
            continue
        steps.add(state[0]["step"].item())
        assert record["step"].item() == state[0]["step"].item()
        close(record["exp_avg"], torch.cat([s["exp_avg"].reshape(-1) for s in state]), 1e-4)
        close(record["exp_avg_sq"], torch.cat([s["exp_avg_sq"].reshape(-1) for s in state]),
              1e-4)
    assert len(steps) > 1, "experts should have different step counts (lazy Adam)"
    store.shutdown()


def test_layers_with_a_store_each_match_the_reference(tmp_path):
    stores = [make_store(tmp_path / "a", 2, 3), make_store(tmp_path / "b", 3, 4)]
    layers = [make_layer(stores[0], 1), make_layer(stores[1], 2)]
    pools = [ReferenceExperts([s.read_expert(e) for e in range(E)]) for s in stores]
    refs = [reference_layer(pool, layer) for pool, layer in zip(pools, layers)]
    torch.manual_seed(5)
    x = torch.randn(2, TOKENS, DIM, dtype=torch.float64)
    target = torch.randn_like(x)
    opts = [ExpertOptimizer(s, lr=1e-2) for s in stores]

    class Both:  # steps both expert optimizers
        def step(self):
            for opt in opts:
                opt.step()

    losses, _ = train(layers, [p for l in layers for p in l.parameters()], x, target, 20,
                      Both())
    ref_params = [p for r in refs for p in (r.router, r.ln_weight, r.ln_bias)]
    ref_params += [p for pool in pools for p in pool.parameters()]
    ref_losses, _ = train(refs, ref_params, x, target, 20)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    for store, pool in zip(stores, pools):
        for e in range(E):
            close(store.read_expert(e)["w1"], pool.w1[e].detach(), 1e-4)
        store.shutdown()


def test_bad_input_is_a_clear_error(tmp_path):
    store = make_store(tmp_path, 2)
    layer = make_layer(store, 0)
    with pytest.raises(ValueError, match=r"expected \[tokens, 6\]"):
        layer(torch.randn(4, DIM + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="expected"):
        layer(torch.randn(DIM, dtype=torch.float64))
    with pytest.raises(ValueError, match="top_k=9 must be between 1 and num_experts=8"):
        TieredMoELayer(DIM, HIDDEN, store, top_k=E + 1)
    with pytest.raises(ValueError, match="top_k=0"):
        ExpertRouter(DIM, E, top_k=0)
    with pytest.raises(ValueError, match="store's experts are 6 -> 10"):
        TieredMoELayer(DIM, HIDDEN * 2, store)
    with pytest.raises(ValueError, match="torch.float32 on cpu but the experts are torch.float64"):
        TieredMoELayer(DIM, HIDDEN, store)(torch.randn(4, DIM))
    store.shutdown()
    with TieredExpertStore(E, DIM, HIDDEN, 2, 4, "cpu", path=tmp_path / "plain") as plain:
        layer = TieredMoELayer(DIM, HIDDEN, plain, TOP_K)
        with pytest.raises(ValueError, match="optimizer_state=True"):
            layer(torch.randn(4, DIM))
        with pytest.raises(ValueError, match="optimizer_state=True"):
            ExpertOptimizer(plain)
        with torch.no_grad():  # inference needs no optimizer state
            assert layer(torch.randn(3, 5, DIM))[0].shape == (3, 5, DIM)


def test_blocks_run_and_dense_baseline_has_the_same_active_parameters(tmp_path):
    with TieredExpertStore(E, DIM, HIDDEN, 4, E, "cpu", path=tmp_path,
                           optimizer_state=True) as store:
        block = MoETransformerBlock(DIM, 2, store, HIDDEN, TOP_K, dropout=0.0)
        dense = DenseTransformerBlock(DIM, 2, HIDDEN, TOP_K, dropout=0.0)
        x = torch.randn(3, 5, DIM)
        mask = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)   # causal
        for b in (block, dense):
            y, aux = b(x, mask)
            assert y.shape == x.shape and aux.dim() == 0
        expert = sum(store.read_expert(0)[n].numel() for n in PARAMS)
        ffn = sum(p.numel() for p in DenseFFN(DIM, HIDDEN, TOP_K).ffn.parameters())
        assert ffn == TOP_K * expert - (TOP_K - 1) * DIM  # one output bias instead of top_k


def test_optimizer_state_needs_full_precision(tmp_path):
    with pytest.raises(ValueError, match="float32 or float64.*stops at 256"):
        TieredExpertStore(E, DIM, HIDDEN, 2, 4, "cpu", path=tmp_path, dtype=torch.bfloat16,
                          optimizer_state=True)


def test_layer_reports_its_waves_and_the_optimizer_prefetches(tmp_path):
    store = make_store(tmp_path, 4)
    layer = make_layer(store, 0)
    y, aux = layer(torch.randn(TOKENS, DIM, dtype=torch.float64))
    assert [len(w) for w in layer.last_waves] == [2, 2, 2, 2]   # half the slots per wave
    assert sorted(e for w in layer.last_waves for e in w) == list(range(E))
    (y.sum() + aux).backward()
    before = store.get_stats_summary()
    ExpertOptimizer(store).step()
    after = store.get_stats_summary()
    # the update streams all 8 experts through 4 slots, yet never waits on a demand copy:
    # the first waves find experts still resident, the later ones were prefetched
    assert after["accesses"] - before["accesses"] == E
    assert after["hbm_hits"] - before["hbm_hits"] == E
    assert after["prefetch_hits"] > before["prefetch_hits"]
    store.shutdown()
