import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import official_keys
from hiwin_model.checkpoint import (CheckpointError, ignored_reason, official_state_dict, read_official,
                                    to_official, to_ours)
from hiwin_model.config import ConfigError, HiwinConfig
from hiwin_model.model import HiwinForCausalLM

RELEASED_CONFIG = json.loads((Path(__file__).resolve().parents[1] / "data" / "released_config.json").read_text())


def test_rename_table_round_trips():
    for k in ("model.vision_tower.vision_tower.vision_model.pre_layrnorm.weight",
              "model.mm_projector.upsampler.upsampler.up1.range_temp", "model.mm_projector.query_1",
              "model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight", "lm_head.weight"):
        assert to_official(to_ours(k)) == k
    assert to_ours("model.mm_projector.upsampler.upsampler.fixup_proj.1.weight") == "jbu.fixup_proj.1.weight"
    assert to_ours("model.norm.weight") == "llm.model.norm.weight"


def test_real_dims_key_names_and_shapes_match_official():
    cfg = HiwinConfig.from_dict(RELEASED_CONFIG)
    with torch.device("meta"):
        model = HiwinForCausalLM(cfg)
    ours = {to_official(k): tuple(v.shape) for k, v in model.state_dict().items()
            if not k.startswith("llm.")}
    official = official_keys()
    used = {k: s for k, (s, g) in official.items() if ignored_reason(k, cfg.vision.layers_built) is None}
    assert ours == used
    skipped = set(official) - set(used)
    # what is skipped, by name: the second CLIP copy, ChannelNorm, query, kv_proj, 8x, CLIP block 24, post-LN
    assert {ignored_reason(k, 23) for k in skipped} == {
        "unused second CLIP copy inside the projector", "unused ChannelNorm", "unused single query set",
        "unused kv_proj", "unused 8x level", "CLIP block after the selected layer (never runs)",
        "CLIP post_layernorm (not used by layer -2 features)"}
    n_proj = sum(torch.Size(s).numel() for k, (s, g) in official.items() if g == "projector.resampler")
    assert round(n_proj / 1e6, 1) == 175.6  # docs/model.md §6
    assert cfg.projector.num_heads == 32 and cfg.vision.layers_built == 23


def test_released_config_points_to_authors_disk_and_is_overridable(tmp_path):
    assert HiwinConfig.from_dict(RELEASED_CONFIG).vision.hidden_size == 1024
    bad = dict(RELEASED_CONFIG, mm_vision_tower="/nonexistent/some-other-tower")
    with pytest.raises(ConfigError, match="mm_vision_tower"):
        HiwinConfig.from_dict(bad)
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"vision_config": {"hidden_size": 1024, "num_hidden_layers": 24,
                                                                    "image_size": 336, "patch_size": 14}}))
    assert HiwinConfig.from_dict(bad, mm_vision_tower=str(clip)).vision.num_hidden_layers == 24


@pytest.mark.parametrize("field,value,match", [
    ("mm_projector_type", "mlp2x_gelu", "unsupported mm_projector_type 'mlp2x_gelu'"),
    ("feature_mode", "uhd_v1", "unsupported feature_mode"),
    ("feature_scale_mask", 15, "unsupported feature_scale_mask 15"),
])
def test_unsupported_config(field, value, match):
    with pytest.raises(ConfigError, match=match):
        HiwinConfig.from_dict(dict(RELEASED_CONFIG, **{field: value}))


