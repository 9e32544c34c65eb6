"""Expert parallelism on ``torch.distributed``: the experts sharded over ranks, each rank with a
tier store of its own.

**What.** With ``W`` ranks (processes started by ``torchrun``, or spawned; gloo on CPUs, NCCL on
GPUs), expert ``e`` of a layer's pool of ``E`` is owned by rank ``e % W``, where it is local
expert ``e // W`` of that rank's ``TieredExpertStore`` (its own file, DRAM and HBM pools; its
capacities are per rank). ``shard_store`` builds a rank's store; its records start as the
experts a single store of ``E`` with the same seed would hold, so ``W`` changes where experts
live, never what they are.

**How a ``ShardedMoELayer`` computes.** Each rank routes its own tokens with its own copy of
the router (dense parameters are replicated; ``DistributedDataParallel`` keeps them equal).
Then, per layer:

1. the ``tokens x top_k`` assignments are sorted by the rank that owns their expert;
2. the ranks exchange how many rows each sends to each (``all_to_all_single`` of counts), then
   the rows' local expert ids and the token vectors themselves (``all_to_all_single`` in an
   autograd ``Function`` whose backward is the reverse exchange);
3. each rank runs the experts it owns on the rows it received through its store, in waves,
   exactly as ``TieredMoELayer`` does (``expert_mixture``);
4. the outputs travel back by the reverse exchange and are weighted and summed per token.

Backward runs the same exchanges in reverse: the gradients of the rows go to the owners, whose
expert backward accumulates the weight gradients into their own records (``ExpertOptimizer``
then steps each rank's experts), and the input gradients come home. Every rank must call the
layer (and backward) the same number of times, as with any collective. With ``W = 1`` the
exchanges are copies and the layer is ``TieredMoELayer``.

Balancing losses and router statistics are each rank's own, over its own tokens (with DDP
averaging the router's gradients, the Switch loss becomes the mean over ranks of per-rank
losses). ``exchange_seconds`` adds up the time this rank spent in the exchanges of rows,
forward and backward (waiting for slower ranks included): ``bench dist`` reports it apart.

**Training on ranks** (``train``/``train-atari`` under ``torchrun``, ``ooc_moe.train.run``):
data-parallel PPO with the experts sharded. After each backward ``average_gradients`` does
what ``DistributedDataParallel`` would (averages the replicated dense gradients) and scales
the experts' gradients to the same mean; ``ExpertOptimizer(reduce_norm=sum_over_ranks)``
makes the clipped norm the one over every rank's experts. Loops whose length differs between
ranks (an evaluation's episodes) go on while ``any_rank`` has work, so every rank keeps
calling the layer; ``gather_lists`` collects each rank's finished episodes for rank 0.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from .moe.layer import TieredMoELayer, expert_mixture
from .moe.optim import ExpertOptimizer
from .moe.router import RouterOutput
from .store import TieredExpertStore

__all__ = ["shard_store", "owner_of", "ShardedMoELayer", "train_sharded_layer", "init_from_env",
           "leave_process_group", "launch_sharded_layer", "shard_dir", "world_info", "any_rank",
           "gather_lists", "sum_over_ranks", "average_gradients"]


def owner_of(expert: int, world: int) -> tuple[int, int]:
    """``(rank, local id)`` of global expert ``expert`` among ``world`` ranks."""
    return expert % world, expert // world


def world_info(group=None) -> tuple[int, int]:
    """``(rank, world)`` of this process; ``(0, 1)`` when torch.distributed is not running."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _on_backend(t: Tensor, group) -> Tensor:
    """``t`` where the group's backend can reduce it (NCCL reduces CUDA tensors only)."""
    if dist.get_backend(group) == "nccl":
        return t.cuda()
    return t.cpu()


def sum_over_ranks(value: Tensor, group=None) -> Tensor:
    """The sum of ``value`` over the group's ranks (every rank must call it), on
    ``value``'s device; ``value`` itself without torch.distributed."""
    if world_info(group)[1] == 1:
        return value
    total = _on_backend(value.detach().clone(), group)
    dist.all_reduce(total, group=group)
    return total.to(value.device)


