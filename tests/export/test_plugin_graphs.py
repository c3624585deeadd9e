"""The tensorrt flavour of the export (TensorRT plugin nodes) and its parity without TensorRT (tiny model).

The plugin graphs run on ``onnx.reference.ReferenceEvaluator`` with the plugin nodes on the plugins' own
CPU launchers (hiwin_export.plugin_lib, built with CMake on first use), compared with the faithful
PyTorch reference like every other graph.
"""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from hiwin_export.export import export_model
from hiwin_export.manifest import ExportDir, ExportError, sha256
from hiwin_export.parity import REFERENCE_QUICK_GRIDS, Harness, OnnxRunner, ParityError
from hiwin_export import plugin_graphs as pg
from hiwin_runtime.buckets import HIWIN_BUCKETS

PLUGINS_SRC = Path(__file__).resolve().parents[2] / "engines" / "plugins"
# odd and minimum crops (h, w patches) beyond the export's own quick set
ODD_GRIDS = ((2, 2), (3, 5), (7, 4), (5, 9))


@pytest.fixture(scope="module")
def trt_export(tiny_model, tmp_path_factory):
    """vit, jbu and the fast projector in the tensorrt flavour, fp32 + fp16, with the built-in quick parity."""
    out = tmp_path_factory.mktemp("trt") / "export"
    export_model(tiny_model, out, graphs=["vit", "jbu", "hiwin"], flavour="tensorrt", bundles=False)
    return out


@pytest.fixture(scope="module")
def trt_faithful(tiny_model, tmp_path_factory):
    """One faithful projector bucket graph (HiwinRoiAlign), fp32 + fp16, with bundles and parity."""
    out = tmp_path_factory.mktemp("trt-faithful") / "export"
    export_model(tiny_model, out, graphs=["hiwin_3x3"], projector_impl="faithful", flavour="tensorrt")
    return out


def _load(d: Path, name: str) -> onnx.ModelProto:
    return onnx.load(str(d / f"{name}.onnx"), load_external_data=False)


def _creator_fields() -> dict[str, dict[str, int]]:
    """plugin name -> {field: ONNX attribute type} as the C++ creators declare them (getFieldNames)."""
    kind = {"kINT32": onnx.AttributeProto.INT, "kFLOAT32": onnx.AttributeProto.FLOAT, "kCHAR": onnx.AttributeProto.STRING}
    out = {}
    for folder in ("jbuConv", "roiAlign"):
        header = next((PLUGINS_SRC / folder).glob("hiwin*Plugin.h")).read_text()
        name = re.search(r'PLUGIN_NAME = "(\w+)"', header).group(1)
        src = next((PLUGINS_SRC / folder).glob("hiwin*Plugin.cpp")).read_text()
        out[name] = {f: kind[t] for f, t in re.findall(r'mFieldNames\.add\("(\w+)", nullptr, PluginFieldType::(\w+)', src)}
    return out


def test_manifest_records_the_flavour_and_plugins(trt_export, trt_faithful):
    mf = json.loads((trt_export / "manifest.json").read_text())
    assert mf["flavour"] == "tensorrt" and mf["manifest_version"] == 2
    assert sorted(mf["graphs"]) == ["hiwin", "hiwin.fp16", "jbu", "jbu.fp16", "vit", "vit.fp16"]
    assert {g: e["plugins"] for g, e in mf["graphs"].items()} == {
        "vit": [], "vit.fp16": [], "jbu": ["HiwinJbuConv"], "jbu.fp16": ["HiwinJbuConv"], "hiwin": [], "hiwin.fp16": []}
    mf3 = json.loads((trt_faithful / "manifest.json").read_text())
    assert {g: e["plugins"] for g, e in mf3["graphs"].items()} == {
        "hiwin_3x3": ["HiwinRoiAlign"], "hiwin_3x3.fp16": ["HiwinRoiAlign"]}
    # the export's built-in parity ran on the reference executor, every graph and the whole path in bound
    assert mf["parity"]["executor"] == "reference"
    p32, p16 = mf["parity"]["fp32"], mf["parity"]["fp16"]
    assert all(p32[g]["ok"] and p32[g]["worst_max_rel"] <= 1e-4 for g in ("vit", "jbu", "hiwin", "vision-path"))
    assert all(p16[g]["ok"] and p16[g]["min_cosine"] >= 0.999 for g in ("vit", "jbu", "hiwin", "vision-path"))
    assert mf3["parity"]["fp32"]["hiwin_3x3"]["ok"] and mf3["parity"]["fp16"]["hiwin_3x3"]["ok"]
    report = json.loads((trt_export / "reports" / "parity.json").read_text())
    assert report["executor"] == "reference" and report["flavour"] == "tensorrt"
    cases = {r["case"] for r in report["records"] if r["graph"] == "jbu"}
    assert len(cases) >= len(REFERENCE_QUICK_GRIDS)