def test_round_trip(tiny_dir, tiny_model, tmp_path):
    index = json.loads((tiny_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert set(index["weight_map"]) == set(official_state_dict(tiny_model))
    out = tiny_model.save_pretrained(tmp_path / "again")
    again = HiwinForCausalLM.from_pretrained(out)
    a, b = tiny_model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rewrite(src, dst, edit):
    """Copy a checkpoint dir with its tensors edited (written as one model.safetensors)."""
    shutil.copytree(src, dst)
    tensors = {k: load() for k, load, _ in read_official(src)}
    edit(tensors)
    for f in dst.glob("model*.safetensors*"):
        f.unlink()
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_unused_official_keys_are_skipped(tiny_dir, tiny_model, tmp_path, caplog):
    def add_unused(t):
        t["model.mm_projector.query"] = torch.zeros(144, 128)
        t["model.mm_projector.kv_proj.weight"] = torch.zeros(128, 32)
        t["model.mm_projector.feature_8x_embedding"] = torch.zeros(1, 1, 128)
        t["model.mm_projector.upsampler.model.0.vision_tower.vision_model.pre_layrnorm.weight"] = torch.zeros(32)
        t["model.mm_projector.upsampler.model.1.norm.weight"] = torch.zeros(32)
        t["model.vision_tower.vision_tower.vision_model.encoder.layers.2.mlp.fc1.weight"] = torch.zeros(64, 32)
        t["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.zeros(32)

    d = _rewrite(tiny_dir, tmp_path / "with_unused", add_unused)
    m = HiwinForCausalLM.from_pretrained(d)
    assert torch.equal(m.projector.proj, tiny_model.projector.proj)
    assert not hasattr(m.projector, "query") and not hasattr(m.projector, "kv_proj")


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.mm_projector.query_3"), r"missing keys \(1\): \['model.mm_projector.query_3'\]"),
    (lambda t: t.update({"model.mm_projector.bogus": torch.zeros(1)}), r"unexpected keys \(1\): \['model.mm_projector.bogus'\]"),
    (lambda t: t.update({"model.mm_projector.proj": torch.zeros(128, 64)}),
     r"mis-shaped keys \(1\): \['model.mm_projector.proj: checkpoint \[128, 64\] vs model \[128, 128\]'\]"),
])
def test_bad_checkpoints_name_the_keys(tiny_dir, tmp_path, edit, match):
    d = _rewrite(tiny_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=match):
        HiwinForCausalLM.from_pretrained(d)


def test_missing_shard_and_missing_dir(tiny_dir, tmp_path):
    d = tmp_path / "noshard"
    shutil.copytree(tiny_dir, d)
    next(d.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard files listed in model.safetensors.index.json are missing"):
        HiwinForCausalLM.from_pretrained(d)
    with pytest.raises(FileNotFoundError):
        HiwinForCausalLM.from_pretrained(tmp_path / "nothing")


def test_stage1_projector_bin_and_stage0_ckpt(tiny_model, tmp_path):
    from hiwin_model.tiny import build_tiny_model

    fresh = build_tiny_model(seed=7)
    proj = {to_official(k): v for k, v in tiny_model.state_dict().items() if k.startswith(("projector.", "jbu."))}
    torch.save(proj, tmp_path / "mm_projector.bin")
    fresh.load_projector_weights(tmp_path / "mm_projector.bin")
    assert torch.equal(fresh.projector.query_2, tiny_model.projector.query_2)
    assert torch.equal(fresh.jbu.up1.range_temp, tiny_model.jbu.up1.range_temp)

    fresh = build_tiny_model(seed=7)
    sd = {"upsampler." + k: v for k, v in tiny_model.jbu.state_dict().items()}
    sd.update({"model.0.weight": torch.zeros(2), "downsampler.2x.w": torch.zeros(3), "scale_net.0.weight": torch.zeros(1)})
    torch.save({"state_dict": sd, "epoch": 0, "global_step": 2000}, tmp_path / "clip-large-jbu.ckpt")
    fresh.load_jbu_checkpoint(tmp_path / "clip-large-jbu.ckpt")
    assert torch.equal(fresh.jbu.fixup_proj[1].weight, tiny_model.jbu.fixup_proj[1].weight)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickles_are_never_trusted(tiny_model, tmp_path):
    torch.save({"model.mm_projector.proj": _Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        tiny_model.load_projector_weights(tmp_path / "evil.bin")


def test_save_is_atomic(tiny_model, tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        tiny_model.save_pretrained(target)
    assert (target / "keep.txt").read_text() == "precious"

    import hiwin_model.model as model_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model_mod, "save_sharded", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny_model.save_pretrained(target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temp directory left behind


def test_bf16_load(tiny_dir):
    m = HiwinForCausalLM.from_pretrained(tiny_dir, dtype="bf16")
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
