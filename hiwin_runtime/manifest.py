"""Reading an export directory back: file integrity (sha256), graph lookup by :class:`GraphId`,
the bucket rule from the manifest's data, and input validation.

Everything that runs a graph (parity harness, runtimes) goes through :class:`ExportDir`, so a
missing or modified file, a wrong input name, rank or dtype, a crop that is not a multiple of the
patch size or a shape beyond the exported range is a clear :class:`ExportError`, never an
opaque ONNX Runtime failure.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from .buckets import apply_bucket_rule
from .graph_id import GraphId, serving_graph

MANIFEST_VERSION = 2
# What the graphs of an export directory are made for (``manifest.json["flavour"]``; a manifest without the
# key is "onnx"): "onnx", standard ONNX for ONNX Runtime (and TensorRT); "tensorrt", the same graphs with
# TensorRT plugin nodes (domain "hiwin": HiwinJbuConv, HiwinRoiAlign) that only TensorRT runs.
FLAVOURS = ("onnx", "tensorrt")


class ExportError(ValueError):
    pass


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class ExportDir:
    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        mf = self.path / "manifest.json"
        if not mf.is_file():
            raise ExportError(f"{self.path}: no manifest.json (not a hiwin export directory)")
        try:
            self.manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise ExportError(f"{mf}: invalid JSON ({e})") from e
        version = self.manifest.get("manifest_version")
        if version != MANIFEST_VERSION:
            raise ExportError(f"{mf}: manifest version {version}, this runtime reads version {MANIFEST_VERSION} "
                              "(re-export the model with this version of hiwin)")
        if self.flavour not in FLAVOURS:
            raise ExportError(f"{mf}: unknown flavour {self.flavour!r} (this runtime knows {', '.join(FLAVOURS)}; "
                              "re-export the model with this version of hiwin)")
        if verify:
            self.verify()

    @property
    def flavour(self) -> str:
        """``"onnx"`` or ``"tensorrt"`` (TensorRT plugin nodes; ONNX Runtime refuses it)."""
        return self.manifest.get("flavour", "onnx")

    def plugins(self, graph: GraphId | str) -> list[str]:
        """The TensorRT plugin ops a graph holds (``[]`` for standard ONNX)."""
        self.graph_path(graph)
        return list(self.graphs[str(graph)].get("plugins", []))

    def verify(self) -> None:
        """Every graph and weights file exists and matches its sha256."""
        files = {g["file"]: g["sha256"] for g in self.manifest["graphs"].values()}
        files.update({k: v["sha256"] for k, v in self.manifest.get("weights", {}).items()})
        files.update(self.manifest.get("files", {}))  # tokenizer
        missing = sorted(n for n in files if not (self.path / n).is_file())
        modified = sorted(n for n, d in files.items() if n not in missing and sha256(self.path / n) != d)
        problems = [f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing"] if missing else []
        if modified:
            problems.append(f"{', '.join(modified)} {'was' if len(modified) == 1 else 'were'} modified "
                            "(sha256 mismatch with manifest.json)")
        if problems:
            raise ExportError(f"{self.path}: " + "; ".join(problems))

    @property
    def graphs(self) -> dict:
        return self.manifest["graphs"]

    def graph_ids(self) -> list[GraphId]:
        return sorted(GraphId.parse(n) for n in self.graphs)

    def graph_path(self, graph: GraphId | str) -> Path:
        name = str(graph)
        if name not in self.graphs:
            raise ExportError(f"{self.path}: no graph {name!r} (has {sorted(self.graphs)})")
        return self.path / self.graphs[name]["file"]

    def bucket_for(self, width: int, height: int) -> tuple[int, int]:
        """(oh, ow) projector bucket of a (width, height)-patch crop, by the manifest's rule."""
        return apply_bucket_rule(self.manifest["buckets"]["rule"], width, height)

    def hiwin_graph_for(self, h: int, w: int, precision: str = "fp32") -> GraphId:
        """Projector graph of an (h, w)-patch crop (the any-grid graph when exported)."""
        return self.stage_graph("hiwin", self.bucket_for(w, h), precision)

    def stage_graph(self, family: str, bucket: tuple[int, int] | None, precision: str = "fp32") -> GraphId:
        """The graph of this directory that runs a crop-chain stage call."""
        return serving_graph(family, bucket, precision, self.graphs)

    def check_feeds(self, graph: GraphId | str, feeds: dict[str, np.ndarray]) -> None:
        name = str(graph)
        self.graph_path(name)  # a clear error for an unknown graph
        g = self.graphs[name]
        want = {i["name"]: i for i in g["inputs"]}
        if set(feeds) != set(want):
            missing, extra = sorted(set(want) - set(feeds)), sorted(set(feeds) - set(want))
            raise ExportError(f"{name}: inputs are {sorted(want)}, got {sorted(feeds)} "
                              f"(missing {missing}, unexpected {extra})")
        if g.get("kind") == "language":
            return self._check_language(name, feeds, want)
        lo, hi = self.manifest["shape_ranges"]["patches_per_side"]
        bmax = self.manifest["shape_ranges"]["batch"][1]
        p = self.manifest["shape_ranges"]["patch_size"]
        sizes: dict[str, int] = {}
        for n, a in feeds.items():
            spec = want[n]
            _check_static(name, n, a, spec)
            for ax, sym in spec["dynamic_axes"].items():
                size = a.shape[int(ax)]
                if sym == "batch":
                    if not 1 <= size <= bmax:
                        raise ExportError(f"{name}: batch {size} outside the exported range [1, {bmax}]")
                    base = size
                else:
                    mult = int(sym[:-1]) if sym[:-1] else 1
                    if size % mult:
                        what = f"a multiple of the {p}-px patch size" if mult == p else f"a multiple of {mult}"
                        raise ExportError(f"{name}: input {n!r} axis {ax} is {size}, must be {what}")
                    base = size // mult
                    if not lo <= base <= hi:
                        raise ExportError(f"{name}: {base} patches on axis {ax} of {n!r} is outside the "
                                          f"exported range [{lo}, {hi}]")
                key = sym.lstrip("0123456789")
                if sizes.setdefault(key, base) != base:
                    raise ExportError(f"{name}: inconsistent sizes for {key!r} across inputs")

    def _check_language(self, name: str, feeds: dict[str, np.ndarray], want: dict) -> None:
        """Token graphs: dtype, rank and fixed sizes; one batch; mask = past + seq; within the context."""
        sizes: dict[str, int] = {}
        for n, a in feeds.items():
            spec = want[n]
            _check_static(name, n, a, spec)
            for ax, sym in spec["dynamic_axes"].items():
                if sizes.setdefault(sym, a.shape[int(ax)]) != a.shape[int(ax)]:
                    raise ExportError(f"{name}: input {n!r} axis {ax} ({sym}) is {a.shape[int(ax)]}, other inputs "
                                      f"give {sizes[sym]}")
        bmax = self.manifest["shape_ranges"]["batch"][1]
        if not 1 <= sizes.get("batch", 1) <= bmax:
            raise ExportError(f"{name}: batch {sizes['batch']} outside the exported range [1, {bmax}]")
        if sizes.get("seq", 1) < 1:
            raise ExportError(f"{name}: empty sequence (seq = 0)")
        if "total" in sizes and sizes["total"] != sizes.get("past", 0) + sizes["seq"]:
            raise ExportError(f"{name}: attention_mask covers {sizes['total']} positions, past + seq is "
                              f"{sizes.get('past', 0)} + {sizes['seq']}")
        ctx = self.manifest.get("language", {}).get("context_length")
        if ctx and sizes.get("past", 0) + sizes.get("seq", 0) > ctx:
            raise ExportError(f"{name}: {sizes.get('past', 0) + sizes['seq']} positions exceed the context of "
                              f"{ctx} tokens")
        if "input_ids" in feeds:
            ids = feeds["input_ids"]
            vocab = self.manifest["language"]["vocab_size"]
            if ids.size and (ids.min() < 0 or ids.max() >= vocab):
                raise ExportError(f"{name}: token ids must be in [0, {vocab}), got [{ids.min()}, {ids.max()}]")


