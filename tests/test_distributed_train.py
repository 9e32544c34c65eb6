"""``torchrun --nproc_per_node 2 -m ooc_moe train``: a data-parallel job with the experts
sharded over two gloo ranks, killed (SIGKILL of one rank) and restarted by torchrun from its
last checkpoint; checkpoints of another world size and shards that do not divide are clear
errors before any work."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ooc_moe import TieredExpertStore

pytestmark = pytest.mark.xdist_group("torchrun")      # one job at a time on two cores

TINY = ["--num_experts", "8", "--expert_dim", "16", "--expert_hidden_dim", "32",
        "--num_heads", "2", "--hbm_capacity", "2", "--dram_capacity", "4", "--context_len", "2",
        "--num_envs", "4", "--num_steps", "16", "--eval_episodes", "2", "--eval_max_steps", "20"]
STEPS_PER_GAME, BATCH = 320, 64                         # 5 updates per game, 2 games
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun(*args: str, restarts: int = 0) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
            "2", "--max_restarts", str(restarts), "-m", "ooc_moe", *args]


def history(out: Path) -> list[dict]:
    try:
        return json.loads((out / "metrics.json").read_text())["history"]
    except (OSError, ValueError, KeyError):
        return []


def worker_of_rank(parent: int, rank: int) -> int:
    """The pid of torchrun's worker process with ``RANK=rank``."""
    for child in Path(f"/proc/{parent}/task/{parent}/children").read_text().split():
        environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in environ:
            return int(child)
    raise AssertionError(f"no worker of rank {rank} under {parent}")


def digest(directory: Path) -> dict:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="session")    # once per pytest worker, even if xdist interleaves files
def killed_and_restarted(tmp_path_factory):
    """A 2-rank job; once it has checkpointed and trained on, rank 1 is SIGKILLed; torchrun
    restarts both ranks, which resume from the checkpoint and finish."""
    out = tmp_path_factory.mktemp("job") / "run"
    job = subprocess.Popen(torchrun("train", "--num_games", "2", "--steps_per_game",
                                    str(STEPS_PER_GAME), "--checkpoint_every", "2", "--out",
                                    str(out), *TINY, restarts=1),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        deadline = time.monotonic() + 600
        while len(history(out)) < 3:                 # checkpointed at 2, trained past it
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()
            time.sleep(0.2)
        os.kill(worker_of_rank(job.pid, 1), signal.SIGKILL)
        at_kill = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
        stdout, stderr = job.communicate(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
    return out, at_kill, job.returncode, stdout, stderr


def test_a_killed_rank_restarts_the_job_from_its_last_checkpoint(killed_and_restarted):
    out, at_kill, returncode, stdout, stderr = killed_and_restarted
    assert returncode == 0, stderr[-3000:]
    assert "exitcode: -9" in stderr                           # the kill was real
    assert "trained moe on synthetic-0, synthetic-1" in stdout  # rank 0 reports, once
    assert stdout.count("trained moe") == 1
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["finished"] and metrics["world"] == 2
    steps = [h["global_step"] for h in metrics["history"]]
    assert steps == list(range(BATCH, 2 * STEPS_PER_GAME + 1, BATCH))  # each update once
    kept = at_kill["history"]
    assert 2 <= len(kept) < len(steps)
    # what the checkpoint held is what the finished run reports: nothing before it redone
    assert [h["losses/policy_loss"] for h in metrics["history"][:len(kept)]] == \
        [h["losses/policy_loss"] for h in kept]
    assert len(metrics["retention"]) == 2 and (out / "retention.csv").is_file()


def test_each_rank_checkpoints_and_keeps_only_its_shard(killed_and_restarted):
    out = killed_and_restarted[0]
    for rank in range(2):
        for directory in (out / "checkpoint" / f"rank-{rank}" / "store",
                          out / "store" / f"rank-{rank}"):
            store = TieredExpertStore.open(directory, "cpu")
            assert store.num_experts == 4                   # 8 experts over 2 ranks
            store.shutdown()
        assert (out / "checkpoint" / f"rank-{rank}" / "state.pt").is_file()
    assert not (out / "checkpoint.tmp").exists()


def test_resuming_with_another_world_size_is_a_clear_error_that_changes_nothing(
        killed_and_restarted, tmp_path):
    out = killed_and_restarted[0]
    before = digest(out)
    result = subprocess.run([sys.executable, "-m", "ooc_moe", "train", "--resume", str(out)],
                            capture_output=True, text=True, timeout=300, env=ENV)
    assert result.returncode != 0
    assert "written by 2 rank(s)" in result.stderr
    assert f"torchrun --nproc_per_node 2 -m ooc_moe train --resume {out}" in result.stderr
    assert digest(out) == before
    # and a single process's checkpoint under two ranks
    single = tmp_path / "single"
    subprocess.run([sys.executable, "-m", "ooc_moe", "train", "--num_games", "1",
                    "--steps_per_game", str(BATCH), "--out", str(single), *TINY],
                   capture_output=True, text=True, timeout=300, env=ENV, check=True)
    before = digest(single)
    result = subprocess.run(torchrun("train", "--resume", str(single)), capture_output=True,
                            text=True, timeout=600, env=ENV)
    assert result.returncode != 0 and "written by 1 rank(s)" in result.stderr
    assert "without torchrun" in result.stderr
    assert digest(single) == before


@pytest.mark.parametrize("flags, message", [
    (["--num_experts", "7"], "does not divide over 2 ranks"),
    (["--hbm_capacity", "6", "--dram_capacity", "8"],
     "hbm_capacity=6 is larger than a rank's shard"),
    (["--num_envs", "3"], "num_envs=3 does not divide over 2 ranks"),
])
def test_shards_that_do_not_fit_are_errors_before_any_work(tmp_path, flags, message):
    out = tmp_path / "run"
    result = subprocess.run(torchrun("train", "--num_games", "1", "--steps_per_game",
                                     str(BATCH), "--out", str(out), *TINY, *flags),
                            capture_output=True, text=True, timeout=600, env=ENV)
    assert result.returncode != 0 and message in result.stderr
    assert not (out / "metrics.json").exists() and not (out / "checkpoint").exists()
