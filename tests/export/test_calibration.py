"""Calibration recipe and tensors (hiwin_export.calibration), ModelOpt Q/DQ graphs for TensorRT
(int8trt / fp8trt), the accuracy report on the held-out split, the runtime's int8 path and the fp16
policy comparison. Tiny model; a small recipe so the whole file stays fast."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from hiwin_export.calibration import (DEFAULT_RECIPE, CalibrationError, CalibrationSet, build_calibration,
                                      data_hash, folder_images, recipe_images)
from hiwin_export.parity import IMAGE_SIZES, Harness, ParityError
from hiwin_runtime.graph_id import GraphId
from hiwin_runtime.manifest import ExportDir
from hiwin_runtime.ort import OnnxRunner

REPO = Path(__file__).resolve().parents[2]
# A small recipe: one photograph and two generated pages to calibrate, two pages held out.
SMALL = {"version": 1, "max_slices": 4, "sets": {
    "photos": {"source": "skimage", "calibration": ["astronaut"], "held_out": []},
    "charts": {"source": "synthetic", "kind": "chart", "calibration": [[640, 400, 1]], "held_out": [[420, 700, 9]]},
    "documents": {"source": "synthetic", "kind": "document", "calibration": [[400, 720, 2]],
                  "held_out": [[900, 500, 8]]}}}


@pytest.fixture(scope="module")
def calib(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("calib") / "c"
    idx = build_calibration(exported, out, recipe=SMALL)
    return out, idx


def test_recipe_file_is_the_default_and_splits_are_disjoint():
    assert json.loads((REPO / "calibration" / "recipe.json").read_text()) == DEFAULT_RECIPE
    cal, held = recipe_images(DEFAULT_RECIPE, "calibration"), recipe_images(DEFAULT_RECIPE, "held_out")
    assert len(cal) >= 20 and len(held) >= 8
    assert not {s.name for s in cal} & {s.name for s in held}
    synth = [s.args for s in cal + held if s.source == "synthetic"]
    assert not {(w, h) for _, w, h, _ in synth} & set(IMAGE_SIZES)  # parity's page sizes are never calibrated
    assert not {a[1:3] for a in synth if a in [s.args for s in cal]} & {s.args[1:3] for s in held if s.source == "synthetic"}
    ratios = [w / h for _, w, h, _ in synth]
    assert min(ratios) < 0.5 and max(ratios) > 3


def test_folder_split_is_by_content(tmp_path):
    from tests.conftest import random_image

    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(12):
        random_image(60 + i, 40, seed=i).save(d / f"{i:02d}.png")
    cal, held = folder_images(d, "calibration"), folder_images(d, "held_out")
    assert len(cal) + len(held) == 12 and not {s.name for s in cal} & {s.name for s in held}
    before = {Path(s.args[0]).read_bytes() for s in held}
    for p in sorted(d.iterdir()):  # renaming every file moves none across the split
        p.rename(d / f"renamed-{p.name}")
    assert {Path(s.args[0]).read_bytes() for s in folder_images(d, "held_out")} == before
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match="no images"):
        folder_images(tmp_path / "empty", "held_out")


def test_calibration_tensors_follow_the_fp32_chain(exported, calib):
    out, idx = calib
    cs = CalibrationSet(out)
    n = sum(i["crops"] for i in idx["images"])
    assert [cs.samples(f) for f in ("vit", "jbu", "hiwin")] == [n, n, n] and len(idx["images"]) == 3
    for fam in ("vit", "jbu", "hiwin"):  # the recorded hash is the hash of what is read back
        assert data_hash(cs.feeds(fam)) == cs.content_sha256(fam)
        assert len(idx["graphs"][fam]["buckets"]) == n
    # the projector's samples are the fp32 JBU's outputs on the JBU's samples
    runner = OnnxRunner(ExportDir(exported))
    j, h = next(cs.feeds("jbu")), next(cs.feeds("hiwin"))
    got = runner.run(GraphId("jbu"), j)
    np.testing.assert_array_equal(got["feat2x"], h["feat2x"])
    np.testing.assert_array_equal(j["features"], h["feat1x"])
    assert {"vit", "jbu", "hiwin"} <= set(idx["fp32_graphs"])


def test_calibration_refusals(exported, calib, tmp_path):
    out, _ = calib
    with pytest.raises(CalibrationError, match="exists"):
        build_calibration(exported, out, recipe=SMALL)
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    with open(bad / "vit.npz", "ab") as f:
        f.write(b"x")
    with pytest.raises(CalibrationError, match="vit.npz missing or modified"):
        CalibrationSet(bad)
    other = tmp_path / "other"
    shutil.copytree(exported, other)
    mf = json.loads((other / "manifest.json").read_text())
    mf["graphs"]["jbu"]["sha256"] = "0" * 64  # pretend these are other fp32 graphs
    (other / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(CalibrationError, match="recorded on other fp32 graphs"):
        CalibrationSet(out).check_export(ExportDir(other, verify=False), ("vit", "jbu"))
    assert not list(tmp_path.glob(".c.*"))


@pytest.fixture(scope="module")
def trt_qdq(exported, calib, tmp_path_factory):
    from hiwin_export.quantize import quantize

    out = tmp_path_factory.mktemp("qdq") / "export"
    shutil.copytree(exported, out)
    entries = {**quantize(out, calib[0], backend="modelopt", mode="int8"),
               **quantize(out, calib[0], backend="modelopt", mode="fp8")}
    return out, entries


def test_modelopt_graphs_listed_with_provenance_and_policy(trt_qdq):
    from hiwin_export.quantize import POLICY

    out, entries = trt_qdq
    assert sorted(entries) == sorted(f"{f}.{p}" for f in ("vit", "jbu", "hiwin") for p in ("int8trt", "fp8trt"))
    export = ExportDir(out)  # sha256 of every file checked
    for name, e in entries.items():
        p = e["provenance"]
        assert p["backend"] == "modelopt" and p["high_precision_dtype"] == "fp32" and p["policy"] == POLICY
        assert p["calibration_samples"] > 0 and len(p["calibration_sha256"]) == 64 and p["qdq_pairs"] > 0
        assert p["method"].endswith("calibration max")
        m = onnx.load(str(export.graph_path(name)), load_external_data=False)
        zp = {i.data_type for i in m.graph.initializer if i.name.endswith("zero_point")}
        want = onnx.TensorProto.FLOAT8E4M3FN if name.endswith("fp8trt") else onnx.TensorProto.INT8
        q_inputs = {x for n in m.graph.node if n.op_type == "QuantizeLinear" for x in n.input[2:3]}
        types = {i.data_type for i in m.graph.initializer if i.name in q_inputs} | zp
        assert want in types, name
        # no float16 anywhere: high_precision_dtype fp32 kept the graph fp32 outside the Q/DQ pairs
        assert not any(i.data_type == onnx.TensorProto.FLOAT16 for i in m.graph.initializer), name
    ex = entries["hiwin.int8trt"]["provenance"]["nodes_excluded"]
    assert ex["sampling products"] > 0 and ex["shape-derived nodes"] > 0 and ex["LayerNormalization"] > 0
    # JBU: the quantised tensors are convolution inputs (a tensor that also feeds the kernel path is read
    # through the same Q/DQ pair, ModelOpt's placement); no other op gets a Q/DQ pair of its own
    m = onnx.load(str(export.graph_path("jbu.int8trt")), load_external_data=False)
    dq = {n.output[0] for n in m.graph.node if n.op_type == "DequantizeLinear"}
    readers = {x: {n.op_type for n in m.graph.node if x in n.input} for x in dq}
    assert readers and all("Conv" in r for r in readers.values()), readers


@pytest.mark.parametrize("precision", ["int8trt", "fp8trt"])
def test_modelopt_accuracy_on_held_out_images(tiny_model, trt_qdq, precision):
    from hiwin_export.calibration import held_out_images

    out, _ = trt_qdq
    h = Harness(tiny_model, out, precision=precision)  # fp8 Q/DQ runs on ONNX Runtime's CPU kernels
    h.image_cases(held_out_images(recipe=SMALL))
    assert set(h.summary()) == {"vit", "jbu", "hiwin", "vision-path"}
    h.assert_ok()  # int8 cosine >= 0.99, fp8 >= 0.995 per graph and for the visual tokens
    assert h.summary()["vision-path"]["worst_max_rel"] > 1e-4  # really quantised: far from fp32 parity


def test_cli_calibrate_quantize_report_and_runtime(exported, tiny_dir, tmp_path, capsys):
    from hiwin_export.cli import main
    from hiwin_runtime.pipeline import Pipeline

    out, cal, recipe = tmp_path / "e", tmp_path / "cal", tmp_path / "recipe.json"
    shutil.copytree(exported, out)
    recipe.write_text(json.dumps(SMALL))
    assert main(["calibrate", "--export", str(out), "--out", str(cal), "--recipe", str(recipe)]) == 0
    assert "vit.npz" in capsys.readouterr().out
    assert main(["quantize", "--export", str(out), "--calibration", str(cal)]) == 0  # ort int8
    assert "vit.int8.onnx" in capsys.readouterr().out
    assert main(["quantize", "--export", str(out), "--calibration", str(cal), "--mode", "fp8"]) == 2
    assert "backend ort has no mode 'fp8'" in capsys.readouterr().err
    jp, mp = tmp_path / "r.json", tmp_path / "r.md"
    assert main(["parity", "--model", str(tiny_dir), "--export", str(out), "--precision", "int8", "--recipe", str(recipe), "--tokens", "6",
                 "--report-json", str(jp), "--report-md", str(mp)]) == 0
    rep = json.loads(jp.read_text())
    assert rep["split"] == "held_out" and len(rep["images"]) == 2
    assert set(rep["summary"]) == {"vit", "jbu", "hiwin", "vision-path"}
    assert len(rep["token_agreement"]) == 2 and all(len(a["int8"]) == 6 for a in rep["token_agreement"])
    assert "greedy tokens" in mp.read_text() and rep["provenance"]["vit.int8"]["backend"] == "ort"
    # the runtime's int8 path: int8 vision graphs, fp32 LLM
    pipe = Pipeline.from_export(out, precision="int8")
    assert pipe.backend.decoder_graph == GraphId("llm") and pipe.backend.embed_graph == GraphId("embed")
    from hiwin_model.synthetic import demo_image

    ans = pipe.generate(demo_image(), "What is this?", max_new_tokens=3, ignore_eos=True)
    assert len(ans.token_ids) == 3 and ans.visual_tokens > 0
    with pytest.raises(Exception, match="no graph 'vit.fp8trt'"):
        Pipeline.from_export(out, precision="fp8trt")


def test_quantised_bound_can_fail(tiny_model, trt_qdq):
    """The fp8 bound is checked: an impossible bound on the same graphs fails."""
    out, _ = trt_qdq
    h = Harness(tiny_model, out, precision="fp8trt")
    h._ok = lambda max_rel, cosine, finite: cosine >= 0.99999999
    from hiwin_export.calibration import held_out_images

    h.image_cases(held_out_images(recipe=SMALL)[:1])
    with pytest.raises(ParityError, match="fp8trt"):
        h.assert_ok()


def test_fp16_type_census_flags_mixed_types():
    from onnx import TensorProto, helper

    from hiwin_export.fp16_compare import type_census

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2])
    g = helper.make_graph([helper.make_node("Add", ["x", "yc"], ["z"], name="mixed"),
                           helper.make_node("Cast", ["y"], ["yc"], to=TensorProto.FLOAT16, name="c")], "g", [x, y], [z])
    m = helper.make_model(g)
    c = type_census(m)
    assert c["mixed_type_nodes"] == ["mixed"] and c["casts"] == 1


@pytest.mark.slow
def test_fp16_compare_and_autocast_apply(tiny_model, exported, calib, tmp_path):
    """Both fp16 variants through the same sweep (ViT, one grid, one held-out page); then AutoCast's JBU
    put in place of ours in a copy of the export, listed with its provenance and passing fp16 parity."""
    from hiwin_export.calibration import held_out_images
    from hiwin_export.fp16_compare import apply_autocast, compare, markdown

    r = compare(tiny_model, exported, calib[0], held_out_images(recipe=SMALL)[:1], families=("vit",), grids=((3, 4),))
    for v in ("ours", "autocast"):
        assert r["vit"][v]["cases"] > 0 and r["vit"][v]["mixed_type_nodes"] == [] and r["vit"][v]["fp16_nodes"] > 0
    assert r["vit"]["ours"]["ok"] and "| vit | autocast |" in markdown(r)
    out = tmp_path / "e"
    shutil.copytree(exported, out)
    entries = apply_autocast(out, calib[0], ("jbu",))
    assert entries["jbu.fp16"]["provenance"]["tool"].startswith("modelopt.onnx.autocast")
    h = Harness(tiny_model, out, precision="fp16")
    h.graph_cases(GraphId("jbu"), ((3, 4), (2, 9)))
    h.assert_ok()
