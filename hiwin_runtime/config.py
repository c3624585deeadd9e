"""Typed configuration of LLaVA-UHD v2, read from and written to the HF ``config.json``.

One frozen dataclass per stage (slicing, vision tower, JBU, projector) plus the Llama config of
the language model. :class:`HiwinConfig` is the single source of truth: it is built from the
released ``config.json`` (official keys, see docs/model.md §6) and written back to
the same layout, with a few optional ``hiwin_*`` keys that only our tiny test models need.

Round trip: ``HiwinConfig.from_dict(cfg.to_dict()) == cfg`` for every field of every config that
:meth:`HiwinConfig.to_dict` accepts. Whatever the official keys cannot express is written as an
optional ``hiwin_*`` key, and only when its value differs from what :meth:`HiwinConfig.from_dict`
assumes in its absence, so a released config gains no key:

=============================  ========================================  ===============================
key                            field                                     assumed when absent
=============================  ========================================  ===============================
``hiwin_vision_config``        ``vision`` (all but ``select_layer``)     CLIP ViT-L/14-336 (named by
                                                                         ``mm_vision_tower``, or its
                                                                         local ``config.json``)
``hiwin_scale_resolution``     ``slicing.scale_resolution``              ``vision.image_size``
``hiwin_slice_patch_size``     ``slicing.patch_size``                    ``vision.patch_size``
``hiwin_max_slices``           ``slicing.max_slices``                    9
``hiwin_image_mean``           ``slicing.mean``                          CLIP's mean
``hiwin_image_std``            ``slicing.std``                           CLIP's std
``hiwin_jbu_key_dim``          ``jbu.key_dim``                           32
``hiwin_jbu_radius``           ``jbu.radius``                            3
``hiwin_jbu_guidance_dim``     ``jbu.guidance_dim``                      3
``hiwin_jbu_fixup_scale``      ``jbu.fixup_scale``                       0.1
``hiwin_projector_num_heads``  ``projector.num_heads``                   ``hidden_size // 128``
``hiwin_projector_queries``    ``projector.grid`` squared                144
``hiwin_projector_eps``        ``projector.eps``                         1e-6
=============================  ========================================  ===============================

``jbu.dim`` and ``projector.vision_dim`` are ``mm_hidden_size`` (the vision width) and
``projector.dim`` is ``hidden_size`` (the LLM width): a config where they disagree is refused by
``to_dict`` (:class:`ConfigError`) rather than silently written as a different one.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

SUPPORTED_PROJECTOR = "adapt_spatial_resampler"
SUPPORTED_FEATURE_MODE = "featup_muti_res"
SUPPORTED_SCALE_MASK = 7  # levels {1x, 2x, 4x}

# openai/clip-vit-large-patch14-336, the tower every released LLaVA-UHD v2 checkpoint uses.
CLIP_L14_336 = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)


class ConfigError(ValueError):
    """A config.json that this implementation cannot build a model from."""


@dataclass(frozen=True)
class SliceConfig:
    """Image slicing (docs/model.md §1)."""

    scale_resolution: int = 336
    patch_size: int = 14
    max_slices: int = 9
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:  # lists (from JSON or a caller) become tuples, so equality holds
        object.__setattr__(self, "mean", tuple(float(x) for x in self.mean))
        object.__setattr__(self, "std", tuple(float(x) for x in self.std))


@dataclass(frozen=True)
class VisionConfig:
    """CLIP vision tower; ``num_hidden_layers`` is the checkpoint's depth, not what we build."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    select_layer: int = -2

    @property
    def layers_built(self) -> int:
        """Blocks needed for ``hidden_states[select_layer]`` (23 of 24 for layer -2)."""
        n = self.num_hidden_layers + 1 + self.select_layer if self.select_layer < 0 else self.select_layer
        if not 1 <= n <= self.num_hidden_layers:
            raise ConfigError(f"mm_vision_select_layer={self.select_layer} is out of range for "
                              f"{self.num_hidden_layers} layers")
        return n

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class JBUConfig:
    """JBU up-sampler stack (docs/model.md §3)."""

    dim: int = 1024
    key_dim: int = 32
    radius: int = 3
    guidance_dim: int = 3
    fixup_scale: float = 0.1


