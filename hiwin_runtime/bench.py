"""Benchmark plumbing shared by ``hiwin bench-vision`` and ``hiwin-export bench`` (torch-free, so an
export directory can be timed on the target too): the process's peak RSS, per-stage timing of a
crop chain, and one report format (a markdown table for people, JSON for machines)."""

from __future__ import annotations

import json
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .crop_chain import Stages, wrap_stages


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM; unlike ru_maxrss it does not carry over across fork+exec)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def timed_stages(stages: Stages, times: dict[str, float], *,
                 around: Callable[[str, Callable], Callable] | None = None) -> Stages:
    """Stages that add their wall time to ``times[family]`` (vit, jbu, hiwin); ``around`` may wrap
    each call once more inside the timer (e.g. a FLOP counter)."""
    def wrap(family: str, fn: Callable) -> Callable:
        inner = around(family, fn) if around else fn

        def call(*args):
            t = time.perf_counter()
            out = inner(*args)
            times[family] = times.get(family, 0.0) + time.perf_counter() - t
            return out
        return call
    return wrap_stages(stages, wrap)


@dataclass
class Report:
    """Rows of one benchmark run: printed as a markdown table, saved as JSON with the same rows."""

    title: str
    columns: list[tuple[str, str]]  # (key, header)
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def markdown(self) -> str:
        lines = [self.title, "", "| " + " | ".join(h for _, h in self.columns) + " |",
                 "|" + "---|" * len(self.columns)]
        for r in self.rows:
            lines.append("| " + " | ".join(_fmt(r.get(k)) for k, _ in self.columns) + " |")
        return "\n".join(lines + ([""] + self.notes if self.notes else []))

    def to_json(self) -> dict:
        return {"title": self.title, "columns": [k for k, _ in self.columns], "rows": self.rows,
                "notes": self.notes, "meta": self.meta}


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return str(v)


def write_json(reports: list[Report], path: str | os.PathLike) -> None:
    """All reports of a run into one JSON file, atomically."""
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps([r.to_json() for r in reports], indent=1))
    os.replace(tmp, p)
