"""int8 (ONNX Runtime QDQ) vision graphs: calibrated through the crop chain on some pages, checked
on others (held out) against the PyTorch reference, listed in the manifest with their provenance."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from hiwin_export.parity import Harness, ParityError
from hiwin_export.quantize import OP_TYPES, quantize_int8
from hiwin_model.synthetic import parity_pages
from hiwin_runtime.graph_id import GraphId
from hiwin_runtime.manifest import ExportDir, ExportError
from hiwin_runtime.ort import OnnxRunner

CALIBRATION = ((1008, 672), (800, 800), (672, 1008))
HELD_OUT = ((1344, 336), (500, 300), (336, 1344), (1024, 768))


@pytest.fixture(scope="module")
def quantized(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8") / "export"
    shutil.copytree(exported, out)
    entries = quantize_int8(out, parity_pages(CALIBRATION))
    return out, entries


def test_int8_graphs_are_listed_with_provenance(quantized):
    out, entries = quantized
    assert sorted(entries) == ["hiwin.int8", "jbu.int8", "vit.int8"]
    export = ExportDir(out)  # every file, old and new, matches its sha256
    mf = json.loads((out / "manifest.json").read_text())
    for name in entries:
        gid = GraphId.parse(name)
        e = mf["graphs"][name]
        assert e["precision"] == "int8" and e["file"] == gid.file and gid.weights_file in mf["weights"]
        p = e["provenance"]
        assert p["calibration_samples"] > 0 and len(p["calibration_sha256"]) == 64 and p["op_types"] == list(OP_TYPES)
        m = onnx.load(str(export.graph_path(gid)), load_external_data=False)
        ops = {n.op_type for n in m.graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops, name
    assert "vit" in mf["graphs"] and "vit.fp16" in mf["graphs"]  # the other graphs stay


def test_int8_parity_on_held_out_pages(tiny_model, quantized):
    out, _ = quantized
    h = Harness(tiny_model, out, precision="int8")
    h.image_cases(parity_pages(HELD_OUT))
    s = h.summary()
    assert set(s) == {"vit", "jbu", "hiwin", "vision-path"}
    h.assert_ok()  # cosine >= 0.99 per graph and for the visual tokens
    assert s["vision-path"]["min_cosine"] >= 0.99
    # the check can fail: int8 is far from the fp32 bound
    strict = Harness(tiny_model, out, precision="int8")
    strict._ok = lambda max_rel, cosine, finite: max_rel <= 1e-4
    strict.image_cases(parity_pages(HELD_OUT[:1]))
    with pytest.raises(ParityError):
        strict.assert_ok()


def test_int8_stages_run_through_the_runtime(quantized):
    out, _ = quantized
    stages = OnnxRunner(ExportDir(out)).vision_stages("int8")
    f = stages.vit(np.zeros((1, 3, 28, 42), np.float32))
    assert f.shape[-2:] == (2, 3) and np.isfinite(f).all()


def test_refusals(tmp_path, exported):
    with pytest.raises(ValueError, match="at least one image"):
        quantize_int8(exported, [])
    with pytest.raises(ValueError, match="unknown graph family"):
        quantize_int8(exported, parity_pages(CALIBRATION[:1]), families=("vit", "hiwin_3x3"))
    out = tmp_path / "e"
    shutil.copytree(exported, out)
    mf = json.loads((out / "manifest.json").read_text())
    del mf["graphs"]["jbu"]  # an export without the fp32 JBU graph
    (out / "manifest.json").write_text(json.dumps(mf))
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(ExportError, match="no fp32 graph for \\['jbu'\\]"):
        quantize_int8(out, parity_pages(CALIBRATION[:1]))
    mf["flavour"] = "tensorrt"
    (out / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(ExportError, match="int8 graphs are for ONNX Runtime"):
        quantize_int8(out, parity_pages(CALIBRATION[:1]))
    assert not list(out.glob("*.int8.*")) and "jbu.int8" not in json.loads(before)["graphs"]


def test_cli_quantize_and_int8_parity(exported, tiny_dir, tmp_path, capsys):
    from hiwin_export.cli import main

    out = tmp_path / "e"
    shutil.copytree(exported, out)
    pages = []
    for i, page in enumerate(parity_pages(CALIBRATION[:2])):
        pages.append(str(tmp_path / f"page{i}.png"))
        page.save(pages[-1])
    assert main(["quantize", "--export", str(out), "--families", "vit", "--images", *pages]) == 0
    assert "vit.int8.onnx" in capsys.readouterr().out
    assert main(["parity", "--model", str(tiny_dir), "--export", str(out), "--precision", "int8",
                 "--quick"]) == 2  # jbu/hiwin int8 missing
    assert "no graph 'jbu.int8'" in capsys.readouterr().err


def test_attention_products_stay_fp32_on_onnx_runtime_only():
    """MatMuls of two activations (scores, probabilities x values) are left out of ONNX Runtime's int8
    placement; MatMuls with a weight operand are quantised; ModelOpt's placement keeps its own rule."""
    from onnx import TensorProto, helper, numpy_helper

    from hiwin_export.quantize import exclusions

    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["q"], name="proj"),
             helper.make_node("Transpose", ["q"], ["qt"], name="t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "qt"], ["s"], name="scores"),
             helper.make_node("Softmax", ["s"], ["p"], name="softmax", axis=-1),
             helper.make_node("MatMul", ["p", "q"], ["y"], name="mix")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])], [w])
    m = helper.make_model(g)
    ex = exclusions(m, "vit")
    assert ex["attention products"] == ["scores", "mix"] and ex["Softmax"] == ["softmax"]
    assert "proj" not in {n for v in ex.values() for n in v}
    assert "attention products" not in exclusions(m, "vit", "modelopt")
