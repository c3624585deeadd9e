"""engines/plugins/gpu_check.py stays runnable without a GPU: its --dry-run mode exercises the argument
handling, the reference computations and the comparisons at tiny sizes on the CPU (the plugins' CPU
launchers standing in for the CUDA library)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hiwin_export import plugin_lib

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "engines" / "plugins" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("hiwin_gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_arguments(gpu_check):
    a = gpu_check.parse_args([])
    assert (a.sizes, a.dry_run, a.repeats, a.out) == ("real", False, 20, None)
    assert gpu_check.SIZES["real"]["jbu"] == dict(B=7, C=1024, K=32, H=96, W=96, radius=3)
    assert gpu_check.SIZES["real"]["roi"]["C"] == 1024 and gpu_check.SIZES["real"]["roi"]["out"] == (3, 3)
    a = gpu_check.parse_args(["--dry-run", "--out", "x.json", "--repeats", "3"])
    assert (a.sizes, a.dry_run, a.repeats, a.out) == ("tiny", True, 3, Path("x.json"))
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--repeats", "0"])


def test_reference_is_forward_minus_resize(gpu_check):
    cfg = dict(B=2, C=3, K=4, H=7, W=9, radius=3)
    layer, hr, g = gpu_check.make_jbu(cfg, "cpu", 0)
    with torch.no_grad():
        full = layer(hr, g)  # hr at the output size: the bicubic resize is an exact identity
        assert torch.equal(gpu_check.jbu_reference(layer, hr, g), full)
        assert torch.equal(gpu_check.jbu_reference(layer, hr, g, q=layer.range_proj(g)), full)
    p = gpu_check.jbu_params(layer)
    assert p["w1"].shape == (49, 52) and p["w2"].shape == (49, 49) and p["range_temp"].shape == (1,)


def test_compare_rules(gpu_check):
    ref = torch.tensor([1.0, -2.0, 4.0])
    assert gpu_check.compare(ref + 1e-6, ref, fp16=False)["ok"]
    assert not gpu_check.compare(ref + 1e-3, ref, fp16=False)["ok"]
    assert gpu_check.compare(ref + 1e-3, ref, fp16=True)["ok"]
    assert not gpu_check.compare(-ref, ref, fp16=True)["ok"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_refuses_without_gpu(gpu_check):
    with pytest.raises(SystemExit, match="no CUDA device"):
        gpu_check.run(gpu_check.parse_args([]))


def test_dry_run(tmp_path):
    try:
        plugin_lib.load_cpu_library()
    except plugin_lib.PluginBuildError as e:
        pytest.skip(f"plugin CPU library unavailable: {e}")
    out = tmp_path / "dry.json"
    res = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out), "--repeats", "2",
                          "--warmup", "0"], cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "CUDA parts skipped" in res.stdout and "| jbu_fp32 |" in res.stdout
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and r["ok"] is True and r["arch"] is None
    assert set(r["checks"]) == {"roi_align_fp32", "roi_align_fp16", "edge_roi_align_fp32", "edge_jbu_fp32",
                                "edge_jbu_fp16", "jbu_fp32", "jbu_fp16"}
    assert all(c["ok"] for c in r["checks"].values())
    assert r["checks"]["edge_jbu_fp32"]["cases"] == 6
    assert set(r["timings_ms"]) >= {"roi_align_reference_fp32", "roi_align_plugin_fp32", "jbu_reference_fp32",
                                    "jbu_plugin_fp32"}
    assert all(g["met"] is None for g in r["goals"].values())  # no speed claims from a CPU run