@dataclass(frozen=True)
class ProjectorConfig:
    """Hiwin projector (docs/model.md §4)."""

    dim: int = 4096
    vision_dim: int = 1024
    num_heads: int = 32
    grid: int = 12
    eps: float = 1e-6

    @property
    def num_queries(self) -> int:
        return self.grid * self.grid


@dataclass(frozen=True)
class HiwinConfig:
    slicing: SliceConfig = field(default_factory=SliceConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    jbu: JBUConfig = field(default_factory=JBUConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: dict[str, Any] = field(default_factory=dict)  # LlamaConfig kwargs
    raw: dict[str, Any] = field(default_factory=dict, compare=False)  # the config.json as read

    def __post_init__(self) -> None:
        # The LLM's width is the projector's output width: an ``llm`` without ``hidden_size`` (as in
        # ``HiwinConfig()``) means that one, which is also what survives a to_dict/from_dict round trip.
        if "hidden_size" not in self.llm:
            object.__setattr__(self, "llm", {**self.llm, "hidden_size": self.projector.dim})

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_dict(cls, d: dict[str, Any], *, mm_vision_tower: str | None = None,
                  max_slices: int | None = None) -> "HiwinConfig":
        ptype = d.get("mm_projector_type")
        if ptype != SUPPORTED_PROJECTOR:
            raise ConfigError(f"unsupported mm_projector_type {ptype!r}: this implementation "
                              f"reproduces LLaVA-UHD v2, whose projector is {SUPPORTED_PROJECTOR!r}")
        mode = d.get("feature_mode", SUPPORTED_FEATURE_MODE)
        if mode != SUPPORTED_FEATURE_MODE:
            raise ConfigError(f"unsupported feature_mode {mode!r} (expected {SUPPORTED_FEATURE_MODE!r})")
        mask = int(d.get("feature_scale_mask", SUPPORTED_SCALE_MASK))
        if mask != SUPPORTED_SCALE_MASK:
            raise ConfigError(f"unsupported feature_scale_mask {mask}: the released model uses 7 "
                              "(levels 1x, 2x, 4x)")
        for key in ("hidden_size", "mm_hidden_size"):
            if key not in d:
                raise ConfigError(f"config.json lacks {key!r}")
        vision = _vision_config(d, mm_vision_tower or d.get("mm_vision_tower"))
        hidden = int(d["hidden_size"])
        heads = int(d.get("hiwin_projector_num_heads", hidden // 128))  # the builder's rule
        if heads < 1 or hidden % heads:
            raise ConfigError(f"projector width {hidden} cannot be split into {heads} heads")
        seq = int(d.get("hiwin_projector_queries", 144))
        grid = math.isqrt(seq)
        if grid * grid != seq:
            raise ConfigError(f"projector query count {seq} is not a square")
        mm_hidden = int(d["mm_hidden_size"])
        if mm_hidden != vision.hidden_size:
            raise ConfigError(f"mm_hidden_size={mm_hidden} differs from the vision tower width "
                              f"{vision.hidden_size}")
        slicing = SliceConfig(
            scale_resolution=int(d.get("hiwin_scale_resolution", vision.image_size)),
            patch_size=int(d.get("hiwin_slice_patch_size", vision.patch_size)),
            max_slices=int(max_slices if max_slices is not None else d.get("hiwin_max_slices", _SLICE.max_slices)),
            mean=_triple(d, "hiwin_image_mean", _SLICE.mean),
            std=_triple(d, "hiwin_image_std", _SLICE.std),
        )
        if slicing.max_slices < 1:
            raise ConfigError(f"max_slices must be >= 1, got {slicing.max_slices}")
        if slicing.scale_resolution < 1 or slicing.patch_size < 1:
            raise ConfigError(f"slicing resolution {slicing.scale_resolution} and patch size {slicing.patch_size} "
                              "must be >= 1")
        if min(slicing.std) <= 0:
            raise ConfigError(f"hiwin_image_std must be positive, got {list(slicing.std)}")
        jbu = JBUConfig(
            dim=mm_hidden,
            key_dim=int(d.get("hiwin_jbu_key_dim", _JBU.key_dim)),
            radius=int(d.get("hiwin_jbu_radius", _JBU.radius)),
            guidance_dim=int(d.get("hiwin_jbu_guidance_dim", _JBU.guidance_dim)),
            fixup_scale=float(d.get("hiwin_jbu_fixup_scale", _JBU.fixup_scale)),
        )
        if jbu.key_dim < 1 or jbu.radius < 0 or jbu.guidance_dim < 1:
            raise ConfigError(f"invalid JBU settings: key_dim={jbu.key_dim}, radius={jbu.radius}, "
                              f"guidance_dim={jbu.guidance_dim}")
        eps = float(d.get("hiwin_projector_eps", _PROJ.eps))
        if not eps > 0:
            raise ConfigError(f"hiwin_projector_eps must be positive, got {eps}")
        llm = {k: v for k, v in d.items() if not _is_mm_key(k)}
        return cls(
            slicing=slicing,
            vision=vision,
            jbu=jbu,
            projector=ProjectorConfig(dim=hidden, vision_dim=mm_hidden, num_heads=heads, grid=grid, eps=eps),
            llm=llm,
            raw=dict(d),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides: Any) -> "HiwinConfig":
        cfg_file = Path(path) / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{path}: no config.json (expected an HF model directory)")
        try:
            d = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file}: invalid JSON ({e})") from e
        return cls.from_dict(d, **overrides)

    # ------------------------------------------------------------------ writing
    def to_dict(self) -> dict[str, Any]:
        """The config.json of this config, such that ``from_dict(cfg.to_dict()) == cfg`` (every field).

        Keys of ``raw`` that ``from_dict`` does not interpret (``image_aspect_ratio``, ...) are kept;
        the LLM's keys are ``llm``'s; the optional ``hiwin_*`` keys are derived from the fields (a
        stale one in ``raw`` is dropped), each written only when its value differs from the one
        ``from_dict`` assumes without it. Raises :class:`ConfigError` for a config that no
        config.json describes (see the module docstring).
        """
        self._check_writable()
        d = {k: v for k, v in self.raw.items() if (_is_mm_key(k) or k in self.llm) and k not in _OPTIONAL_KEYS}
        d.update(self.llm)
        d.update(
            model_type="llava_llama",
            architectures=d.get("architectures", ["LlavaLlamaForCausalLM"]),
            mm_projector_type=SUPPORTED_PROJECTOR,
            feature_mode=SUPPORTED_FEATURE_MODE,
            feature_scale_mask=SUPPORTED_SCALE_MASK,
            mm_hidden_size=self.vision.hidden_size,
            mm_vision_select_layer=self.vision.select_layer,
            hidden_size=self.projector.dim,
        )
        d.setdefault("mm_vision_tower", "openai/clip-vit-large-patch14-336")
        if self.vision != _builtin_vision(self.vision.select_layer) or not _names_builtin(d["mm_vision_tower"]):
            # Also for CLIP-L/336 found through a local directory or an mm_vision_tower= override:
            # the written config must not depend on that directory still being there.
            d["hiwin_vision_config"] = {k: v for k, v in asdict(self.vision).items() if k != "select_layer"}
        s, j, p = self.slicing, self.jbu, self.projector
        optional = {  # key: (value, what from_dict assumes when the key is absent)
            "hiwin_scale_resolution": (s.scale_resolution, self.vision.image_size),
            "hiwin_slice_patch_size": (s.patch_size, self.vision.patch_size),
            "hiwin_max_slices": (s.max_slices, _SLICE.max_slices),
            "hiwin_image_mean": (list(s.mean), list(_SLICE.mean)),
            "hiwin_image_std": (list(s.std), list(_SLICE.std)),
            "hiwin_jbu_key_dim": (j.key_dim, _JBU.key_dim),
            "hiwin_jbu_radius": (j.radius, _JBU.radius),
            "hiwin_jbu_guidance_dim": (j.guidance_dim, _JBU.guidance_dim),
            "hiwin_jbu_fixup_scale": (j.fixup_scale, _JBU.fixup_scale),
            "hiwin_projector_num_heads": (p.num_heads, p.dim // 128),
            "hiwin_projector_queries": (p.num_queries, _PROJ.num_queries),
            "hiwin_projector_eps": (p.eps, _PROJ.eps),
        }
        d.update({k: value for k, (value, assumed) in optional.items() if value != assumed})
        return d

    def _check_writable(self) -> None:
        """Fields that config.json stores once must agree (``from_dict`` never builds them otherwise)."""
        width = self.vision.hidden_size
        if self.jbu.dim != width or self.projector.vision_dim != width:
            raise ConfigError(f"cannot write a config whose JBU width ({self.jbu.dim}) or projector input width "
                              f"({self.projector.vision_dim}) differs from the vision width {width}: config.json "
                              "has one mm_hidden_size for the three")
        if self.llm.get("hidden_size", self.projector.dim) != self.projector.dim:
            raise ConfigError(f"cannot write a config whose LLM width ({self.llm['hidden_size']}) differs from the "
                              f"projector width {self.projector.dim}: config.json has one hidden_size for both")


_MM_PREFIXES = ("mm_", "hiwin_", "feature_", "image_", "tune_", "freeze_", "unfreeze_")


def _is_mm_key(k: str) -> bool:
    return k.startswith(_MM_PREFIXES) or k in ("model_type", "architectures", "tokenizer_padding_side",
                                                 "tokenizer_model_max_length")


_SLICE, _JBU, _PROJ = SliceConfig(), JBUConfig(), ProjectorConfig()
# The optional keys to_dict derives from the fields; a stale copy in ``raw`` is never written back.
_OPTIONAL_KEYS = frozenset({
    "hiwin_vision_config", "hiwin_scale_resolution", "hiwin_slice_patch_size", "hiwin_max_slices",
    "hiwin_image_mean", "hiwin_image_std", "hiwin_jbu_key_dim", "hiwin_jbu_radius", "hiwin_jbu_guidance_dim",
    "hiwin_jbu_fixup_scale", "hiwin_projector_num_heads", "hiwin_projector_queries", "hiwin_projector_eps"})


def _triple(d: dict[str, Any], key: str, default: tuple[float, float, float]) -> tuple[float, float, float]:
    v = d.get(key, default)
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        raise ConfigError(f"{key} must be a list of 3 numbers (one per RGB channel), got {v!r}")
    return tuple(float(x) for x in v)


def _names_builtin(tower: str | None) -> bool:
    """Whether ``mm_vision_tower`` alone identifies the built-in CLIP ViT-L/14-336."""
    return bool(tower) and str(tower).rstrip("/").endswith("clip-vit-large-patch14-336")


def _builtin_vision(select_layer: int) -> VisionConfig:
    return VisionConfig(**CLIP_L14_336, select_layer=select_layer)


def _vision_config(d: dict[str, Any], tower: str | None) -> VisionConfig:
    select = int(d.get("mm_vision_select_layer", -2))
    names = {f.name for f in fields(VisionConfig)}
    if "hiwin_vision_config" in d:
        kw = {k: v for k, v in d["hiwin_vision_config"].items() if k in names}
        return VisionConfig(**kw, select_layer=select)
    if tower and (Path(tower) / "config.json").is_file():
        cd = json.loads((Path(tower) / "config.json").read_text())
        cd = cd.get("vision_config", cd)
        kw = {k: cd[k] for k in names if k in cd}
        return VisionConfig(**kw, select_layer=select)
    if _names_builtin(tower):
        # The released config points at the authors' disk; the weights are in the checkpoint
        # itself, so only the architecture is needed and it is known.
        return _builtin_vision(select)
    raise ConfigError(f"cannot determine the vision tower from mm_vision_tower={tower!r}: pass "
                      "mm_vision_tower=<local CLIP dir> or 'openai/clip-vit-large-patch14-336'")