def any_rank(flag: bool, group=None) -> bool:
    """Whether ``flag`` is true on any rank of the group (every rank must call it): how ranks
    that step in lockstep agree to go on while one of them still has work."""
    return bool(sum_over_ranks(torch.tensor(float(flag)), group) > 0)


def gather_lists(items: list, group=None) -> list:
    """Every rank's ``items`` (picklable), concatenated in rank order."""
    if world_info(group)[1] == 1:
        return list(items)
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, list(items), group=group)
    return [x for part in gathered for x in part]


def average_gradients(parameters, expert_opt: ExpertOptimizer | None = None,
                      group=None) -> None:
    """What ``DistributedDataParallel`` does after backward, for a model whose dense
    parameters are replicated and whose experts are sharded: average the dense gradients over
    the ranks (one all-reduce of those with a gradient: every rank runs the same modules, so
    the same parameters have one), and scale
    ``expert_opt``'s pending expert gradients by ``1 / W``. An expert's gradient is the sum
    of what every rank's tokens sent it, each rank's loss a mean over its own batch; scaled,
    it is the gradient of the mean over all ranks' batches, as the dense ones are. (DDP
    itself hooks ``forward``; the agents' ``encode`` and ``forward`` are separate calls.)"""
    world = world_info(group)[1]
    if world == 1:
        return
    params = [p for p in parameters if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in params])
    flat = sum_over_ranks(flat, group) / world
    offset = 0
    for p in params:
        p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()
    if expert_opt is not None:
        expert_opt.grad_scale /= world


def _rank_and_world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: start the processes with "
                           "torchrun (or init_process_group) before building sharded experts")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_dir(path: str | os.PathLike, group=None) -> Path:
    """Where this rank keeps its shard under ``path``: ``path/rank-<rank>``."""
    return Path(path) / f"rank-{_rank_and_world(group)[0]}"


def shard_store(num_experts: int, expert_dim: int, hidden_dim: int, hbm_capacity: int,
                dram_capacity: int, device=None, *, path: str | os.PathLike | None = None,
                group=None, **store_kw) -> TieredExpertStore:
    """This rank's store of a pool of ``num_experts`` sharded over the group's ranks: the
    experts ``e`` with ``e % W == rank``, in the file ``path/rank-<rank>`` (a temporary one
    without ``path``). ``hbm_capacity`` and ``dram_capacity`` are this rank's slots, at most
    its ``num_experts / W`` experts. Other keywords go to ``TieredExpertStore``."""
    rank, world = _rank_and_world(group)
    if num_experts % world:
        raise ValueError(f"num_experts={num_experts} does not divide over {world} ranks: each "
                         f"rank owns the experts e with e % {world} == rank, so use a multiple "
                         f"of {world}")
    local = num_experts // world
    for name, value in (("hbm_capacity", hbm_capacity), ("dram_capacity", dram_capacity)):
        if value > local:
            raise ValueError(f"{name}={value} is larger than a rank's shard ({num_experts} "
                             f"experts over {world} ranks = {local}): capacities are per rank; "
                             f"use at most {local}")
    rank_path = None if path is None else shard_dir(path, group)
    return TieredExpertStore(local, expert_dim, hidden_dim, hbm_capacity, dram_capacity,
                             device, path=rank_path, init_ids=range(rank, num_experts, world),
                             **store_kw)


