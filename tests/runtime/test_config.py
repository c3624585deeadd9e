"""HiwinConfig <-> config.json: ``from_dict(cfg.to_dict()) == cfg`` field by field, for the default, the
tiny and the released configs and for one where every field differs from its default."""

import json
from dataclasses import fields, is_dataclass, replace
from pathlib import Path

import pytest

from hiwin_model.config import (ConfigError, HiwinConfig, JBUConfig, ProjectorConfig, SliceConfig,
                                VisionConfig)
from hiwin_model.tiny import TINY_CONFIG, tiny_config

RELEASED_CONFIG = json.loads((Path(__file__).resolve().parents[1] / "data" / "released_config.json").read_text())

# A config where every field of every part differs from its default, and the slicing differs from the
# vision tower's geometry (the widths agree where config.json has a single key for them).
ALL_CHANGED = HiwinConfig(
    slicing=SliceConfig(scale_resolution=448, patch_size=28, max_slices=4, mean=(0.5, 0.25, 0.125),
                        std=(0.2, 0.3, 0.4)),
    vision=VisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=6,
                        image_size=224, patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6, select_layer=-3),
    jbu=JBUConfig(dim=48, key_dim=16, radius=2, guidance_dim=4, fixup_scale=0.25),
    projector=ProjectorConfig(dim=192, vision_dim=48, num_heads=3, grid=8, eps=1e-5),
    llm=dict(hidden_size=192, intermediate_size=384, num_hidden_layers=1, num_attention_heads=3, vocab_size=300),
)
# Every optional key to_dict can write (ALL_CHANGED needs all of them).
OPTIONAL_KEYS = sorted([
    "hiwin_vision_config", "hiwin_scale_resolution", "hiwin_slice_patch_size", "hiwin_max_slices",
    "hiwin_image_mean", "hiwin_image_std", "hiwin_jbu_key_dim", "hiwin_jbu_radius", "hiwin_jbu_guidance_dim",
    "hiwin_jbu_fixup_scale", "hiwin_projector_num_heads", "hiwin_projector_queries", "hiwin_projector_eps"])


def _differences(a: HiwinConfig, b: HiwinConfig) -> dict[str, tuple]:
    """{'part.field': (a's, b's)} over every compared field, nested dataclasses field by field."""
    out = {}
    for f in fields(HiwinConfig):
        if not f.compare:  # raw: the dict as read, not part of the config's identity
            continue
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if is_dataclass(va):
            out.update({f"{f.name}.{g.name}": (getattr(va, g.name), getattr(vb, g.name)) for g in fields(va)
                        if getattr(va, g.name) != getattr(vb, g.name)})
        elif va != vb:
            out[f.name] = (va, vb)
    return out


def _round_trip(cfg: HiwinConfig) -> HiwinConfig:
    return HiwinConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # through JSON text, as on disk


@pytest.mark.parametrize("name,cfg", [("default", HiwinConfig()), ("tiny", tiny_config()),
                                      ("released", HiwinConfig.from_dict(RELEASED_CONFIG)),
                                      ("all_changed", ALL_CHANGED)])
def test_round_trip_every_field(name, cfg):
    again = _round_trip(cfg)
    assert _differences(cfg, again) == {}
    assert again == cfg
    assert _round_trip(again).to_dict() == again.to_dict()  # a fixed point from the first write on


def test_all_changed_really_changes_every_field():
    default = HiwinConfig()
    for part in ("slicing", "vision", "jbu", "projector"):
        for f in fields(getattr(default, part)):
            assert getattr(getattr(ALL_CHANGED, part), f.name) != getattr(getattr(default, part), f.name), \
                f"{part}.{f.name} is left at its default: the round trip would not test it"
    assert ALL_CHANGED.slicing.scale_resolution != ALL_CHANGED.vision.image_size
    assert ALL_CHANGED.slicing.patch_size != ALL_CHANGED.vision.patch_size
    written = ALL_CHANGED.to_dict()
    assert sorted(k for k in written if k.startswith("hiwin_")) == OPTIONAL_KEYS
    assert written["hiwin_image_mean"] == [0.5, 0.25, 0.125] and written["hiwin_projector_queries"] == 64


@pytest.mark.parametrize("key", OPTIONAL_KEYS)
def test_negative_control_a_dropped_key_breaks_the_round_trip(key):
    """What the round-trip test would catch: a to_dict that forgot any one key."""
    d = ALL_CHANGED.to_dict()
    del d[key]
    try:
        again = HiwinConfig.from_dict(d)
    except ConfigError:  # e.g. without hiwin_vision_config, mm_hidden_size no longer matches CLIP-L
        return
    assert again != ALL_CHANGED and _differences(ALL_CHANGED, again)


