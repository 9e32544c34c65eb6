"""Expert parallelism on gloo: two ranks spawned by the test, each with its shard of the
experts in a store of its own, against one process holding them all (``TieredMoELayer``) and
against the plain PyTorch MoE trained by ``torch.optim.Adam``."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ooc_moe import ExpertOptimizer, TieredExpertStore, TieredMoELayer
from ooc_moe.distributed import (ShardedMoELayer, average_gradients, owner_of, shard_store,
                                  sum_over_ranks)
from ooc_moe.moe.optim import clip_grad_norm_
from reference_moe import ReferenceExperts, ReferenceMoELayer

E, DIM, HIDDEN, TOP_K, TOKENS, SEED = 8, 6, 10, 2, 24, 3
PARAMS = ("w1", "b1", "w2", "b2")
STEPS = 20
MAX_NORM = 0.05


def inputs(world: int):
    """Per rank: its tokens, targets and (for one-rank routing) a cohort of even experts."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(world, TOKENS, DIM, generator=g, dtype=torch.float64)
    target = torch.randn(STEPS, world, TOKENS, DIM, generator=g, dtype=torch.float64)
    return x, target


def dense_weights():
    g = torch.Generator().manual_seed(12)
    return {"router": torch.randn(E, DIM, generator=g, dtype=torch.float64) * 0.5,
            "ln_weight": 1 + 0.1 * torch.randn(DIM, generator=g, dtype=torch.float64),
            "ln_bias": 0.1 * torch.randn(DIM, generator=g, dtype=torch.float64)}


def set_dense(layer, weights):
    with torch.no_grad():
        layer.router.router.weight.copy_(weights["router"])
        layer.layer_norm.weight.copy_(weights["ln_weight"])
        layer.layer_norm.bias.copy_(weights["ln_bias"])
    return layer


EVEN = torch.arange(0, E, 2).expand(TOKENS, -1)      # a cohort on rank 0's experts only


def forward_backward(layer, x, target, cohort=None):
    x = x.clone().requires_grad_()
    y, _ = layer(x, cohort=cohort)
    (y - target).pow(2).sum().backward()
    return {"y": y.detach(), "x_grad": x.grad, "router_grad": layer.router.router.weight.grad,
            "ln_grad": layer.layer_norm.weight.grad}


def expert_grads(store, ids, scale=1.0):
    return {g: {n: store.read_expert(i)[f"grad_{n}"] * scale for n in PARAMS} for i, g in ids}


def clipped_mean_loss_gradients(layer, store, x, target, reduce_norm=None):
    """A data-parallel step's gradients: the mean loss over this rank's tokens, gradients
    averaged over the ranks (experts: scaled), the global norm clipped to ``MAX_NORM``."""
    y, _ = layer(x)
    (y - target).pow(2).mean().backward()
    expert_opt = ExpertOptimizer(store, reduce_norm=reduce_norm)
    average_gradients(layer.parameters(), expert_opt)
    total = clip_grad_norm_(layer.parameters(), MAX_NORM, expert_opt)
    return {"total": total, "router_grad": layer.router.router.weight.grad.clone(),
            "ln_grad": layer.layer_norm.weight.grad.clone(), "scale": expert_opt.grad_scale}