def _all_to_all(x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
    out = x.new_empty(sum(out_splits), *x.shape[1:])
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
    return out


class _Exchange(torch.autograd.Function):
    """Rows sent ``send[r]`` to rank r and ``received[r]`` from it; backward sends the
    gradients back the same way. Both directions add their time to ``layer.exchange_seconds``."""

    @staticmethod
    def forward(ctx, x: Tensor, send: list[int], received: list[int], layer) -> Tensor:
        ctx.send, ctx.received, ctx.layer = send, received, layer
        started = time.perf_counter()
        out = _all_to_all(x, received, send, layer.group)
        layer.exchange_seconds += time.perf_counter() - started
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        started = time.perf_counter()
        out = _all_to_all(grad, ctx.send, ctx.received, ctx.layer.group)
        ctx.layer.exchange_seconds += time.perf_counter() - started
        return out, None, None, None


class ShardedMoELayer(TieredMoELayer):
    """``TieredMoELayer`` whose ``W * store.num_experts`` experts are sharded over the ranks
    of ``group`` (default: the world); ``expert_store`` is this rank's shard
    (``shard_store``). The router chooses among all experts; ``last_waves`` are this rank's
    waves over its local ids. Other arguments as ``TieredMoELayer``."""

    def __init__(self, input_dim: int, hidden_dim: int, expert_store: TieredExpertStore,
                 top_k: int = 2, dropout: float = 0.1, *, group=None, **layer_kw) -> None:
        self.group, self.exchange_seconds = group, 0.0
        self.last_sent: list[int] = []            # rows sent to each rank by the last call
        self.rank, self.world = _rank_and_world(group)
        super().__init__(input_dim, hidden_dim, expert_store, top_k, dropout, **layer_kw)

    def routed_experts(self) -> int:
        """Every rank's experts: ``W`` times the local store's."""
        return self.expert_store.num_experts * self.world

    def mixture(self, h: Tensor, routing: RouterOutput) -> Tensor:
        """Send each assignment's token to the rank owning its expert, run the local experts
        on what arrives, send the outputs back, and sum them weighted per token."""
        top_k = routing.expert_indices.shape[1]
        experts = routing.expert_indices.reshape(-1)                       # [A]
        owner, local = experts % self.world, experts // self.world
        order = torch.argsort(owner, stable=True)
        token = torch.div(order, top_k, rounding_mode="floor")             # [A] in send order
        send = torch.bincount(owner, minlength=self.world)
        received = torch.empty_like(send)
        dist.all_to_all_single(received, send, group=self.group)
        send, received = send.tolist(), received.tolist()
        self.last_sent = send
        local_ids = _all_to_all(local[order], received, send, self.group)
        rows = _Exchange.apply(h[token], send, received, self)
        out, self.last_waves = expert_mixture(rows, local_ids[:, None],
                                              rows.new_ones(len(local_ids), 1),
                                              self.expert_store, self.prefetch)
        back = _Exchange.apply(out, received, send, self)
        weights = routing.expert_weights.reshape(-1)[order]
        return torch.zeros_like(h).index_add(0, token, back * weights[:, None])

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", rank {self.rank} of {self.world} "
                f"(experts e with e % {self.world} == {self.rank})")


def init_from_env() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment (NCCL when CUDA is
    there, each rank on the GPU of its ``LOCAL_RANK``, else gloo); returns ``(rank, world)``."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise RuntimeError("no RANK / WORLD_SIZE in the environment: launch with torchrun, "
                           "e.g. torchrun --standalone --nproc_per_node 2 -m ooc_moe dist-layer")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    if not dist.is_initialized():
        store, rank, world = next(dist.rendezvous("env://"))
        # a job torchrun restarted (--max_restarts) keeps its keys apart from those the
        # killed attempt left in torchrun's store: gloo would wait on the dead ranks' addresses
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                store=dist.PrefixStore(f"attempt-{attempt}", store),
                                rank=rank, world_size=world)
    return dist.get_rank(), dist.get_world_size()