def test_plugin_nodes_are_what_the_creators_expect(trt_export, trt_faithful):
    fields = _creator_fields()
    assert set(fields) == set(pg.PLUGIN_OPS)
    base = (PLUGINS_SRC / "common" / "pluginBase.h").read_text()
    assert f'kPLUGIN_VERSION = "{pg.PLUGIN_VERSION}"' in base and f'kPLUGIN_NAMESPACE = "{pg.PLUGIN_NAMESPACE}"' in base
    for d, name, op, count in ((trt_export, "jbu", "HiwinJbuConv", 2), (trt_faithful, "hiwin_3x3", "HiwinRoiAlign", 6)):
        for suffix in ("", ".fp16"):
            m = _load(d, name + suffix)
            nodes = pg.plugin_nodes(m.graph)
            assert len(nodes) == count and {n.op_type for n in nodes} == {op}, name + suffix
            assert dict((o.domain, o.version) for o in m.opset_import)["hiwin"] == 1
            for n in nodes:
                assert n.domain == "hiwin" and len(n.input) == len(pg.PLUGIN_INPUTS[op]) and len(n.output) == 1
                types = {a.name: a.type for a in n.attribute}
                assert types == {**fields[op], "plugin_version": onnx.AttributeProto.STRING,
                                 "plugin_namespace": onnx.AttributeProto.STRING}
                a = pg.node_attributes(n)
                assert (a["plugin_version"], a["plugin_namespace"]) == ("1", "")
                if op == "HiwinJbuConv":
                    assert a["radius"] == 3
                else:  # exactly RoiAlign's attributes in the onnx flavour
                    assert {k: a[k] for k in fields[op]} == {
                        "mode": "avg", "coordinate_transformation_mode": "output_half_pixel", "sampling_ratio": 0,
                        "spatial_scale": 1.0, "output_height": 3, "output_width": 3}
    for name in ("vit", "hiwin", "vit.fp16", "hiwin.fp16"):  # nothing there needs a plugin
        m = _load(trt_export, name)
        assert not pg.plugin_nodes(m.graph) and "RoiAlign" not in {n.op_type for n in m.graph.node}
    # no RoiAlign left beside the plugin, and no adaptive-convolution or kernel ops left in the JBU
    assert "RoiAlign" not in {n.op_type for n in _load(trt_faithful, "hiwin_3x3").graph.node}
    from hiwin_export.precision import _shape_derived_nodes

    g = _load(trt_export, "jbu").graph
    const = set(_shape_derived_nodes(g))  # (pooling and bicubic matrices from the shapes)
    data_ops = [n.op_type for n in g.node if n.name not in const]
    # on the data: the resampling MatMuls, the range projections (Conv, GELU), the stack's fixup, the plugins;
    # no padding, taps, gathers, softmax or exp of the kernel computation
    assert set(data_ops) <= {"MatMul", "Conv", "Erf", "Mul", "Add", "Div", "Shape", "HiwinJbuConv"}, data_ops
    assert data_ops.count("Conv") == 5  # 2 range-projection convs per layer + the stack's fixup
    fixup = {i.name for i in g.initializer if ".fixup_proj." in i.name and i.name.startswith(("jbu.up1", "jbu.up2"))}
    assert len(fixup) == 8 and all(n.op_type == "HiwinJbuConv" for n in g.node if fixup & set(n.input))


def test_plugin_graphs_pass_the_checker(trt_export, trt_faithful):
    for d in (trt_export, trt_faithful):
        for name in json.loads((d / "manifest.json").read_text())["graphs"]:
            onnx.checker.check_model(str(d / f"{name}.onnx"), full_check=True)
    # the custom domain is what makes the checker accept the nodes: in the default domain it refuses them
    m = onnx.load(str(trt_export / "jbu.onnx"))  # with its weights: checked in memory
    for n in pg.plugin_nodes(m.graph):
        n.domain = ""
    with pytest.raises(onnx.checker.ValidationError, match="HiwinJbuConv"):
        onnx.checker.check_model(m)


