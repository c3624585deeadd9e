"""Typed identity of an exported graph: ``GraphId(family, bucket, precision)``.

One mapping to and from file names (``hiwin_3x3.fp16`` <-> ``GraphId("hiwin", (3, 3), "fp16")``),
used by the exporter, the manifest, the runners, parity and the bundles, so no other code parses
names. Families: ``vit``, ``jbu``, ``hiwin``, ``embed`` and ``llm``. The projector is either one
graph for every RoI sampling grid (``hiwin``: the grid is computed from the input shapes inside the
graph) or one graph per grid (``hiwin_{oh}x{ow}``, ``bucket = (oh, ow)``: the faithful form, where
the grid is an attribute of ONNX ``RoiAlign``); :func:`serving_graph` picks the one that serves a
crop.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

VISION_FAMILIES = ("vit", "jbu", "hiwin")
LANGUAGE_FAMILIES = ("embed", "llm")
FAMILIES = VISION_FAMILIES + LANGUAGE_FAMILIES
# int8: ONNX Runtime QDQ vision graphs for its CPU kernels; int8trt / fp8trt: Q/DQ vision graphs placed
# for TensorRT by NVIDIA ModelOpt (A100 / Orin int8, H100 fp8). All three: hiwin_export.quantize.
PRECISIONS = ("fp32", "fp16", "int8", "int8trt", "fp8trt")
QUANTIZED = ("int8", "int8trt", "fp8trt")
_NAME = re.compile(r"^(?P<family>[a-z]+)(?:_(?P<oh>\d+)x(?P<ow>\d+))?(?:\.(?P<precision>[a-z0-9]+))?$")


@dataclass(frozen=True, order=True)
class GraphId:
    family: str
    bucket: tuple[int, int] | None = None  # (oh, ow): projector graphs only
    precision: str = "fp32"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown graph family {self.family!r} (known: {', '.join(FAMILIES)})")
        if self.bucket is not None and self.family != "hiwin":
            raise ValueError(f"{self.family}: a sampling-grid bucket is for projector graphs only")
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r} (known: {', '.join(PRECISIONS)})")

    @property
    def base(self) -> str:
        """Name without precision: ``vit``, ``hiwin_3x3``."""
        return self.family if self.bucket is None else f"{self.family}_{self.bucket[0]}x{self.bucket[1]}"

    @property
    def name(self) -> str:
        """``vit``, ``hiwin_3x3``, ``llm.fp16`` (fp32 carries no suffix)."""
        return self.base if self.precision == "fp32" else f"{self.base}.{self.precision}"

    @property
    def file(self) -> str:
        return self.name + ".onnx"

    @property
    def weights_file(self) -> str:
        """External weights shared by the graphs of one family and precision."""
        return self.family + ("" if self.precision == "fp32" else f".{self.precision}") + ".weights"

    @property
    def is_vision(self) -> bool:
        return self.family in VISION_FAMILIES

    def at(self, precision: str) -> "GraphId":
        return replace(self, precision=precision)

    @classmethod
    def parse(cls, name: str) -> "GraphId":
        m = _NAME.match(name[:-5] if name.endswith(".onnx") else name)
        if m is None:
            raise ValueError(f"{name!r} is not a graph name (e.g. vit, hiwin_3x3, llm.fp16)")
        bucket = (int(m["oh"]), int(m["ow"])) if m["oh"] else None
        return cls(m["family"], bucket, m["precision"] or "fp32")

    def __str__(self) -> str:
        return self.name


def serving_graph(family: str, bucket: tuple[int, int] | None, precision: str, present) -> GraphId:
    """The graph that runs one stage call: for the projector, the any-grid graph ``hiwin`` when
    ``present`` (a container of :class:`GraphId` or names) has it, else the crop's bucket graph."""
    if family == "hiwin":
        any_grid = GraphId("hiwin", None, precision)
        if any_grid in present or any_grid.name in present:
            return any_grid
        if bucket is None:
            raise ValueError("a projector call needs its bucket (oh, ow) when there is no any-grid graph")
        return GraphId("hiwin", tuple(bucket), precision)
    return GraphId(family, None, precision)
