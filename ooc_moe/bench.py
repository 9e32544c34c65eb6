"""Benchmarks, each a ratio against a baseline measured in the same run.

Run: ``python -m ooc_moe bench {store,layer,sim,train,all} [--quick] [--json FILE]``.

``store``: for each link of the fetch path, the store's throughput divided by the raw copy of
the same bytes (file -> DRAM: ``preadv`` into one buffer, from the page cache and cold, once per
file backend, ``pread``, ``memmap`` and ``direct``; with ``fio`` installed, its ``O_DIRECT``
sequential read of the same file as the disk's own limit; DRAM -> HBM: ``copy_`` between
preallocated tensors, ``non_blocking`` from pinned memory on CUDA). Then prefetch overlap: a
loop of expert compute + ``get_experts`` with the next step prefetched, divided by the same loop
with every expert resident.

``layer``: the train step (forward + backward + optimizer) of a ``TieredMoELayer`` whose
working set fits HBM, against the same layer with every expert resident and against a
straightforward PyTorch MoE of ``nn.Linear`` experts trained by ``torch.optim.Adam``; then with
a working set 2x and 8x the HBM tier, with and without prefetch: step time and bytes per step.

``sim``: accesses per second of the trace simulator per policy, one core (goal for LRU: 1M/s,
so that widgets redraw at once).

``train``: environment steps per second of PPO training (rollout + update) for the cnn, dense
and MoE agents at the CLI demo's sizes, in one process on one torch thread, one iteration of
each in turn so that the machine's load falls on all alike; the ratios MoE/dense (goal
>= 0.8) and dense/cnn (goal >= 1.0), and cnn/env against the environment stepped alone (random
actions), the share of the ceiling the plainest agent reaches.

``dist``: train steps of the expert-parallel layer (``ooc_moe.distributed``, gloo) on 1 rank and
on 2, the same tokens per step: tokens/s, the share of a step spent exchanging rows, bytes per
link, and the speed-up.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn as nn

from .moe import ExpertOptimizer, ExpertRouter, TieredMoELayer
from .store import TieredExpertStore
from .store.file_tier import BACKENDS, DATA_NAME
from .store.stats import LINKS

__all__ = ["StoreBenchConfig", "bench_store", "bench_file_tier", "LayerBenchConfig", "bench_layer",
           "SimBenchConfig", "bench_sim", "TrainBenchConfig", "bench_train"]


@dataclass
class StoreBenchConfig:
    expert_dim: int = 512          # the prototype's expert: 8.4 MB per fp32 record
    hidden_dim: int = 2048
    num_experts: int = 48          # experts read per file -> DRAM measurement
    batch: int = 8                 # experts per get_experts call / per step
    steps: int = 24                # steps of the overlap loop
    tokens: int = 1024             # tokens per expert per step in the overlap loop
    repeats: int = 3               # the median of this many runs is reported
    device: str | None = None
    directory: str | None = None   # where the expert file goes (point at the disk to test)

    @classmethod
    def quick(cls, **kw) -> "StoreBenchConfig":
        return cls(expert_dim=256, hidden_dim=1024, num_experts=24, batch=4, steps=12,
                   tokens=512, repeats=3, **kw)


@dataclass
class LinkResult:
    link: str
    bytes: int
    store_s: float
    raw_s: float
    backend: str | None = None         # file -> DRAM links: the store's file backend
    cold: bool = False                 # file -> DRAM links: page cache dropped before each read
    ratio: float = field(init=False)   # store throughput / raw throughput (goal >= 0.9)

    def __post_init__(self) -> None:
        self.ratio = self.raw_s / self.store_s

    def line(self) -> str:
        gbs = lambda s: self.bytes / s / 1e9  # noqa: E731
        return (f"{self.link:<34} {self.bytes / 1e6:8.1f} MB  store {gbs(self.store_s):6.2f} GB/s"
                f"  raw {gbs(self.raw_s):6.2f} GB/s  ratio {self.ratio:5.2f}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _drop_page_cache(path) -> bool:
    """Evict the (clean) file pages from the OS page cache, so the next read hits the disk."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _median_pair(store_fn, raw_fn, repeats: int, prepare=lambda: None) -> tuple[float, float]:
    """Alternate store and raw runs so both see the same machine state; medians."""
    store_t, raw_t = [], []
    for _ in range(repeats):
        prepare()
        raw_t.append(_time(raw_fn))
        prepare()
        store_t.append(_time(store_fn))
    return statistics.median(store_t), statistics.median(raw_t)