def test_fp16_plugin_io(trt_export, trt_faithful):
    """fp16 graphs: the JBU plugin takes fp16 data and fp32 parameters; HiwinRoiAlign stays fp32."""
    seen = []

    class HiwinJbuConv(pg.HiwinJbuConv):  # records what the plugin node receives
        def _run(self, *inputs, **attrs):
            seen.append([x.dtype.name for x in inputs])
            out = super()._run(*inputs, **attrs)
            seen[-1].append(out[0].dtype.name)
            return out

    class HiwinRoiAlign(pg.HiwinRoiAlign):
        def _run(self, X, rois, batch_indices, **attrs):
            seen.append([X.dtype.name, rois.dtype.name, batch_indices.dtype.name])
            return super()._run(X, rois, batch_indices, **attrs)

    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(0)
    ev = ReferenceEvaluator(onnx.load(str(trt_export / "jbu.fp16.onnx")), new_ops=[HiwinJbuConv, HiwinRoiAlign])
    ev.run(None, {"features": rng.standard_normal((1, 32, 3, 2), np.float32),
                  "pixel_values": rng.standard_normal((1, 3, 42, 28), np.float32)})
    assert seen == [["float16"] * 3 + ["float32"] * 6 + ["float16"]] * 2
    seen.clear()
    ev = ReferenceEvaluator(onnx.load(str(trt_faithful / "hiwin_3x3.fp16.onnx")), new_ops=[HiwinJbuConv, HiwinRoiAlign])
    ev.run(None, {f"feat{s}x": rng.standard_normal((1, 32, 2 * s, 2 * s), np.float32) for s in (1, 2, 4)})
    assert seen == [["float32", "float32", "int64"]] * 6


def test_reference_parity_on_odd_crops(tiny_model, trt_export, trt_faithful):
    """Random crops of several shapes (the 2-patch minimum, odd shapes), batch 2, per graph."""
    h = Harness(tiny_model, trt_export)
    assert h.executor == "reference" and isinstance(h.runner, pg.ReferenceRunner)
    h.graph_cases("jbu", ODD_GRIDS)
    h.graph_cases("hiwin", ODD_GRIDS)
    h3 = Harness(tiny_model, trt_faithful)
    h3.graph_cases("hiwin_3x3", ((2, 2), (5, 5), (3, 3), (4, 5)))
    for harness, graphs in ((h, {"jbu", "hiwin"}), (h3, {"hiwin_3x3"})):
        s = harness.summary()
        assert set(s) == graphs
        harness.assert_ok()
        assert all(v["worst_max_rel"] <= 1e-4 and v["min_cosine"] > 0.99999 for v in s.values())
    assert len([r for r in h.records if r.graph == "jbu"]) == 2 * len(ODD_GRIDS)  # feat2x and feat4x per crop
    assert len(h3.records) == 3  # the grids of bucket 3x3 among them


def test_negative_control_a_wrong_plugin_input_fails(tiny_model, trt_export, tmp_path):
    """The same graph with one plugin input changed (range_temp + 0.25 on the first JBU layer) fails."""
    bad = tmp_path / "bad"
    shutil.copytree(trt_export, bad)
    m = onnx.load(str(bad / "jbu.onnx"), load_external_data=False)
    first = pg.plugin_nodes(m.graph)[0]
    shift = onnx.helper.make_tensor("range_temp_shift", onnx.TensorProto.FLOAT, [1], [0.25])
    m.graph.initializer.append(shift)
    m.graph.node.insert(0, onnx.helper.make_node("Add", [first.input[3], "range_temp_shift"], ["range_temp_shifted"]))
    first.input[3] = "range_temp_shifted"
    from hiwin_export.precision import _toposort

    _toposort(m.graph)
    onnx.save(m, str(bad / "jbu.onnx"))  # the weights stay in jbu.weights
    mf = json.loads((bad / "manifest.json").read_text())
    mf["graphs"]["jbu"]["sha256"] = sha256(bad / "jbu.onnx")
    (bad / "manifest.json").write_text(json.dumps(mf))
    h = Harness(tiny_model, bad)
    h.graph_cases("jbu", ((3, 5),))
    with pytest.raises(ParityError, match="fail max_rel<=0.0001"):
        h.assert_ok()
    assert all(not r.ok and r.max_rel > 1e-3 for r in h.records)  # feat2x directly, feat4x through it


