"""Checkpoints on a disk that runs out of space: the previous checkpoint stays loadable."""

import errno
import shutil
import subprocess

import pytest
import torch

from ooc_moe import TieredExpertStore
from ooc_moe.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs mounted for the test (needs root and permission to mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_a_checkpoint_too_large_for_the_disk_keeps_the_previous_one(small_disk):
    run = small_disk / "run"
    save_checkpoint(run, {"step": 1, "w": torch.zeros(1000)})
    with pytest.raises(CheckpointError, match="bytes") as info:
        save_checkpoint(run, {"step": 2, "w": torch.zeros(400_000)})   # 1.6 MB
    assert "previous checkpoint" in str(info.value) and "--resume" in str(info.value)
    assert not (run / "checkpoint.tmp").exists()
    assert load_checkpoint(run)["step"] == 1


def test_a_write_failing_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    store = TieredExpertStore(4, 8, 16, 2, 4, "cpu", path=tmp_path / "store")
    save_checkpoint(tmp_path / "run", {"step": 1}, store)
    store.get_experts([0])[0].b1.fill_(3.0)
    store.mark_dirty([0])

    def no_space(src, dst, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", no_space)
    with pytest.raises(CheckpointError, match="No space left"):
        save_checkpoint(tmp_path / "run", {"step": 2}, store)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "checkpoint.tmp").exists()
    state = load_checkpoint(tmp_path / "run", store_dir=tmp_path / "restored")
    assert state["step"] == 1
    with TieredExpertStore.open(tmp_path / "restored", "cpu") as restored:
        assert torch.all(restored.read_expert(0)["b1"] == 0.0)   # the step-1 experts
    save_checkpoint(tmp_path / "run", {"step": 2}, store)        # space is back
    assert load_checkpoint(tmp_path / "run")["step"] == 2
    store.shutdown()
