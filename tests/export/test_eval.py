"""`hiwin-export eval`: held-out demo accuracy per backend and precision, on small slices."""

from __future__ import annotations

import json

import pytest

from hiwin_export.cli import main
from hiwin_export.evaluate import evaluate, table, targets


def test_eval_of_the_embedded_demo_model_on_pytorch(tmp_path, capsys):
    """The shipped model on the first 12 held-out questions: every answer is one of the task's
    answers (random weights answer noise); its accuracy is what the card reports for all 400
    (28.5 %), not asserted on a slice this small."""
    from hiwin_model.demo_task import ANSWERS

    out = tmp_path / "eval.json"
    assert main(["eval", "--limit", "12", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    rep = json.loads(out.read_text())
    (row,) = rep["rows"]
    assert (row["backend"], row["precision"], row["n"]) == ("torch", "fp32", 12)
    assert row["correct"] == 12 - len(row["wrong"]) and row["accuracy"] == row["correct"] / 12
    assert sum(k["n"] for k in row["by_kind"].values()) == 12
    assert len(row["answers"]) == 12 and all(a in ANSWERS for a in row["answers"]), row["answers"]
    assert "| torch | fp32 |" in text and rep["questions_sha256"][:12] in text


def test_eval_of_an_export_scores_every_precision_it_holds(exported, tiny_dir, tmp_path):
    """On the (random-weight) tiny export: one row per exported precision plus the PyTorch reference;
    the answers are noise, but every backend gives the same ones (greedy, fp32 graphs)."""
    rep = evaluate(str(exported), reference=str(tiny_dir), limit=3, out=tmp_path / "e.json")
    assert [(r["backend"], r["precision"]) for r in rep["rows"]] == [("torch", "fp32"), ("onnx", "fp32"),
                                                                      ("onnx", "fp16")]
    by = {(r["backend"], r["precision"]): r for r in rep["rows"]}
    assert by["torch", "fp32"]["answers"] == by["onnx", "fp32"]["answers"]
    assert json.loads((tmp_path / "e.json").read_text())["rows"][1]["n"] == 3
    md = table(rep).splitlines()
    assert len(md) == 5 and "vs torch" in md[0] and md[3].startswith("| onnx | fp32 |")
    assert "| 3 / 3 |" in md[3]  # same answers as PyTorch on all three questions


def test_eval_refuses_what_it_cannot_score(exported, tmp_path):
    with pytest.raises(ValueError, match="nothing to evaluate"):
        targets(str(exported), precisions=["int8"])  # not quantized
    with pytest.raises(ValueError, match="unknown backend"):
        targets(str(exported), backends=["tensorrt"])
    with pytest.raises(FileNotFoundError, match="neither an export"):
        targets(str(tmp_path))
    assert main(["eval", "--model", str(tmp_path / "missing"), "--limit", "1"]) == 2


@pytest.mark.slow
def test_main_job_exports_and_answers_like_pytorch(capsys):
    """`hiwin-export run` with no arguments, for real: export the embedded demo model (fp32, quick
    parity) and answer the held-out demo question on ONNX Runtime: the same answer as `hiwin
    generate` on PyTorch, and the verdict against the expected answer."""
    from hiwin_model.cli import main as hiwin_main
    from hiwin_model.demo_task import demo_question

    _, question, expected = demo_question()
    assert hiwin_main(["generate", "--max-new-tokens", "8"]) == 0
    torch_out = capsys.readouterr().out
    assert main(["run", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    assert out == torch_out and out.startswith(f"question: {question}\nanswer: ")
    assert f"expected: {expected} (" in out
