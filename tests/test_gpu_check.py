"""gpu-check: the report it writes, exercised on the CPU with tiny benchmark sizes."""

import json

import pytest

from ooc_moe import bench, gpu_check
from ooc_moe.gpu_check import GpuCheckConfig, prefetch_hidden


def test_prefetch_hidden_is_the_share_of_copy_time_saved():
    assert prefetch_hidden({"resident_s": 1.0, "demand_s": 3.0, "prefetch_s": 1.2}) == \
        pytest.approx(0.9)
    assert prefetch_hidden({"resident_s": 1.0, "demand_s": 1.0, "prefetch_s": 1.0}) is None


def test_without_a_gpu_it_refuses_unless_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        gpu_check.gpu_check(GpuCheckConfig(out=str(tmp_path)))


def test_the_report_and_summary_hold_every_check(tmp_path, monkeypatch):
    tiny_store = bench.StoreBenchConfig(expert_dim=16, hidden_dim=32, num_experts=8, batch=2,
                                        steps=4, tokens=16, repeats=1)
    tiny_layer = bench.LayerBenchConfig(expert_dim=16, hidden_dim=32, tokens=64, steps=2)
    monkeypatch.setattr(bench.StoreBenchConfig, "quick",
                        classmethod(lambda cls, **kw: tiny_store))
    monkeypatch.setattr(bench.LayerBenchConfig, "quick",
                        classmethod(lambda cls, **kw: tiny_layer))
    out = tmp_path / "check"
    report = gpu_check.gpu_check(GpuCheckConfig(out=str(out), quick=True, allow_cpu=True,
                                                timeout_s=900))
    saved = json.loads((out / "report.json").read_text())
    assert saved["cuda_tests"]["status"] == "passed"           # every one skipped here
    assert saved["cuda_tests"]["tests"] == saved["cuda_tests"]["skipped"] > 10
    assert saved["train"]["status"] == "passed" and saved["train"]["sps"] > 0
    assert {link["link"] for link in saved["bench_store"]["links"]} >= {"DRAM -> HBM"}
    assert report["seconds"] > 0
    summary = (out / "summary.txt").read_text()
    for needle in ("cuda tests: passed", "DRAM -> HBM", "prefetch hides", "train-atari: passed"):
        assert needle in summary
