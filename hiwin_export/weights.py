"""One external-data file per graph family and precision: the seven projector buckets store the
projector's weights once, and every graph stays loadable by ONNX Runtime, TensorRT and Polygraphy."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
from onnx import TensorProto, numpy_helper

EXTERNAL_MIN_BYTES = 1024


class SharedWeights:
    """Appends initializers to one external-data file; identical bytes are stored once, whatever
    their names (the exporter names folded weights, e.g. a transposed Linear weight, per graph)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0
        self.index: dict[str, tuple[int, int]] = {}
        self.fh = open(path, "wb")

    def externalize(self, model: onnx.ModelProto) -> None:
        for t in model.graph.initializer:
            raw = numpy_helper.to_array(t).tobytes() if not t.HasField("raw_data") else t.raw_data
            if len(raw) < EXTERNAL_MIN_BYTES:
                continue
            key = hashlib.sha256(raw).hexdigest()
            if key not in self.index:
                pad = (-self.offset) % 64  # aligned offsets allow mmap
                self.fh.write(b"\0" * pad)
                self.offset += pad
                self.fh.write(raw)
                self.index[key] = (self.offset, len(raw))
                self.offset += len(raw)
            off, n = self.index[key]
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(f)
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for k, v in (("location", self.path.name), ("offset", str(off)), ("length", str(n))):
                e = t.external_data.add()
                e.key, e.value = k, v

    def close(self) -> None:
        self.fh.close()