def test_released_config_loads_unchanged_and_gains_no_key():
    cfg = HiwinConfig.from_dict(RELEASED_CONFIG)
    assert cfg.slicing == SliceConfig() and cfg.jbu == JBUConfig() and cfg.projector == ProjectorConfig()
    assert cfg.vision == VisionConfig() and cfg.llm["num_hidden_layers"] == 32
    assert cfg.to_dict() == RELEASED_CONFIG  # same keys, same values: nothing hiwin_* for defaults
    assert _round_trip(cfg).to_dict() == RELEASED_CONFIG


def test_tiny_config_writes_back_what_it_was_built_from():
    assert tiny_config().to_dict() == TINY_CONFIG


def test_default_config_is_the_released_architecture():
    cfg = HiwinConfig()
    assert cfg.llm == {"hidden_size": 4096}  # the LLM width is the projector's output width
    released = HiwinConfig.from_dict(RELEASED_CONFIG)
    assert (cfg.slicing, cfg.vision, cfg.jbu, cfg.projector) == (released.slicing, released.vision, released.jbu,
                                                                 released.projector)


def test_max_slices_override_round_trips_and_defaults_are_not_written():
    cfg = HiwinConfig.from_dict(RELEASED_CONFIG, max_slices=5)
    assert cfg.slicing.max_slices == 5 and cfg.to_dict()["hiwin_max_slices"] == 5
    assert _round_trip(cfg) == cfg
    # the override wins over the key, and going back to the default drops the key (no stale copy from raw)
    back = HiwinConfig.from_dict(cfg.to_dict(), max_slices=9)
    assert back.slicing.max_slices == 9 and "hiwin_max_slices" not in back.to_dict()
    edited = replace(cfg, slicing=replace(cfg.slicing, max_slices=9))
    assert edited.to_dict() == RELEASED_CONFIG


def test_stale_optional_keys_in_raw_are_rewritten_from_the_fields():
    cfg = HiwinConfig.from_dict(dict(RELEASED_CONFIG, hiwin_projector_queries=64, hiwin_jbu_radius=2))
    assert cfg.projector.grid == 8 and cfg.jbu.radius == 2
    edited = replace(cfg, projector=replace(cfg.projector, grid=12), jbu=replace(cfg.jbu, radius=3))
    assert edited.to_dict() == RELEASED_CONFIG and _round_trip(edited) == edited


def test_vision_tower_found_through_an_override_is_written_into_the_config(tmp_path):
    clip = tmp_path / "clip"
    clip.mkdir()
    (clip / "config.json").write_text(json.dumps({"vision_config": {"hidden_size": 1024, "num_hidden_layers": 24,
                                                                    "image_size": 336, "patch_size": 14}}))
    bad = dict(RELEASED_CONFIG, mm_vision_tower="/nonexistent/some-other-tower")
    cfg = HiwinConfig.from_dict(bad, mm_vision_tower=str(clip))
    written = cfg.to_dict()
    assert "hiwin_vision_config" in written  # the pointer alone would no longer resolve
    (clip / "config.json").unlink()
    assert HiwinConfig.from_dict(written) == cfg


def test_llm_keys_come_from_llm():
    cfg = HiwinConfig.from_dict(RELEASED_CONFIG)
    llm = {k: v for k, v in cfg.llm.items() if k != "rope_scaling"}
    written = replace(cfg, llm=llm).to_dict()
    assert "rope_scaling" not in written and "image_aspect_ratio" in written  # raw's mm keys are kept
    assert HiwinConfig.from_dict(written).llm == llm


def test_configs_that_no_config_json_describes_are_refused():
    with pytest.raises(ConfigError, match="mm_hidden_size"):
        replace(ALL_CHANGED, jbu=replace(ALL_CHANGED.jbu, dim=64)).to_dict()
    with pytest.raises(ConfigError, match="mm_hidden_size"):
        replace(ALL_CHANGED, projector=replace(ALL_CHANGED.projector, vision_dim=64)).to_dict()
    with pytest.raises(ConfigError, match="hidden_size"):
        replace(ALL_CHANGED, llm=dict(ALL_CHANGED.llm, hidden_size=256)).to_dict()


@pytest.mark.parametrize("key,value,match", [
    ("hiwin_image_mean", [0.5, 0.5], "3 numbers"),
    ("hiwin_image_std", [0.5, 0.0, 0.5], "positive"),
    ("hiwin_max_slices", 0, "max_slices"),
    ("hiwin_jbu_key_dim", 0, "JBU"),
    ("hiwin_projector_eps", 0, "positive"),
])
def test_invalid_optional_values(key, value, match):
    with pytest.raises(ConfigError, match=match):
        HiwinConfig.from_dict(dict(RELEASED_CONFIG, **{key: value}))