def _check_static(graph: str, name: str, a: np.ndarray, spec: dict) -> None:
    """dtype, rank and the fixed sizes of one input against its manifest entry."""
    if a.dtype != np.dtype(spec["dtype"]):
        raise ExportError(f"{graph}: input {name!r} must be {spec['dtype']}, got {a.dtype}")
    if a.ndim != len(spec["shape"]):
        raise ExportError(f"{graph}: input {name!r} must have rank {len(spec['shape'])}, got shape {a.shape}")
    for ax, dim in enumerate(spec["shape"]):
        if isinstance(dim, int) and dim and a.shape[ax] != dim:
            raise ExportError(f"{graph}: input {name!r} axis {ax} must be {dim}, got {a.shape[ax]}")


class LanguageDir:
    """A directory that a ``hiwin-export`` command writes next to an export for another runtime's
    language half (GenAI, TensorRT-LLM): a facts JSON (sizes, token ids, precision, sha256 of every
    other file) checked on load. Subclasses set ``FACTS`` (the JSON's name), ``KIND`` (for messages)
    and ``COMMAND`` (what rebuilds it), and may check their facts in ``_check_facts``."""

    FACTS = ""
    KIND = ""
    COMMAND = ""

    def __init__(self, path: str | os.PathLike, *, verify: bool = True):
        self.path = Path(path)
        f = self.path / self.FACTS
        if not self.path.is_dir():
            raise ExportError(f"{self.path}: {self.KIND} directory not found")
        if not f.is_file():
            raise ExportError(f"{self.path}: no {self.FACTS} (not written by `{self.COMMAND}`)")
        try:
            self.facts = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise ExportError(f"{f}: invalid JSON ({e})") from e
        self._check_facts(f)
        if verify:
            self.verify()

    def _check_facts(self, facts_file: Path) -> None:
        pass

    def verify(self) -> None:
        files = self.facts.get("files", {})
        missing = sorted(n for n in files if not (self.path / n).is_file())
        modified = sorted(n for n, d in files.items() if n not in missing and sha256(self.path / n) != d)
        if missing or modified:
            raise ExportError(f"{self.path}: " + "; ".join(
                [f"missing: {', '.join(missing)}"] * bool(missing) + [f"modified: {', '.join(modified)}"] * bool(modified))
                + f" (rebuild it with `{self.COMMAND}`)")

    def check_matches(self, language: dict, where: str) -> None:
        """The directory was built from the same LLM as the export's language manifest."""
        keys = ("hidden_size", "vocab_size", "num_layers", "context_length", "token_ids")
        diff = {k: (self.facts.get(k), language.get(k)) for k in keys
                if language.get(k) is not None and self.facts.get(k) != language.get(k)}
        if diff:
            raise ExportError(f"{self.path}: {self.KIND} directory does not match the export {where}: "
                              + ", ".join(f"{k} {a} vs {b}" for k, (a, b) in diff.items()))