def leave_process_group(finished: bool) -> None:
    """Tear down the default process group, if any. A rank that ``finished`` its work first
    waits at a barrier for the others: one that destroys its gloo pairs while a slower peer
    still finishes the last collective can abort that peer (seen once in CI:
    "terminate called without an active exception"). After a failure there is no barrier,
    since the other ranks may never reach it."""
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def train_sharded_layer(num_experts: int = 16, expert_dim: int = 32, hidden_dim: int = 64,
                        top_k: int = 2, tokens: int = 256, hbm_capacity: int = 2,
                        steps: int = 5, *, warmup: int = 0,
                        path: str | os.PathLike | None = None, seed: int = 0,
                        group=None) -> dict:
    """Train a ``ShardedMoELayer`` for ``steps`` on this rank's ``tokens / W`` random tokens
    (a regression to a fixed random map; dense gradients averaged over ranks, as
    ``DistributedDataParallel`` does; each rank's ``ExpertOptimizer`` steps its experts), after
    ``warmup`` steps that are not counted. Every rank of the group must call it.
    ``hbm_capacity`` is per rank; DRAM holds the rank's shard.
    Returns this rank's figures: step and exchange seconds per step, rows sent to each rank
    per step, the loss per step (the mean over ranks) and its store's summary."""
    rank, world = _rank_and_world(group)
    if tokens % world:
        raise ValueError(f"tokens={tokens} does not divide over {world} ranks")
    store = shard_store(num_experts, expert_dim, hidden_dim, hbm_capacity, num_experts // world,
                        path=path, group=group, seed=seed, overwrite=path is not None,
                        optimizer_state=True)
    with store:
        torch.manual_seed(seed)                              # the same router on every rank
        layer = ShardedMoELayer(expert_dim, hidden_dim, store, top_k, dropout=0.0,
                                noise_std=0.0, group=group).to(store.device)
        target_map = torch.randn(expert_dim, expert_dim, device=store.device) / expert_dim ** 0.5
        torch.manual_seed(seed + 1 + rank)                   # each rank its own tokens
        x = torch.randn(tokens // world, expert_dim, device=store.device)
        dense = list(layer.parameters())
        opt = torch.optim.Adam(dense, lr=1e-3)
        expert_opt = ExpertOptimizer(store, lr=1e-3)
        figures = {"rank": rank, "world": world, "step_s": [], "exchange_s": [], "sent": [],
                   "loss": []}
        for step in range(warmup + steps):
            if step == warmup:
                store.reset_stats()
            dist.barrier(group)
            started, layer.exchange_seconds = time.perf_counter(), 0.0
            y, aux = layer(x)
            loss = (y - x @ target_map).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            (loss + aux).backward()
            for p in dense:
                dist.all_reduce(p.grad, group=group)
                p.grad /= world
            opt.step()
            expert_opt.step()
            seconds = time.perf_counter() - started
            mean = loss.detach().clone()
            dist.all_reduce(mean, group=group)
            if step >= warmup:
                figures["step_s"].append(seconds)
                figures["exchange_s"].append(layer.exchange_seconds)
                figures["sent"].append(layer.last_sent)
                figures["loss"].append(mean.item() / world)
        figures["store"] = {k: v for k, v in store.get_stats_summary().items()
                            if isinstance(v, (int, float))}
        figures["experts"] = [rank + world * i for i in range(store.num_experts)]
    return figures


def launch_sharded_layer(nproc: int = 2, out: str | os.PathLike | None = None,
                         timeout: float = 600, **options) -> list[dict]:
    """Run ``torchrun --standalone --nproc_per_node nproc -m ooc_moe dist-layer`` (each rank
    one torch thread; ``options`` become its flags, e.g. ``steps=3``), print what the ranks
    printed and return their figures, rank by rank. ``out``: where the expert files and
    figures go (default: a temporary directory, removed). If a rank dies, torchrun restarts
    the job once (``--max_restarts 1``) and what the failed attempt wrote to stderr is shown."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="ooc-moe-dist-") as tmp:
        out = str(out or tmp)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), "--max_restarts", "1", "-m", "ooc_moe",
               "dist-layer", "--out", out]
        cmd += [f"--{k}={v}" for k, v in options.items()]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        if result.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed (exit status {result.returncode}); "
                               f"the ranks printed:\n{result.stdout[-2000:]}\n"
                               f"and on stderr:\n{result.stderr[-3000:]}")
        if result.stderr:
            print(result.stderr[-3000:], file=sys.stderr)
        lines = {line.split(":")[0]: line for line in result.stdout.splitlines()}
        print("\n".join(lines[rank] for rank in sorted(lines)))  # a restart's last attempt
        ranks = []
        for r in range(nproc):
            with open(os.path.join(out, f"rank-{r}.json")) as f:
                ranks.append(json.load(f))
    return ranks