def test_onnx_runtime_refuses_the_flavour(tiny_model, trt_export, tmp_path):
    export = ExportDir(trt_export)
    assert export.flavour == "tensorrt" and export.plugins("jbu") == ["HiwinJbuConv"]
    msg = r"'tensorrt'-flavour export.*HiwinJbuConv.*ONNX Runtime cannot run.*TensorRT engines.*--flavour onnx"
    with pytest.raises(ExportError, match=msg):
        OnnxRunner(export)
    with pytest.raises(ExportError, match=msg):
        Harness(tiny_model, trt_export, executor="onnxruntime")
    with pytest.raises(ValueError, match="unknown executor"):
        Harness(tiny_model, trt_export, executor="tensorrt")
    # a manifest without "flavour" (written before flavours existed) is the onnx flavour; an unknown one is refused
    old = tmp_path / "old"
    shutil.copytree(trt_export, old)
    mf = json.loads((old / "manifest.json").read_text())
    del mf["flavour"]
    (old / "manifest.json").write_text(json.dumps(mf))
    assert ExportDir(old).flavour == "onnx"
    mf["flavour"] = "tflite"
    (old / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(ExportError, match="unknown flavour 'tflite'"):
        ExportDir(old)


def test_eager_plugin_path_equals_taps(tiny_model):
    """conv="plugin" (the custom op hiwin::jbu_conv, eager) computes the reference taps exactly, and the
    plugin's CPU launcher agrees with it."""
    from hiwin_export import plugin_lib
    from hiwin_model.jbu import JBULayer, bicubic_resize, jbu_conv

    torch.manual_seed(0)
    layer = JBULayer(16).eval()
    with torch.no_grad():
        layer.range_temp.fill_(0.7)
        layer.sigma_spatial.fill_(0.8)
        for p in layer.fixup_proj.parameters():
            p.mul_(3)
    for (h, w), b in (((2, 2), 2), ((3, 5), 1), ((7, 4), 3)):
        src, guid = torch.randn(b, 16, h, w), torch.randn(b, 3, 2 * h, 2 * w)
        with torch.no_grad():
            taps, plug = layer(src, guid, conv="taps"), layer(src, guid, conv="plugin")
            assert torch.equal(taps, plug), (h, w)
            hr, q = bicubic_resize(src, (2 * h, 2 * w)), layer.range_proj(guid)
            f0, f3 = layer.fixup_proj[0], layer.fixup_proj[3]
            args = (layer.range_temp, layer.sigma_spatial, f0.weight, f0.bias, f3.weight, f3.bias)
            cpu = plugin_lib.jbu_conv(hr.numpy(), q.numpy(), guid.numpy(), *(t.detach().numpy() for t in args), radius=3)
        assert np.abs(cpu - taps.numpy()).max() <= 1e-5 * np.abs(taps.numpy()).max()
    with torch.no_grad():  # the whole stack of the tiny model
        f, pix = torch.randn(2, 32, 3, 5), torch.randn(2, 3, 42, 70)
        for a, b in zip(tiny_model.jbu(f, pix, conv="taps"), tiny_model.jbu(f, pix, conv="plugin")):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match="inference form"):
        layer.train()(src, guid, conv="plugin")
    # the custom op: schema, fake (meta) implementation and autograd registration
    layer.eval()
    hr = torch.randn(1, 4, 5, 6, requires_grad=True)
    q, g = torch.randn(1, 8, 5, 6), torch.randn(1, 3, 5, 6)
    f0, f3 = layer.fixup_proj[0], layer.fixup_proj[3]
    torch.library.opcheck(torch.ops.hiwin.jbu_conv.default,
                          (hr, q, g, layer.range_temp.detach().reshape(1), layer.sigma_spatial.detach().reshape(1),
                           f0.weight.detach(), f0.bias.detach(), f3.weight.detach(), f3.bias.detach(), 3),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    y = jbu_conv(hr, q, g, layer.range_temp, layer.sigma_spatial, f0.weight, f0.bias, f3.weight, f3.bias, 3)
    y.sum().backward()
    assert hr.grad is not None and layer.range_temp.grad is not None


def test_bundles_of_plugin_graphs_name_the_plugin_library(trt_faithful):
    mf = json.loads((trt_faithful / "manifest.json").read_text())
    assert mf["bundles"]["hiwin_3x3"]
    for d in mf["bundles"]["hiwin_3x3"]:
        info = json.loads((trt_faithful / d / "bundle.json").read_text())
        assert info["onnxrt_command"] is None and info["plugins"] == ["HiwinRoiAlign"]
        assert " --trt " in info["trt_command"] and "--plugins libhiwin_plugins.so" in info["trt_command"]


def test_cli_export_flavour(tiny_dir, tmp_path, monkeypatch):
    from hiwin_export import cli, export

    seen = {}

    def fake_export(model, out, **kw):
        seen.update(kw)
        return {"graphs": {"jbu": {}}, "opset": 18, "flavour": kw["flavour"]}

    monkeypatch.setattr(export, "export_model", fake_export)
    monkeypatch.setattr(cli, "_model", lambda path: None)
    assert cli.main(["export", "--out", str(tmp_path / "e"), "--flavour", "tensorrt", "--graphs", "jbu"]) == 0
    assert seen["flavour"] == "tensorrt" and seen["graphs"] == ["jbu"]
    assert cli.build_parser().parse_args(["export", "--out", "x"]).flavour == "onnx"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["export", "--out", "x", "--flavour", "tflite"])


def test_every_bucket_in_the_quick_reference_set():
    from hiwin_runtime.buckets import sampling_grid

    assert {sampling_grid(w, h) for h, w in REFERENCE_QUICK_GRIDS} == set(HIWIN_BUCKETS)
    assert min(min(g) for g in REFERENCE_QUICK_GRIDS) == 2
