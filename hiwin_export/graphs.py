"""Declarative export specs of the three vision graphs (one module, one graph, one parity test each).

| graph | inputs | outputs |
|---|---|---|
| ``vit.onnx`` | ``pixel_values`` f32 [batch, 3, 14h, 14w] | ``features`` f32 [batch, Cv, h, w] |
| ``jbu.onnx`` | ``features`` f32 [batch, Cv, h, w], ``pixel_values`` f32 [batch, 3, 14h, 14w] | ``feat2x`` [batch, Cv, 2h, 2w], ``feat4x`` [batch, Cv, 4h, 4w] |
| ``hiwin.onnx`` | ``feat1x`` [batch, Cv, h, w], ``feat2x``, ``feat4x`` | ``tokens`` f32 [batch, 144, C] |

The ViT interpolates its position embeddings in-graph (bicubic ``Resize`` to the input's patch
grid). The JBU graph computes its adaptive convolutions as one GEMM per 8x8 output tile
(:func:`hiwin_model.jbu.adaptive_conv_tiled`). The projector graph computes the fast form (docs/model.md §4.9) and chooses the crop's RoI
sampling grid (oh, ow) itself from its input shapes, with the released rule written as integer
comparisons (:func:`hiwin_model.projector.grid_from_shape`): one graph and one copy of the weights
serve every bucket. ``--projector-impl faithful`` exports the released order of operations
instead, where the grid is an attribute of ONNX ``RoiAlign``: one graph per grid,
``hiwin_{oh}x{ow}.onnx`` (7 buckets, chosen by the runtime from the manifest's rule), sharing one
external weights file.

``flavour="tensorrt"`` (:mod:`.plugin_graphs`): the same graphs with TensorRT plugin nodes. The JBU
graph computes each layer's kernel and adaptive convolution as one ``HiwinJbuConv`` node
(``conv="plugin"``); the faithful projector graphs have ``HiwinRoiAlign`` where the onnx flavour has
``RoiAlign``; the ViT and the fast projector graph need no plugin and are the same as in the onnx flavour.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from hiwin_model.projector import EXPORT_MAX_SIDE
from hiwin_runtime.buckets import HIWIN_BUCKETS
from hiwin_runtime.graph_id import GraphId

# Patch-grid range every graph is exported (and checked) for: 2 patches (28 px, what the JBU
# needs) to 288 patches (4032 px) per side: the slicer's longest side is s^2 / (2 p^2) = 288 patches
# (a 2 x 288 crop of an image beyond 1:116; hiwin_export.profiles proves the bound and enumerates
# every reachable crop), so every crop it produces is in range.
MIN_PATCHES, MAX_PATCHES, MAX_BATCH = 2, 288, 64
assert 4 * MAX_PATCHES <= EXPORT_MAX_SIDE, "the fast projector's RoI sample bound must cover the 4x level"


class _Jbu(nn.Module):
    def __init__(self, jbu: nn.Module, conv: str):
        super().__init__()
        self.jbu, self.conv = jbu, conv

    def forward(self, features: Tensor, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        return self.jbu(features, pixel_values, conv=self.conv)


class _HiwinAnyGrid(nn.Module):
    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector

    def forward(self, feat1x: Tensor, feat2x: Tensor, feat4x: Tensor) -> Tensor:
        return self.projector.forward_any_grid([feat1x, feat2x, feat4x])


class _HiwinBucket(nn.Module):
    def __init__(self, projector: nn.Module, grid_hw: tuple[int, int], impl: str):
        super().__init__()
        self.projector, self.grid_hw, self.impl = projector, grid_hw, impl

    def forward(self, feat1x: Tensor, feat2x: Tensor, feat4x: Tensor) -> Tensor:
        return self.projector([feat1x, feat2x, feat4x], grid_hw=self.grid_hw, impl=self.impl)


@dataclass(frozen=True)
class GraphSpec:
    graph: GraphId  # fp32 identity; precision passes derive the others
    module: Callable[[nn.Module], nn.Module]  # HiwinForCausalLM -> exported module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    # per input: axis -> (symbol, multiplier of the patch grid or None for batch)
    axes: dict[str, dict[int, str]]
    dummy: Callable[[nn.Module], tuple]
    meta: dict = field(default_factory=dict)
    kind: str = "vision"  # "vision" (patch-grid axes) or "language" (token axes)
    # torch.export shapes keyed by forward() parameter (default: derived from ``axes``)
    export_shapes: Callable[[], dict] | None = None
    output_axes: dict[str, dict[int, str]] = field(default_factory=dict)
    flavour: str = "onnx"  # "onnx" (standard ONNX) or "tensorrt" (TensorRT plugin nodes, .plugin_graphs)

    @property
    def name(self) -> str:
        return self.graph.name

    def dynamic_shapes(self) -> dict:
        if self.export_shapes is not None:
            return self.export_shapes()
        B = torch.export.Dim("batch", min=1, max=MAX_BATCH)
        h = torch.export.Dim("h", min=MIN_PATCHES, max=MAX_PATCHES)
        w = torch.export.Dim("w", min=MIN_PATCHES, max=MAX_PATCHES)
        sym = {"batch": B, "h": h, "w": w, "2h": 2 * h, "2w": 2 * w, "4h": 4 * h, "4w": 4 * w,
               "14h": 14 * h, "14w": 14 * w}
        return {n: {ax: sym[s] for ax, s in self.axes[n].items()} for n in self.inputs}


def _pixels(model, h=3, w=2, b=2):
    return torch.randn(b, 3, model.config.vision.patch_size * h, model.config.vision.patch_size * w)


def _feats(model, h=3, w=2, b=2, s=1):
    return torch.randn(b, model.config.vision.hidden_size, s * h, s * w)


def graph_specs(projector_impl: str = "fast", flavour: str = "onnx") -> list[GraphSpec]:
    """The vision specs. ``projector_impl="fast"``: one any-grid projector graph (separable RoI
    MatMuls, absorbed keys, grid from the shapes); ``"faithful"``: ONNX ``RoiAlign`` and the released
    order, one graph per bucket. Parity compares either with the faithful reference. ``flavour``:
    ``"onnx"`` or ``"tensorrt"`` (the JBU's layers as ``HiwinJbuConv`` plugin nodes, ``RoiAlign`` as
    ``HiwinRoiAlign``)."""
    if projector_impl not in ("fast", "faithful"):
        raise ValueError(f"unknown projector implementation {projector_impl!r} (known: fast, faithful)")
    if flavour not in ("onnx", "tensorrt"):
        raise ValueError(f"unknown flavour {flavour!r} (known: onnx, tensorrt)")
    conv = "plugin" if flavour == "tensorrt" else "tiled"
    specs = [
        GraphSpec(GraphId("vit"), lambda m: m.vision_tower, ("pixel_values",), ("features",),
                  {"pixel_values": {0: "batch", 2: "14h", 3: "14w"}}, lambda m: (_pixels(m),), flavour=flavour),
        GraphSpec(GraphId("jbu"), lambda m: _Jbu(m.jbu, conv), ("features", "pixel_values"), ("feat2x", "feat4x"),
                  {"features": {0: "batch", 2: "h", 3: "w"}, "pixel_values": {0: "batch", 2: "14h", 3: "14w"}},
                  lambda m: (_feats(m), _pixels(m)), flavour=flavour),
    ]
    levels = {"feat1x": {0: "batch", 2: "h", 3: "w"}, "feat2x": {0: "batch", 2: "2h", 3: "2w"},
              "feat4x": {0: "batch", 2: "4h", 3: "4w"}}
    if projector_impl == "fast":
        return specs + [GraphSpec(
            GraphId("hiwin"), lambda m: _HiwinAnyGrid(m.projector), ("feat1x", "feat2x", "feat4x"), ("tokens",),
            levels, lambda m: tuple(_feats(m, s=s) for s in (1, 2, 4)),
            meta={"sampling_grid": "from the input shapes (manifest buckets.rule)", "projector_impl": "fast"},
            flavour=flavour)]
    for g in HIWIN_BUCKETS:
        specs.append(GraphSpec(
            GraphId("hiwin", g), lambda m, g=g: _HiwinBucket(m.projector, g, projector_impl), ("feat1x", "feat2x", "feat4x"),
            ("tokens",), levels, lambda m: tuple(_feats(m, s=s) for s in (1, 2, 4)),
            meta={"sampling_grid": list(g), "projector_impl": projector_impl}, flavour=flavour))
    return specs


OUTPUT_AXES = {
    "features": {0: "batch", 2: "h", 3: "w"}, "feat2x": {0: "batch", 2: "2h", 3: "2w"},
    "feat4x": {0: "batch", 2: "4h", 3: "4w"}, "tokens": {0: "batch"},
}
