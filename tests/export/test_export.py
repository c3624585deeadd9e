"""ONNX export of the vision graphs (tiny model): structure, manifest, parity, bad inputs."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch

from conftest import random_image
from hiwin_export import export as export_mod
from hiwin_export.export import export_model
from hiwin_runtime.buckets import apply_bucket_rule
from hiwin_runtime.graph_id import GraphId
from hiwin_export.graphs import HIWIN_BUCKETS
from hiwin_export.manifest import ExportDir, ExportError
from hiwin_export.parity import Harness, OnnxRunner, error_stats

VISION = ["vit", "jbu", "hiwin"]  # one projector graph serves every bucket
ALL = VISION + ["embed", "llm"]
ALL16 = [f"{g}.fp16" for g in ALL]


def test_polygraphy_bundle_round_trip(exported):
    """The real polygraphy CLI verifies a graph against a bundle, no PyTorch involved."""
    import shutil as sh
    import subprocess

    if sh.which("polygraphy") is None:
        pytest.skip("needs the polygraphy CLI (pip install polygraphy)")
    mf = json.loads((exported / "manifest.json").read_text())
    assert set(mf["bundles"]) == set(VISION)
    assert len(mf["bundles"]["hiwin"]) == len(HIWIN_BUCKETS)  # one bundle per bucket, one graph
    for d in (mf["bundles"]["vit"][0], mf["bundles"]["hiwin"][1]):
        cmd = json.loads((exported / d / "bundle.json").read_text())["onnxrt_command"]
        r = subprocess.run(cmd.split(), cwd=exported, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
        assert "PASSED" in r.stdout + r.stderr
    # and it fails when the reference does not match (the check can fail)
    d = exported / mf["bundles"]["vit"][0]
    cmd = json.loads((d / "bundle.json").read_text())["onnxrt_command"]
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    rr = RunResults.load(str(d / "reference_outputs.json"))
    feats = rr[0][1][0]["features"]
    bad = exported.parent / "bad_ref.json"
    out = RunResults()
    out.append(("pytorch-reference", [IterationResult({"features": feats * 1.01}, runner_name="pytorch-reference")]))
    out.save(str(bad))
    cmd = cmd.replace(f"{mf['bundles']['vit'][0]}/reference_outputs.json", str(bad))
    r = subprocess.run(cmd.split(), cwd=exported, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0


def test_manifest_and_files(exported):
    mf = json.loads((exported / "manifest.json").read_text())
    assert sorted(mf["graphs"]) == sorted(ALL + ALL16)
    assert {mf["graphs"][g]["precision"] for g in ALL16} == {"fp16"}
    assert mf["opset"] == 18 and mf["manifest_version"] == 2
    for name, entry in mf["graphs"].items():  # the typed identity is in every entry
        gid = GraphId.parse(name)
        assert (entry["family"], entry["precision"], entry["file"]) == (gid.family, gid.precision, gid.file)
        assert entry["bucket"] == (list(gid.bucket) if gid.bucket else None)
    rule = mf["buckets"]["rule"]  # the bucket rule as data: a consumer needs nothing else
    assert all(f"{oh}x{ow}" in mf["buckets"]["graphs"] for oh, ow in
               {apply_bucket_rule(rule, w, h) for w in range(2, 40) for h in range(2, 40)})
    assert set(mf["buckets"]["graphs"].values()) == {"hiwin"}  # every bucket served by the one graph
    assert mf["graphs"]["vit"]["inputs"][0]["name"] == "pixel_values"
    assert [o["name"] for o in mf["graphs"]["jbu"]["outputs"]] == ["feat2x", "feat4x"]
    assert mf["graphs"]["hiwin"]["projector_impl"] == "fast" and mf["graphs"]["hiwin"]["bucket"] is None
    assert set(mf["weights"]) == {f"{f}{p}.weights" for f in ("vit", "jbu", "hiwin", "embed", "llm")
                                  for p in ("", ".fp16")}
    assert {mf["graphs"][g]["kind"] for g in VISION} == {"vision"}
    assert {mf["graphs"]["llm"]["kind"], mf["graphs"]["embed"]["kind"]} == {"language"}
    assert mf["config"]["mm_projector_type"] == "adapt_spatial_resampler"
    assert {"torch", "onnx", "onnxruntime"} <= set(mf["tools"])
    p32, p16 = mf["parity"]["fp32"], mf["parity"]["fp16"]
    assert p32["level"] == p16["level"] == "quick"
    assert all(p32[g]["ok"] and p32[g]["worst_max_rel"] <= 1e-4 for g in ALL + ["vision-path"])
    assert all(p16[g]["ok"] and p16[g]["min_cosine"] >= 0.999 for g in ALL + ["vision-path"])
    assert (exported / "reports" / "parity.md").is_file()
    ExportDir(exported)  # sha256 of every file verifies
    # one copy of the projector weights serves every bucket
    from hiwin_model.tiny import build_tiny_model

    n_proj = sum(p.numel() * 4 for p in build_tiny_model().projector.parameters())
    assert (exported / "hiwin.weights").stat().st_size < 1.2 * n_proj


@pytest.fixture(scope="module")
def exported_faithful(tiny_model, tmp_path_factory):
    """Two projector buckets in the faithful form (ONNX RoiAlign), with fp16 variants and parity."""
    out = tmp_path_factory.mktemp("faithful") / "onnx"
    export_model(tiny_model, out, graphs=["hiwin_3x3", "hiwin_2x4"], bundles=False, projector_impl="faithful")
    return out


def test_graphs_are_checker_clean(exported):
    for name in ALL + ALL16:
        path = exported / f"{name}.onnx"
        onnx.checker.check_model(str(path), full_check=True)
        m = onnx.load(str(path), load_external_data=False)
        assert json.loads({p.key: p.value for p in m.metadata_props}["hiwin_config"])["hidden_size"] == 128
        ops = {n.op_type for n in m.graph.node}
        assert "RoiAlign" not in ops  # the fast projector: separable RoI as MatMuls
        if name.split(".")[0] in VISION:  # every resize is a pair of shape-derived MatMuls: no Resize left
            assert "Resize" not in ops, name
        if name.startswith("hiwin"):
            assert "MatMul" in ops and "Softmax" in ops and not ops & {"Einsum", "Loop", "NonZero", "If"}
        assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"}
        assert dict((o.domain, o.version) for o in m.opset_import)[""] == 18


def test_faithful_projector_graphs_have_explicit_roialign(exported_faithful):
    mf = json.loads((exported_faithful / "manifest.json").read_text())
    assert {mf["graphs"][g]["projector_impl"] for g in mf["graphs"]} == {"faithful"}
    assert all(v["ok"] for p in ("fp32", "fp16") for k, v in mf["parity"][p].items() if k != "level")
    for name in ("hiwin_3x3", "hiwin_2x4", "hiwin_3x3.fp16", "hiwin_2x4.fp16"):
        m = onnx.load(str(exported_faithful / f"{name}.onnx"), load_external_data=False)
        rois = [n for n in m.graph.node if n.op_type == "RoiAlign"]
        oh, ow = GraphId.parse(name).bucket
        assert len(rois) == 6  # keys and values of three levels
        if name.endswith(".fp16"):  # RoiAlign (inputs and boxes) stays fp32 inside the fp16 graph
            types = _tensor_types(m)
            assert {types[i] for n in rois for i in n.input[:2]} == {onnx.TensorProto.FLOAT}
        for n in rois:
            a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
            assert a == {"mode": b"avg", "coordinate_transformation_mode": b"output_half_pixel",
                         "sampling_ratio": 0, "spatial_scale": 1.0, "output_height": oh, "output_width": ow}


def _tensor_types(m: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    g = inferred.graph
    return {v.name: v.type.tensor_type.elem_type for v in [*g.value_info, *g.input, *g.output]} | {
        t.name: t.data_type for t in g.initializer}


def test_vision_graphs_are_tensorrt_friendly(exported):
    """No cubic Resize (slow in ONNX Runtime, border rules differ in TensorRT) and no float64."""
    for name in VISION:
        m = onnx.load(str(exported / f"{name}.onnx"), load_external_data=False)
        assert "Resize" not in {n.op_type for n in m.graph.node}, name
        assert onnx.TensorProto.DOUBLE not in set(_tensor_types(m).values()), name


def test_fp16_graphs_follow_the_precision_policy(exported):
    from hiwin_export.precision import FP16_KEEP_FP32, _shape_derived_nodes

    for name in ALL16:
        m = onnx.load(str(exported / f"{name}.onnx"), load_external_data=False)
        types = _tensor_types(m)
        if name == "embed.fp16":  # a Gather from the fp16 table, cast to fp32 at the output
            (table,) = [t for t in m.graph.initializer if len(t.dims) == 2]
            assert table.data_type == onnx.TensorProto.FLOAT16
            assert types["inputs_embeds"] == onnx.TensorProto.FLOAT
            continue
        kept = [n for n in m.graph.node if n.op_type in FP16_KEEP_FP32]
        assert kept and all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in kept), name
        if name == "llm.fp16":  # rotary angles of position_ids: fp16 has no integers beyond 2048
            trig = [n for n in m.graph.node if n.op_type in ("Cos", "Sin")]
            assert trig and all(types[n.output[0]] == onnx.TensorProto.FLOAT for n in trig)
        const = set(_shape_derived_nodes(m.graph))  # shape/constant-only arithmetic stays fp32
        mm = [n for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in const]
        assert mm and all(types[n.output[0]] == onnx.TensorProto.FLOAT16 for n in mm), name  # data GEMMs: fp16
        # fp32 I/O, and no fp32 -> fp16 -> fp32 round trips left between kept-fp32 ops
        assert {types[i.name] for i in m.graph.input} - {onnx.TensorProto.INT64} == {onnx.TensorProto.FLOAT}
        producer = {o: n for n in m.graph.node for o in n.output}
        for n in m.graph.node:
            if n.op_type == "Cast" and onnx.helper.get_attribute_value(n.attribute[0]) == onnx.TensorProto.FLOAT:
                up = producer.get(n.input[0])
                assert not (up is not None and up.op_type == "Cast"), f"{name}: round trip at {n.name}"


def test_parity_random_and_real_images(tiny_model, exported, tmp_path):
    h = Harness(tiny_model, exported)
    h.random_cases()
    h.image_cases([random_image(w, hh, seed=i) for i, (w, hh) in enumerate(
        [(1344, 336), (1008, 672), (800, 800), (672, 1008), (336, 1344), (2400, 240), (90, 60)])])
    s = h.summary()
    assert set(s) == set(VISION) | {"vision-path"}  # every graph and the whole path
    # the one projector graph was checked on crops of every bucket (its in-graph rule included)
    grids = {tuple(int(v) for v in r.case.split("crops ")[1].split(" ")[0].split("x")) for r in h.records
             if r.graph == "hiwin"}
    assert {h.export.bucket_for(w, hh) for hh, w in grids} == set(HIWIN_BUCKETS)
    h.assert_ok()
    assert all(v["worst_max_rel"] <= 1e-4 and v["min_cosine"] > 0.999999 for v in s.values())
    jp, mp = h.write_report(tmp_path)
    assert json.loads(jp.read_text())["summary"]["vit"]["ok"] and "| vit |" in mp.read_text()


def test_parity_catches_a_wrong_graph(tiny_model, exported, tmp_path):
    """A real defect (graph exported from other weights) must fail the harness."""
    from hiwin_model.tiny import build_tiny_model

    other = build_tiny_model(seed=5)
    h = Harness(other, exported, check_source=False)  # the numbers must catch it too
    h.random_cases(((24, 24),))
    with pytest.raises(AssertionError, match="fail max_rel<=0.0001"):
        h.assert_ok()


def test_parity_refuses_other_weights_up_front(tiny_model, exported, tmp_path, capsys):
    """The manifest records the weights the graphs were made from; parity against another checkpoint
    is refused with that reason before any graph runs (the CLI too); the right one is accepted."""
    import copy

    from hiwin_export.cli import main
    from hiwin_export.manifest import weights_sha256
    from hiwin_export.parity import ParityError
    from hiwin_model.tiny import build_tiny_model

    want = json.loads((exported / "manifest.json").read_text())["source"]["weights_sha256"]
    assert want == weights_sha256(tiny_model)
    m = copy.deepcopy(tiny_model)
    assert weights_sha256(m.to(torch.float64)) == want  # the values, not the dtype they are held in
    with torch.no_grad():  # one value changed is another checkpoint
        next(iter(m.parameters())).view(-1)[0] += 1.0
    assert weights_sha256(m) != want
    other = build_tiny_model(seed=5)
    with pytest.raises(ParityError, match="made from other weights"):
        Harness(other, exported)
    Harness(tiny_model, exported)  # the same weights: accepted
    other.save_pretrained(tmp_path / "other")
    assert main(["parity", "--export", str(exported), "--model", str(tmp_path / "other"), "--quick"]) == 2
    err = capsys.readouterr().err
    assert "made from other weights" in err and "FAILED" not in err
    assert not (exported / "reports" / "other").exists()


def test_tampered_or_missing_files(exported, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    with open(bad / "hiwin.weights", "r+b") as f:
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(ExportError, match="hiwin.weights was modified"):
        ExportDir(bad)
    (bad / "jbu.onnx").unlink()
    with pytest.raises(ExportError, match="jbu.onnx is missing"):
        ExportDir(bad)
    with pytest.raises(ExportError, match="no manifest.json"):
        ExportDir(tmp_path)


@pytest.mark.parametrize("graph,feeds,match", [
    ("vit", {"pixel_values": np.zeros((1, 3, 30, 28), np.float32)}, "multiple of the 14-px patch size"),
    ("vit", {"pixel_values": np.zeros((3, 28, 28), np.float32)}, "must have rank 4"),
    ("vit", {"pixel_values": np.zeros((1, 3, 28, 28), np.float64)}, "must be float32"),
    ("vit", {"pixel_values": np.zeros((1, 3, 14, 28), np.float32)}, "outside the exported range"),
    ("vit", {"pixel_values": np.zeros((1, 3, 14 * 289, 28), np.float32)}, "outside the exported range"),
    ("vit", {"pixels": np.zeros((1, 3, 28, 28), np.float32)}, "inputs are"),
    ("jbu", {"features": np.zeros((1, 32, 2, 3), np.float32), "pixel_values": np.zeros((1, 3, 28, 28), np.float32)},
     "inconsistent sizes"),
    ("hiwin", {"feat1x": np.zeros((1, 32, 2, 2), np.float32), "feat2x": np.zeros((1, 32, 4, 4), np.float32),
                   "feat4x": np.zeros((1, 31, 8, 8), np.float32)}, "axis 1 must be 32"),
])
def test_bad_inputs_are_clear_errors(exported, graph, feeds, match):
    runner = OnnxRunner(ExportDir(exported))
    with pytest.raises(ExportError, match=match):
        runner.run(graph, feeds)
    out = runner.run("vit", {"pixel_values": np.zeros((1, 3, 28, 28), np.float32)})  # still usable
    assert out["features"].shape == (1, 32, 2, 2)


def test_export_is_atomic(tiny_model, exported, tmp_path, monkeypatch):
    target = tmp_path / "x"
    shutil.copytree(exported, target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    with pytest.raises(FileExistsError):
        export_model(tiny_model, target, graphs=["vit"])
    calls = []

    def fail_second(spec, model):
        calls.append(spec.name)
        if len(calls) == 2:
            raise RuntimeError("exporter crashed")
        return real(spec, model)

    real = export_mod.export_graph
    monkeypatch.setattr(export_mod, "export_graph", fail_second)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_model(tiny_model, target, overwrite=True, graphs=["vit", "jbu"], parity=None)
    after = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    assert after == before  # no mix of old and new files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_cli_export_and_parity(tiny_dir, tmp_path, capsys):
    from hiwin_export.cli import main

    out = tmp_path / "e"
    assert main(["export", "--model", str(tiny_dir), "--out", str(out), "--graphs", "vit,hiwin"]) == 0
    mf = json.loads((out / "manifest.json").read_text())
    assert mf["parity"]["fp32"]["level"] == "subset"
    assert set(mf["parity"]["fp16"]) - {"level"} == {"vit", "hiwin"}
    assert main(["export", "--model", str(tiny_dir), "--out", str(out), "--graphs", "vit"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    # parity on the subset: the harness refuses graphs the directory lacks
    assert main(["parity", "--model", str(tiny_dir), "--export", str(out), "--quick"]) == 2
    assert "no graph 'jbu'" in capsys.readouterr().err


def test_roialign_onnx_matches_torchvision_semantics_on_degenerate_boxes():
    """ONNX Runtime's RoiAlign vs our op, in isolation, on border and sub-pixel windows."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from hiwin_model.projector import window_boxes
    from hiwin_model.roi_align import roi_align

    node = helper.make_node("RoiAlign", ["X", "rois", "bi"], ["Y"], mode="avg", output_height=3, output_width=4,
                            sampling_ratio=0, spatial_scale=1.0, coordinate_transformation_mode="output_half_pixel")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, None),
                                        helper.make_tensor_value_info("rois", TensorProto.FLOAT, None),
                                        helper.make_tensor_value_info("bi", TensorProto.INT64, None)],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
    sess = ort.InferenceSession(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    for h, w in [(2, 2), (2, 9), (5, 5), (19, 29), (96, 84)]:
        x = torch.randn(1, 6, h, w)
        b = torch.cat([window_boxes(h, w), torch.tensor([[0.0, 0.0, w, h], [w - 0.2, h - 0.2, w + 0.5, h + 0.5]])])
        ref = roi_align(x, b, (3, 4)).numpy()
        out = sess.run(None, {"X": x.numpy(), "rois": b.numpy(), "bi": np.zeros(len(b), np.int64)})[0]
        assert error_stats(ref, out)[1] < 1e-5, (h, w)


def test_export_with_failing_parity_writes_nothing(tiny_model, tmp_path, monkeypatch):
    """Graphs that do not match the reference (here: exported from other weights) abort the export."""
    from hiwin_export.parity import ParityError
    from hiwin_model.tiny import build_tiny_model

    other = build_tiny_model(seed=5)
    real = export_mod.export_graph
    monkeypatch.setattr(export_mod, "export_graph", lambda spec, model: real(spec, other))
    with pytest.raises(ParityError, match="fail max_rel"):
        export_model(tiny_model, tmp_path / "out", graphs=["vit"], bundles=False)
    assert list(tmp_path.iterdir()) == []


def test_bench_workers_and_table(exported):
    """The benchmark's three backends and its table (tiny dims; the real run is `hiwin-export bench`)."""
    import argparse

    from hiwin_export.bench import BACKENDS, format_table, worker

    res = {b: worker(b, str(exported), [(500, 300)], 1, True, 9) for b in BACKENDS}
    flops, fast = res["torch"]["flops"]["500x300"], res["torch-fast"]["flops"]["500x300"]
    assert flops["vit"] == fast["vit"] > 0 and fast["hiwin"] > 0 and fast["hiwin"] != flops["hiwin"]
    assert res["ort"]["projector_impl"] == "fast"
    rep = format_table(res, 100.0, argparse.Namespace(tiny=True, repeats=1))
    table = rep.markdown()
    assert "| 500x300 (3 crops) | **whole path** |" in table and "peak RSS" in table
    whole = [r for r in rep.to_json()["rows"] if r["stage"] == "**whole path**"]
    assert len(whole) == 1 and whole[0]["gflop"] > 0 and whole[0]["gflop_fast"] > 0 and whole[0]["ref_s"] > 0