def _rank(rank: int, world: int, tmp: str) -> None:
    """One rank: forward/backward at HBM 1 and at its whole shard, routed to both ranks and
    to rank 0 alone; then 20 Adam steps; the results saved for the test to compare."""
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    x, target = inputs(world)
    out, local = {}, E // world
    ids = [(i, rank + world * i) for i in range(local)]
    try:
        for hbm in (1, local):
            for name, cohort in (("both", None), ("one", EVEN)):
                with shard_store(E, DIM, HIDDEN, hbm, local, "cpu", seed=SEED,
                                 dtype=torch.float64, optimizer_state=True) as store:
                    layer = set_dense(ShardedMoELayer(DIM, HIDDEN, store, TOP_K, dropout=0.0,
                                                      noise_std=0.0).double(), dense_weights())
                    out[hbm, name] = forward_backward(layer, x[rank], target[0, rank], cohort)
                    out[hbm, name]["expert_grads"] = expert_grads(store, ids)
                    out[hbm, name]["received"] = sorted({e for w in layer.last_waves for e in w})
        with shard_store(E, DIM, HIDDEN, 1, local, "cpu", seed=SEED, dtype=torch.float64,
                         optimizer_state=True) as store:
            layer = set_dense(ShardedMoELayer(DIM, HIDDEN, store, TOP_K, dropout=0.0,
                                              noise_std=0.0).double(), dense_weights())
            out["clip"] = clipped_mean_loss_gradients(layer, store, x[rank], target[0, rank],
                                                      sum_over_ranks)
            out["clip"]["expert_grads"] = expert_grads(store, ids, out["clip"]["scale"])
        store = shard_store(E, DIM, HIDDEN, 1, local, "cpu", path=os.path.join(tmp, "experts"),
                            seed=SEED, dtype=torch.float64, optimizer_state=True)
        layer = set_dense(ShardedMoELayer(DIM, HIDDEN, store, TOP_K, dropout=0.0,
                                          noise_std=0.0).double(), dense_weights())
        dense = list(layer.parameters())
        opt, expert_opt = torch.optim.Adam(dense, lr=1e-2), ExpertOptimizer(store, lr=1e-2)
        losses = []
        for t in range(STEPS):
            y, _ = layer(x[rank])
            loss = (y - target[t, rank]).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            for p in dense:                         # what DDP does (it averages; we sum)
                dist.all_reduce(p.grad)
            opt.step()
            expert_opt.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item())
        store.shutdown()                            # flushes this rank's file
        out["losses"] = losses
        torch.save(out, os.path.join(tmp, f"rank-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 1], ids=["world2", "world1"])
def spawned(request, tmp_path_factory):
    world = request.param
    tmp = str(tmp_path_factory.mktemp(f"world{world}"))
    mp.spawn(_rank, args=(world, tmp), nprocs=world, join=True)
    return world, tmp, [torch.load(os.path.join(tmp, f"rank-{r}.pt")) for r in range(world)]


def one_process(hbm: int, x, target, cohort):
    """The same experts in one store and one TieredMoELayer, on every rank's tokens."""
    with TieredExpertStore(E, DIM, HIDDEN, hbm, E, "cpu", seed=SEED, dtype=torch.float64,
                           optimizer_state=True) as store:
        layer = set_dense(TieredMoELayer(DIM, HIDDEN, store, TOP_K, dropout=0.0,
                                         noise_std=0.0).double(), dense_weights())
        cohort = None if cohort is None else EVEN.repeat(len(x) // TOKENS, 1)
        result = forward_backward(layer, x, target, cohort)
        result["expert_grads"] = expert_grads(store, [(e, e) for e in range(E)])
    return result


def close(a, b):
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-9), (a - b).abs().max()


@pytest.mark.parametrize("routed", ["both", "one"])
def test_sharded_forward_and_backward_equal_one_process(spawned, routed):
    world, _, ranks = spawned
    x, target = inputs(world)
    for hbm_of_shard in ("1", "all"):
        hbm = 1 if hbm_of_shard == "1" else E // world
        ref = one_process(1 if hbm == 1 else E, x.reshape(-1, DIM), target[0].reshape(-1, DIM),
                          None if routed == "both" else EVEN)
        for rank, result in enumerate(ranks):
            got = result[hbm, routed]
            rows = slice(rank * TOKENS, (rank + 1) * TOKENS)
            close(got["y"], ref["y"][rows])
            close(got["x_grad"], ref["x_grad"][rows])
            for e, grads in got["expert_grads"].items():
                assert owner_of(e, world)[0] == rank
                for n in PARAMS:
                    close(grads[n], ref["expert_grads"][e][n])
        # the router's and LayerNorm's gradients are each rank's share: they sum to one process's
        close(sum(r[hbm, routed]["router_grad"] for r in ranks), ref["router_grad"])
        close(sum(r[hbm, routed]["ln_grad"] for r in ranks), ref["ln_grad"])
    if routed == "one" and world == 2:      # rank 1's experts are odd: it computed nothing
        assert ranks[1][E // world, "one"]["received"] == []
        assert ranks[0][E // world, "one"]["received"] == list(range(E // 2))
    if routed == "both" and world == 2:
        assert all(r[E // world, "both"]["received"] for r in ranks)


def test_averaged_and_clipped_gradients_equal_one_process_on_all_tokens(spawned):
    """Each rank's mean loss over its tokens, gradients averaged over ranks and the norm over
    dense parameters and every rank's experts clipped = one process's mean loss over all."""
    world, _, ranks = spawned
    x, target = inputs(world)
    with TieredExpertStore(E, DIM, HIDDEN, 1, E, "cpu", seed=SEED, dtype=torch.float64,
                           optimizer_state=True) as store:
        layer = set_dense(TieredMoELayer(DIM, HIDDEN, store, TOP_K, dropout=0.0,
                                         noise_std=0.0).double(), dense_weights())
        ref = clipped_mean_loss_gradients(layer, store, x.reshape(-1, DIM),
                                          target[0].reshape(-1, DIM))
        ref["expert_grads"] = expert_grads(store, [(e, e) for e in range(E)], ref["scale"])
    assert ref["total"] > MAX_NORM                           # the clip did clip
    for r in ranks:
        got = r["clip"]
        close(got["total"], ref["total"])
        close(got["router_grad"], ref["router_grad"])
        close(got["ln_grad"], ref["ln_grad"])
        for e, grads in got["expert_grads"].items():
            for n in PARAMS:
                close(grads[n], ref["expert_grads"][e][n])
    assert sorted(e for r in ranks for e in r["clip"]["expert_grads"]) == list(range(E))


def test_twenty_adam_steps_match_torch_adam_and_each_file_holds_its_own_experts(spawned):
    world, tmp, ranks = spawned
    x, target = inputs(world)
    with TieredExpertStore(E, DIM, HIDDEN, E, E, "cpu", seed=SEED, dtype=torch.float64) as s:
        experts = ReferenceExperts([s.read_expert(e) for e in range(E)])
    w = dense_weights()
    ref = ReferenceMoELayer(experts, w["router"], w["ln_weight"], w["ln_bias"], TOP_K)
    opt = torch.optim.Adam([ref.router, ref.ln_weight, ref.ln_bias, *experts.parameters()],
                           lr=1e-2)
    losses = []
    for t in range(STEPS):
        y = ref(x.reshape(-1, DIM))[0]
        loss = (y - target[t].reshape(-1, DIM)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert ranks[0]["losses"] == pytest.approx(losses, rel=1e-6)
    assert losses[-1] < losses[0]
    for rank in range(world):
        reopened = TieredExpertStore.open(os.path.join(tmp, "experts", f"rank-{rank}"), "cpu")
        assert reopened.num_experts == E // world              # only its own experts
        for i in range(E // world):
            record = reopened.read_expert(i)
            for n, param in zip(PARAMS, experts.expert_params(rank + world * i)):
                close(record[n], param.detach())
        reopened.shutdown()


def _bad(rank: int, tmp: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank,
                            world_size=2)
    try:
        for kwargs, match in (({"num_experts": 7}, "does not divide over 2 ranks"),
                              ({"hbm_capacity": 5}, "larger than a rank's shard")):
            args = {"num_experts": E, "expert_dim": DIM, "hidden_dim": HIDDEN,
                    "hbm_capacity": 2, "dram_capacity": 4, **kwargs}
            with pytest.raises(ValueError, match=match):
                shard_store(**args)
    finally:
        dist.destroy_process_group()


def test_bad_shards_are_clear_errors(tmp_path):
    with pytest.raises(RuntimeError, match="torchrun"):
        shard_store(E, DIM, HIDDEN, 2, 4)
    mp.spawn(_bad, args=(str(tmp_path),), nprocs=2, join=True)


def test_torchrun_trains_the_sharded_layer_and_each_rank_reports(tmp_path):
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "ooc_moe", "dist-layer", "--steps", "2", "--out", str(tmp_path)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    assert [r["experts"] for r in ranks] == [list(range(0, 16, 2)), list(range(1, 16, 2))]
    for r in ranks:
        assert f"rank {r['rank']} of 2" in result.stdout
        assert len(r["step_s"]) == len(r["sent"]) == 2 and sum(r["sent"][-1]) == 256 // 2 * 2
        assert r["loss"] == ranks[0]["loss"]                 # the mean over ranks, on both
        store = TieredExpertStore.open(tmp_path / "experts" / f"rank-{r['rank']}", "cpu")
        assert store.num_experts == 8
        store.shutdown()
    # every assignment went to one rank: 2 ranks x 128 tokens x top-2
    assert sum(sum(r["sent"][-1]) for r in ranks) == 512


def test_dist_layer_without_torchrun_says_how_to_launch_it():
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-m", "ooc_moe", "dist-layer"], capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode != 0 and "torchrun --standalone --nproc_per_node" in result.stderr