def _file_to_dram(cfg: StoreBenchConfig, directory: str) -> list[LinkResult]:
    """file -> DRAM through each file backend, from the page cache and then cold (where the
    cache can be dropped), each against the raw ``preadv`` of the same bytes in the same run."""
    n = cfg.num_experts
    path = os.path.join(directory, DATA_NAME)
    ids = list(range(n))
    with TieredExpertStore(n, cfg.expert_dim, cfg.hidden_dim, 1, n, cfg.device,
                           path=directory, overwrite=True) as store:
        store.flush()
        device = store.device
    raw = torch.empty(n, store.layout.numel, dtype=store.dtype,
                      pin_memory=device.type == "cuda")
    record_bytes = store.record_bytes

    def read_raw():
        fd = os.open(path, os.O_RDONLY)
        try:
            for e in ids:  # the same record-by-record reads the store makes
                view = memoryview(raw[e].view(torch.uint8).numpy())
                assert os.preadv(fd, [view], e * record_bytes) == record_bytes
        finally:
            os.close(fd)

    def read_store(backend: str, timings: list[float]):
        def run():
            with TieredExpertStore.open(directory, cfg.device, hbm_capacity=1,
                                        dram_capacity=n, file_backend=backend) as s:
                start = time.perf_counter()
                s.prefetch(ids, tier="dram")
                s.synchronize()
                timings.append(time.perf_counter() - start)
        return run

    links = []
    read_raw()  # warm the page cache (and the allocator) for the cached measurements
    for cold in (False, True):
        if cold and not _drop_page_cache(path):
            break
        prepare = (lambda: _drop_page_cache(path)) if cold else (lambda: None)
        for backend in BACKENDS:
            timings: list[float] = []
            _, raw_s = _median_pair(read_store(backend, timings), read_raw, cfg.repeats, prepare)
            name = ("file -> DRAM (cold" if cold else "file -> DRAM (page cache") + (
                ")" if backend == "pread" else f", {backend})")
            links.append(LinkResult(name, n * record_bytes, statistics.median(timings), raw_s,
                                    backend, cold))
    return links


