"""The device-memory measurement of stage 2 (``python -m hiwin_model.train.memory measure-cuda``) on
the tiny width: the byte counts it reports agree with the parameter arithmetic of the plan.

On the CPU the worker runs in this process (the CLI runs each mode in a subprocess; the code is the
same); the CUDA variant runs where a GPU exists and also checks the allocator's peaks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hiwin_model.tiny import TINY_CONFIG
from hiwin_model.train import memory_device

REPO = Path(__file__).resolve().parents[2]
R = 4
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                    reason="needs a CUDA GPU"))]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    return memory_device.write_page(tmp_path_factory.mktemp("page"))


def _counts():
    """Trainable parts besides the adapters, counted on a meta-device build of the tiny model."""
    from hiwin_model.model import HiwinForCausalLM
    from hiwin_model.train.memory import _config

    config, _ = _config("tiny", 2)
    with torch.device("meta"):
        m = HiwinForCausalLM(config)
    proj = sum(p.numel() for p in m.projector.parameters()) - m.projector.pos_embed.numel()
    fixup = sum(p.numel() for p in m.jbu.fixup_proj.parameters())
    scalars = sum(1 for p in m.parameters() if p.dim() == 0)
    return sum(p.numel() for p in m.parameters()), proj, fixup, scalars


def _run(mode, device, page, tmp_path) -> dict:
    out = tmp_path / f"{mode}.json"
    memory_device.worker(mode, "tiny", 2, R, device, str(page), 1, str(out))
    return json.loads(out.read_text())


@pytest.mark.parametrize("device", DEVICES)
def test_measured_bytes_match_the_plan_arithmetic(device, page, tmp_path):
    n, proj, fixup, scalars = _counts()
    h, inter, layers = TINY_CONFIG["hidden_size"], TINY_CONFIG["intermediate_size"], 2
    assert TINY_CONFIG["num_key_value_heads"] == TINY_CONFIG["num_attention_heads"]
    adapters = layers * R * (4 * (h + h) + 3 * (h + inter))  # q k v o: 4096->4096-like; gate up down: h<->inter

    lora = _run("lora", device, page, tmp_path)
    t = lora["trainable_params"]
    assert lora["lora_adapter_params"] == adapters
    assert t == adapters + proj + fixup and lora["params"] == n + adapters
    assert lora["trainable_param_bytes"] == 4 * t  # fp32 trainables
    assert lora["frozen_param_bytes"] == 2 * (lora["params"] - t)  # bf16 base
    assert lora["grad_bytes"] == 4 * t and lora["optim_bytes"] == 8 * t  # fp32 grads, AdamW's two moments
    assert lora["ratio_state"] == pytest.approx(1.0, abs=1e-12)

    full = _run("full-bf16", device, page, tmp_path)
    t, f = full["trainable_params"], full["frozen_params"]
    assert full["params"] == n and t + f == n and f > scalars
    assert full["trainable_param_bytes"] == 4 * t  # fp32 master weights (1 rank holds all of them)
    assert full["frozen_param_bytes"] == 4 * (f - scalars) + 2 * scalars  # the 0-d JBU scalars in bf16
    assert full["grad_bytes"] == 4 * t and full["optim_bytes"] == 8 * t
    assert full["ratio_state"] == pytest.approx(1.0, rel=1e-4)
    u = full["units"]  # every parameter in exactly one FSDP2 unit (the 0-d JBU scalars stay outside)
    assert u["layers"] == layers and u["vision_blocks"] == 2
    assert (u["root"] + u["head"] + u["vision_blocks"] * u["vision_block"] + u["projector"] + u["embed"]
            + layers * u["layer"]) == n - scalars
    assert u["root"] < u["projector"] / 4  # CLIP blocks, projector, embeddings are no longer in the root

    for r in (lora, full):
        assert r["crops"] == 7  # 1008x672: 3x2 slices + the overview
        assert r["visual_tokens"] == 1033  # 7 x 144 queries + the layout's newline / comma separators
        assert r["seq_tokens"] > r["visual_tokens"] + 50  # the conversation's text
        assert all(map(math.isfinite, r["loss"])) and len(r["step_s"]) == 1
        assert r["peak_allocated_bytes"] >= r["state_bytes"] > 0
        p = r["predicted"]
        assert p["peak_bytes"] == p["state_bytes"] + p["gathered_bytes"] + p["llm_activation_bytes"]
        if device == "cuda":
            assert r["memory_source"] == "cuda-allocator"
            assert r["after_init"]["allocated"] >= r["trainable_param_bytes"] + r["frozen_param_bytes"]
            assert r["peak_reserved_bytes"] >= r["peak_allocated_bytes"]
    assert full["predicted"]["gathered_bytes"] > 0 == lora["predicted"]["gathered_bytes"]


def test_cli_refuses_unknown_modes_and_missing_cuda(tmp_path):
    from hiwin_model.train.memory import main

    with pytest.raises(SystemExit):
        main(["measure-cuda", "--modes", "lora,qlora", "--device", "cpu", "--width", "tiny"])
    if not torch.cuda.is_available():
        r = subprocess.run([sys.executable, "-m", "hiwin_model.train.memory", "measure-cuda", "--llm-layers", "1"],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode != 0 and "CUDA is not available" in r.stderr
