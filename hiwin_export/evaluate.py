"""``hiwin-export eval``: exact-answer accuracy on the demo task's held-out set, per backend and precision.

The held-out set is :func:`hiwin_model.demo_task.heldout` (seed 1: images never trained on, one
question each). Every answer is generated greedily through :class:`hiwin_runtime.pipeline.Pipeline`,
the path users run (:func:`hiwin_model.demo_task.score`), and counts only when its text equals the expected answer exactly.

What is scored (``targets``):

* an HF model directory (``config.json``) or no ``--model`` (the embedded demo model): PyTorch fp32;
* an export directory (``manifest.json``): ONNX Runtime at every precision the export holds (fp32,
  fp16 when exported, int8 after ``hiwin-export quantize``: int8 vision graphs, fp32 LLM), and
  ONNX Runtime GenAI for the LLM when ``--genai DIR`` (``hiwin-export genai``) is given;
* ``--reference DIR`` adds the PyTorch rows of the model the export was made from, so one table
  compares them (the deltas are against the PyTorch row).

``--backend`` / ``--precision`` restrict the rows. Output: a Markdown table on stdout and a JSON
report (``--out``, written atomically) with per-kind accuracy and the first wrong answers.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger("hiwin_export.eval")

BACKENDS = ("torch", "onnx", "genai")
PRECISIONS = ("fp32", "fp16", "int8", "int4")  # int4: a GenAI directory


@dataclass(frozen=True)
class Target:
    backend: str  # torch | onnx | genai
    precision: str
    source: str
    load: Callable[[], object]  # -> Pipeline

    @property
    def name(self) -> str:
        return f"{self.backend} {self.precision}"


def _export_precisions(path: Path) -> list[str]:
    from hiwin_runtime.graph_id import GraphId
    from hiwin_runtime.manifest import ExportDir

    have = set(ExportDir(path, verify=False).graph_ids())
    return [p for p in PRECISIONS if p != "int4" and GraphId("vit", None, p) in have]


def targets(model: str | None, *, reference: str | None = None, genai: str | None = None,
            backends=None, precisions=None) -> list[Target]:
    from hiwin_runtime.pipeline import Pipeline

    out: list[Target] = []

    def torch_target(src: str | None) -> Target:
        def load():
            if src is None:
                from hiwin_model.demo_task import load_demo_model

                return Pipeline.from_model(load_demo_model())
            return Pipeline.from_pretrained(src)
        return Target("torch", "fp32", src or "embedded demo model", load)

    path = Path(model) if model else None
    if reference:
        out.append(torch_target(reference))
    if path is None or (path / "config.json").is_file() and not (path / "manifest.json").is_file():
        out.append(torch_target(model))
    elif (path / "manifest.json").is_file():
        for p in _export_precisions(path):
            out.append(Target("onnx", p, str(path),
                              lambda p=p: Pipeline.from_export(path, precision=p, language="onnxruntime")))
        own = json.loads((path / "manifest.json").read_text()).get("language", {}).get("genai")
        if genai or own:  # --genai DIR, else the export's own GenAI directory (hiwin-export export --genai)
            src = Path(genai) if genai else path / own["dir"]
            gp = json.loads((src / "hiwin_genai.json").read_text()).get("precision", "fp32")
            out.append(Target("genai", gp, f"{path} + {src}",
                              lambda: Pipeline.from_export(path, language="genai", genai=src)))
    else:
        raise FileNotFoundError(f"{model}: neither an export directory (manifest.json) nor an HF model "
                                "directory (config.json)")
    if backends:
        bad = [b for b in backends if b not in BACKENDS]
        if bad:
            raise ValueError(f"unknown backend {bad} (known: {', '.join(BACKENDS)})")
        out = [t for t in out if t.backend in backends]
    if precisions:
        bad = [p for p in precisions if p not in PRECISIONS]
        if bad:
            raise ValueError(f"unknown precision {bad} (known: {', '.join(PRECISIONS)})")
        out = [t for t in out if t.precision in precisions]
    if not out:
        raise ValueError(f"{model or 'embedded demo model'}: nothing to evaluate for backend {backends} / "
                         f"precision {precisions}")
    return out


def evaluate(model: str | None = None, *, reference: str | None = None, genai: str | None = None,
             backends=None, precisions=None, limit: int | None = None, out: str | os.PathLike | None = None,
             max_new_tokens: int = 8) -> dict:
    """Score every target on the held-out questions; returns (and writes to ``out``) the report."""
    from hiwin_model.demo_task import heldout_questions, questions_sha256, score

    tg = targets(model, reference=reference, genai=genai, backends=backends, precisions=precisions)
    questions = heldout_questions(limit)
    rows = []
    for t in tg:
        log.info("evaluating %s (%s) on %d held-out questions", t.name, t.source, len(questions))
        res = score(t.load(), questions, max_new_tokens=max_new_tokens, label=t.name)
        rows.append({"backend": t.backend, "precision": t.precision, "source": t.source, **res})
    from hiwin_model import demo_task

    report = {"task": "hiwin demo (hiwin_model.demo_task)", "heldout_seed": demo_task.HELDOUT_SEED,
              "questions": len(questions), "questions_sha256": questions_sha256(questions), "rows": rows}
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        os.replace(tmp, out)
    return report


def table(report: dict) -> str:
    rows = report["rows"]
    ref = next((r for r in rows if r["backend"] == "torch"), None)
    base = ref["accuracy"] if ref else None
    kinds = sorted({k for r in rows for k in r["by_kind"]})
    head = ["backend", "precision", "accuracy", "correct / n", "vs torch", "same answer as torch"] + kinds
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        delta = "" if base is None or r["backend"] == "torch" else f"{100 * (r['accuracy'] - base):+.1f} pt"
        same = ""
        if ref is not None and r is not ref and "answers" in r and "answers" in ref:
            same = f"{sum(a == b for a, b in zip(r['answers'], ref['answers']))} / {r['n']}"
        cells = [r["backend"], r["precision"], f"{100 * r['accuracy']:.1f}%", f"{r['correct']} / {r['n']}", delta, same]
        cells += [f"{100 * r['by_kind'][k]['accuracy']:.0f}%" if k in r["by_kind"] else "" for k in kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