def _fio(path: str, block: int) -> dict | None:
    """The disk's own limit: fio's sequential O_DIRECT read of the file in blocks of ``block``
    bytes (a record, rounded up to 4 KiB), 16 in flight; None without fio, {"error": ...} if
    it failed."""
    if shutil.which("fio") is None:
        return None
    command = ["fio", "--name=disk", f"--filename={path}", "--readonly", "--rw=read",
               "--direct=1", f"--bs={-(-block // 4096) * 4096}", "--ioengine=libaio",
               "--iodepth=16", "--output-format=json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        return {"command": " ".join(command), "error": result.stderr.strip()[-300:]}
    report = json.loads(result.stdout[result.stdout.index("{"):])  # after any warning lines
    read = report["jobs"][0]["read"]
    return {"command": " ".join(command), "block": block, "bytes": read["io_bytes"],
            "bytes_per_s": read["bw_bytes"]}


def _fio_line(fio: dict | None, links: list[LinkResult]) -> str:
    if fio is None:
        return "disk limit: fio is not installed (apt-get install fio), skipped"
    if "error" in fio:
        return f"disk limit: fio failed ({fio['error']}), skipped"
    ratios = "  ".join(f"{x.backend} {x.bytes / x.store_s / fio['bytes_per_s']:.2f}"
                       for x in links if x.cold)
    return (f"disk limit (fio, O_DIRECT, {fio['block'] / 2**20:.1f} MiB x 16 in flight) "
            f"{fio['bytes_per_s'] / 1e9:6.2f}"
            f" GB/s; cold store / fio: {ratios or 'no cold measurement'}")


def bench_file_tier(cfg: StoreBenchConfig) -> dict:
    """file -> DRAM through each file backend, warm and cold, against the raw read and fio."""
    with tempfile.TemporaryDirectory(prefix="ooc-moe-bench-", dir=cfg.directory) as directory:
        links = _file_to_dram(cfg, directory)
        fio = _fio(os.path.join(directory, DATA_NAME), links[0].bytes // cfg.num_experts)
    print(f"bench file tier: {cfg.num_experts} records of {cfg.expert_dim}x{cfg.hidden_dim} "
          f"({links[0].bytes / cfg.num_experts / 1e6:.1f} MB)")
    for link in links:
        print("  " + link.line())
    print("  " + _fio_line(fio, links))
    return {"links": [asdict(x) for x in links], "fio": fio}


def _dram_to_hbm(cfg: StoreBenchConfig, directory: str) -> LinkResult:
    k = cfg.batch
    a, b = list(range(k)), list(range(k, 2 * k))
    with TieredExpertStore(2 * k, cfg.expert_dim, cfg.hidden_dim, k, 2 * k, cfg.device,
                           path=directory, overwrite=True) as store:
        device = store.device
        store.prefetch(a + b, tier="dram")
        store.synchronize()
        src = store._engine.dram_pool                     # pinned on CUDA
        dst = torch.empty(k, store.layout.numel, dtype=store.dtype, device=device)
        state = {"next": a}

        def copy_raw():
            for i in range(k):
                dst[i].copy_(src[i], non_blocking=True)
            _sync(device)

        def copy_store():
            store.get_experts(state["next"])             # k DRAM hits, k promotions
            _sync(device)
            state["next"] = b if state["next"] is a else a

        copy_store(), copy_raw()                         # warm-up
        store_s, raw_s = _median_pair(copy_store, copy_raw, max(cfg.repeats, 5))
        assert store.stats.file_reads == 0 and store.stats.dram_hits >= k  # DRAM -> HBM only
        return LinkResult("DRAM -> HBM", k * store.record_bytes, store_s, raw_s)


def _overlap(cfg: StoreBenchConfig, directory: str) -> dict:
    """Time per step of compute + get_experts: prefetched vs demand vs all resident."""
    n, k = cfg.steps * cfg.batch, cfg.batch
    steps = [list(range(t * k, (t + 1) * k)) for t in range(cfg.steps)]  # new experts each step

    def loop(store: TieredExpertStore, prefetch: bool) -> float:
        x = torch.randn(cfg.tokens, cfg.expert_dim, device=store.device, dtype=store.dtype)
        _sync(store.device)
        start = time.perf_counter()
        for t, ids in enumerate(steps):
            experts = store.get_experts(ids)
            if prefetch and t + 1 < len(steps):
                store.prefetch(steps[t + 1])
            for e in experts.values():                   # the FFN of each expert on its tokens
                h = torch.relu(x @ e.w1.T + e.b1)
                x = x + (h @ e.w2.T + e.b2) * 1e-3
        _sync(store.device)
        return time.perf_counter() - start

    results = {}
    kw = dict(path=directory, overwrite=True)
    with TieredExpertStore(n, cfg.expert_dim, cfg.hidden_dim, n, n, cfg.device, **kw) as s:
        for ids in steps:
            s.get_experts(ids)
        loop(s, False)
        results["resident_s"] = statistics.median(loop(s, False) for _ in range(cfg.repeats))
    for name, prefetch in (("prefetch_s", True), ("demand_s", False)):
        timings = []
        for _ in range(cfg.repeats):
            # HBM holds two steps (this one and the next), DRAM everything: DRAM -> HBM copies
            with TieredExpertStore(n, cfg.expert_dim, cfg.hidden_dim, 2 * k, n, cfg.device,
                                   **kw) as s:
                s.prefetch(range(n), tier="dram")
                s.synchronize()
                timings.append(loop(s, prefetch))
                hits = s.stats.prefetch_hits
        results[name] = statistics.median(timings)
        if prefetch:
            results["prefetch_hits_per_access"] = hits / (n - k)
    results["ratio_prefetch"] = results["prefetch_s"] / results["resident_s"]
    results["ratio_demand"] = results["demand_s"] / results["resident_s"]
    return results


def bench_store(cfg: StoreBenchConfig) -> dict:
    """Run every store benchmark; print a table; return the figures."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg.device = str(device)
    with tempfile.TemporaryDirectory(prefix="ooc-moe-bench-", dir=cfg.directory) as directory:
        links = _file_to_dram(cfg, directory)
        fio = _fio(os.path.join(directory, DATA_NAME), links[0].bytes // cfg.num_experts)
        links.append(_dram_to_hbm(cfg, directory))
        overlap = _overlap(cfg, directory)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    print(f"bench store on {name}; record {cfg.expert_dim}x{cfg.hidden_dim} "
          f"({links[0].bytes / cfg.num_experts / 1e6:.1f} MB)")
    for link in links:
        print("  " + link.line())
    print("  " + _fio_line(fio, links))
    print(f"  overlap: {cfg.steps} steps x {cfg.batch} new experts, {cfg.tokens} tokens each")
    print(f"    all resident {overlap['resident_s'] * 1e3 / cfg.steps:7.2f} ms/step")
    print(f"    prefetched   {overlap['prefetch_s'] * 1e3 / cfg.steps:7.2f} ms/step  ratio "
          f"{overlap['ratio_prefetch']:.2f}  (prefetch hits per access "
          f"{overlap['prefetch_hits_per_access']:.2f})")
    print(f"    demand only  {overlap['demand_s'] * 1e3 / cfg.steps:7.2f} ms/step  ratio "
          f"{overlap['ratio_demand']:.2f}")
    return {"device": name, "config": asdict(cfg), "links": [asdict(x) for x in links],
            "fio": fio, "overlap": overlap}


def machine() -> dict:
    """What shapes a run's figures besides the code: CPUs, torch threads, and the load average as
    it starts (0 on an idle machine, 2 with two cores busy)."""
    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_before": os.getloadavg()[0]}


def write_json(results: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


# -- the layer benchmark ------------------------------------------------------------------------
@dataclass
class LayerBenchConfig:
    expert_dim: int = 512          # the prototype's expert; with Adam state 34 MB per record
    hidden_dim: int = 2048
    working_set: int = 16          # experts every step uses (the router picks only these)
    num_experts: int = 32          # experts in the layer
    top_k: int = 2
    tokens: int = 1024
    steps: int = 4                 # timed train steps per configuration (median reported)
    device: str | None = None
    directory: str | None = None

    @classmethod
    def quick(cls, **kw) -> "LayerBenchConfig":
        return cls(expert_dim=128, hidden_dim=512, tokens=512, steps=3, **kw)


class LinearMoE(nn.Module):
    """The straightforward PyTorch MoE: ``nn.Linear`` experts, all resident, masked dispatch."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.layer_norm = nn.LayerNorm(dim)
        self.router = ExpertRouter(dim, num_experts, top_k, noise_std=0.0)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(),
                                                   nn.Linear(hidden, dim))
                                     for _ in range(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.layer_norm(x)
        r = self.router(h)
        y = torch.zeros_like(h)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(r.expert_indices == e)
            if token.numel():
                y.index_add_(0, token, expert(h[token]) * r.expert_weights[token, slot, None])
        return x + y, 0.01 * r.load_balancing_loss + 1e-3 * r.z_loss


def _route_to_working_set(router: ExpertRouter, working_set: int) -> None:
    """Large logits for the first ``working_set`` experts, zero for the rest, so the rest
    are (almost surely) never in a token's top-k. The benchmark checks how many were used."""
    with torch.no_grad():
        router.router.weight.normal_(0.0, 1.0)
        router.router.weight[working_set:] = 0.0


def _train_steps(model: nn.Module, extra_opt, x: torch.Tensor, steps: int,
                 device: torch.device) -> float:
    """Median seconds of a train step (forward + backward + optimizers)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        y, aux = model(x)
        loss = y.square().mean() + aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if extra_opt is not None:
            extra_opt.step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _tiered(cfg: LayerBenchConfig, directory: str, hbm: int, prefetch: bool,
            x: torch.Tensor) -> dict:
    with TieredExpertStore(cfg.num_experts, cfg.expert_dim, cfg.hidden_dim, hbm,
                           cfg.num_experts, cfg.device, path=directory, overwrite=True,
                           optimizer_state=True) as store:
        torch.manual_seed(0)
        layer = TieredMoELayer(cfg.expert_dim, cfg.hidden_dim, store, cfg.top_k, dropout=0.0,
                               noise_std=0.0, prefetch=prefetch).to(store.device)
        _route_to_working_set(layer.router, cfg.working_set)
        store.prefetch(range(cfg.num_experts), tier="dram")   # host memory holds them all
        store.synchronize()
        optimizer = ExpertOptimizer(store, lr=1e-4, prefetch=prefetch)
        _train_steps(layer, optimizer, x, 1, store.device)   # warm-up, not counted
        store.reset_stats()
        seconds = _train_steps(layer, optimizer, x, cfg.steps, store.device)
        s = store.get_stats_summary()
        return {"hbm": hbm, "prefetch": prefetch, "step_s": seconds,
                "experts_used": layer.last_routing.expert_indices.unique().numel(),
                "bytes_per_step": {k: s[f"bytes_{k}"] / cfg.steps for k in LINKS},
                "record_bytes": store.record_bytes, "hit_rate": s["hit_rate"],
                "prefetch_hits": s["prefetch_hits"]}


def bench_layer(cfg: LayerBenchConfig) -> dict:
    """Train-step time of the tiered layer against all-resident and a plain PyTorch MoE."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg.device = str(device)
    torch.manual_seed(0)
    x = torch.randn(cfg.tokens, cfg.expert_dim, device=device)
    w = cfg.working_set
    configs = {"all resident": (cfg.num_experts, True), "working set fits": (w, True),
               "2x, prefetch": (w // 2, True), "2x, demand": (w // 2, False),
               "8x, prefetch": (max(1, w // 8), True), "8x, demand": (max(1, w // 8), False)}
    with tempfile.TemporaryDirectory(prefix="ooc-moe-bench-", dir=cfg.directory) as directory:
        runs = {name: _tiered(cfg, directory, hbm, prefetch, x)
                for name, (hbm, prefetch) in configs.items()}
    torch.manual_seed(0)
    plain_moe = LinearMoE(cfg.expert_dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k)
    _route_to_working_set(plain_moe.router, w)
    plain_moe.to(device)
    _train_steps(plain_moe, None, x, 1, device)
    plain = _train_steps(plain_moe, None, x, cfg.steps, device)
    base = runs["all resident"]["step_s"]
    for run in runs.values():
        run["ratio_to_resident"] = run["step_s"] / base
        run["ratio_to_plain"] = run["step_s"] / plain
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    print(f"bench layer on {name}; {cfg.num_experts} experts of {cfg.expert_dim}x"
          f"{cfg.hidden_dim} (with Adam state {runs['all resident']['record_bytes'] / 1e6:.1f}"
          f" MB per record), {cfg.tokens} tokens, top-{cfg.top_k}, working set {w} "
          f"(used: {runs['all resident']['experts_used']})")
    print(f"  {'plain PyTorch MoE (nn.Linear)':<30} {plain * 1e3:8.1f} ms/step")
    for key, run in runs.items():
        moved = sum(run["bytes_per_step"].values()) / 1e6
        print(f"  {key + ' (HBM ' + str(run['hbm']) + ')':<30} "
              f"{run['step_s'] * 1e3:8.1f} ms/step  to resident {run['ratio_to_resident']:.2f}"
              f"  to plain {run['ratio_to_plain']:.2f}  moved {moved:8.1f} MB/step  "
              f"hit rate {run['hit_rate']:.2f}")
    return {"device": name, "config": asdict(cfg), "plain_step_s": plain, "runs": runs}


# -- the expert-parallel benchmark -----------------------------------------------------------
@dataclass
class DistBenchConfig:
    world: int = 2                 # ranks of the sharded run (gloo; the 1-rank run beside it)
    num_experts: int = 32
    expert_dim: int = 256
    hidden_dim: int = 1024
    top_k: int = 2
    tokens: int = 2048             # per step over all ranks (each rank routes tokens / world)
    hbm_capacity: int = 8          # HBM slots over all ranks (each rank: hbm_capacity / world)
    steps: int = 4                 # timed train steps (median reported), after one warm-up
    device: str | None = None      # unused: gloo on CPU
    directory: str | None = None   # where the ranks' expert files go (default: temp)

    @classmethod
    def quick(cls, **kw) -> "DistBenchConfig":
        return cls(expert_dim=32, hidden_dim=128, tokens=256, steps=2, **kw)


def _dist_rank(rank: int, world: int, cfg: DistBenchConfig, directory: str) -> None:
    """One rank of ``bench_dist`` (``train_sharded_layer``); its figures saved as
    ``directory/rank-<rank>.json``."""
    import torch.distributed as dist

    from .distributed import leave_process_group, train_sharded_layer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{directory}/rendezvous", rank=rank,
                            world_size=world)
    finished = False
    try:
        figures = train_sharded_layer(cfg.num_experts, cfg.expert_dim, cfg.hidden_dim,
                                      cfg.top_k, cfg.tokens, cfg.hbm_capacity // world,
                                      cfg.steps, warmup=1,
                                      path=os.path.join(directory, "experts"))
        with open(os.path.join(directory, f"rank-{rank}.json"), "w") as f:
            json.dump(figures, f)
        finished = True
    finally:
        leave_process_group(finished)


def bench_dist(cfg: DistBenchConfig) -> dict:
    """Train steps of the expert-parallel layer (``ooc_moe.distributed``) on 1 rank and on
    ``world`` ranks (processes, gloo, one torch thread each), the same tokens per step in all:
    tokens/s, the share of a step spent in the exchanges of rows, bytes per link per step
    (all ranks; ``between_ranks``: what the exchanges send from one rank to another), and the
    speed-up over one rank."""
    import torch.multiprocessing as mp

    if cfg.world < 2 or cfg.num_experts % cfg.world or cfg.hbm_capacity % cfg.world \
            or cfg.tokens % cfg.world:
        raise ValueError(f"world={cfg.world} must be >= 2 and divide num_experts, "
                         f"hbm_capacity and tokens ({cfg.num_experts}, {cfg.hbm_capacity}, "
                         f"{cfg.tokens})")
    print(f"bench dist: {cfg.num_experts} experts of {cfg.expert_dim}x{cfg.hidden_dim}, "
          f"{cfg.tokens} tokens per step over all ranks, top-{cfg.top_k}, {cfg.hbm_capacity} "
          f"HBM slots over all ranks, gloo on {os.cpu_count()} CPU cores, 1 torch thread "
          f"per rank, {cfg.steps} timed steps")
    runs = {}
    for world in (1, cfg.world):
        with tempfile.TemporaryDirectory(prefix="ooc-moe-dist-", dir=cfg.directory) as d:
            mp.spawn(_dist_rank, args=(world, cfg, d), nprocs=world, join=True)
            ranks = []
            for r in range(world):
                with open(os.path.join(d, f"rank-{r}.json")) as f:
                    ranks.append(json.load(f))
        step = statistics.median(max(t) for t in zip(*(r["step_s"] for r in ranks)))
        exchange = statistics.median(max(t) for t in zip(*(r["exchange_s"] for r in ranks)))
        # rows leaving a rank, 4 times a step (tokens out and back, and their gradients),
        # expert_dim float32 values each
        remote_rows = sum(n for r in ranks for sent in r["sent"]
                          for to, n in enumerate(sent) if to != r["rank"])
        runs[world] = {"step_s": step, "tokens_per_s": cfg.tokens / step,
                       "exchange_s": exchange, "exchange_share": exchange / step,
                       "bytes_per_step": {
                           **{k: sum(r["store"][f"bytes_{k}"] for r in ranks) / cfg.steps
                              for k in LINKS},
                           "between_ranks": 4 * remote_rows * cfg.expert_dim * 4 / cfg.steps},
                       "hit_rate": statistics.mean(r["store"]["hit_rate"] for r in ranks)}
    runs[cfg.world]["speedup"] = runs[cfg.world]["tokens_per_s"] / runs[1]["tokens_per_s"]
    for world, run in runs.items():
        moved = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in run["bytes_per_step"].items())
        print(f"  {world} rank{'s' if world > 1 else ' '}: {run['step_s'] * 1e3:8.1f} ms/step "
              f"{run['tokens_per_s']:9,.0f} tokens/s  exchanges {run['exchange_s'] * 1e3:6.1f} "
              f"ms ({run['exchange_share']:.0%})  HBM hit rate {run['hit_rate']:.2f}  "
              f"MB/step: {moved}")
    print(f"  speed-up of {cfg.world} ranks over 1: {runs[cfg.world]['speedup']:.2f}")
    return {"config": asdict(cfg), "runs": {str(w): r for w, r in runs.items()}}


# -- the simulator benchmark --------------------------------------------------------------------
@dataclass
class SimBenchConfig:
    num_experts: int = 256
    experts_per_step: int = 16
    steps: int = 50_000            # 800k accesses
    hbm_capacity: int = 32
    dram_capacity: int = 128
    device: str | None = None      # unused: the simulator runs on one CPU core
    directory: str | None = None   # unused

    @classmethod
    def quick(cls, **kw) -> "SimBenchConfig":
        return cls(steps=5_000, **kw)


def bench_sim(cfg: SimBenchConfig) -> dict:
    """Accesses per second of ``simulate`` for each policy on a sequential-games pattern."""
    from .trace import POLICIES, simulate
    from .workloads import access_pattern

    steps = access_pattern("sequential_games", cfg.num_experts, cfg.steps,
                           cfg.experts_per_step, num_games=4)
    accesses = sum(map(len, steps))
    print(f"bench sim: {accesses:,} accesses ({cfg.steps:,} steps of {cfg.experts_per_step} of "
          f"{cfg.num_experts} experts), HBM {cfg.hbm_capacity}, DRAM {cfg.dram_capacity}")
    results = {}
    for policy in POLICIES:
        seconds = _time(lambda: results.setdefault(policy, simulate(
            steps, cfg.hbm_capacity, cfg.dram_capacity, policy)))
        rate = accesses / seconds
        results[policy] = {"accesses_per_s": rate, "hit_rate": results[policy].hit_rate}
        print(f"  {policy:<7} {rate / 1e6:5.2f} M accesses/s  (ratio to the 1M/s goal "
              f"{rate / 1e6:.2f})  HBM hit rate {results[policy]['hit_rate']:.3f}")
    return {"config": asdict(cfg), "policies": results}


# -- the training benchmark -------------------------------------------------------------------
@dataclass
class TrainBenchConfig:
    game: str = "breakout"
    agents: tuple = ("cnn", "dense", "moe")
    iterations: int = 4            # timed PPO iterations (rollout + update) per agent
    warmup: int = 1                # untimed iterations per agent first
    num_envs: int = 8
    num_steps: int = 128
    # the agents' sizes: those of the CLI's demo (``python -m ooc_moe demo``)
    num_experts: int = 32
    expert_dim: int = 64
    expert_hidden_dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    top_k: int = 2
    context_len: int = 4
    hbm_capacity: int = 8
    dram_capacity: int = 16
    detector: bool = True          # the MoE agent's online detector and prefetching, as trained
    older_tokens: str = "recycled"  # PPOArgs.older_tokens of the window agents (its default)
    newest_only: bool = True       # MoERLAgentConfig.newest_only of the MoE agent (its default)
    threads: int = 1               # torch threads while measuring
    seed: int = 1
    device: str | None = None
    directory: str | None = None   # where the MoE agent's expert file goes (default: temp)

    @classmethod
    def quick(cls, **kw) -> "TrainBenchConfig":
        return cls(game="synthetic-0", iterations=2, num_envs=4, num_steps=32, **kw)


def _env_sps(cfg: TrainBenchConfig, steps: int) -> dict:
    """Steps per second of the environment alone (random actions, the same envs as training):
    the ceiling no agent's SPS can pass."""
    from .train.run import make_env

    env = make_env(cfg.game, cfg.num_envs, cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    try:
        env.reset(seed=cfg.seed)
        started = time.perf_counter()
        for _ in range(max(steps // cfg.num_envs, 1)):
            env.step(rng.integers(0, env.single_action_space.n, cfg.num_envs))
        seconds = time.perf_counter() - started
    finally:
        env.close()
    return {"sps": max(steps // cfg.num_envs, 1) * cfg.num_envs / seconds, "seconds": seconds}


def bench_train(cfg: TrainBenchConfig) -> dict:
    """SPS of each agent trained side by side (one iteration of each in turn, the order
    rotating every round), from its median iteration time (a burst of load from elsewhere
    hits one iteration, not the figure), and the ratios MoE/dense and dense/cnn."""
    from .train.ppo import PPOArgs
    from .train.run import TrainArgs, build_agent, build_trainer, make_env

    sizes = {k: getattr(cfg, k) for k in (
        "num_experts", "expert_dim", "expert_hidden_dim", "num_layers", "num_heads", "top_k",
        "context_len", "hbm_capacity", "dram_capacity", "detector", "newest_only", "seed",
        "device")}
    ppo = PPOArgs(num_envs=cfg.num_envs, num_steps=cfg.num_steps,
                  older_tokens=cfg.older_tokens)
    steps = ppo.batch_size * (cfg.iterations + cfg.warmup)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    state = machine()
    print(f"bench train: {cfg.game}, {cfg.num_envs} envs x {cfg.num_steps} steps, "
          f"{cfg.iterations} timed iterations per agent after {cfg.warmup} warm-up, "
          f"interleaved, {cfg.threads} torch thread(s), older tokens {cfg.older_tokens}, MoE "
          f"last block {'newest position' if cfg.newest_only else 'every position'}; load "
          f"average before {state['load_before']:.2f} on {state['cpus']} CPUs")
    runs, results, env_alone = {}, {}, _env_sps(cfg, steps)
    print(f"  env    SPS {env_alone['sps']:7.1f}  (the environment alone, random actions)")
    try:
        for kind in cfg.agents:
            args = TrainArgs(games=(cfg.game,), steps_per_game=steps, baseline=kind,
                             ppo=ppo, **sizes)
            torch.manual_seed(cfg.seed)
            agent = build_agent(args, cfg.directory and os.path.join(cfg.directory, kind))
            trainer = build_trainer(args, agent)
            env = make_env(cfg.game, cfg.num_envs, cfg.seed)
            runs[kind] = {"trainer": trainer, "env": env, "state": trainer.start(env, cfg.seed),
                          "seconds": []}
        for round_ in range(cfg.warmup + cfg.iterations):
            for i in range(len(cfg.agents)):
                run = runs[cfg.agents[(round_ + i) % len(cfg.agents)]]
                if round_ == cfg.warmup and run["trainer"].agent.store is not None:
                    run["trainer"].agent.store.reset_stats()
                started = time.perf_counter()
                run["trainer"].iteration(run["env"], run["state"], 0)
                if round_ >= cfg.warmup:
                    run["seconds"].append(time.perf_counter() - started)
        for kind, run in runs.items():
            median = statistics.median(run["seconds"])
            results[kind] = {"sps": ppo.batch_size / median, "iteration_seconds": run["seconds"],
                             "steps": ppo.batch_size * cfg.iterations}
            store = run["trainer"].agent.store
            line = (f"  {kind:<6} SPS {results[kind]['sps']:7.1f}  (iterations of "
                    f"{ppo.batch_size} steps: " + ", ".join(f"{t:.2f}" for t in run["seconds"])
                    + " s)")
            if store is not None:
                results[kind]["hit_rate"] = store.get_stats_summary()["hit_rate"]
                line += f"  HBM hit rate {results[kind]['hit_rate']:.1%}"
            print(line)
    finally:
        torch.set_num_threads(threads)
        for run in runs.values():
            run["env"].close()
            if run["trainer"].agent.store is not None:
                run["trainer"].agent.store.shutdown()
    sps = {"env": env_alone["sps"], **{kind: r["sps"] for kind, r in results.items()}}
    ratios = {f"{a}/{b}": sps[a] / sps[b] for a, b in (("moe", "dense"), ("dense", "cnn"),
                                                       ("cnn", "env")) if a in sps and b in sps}
    goals = {"moe/dense": " (goal >= 0.8)", "dense/cnn": " (goal >= 1.0)", "cnn/env": ""}
    if ratios:
        print("  ratios: " + "  ".join(f"{name} {r:.3g}{goals[name]}"
                                       for name, r in ratios.items()))
    return {"config": asdict(cfg), "env": env_alone, "agents": results, "ratios": ratios,
            **state}
