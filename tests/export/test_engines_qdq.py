"""TensorRT engine sets from ModelOpt Q/DQ graphs (``--precision int8trt | fp8trt``): which graphs the
builder gets, strong typing without precision flags, the refusals, the provenance in ``engines.json``,
verify-engines against the fp32 reference with parity's cosine bounds, the runtime and the trtexec
script. TensorRT and CUDA are the test doubles of ``tests/trt_fakes.py`` (they run the Q/DQ graphs with
ONNX Runtime); nothing here runs TensorRT.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hiwin_export import engines as E
from hiwin_runtime.manifest import ExportError
from hiwin_runtime.trt import read_engine_set
from trt_fakes import FakeCuda, add_qdq_graphs, call_names, make_fake_trt, write_synthetic_export

A100 = ("NVIDIA A100-SXM4-80GB", (8, 0))
ORIN = ("NVIDIA Jetson AGX Orin", (8, 7))


@pytest.fixture(scope="module")
def synth_q(tmp_path_factory):
    exp = write_synthetic_export(tmp_path_factory.mktemp("synthq") / "export", precisions=("fp32", "fp16"))
    add_qdq_graphs(exp, "int8")
    return add_qdq_graphs(exp, "fp8")


def _parsed(trt):
    return [c for c in trt.calls if c[0] == "parsed"]


def test_int8trt_orin_tensorrt_10_builds_the_qdq_graphs_strongly_typed(synth_q, tmp_path):
    cuda = FakeCuda(*ORIN)
    trt = make_fake_trt("10.3.0", cuda)
    info = E.build_engines(synth_q, tmp_path / "eng", E.EngineOptions(target="orin", precision="int8trt"),
                           trt=trt, cuda=cuda)
    # the parser got the Q/DQ graphs (int8 zero points), nothing else
    parsed = _parsed(trt)
    assert [Path(c[1]).name for c in parsed] == ["hiwin.int8trt.onnx", "jbu.int8trt.onnx", "vit.int8trt.onnx"]
    assert [c[2] for c in parsed] == [4, 2, 4] and {t for c in parsed for t in c[3]} == {"INT8"}
    # strongly typed (TensorRT 10: the creation flag), no INT8 / FP16 builder flag, no calibrator
    assert [c[1] for c in trt.calls if c[0] == "create_network"] == [1 << 0] * 3
    assert "set_flag" not in call_names(trt) and not any("calib" in n.lower() for n in call_names(trt))
    mf = json.loads((synth_q / "manifest.json").read_text())
    assert info == read_engine_set(tmp_path / "eng")
    assert info["precision"] == "int8trt" and set(info["engines"]) == {"vit.int8trt", "jbu.int8trt", "hiwin.int8trt"}
    assert info["tensorrt"]["strongly_typed"] and info["gpu"]["compute_capability"] == [8, 7]
    q = info["quantization"]
    assert q["mode"] == "int8" and "Q/DQ" in q["scheme"] and "no INT8/FP8 builder flag" in q["scheme"]
    for name, e in info["engines"].items():
        prov = mf["graphs"][name]["provenance"]
        assert e["precision"] == "int8trt" and e["source"]["sha256"] == mf["graphs"][name]["sha256"]
        assert e["provenance"] == q["graphs"][name]
        assert e["provenance"]["backend"] == "modelopt" and e["provenance"]["mode"] == "int8"
        assert e["provenance"]["calibration_sha256"] == prov["calibration_sha256"]
        assert e["provenance"]["qdq_pairs"] == prov["qdq_pairs"] and "policy" not in e["provenance"]
    assert info["plugins"] == {"required": False, "ops": []}  # onnx flavour: TensorRT's own ops
    # fp32 / fp16 sets record no quantisation
    fp16 = E.build_engines(synth_q, tmp_path / "e16", E.EngineOptions(target="orin", precision="fp16"),
                           trt=make_fake_trt("10.3.0", cuda), cuda=cuda)
    assert fp16["quantization"] is None and fp16["engines"]["vit.fp16"]["provenance"] is None


def test_fp8trt_h100_tensorrt_11(synth_q, tmp_path):
    cuda = FakeCuda()
    trt = make_fake_trt("11.1.0", cuda)
    info = E.build_engines(synth_q, tmp_path / "eng", E.EngineOptions(target="h100", precision="fp8trt"),
                           trt=trt, cuda=cuda)
    parsed = _parsed(trt)
    assert {Path(c[1]).name for c in parsed} == {"vit.fp8trt.onnx", "jbu.fp8trt.onnx", "hiwin.fp8trt.onnx"}
    assert {t for c in parsed for t in c[3]} == {"FLOAT8E4M3FN"}
    assert [c[1] for c in trt.calls if c[0] == "create_network"] == [0, 0, 0]  # TensorRT 11: always strongly typed
    assert "set_flag" not in call_names(trt)
    assert info["quantization"]["mode"] == "fp8" and info["engines"]["vit.fp8trt"]["provenance"]["mode"] == "fp8"
    res = E.verify_engines(synth_q, tmp_path / "eng", trt=trt, cuda=cuda)
    assert len(res) == 9 and all(r.passed for r in res), [r.line() for r in res]
    assert {o["bound"] for r in res for o in r.outputs.values()} == {"cosine>=0.995"}


def test_refusals(synth_q, tmp_path, monkeypatch, capsys):
    for target in ("a100", "orin"):  # no FP8 tensor cores: refused before anything is built, naming the target
        with pytest.raises(ValueError, match=rf"fp8trt: target {target} \(NVIDIA [^)]*sm_8[07]\) has no FP8 tensor"):
            E.EngineOptions(target=target, precision="fp8trt")
    with pytest.raises(ValueError, match="ONNX Runtime's CPU placement.*int8trt"):
        E.EngineOptions(target="a100", precision="int8")
    with pytest.raises(ValueError, match="precision must be one of"):
        E.EngineOptions(precision="int4")
    # an export without the precision: the command that makes it
    plain = write_synthetic_export(tmp_path / "plain", bundles=())
    trt, cuda = make_fake_trt("10.3.0", FakeCuda(*A100)), FakeCuda(*A100)
    with pytest.raises(ExportError, match="no int8trt vision graphs; make them first: hiwin-export quantize .*"
                                          "--backend modelopt --mode int8"):
        E.build_engines(plain, tmp_path / "x", E.EngineOptions(target="a100", precision="int8trt"), trt=trt, cuda=cuda)
    # only part of the vision path quantised
    part = tmp_path / "part"
    shutil.copytree(synth_q, part)
    mf = json.loads((part / "manifest.json").read_text())
    del mf["graphs"]["jbu.int8trt"]
    mf["graphs"]["hiwin.int8trt"]["provenance"]["backend"] = "ort"
    (part / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(ExportError, match="int8trt vision path needs jbu as well.*quantize"):
        E.engine_plans(E.ExportDir(part), E.EngineOptions(target="a100", precision="int8trt"))
    mf["graphs"]["jbu.int8trt"] = json.loads((synth_q / "manifest.json").read_text())["graphs"]["jbu.int8trt"]
    (part / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(ExportError, match="hiwin.int8trt.onnx is not a ModelOpt int8 Q/DQ graph"):
        E.engine_plans(E.ExportDir(part), E.EngineOptions(target="a100", precision="int8trt"))
    # a plugin-flavour export has no quantised graphs: build from the onnx flavour
    plug = write_synthetic_export(tmp_path / "plug", plugin_jbu=True, bundles=())
    with pytest.raises(ExportError, match="'tensorrt'-flavour export has no int8trt graphs.*onnx-flavour"):
        E.emit_trtexec(plug, tmp_path / "e", E.EngineOptions(target="a100", precision="int8trt"), tmp_path / "s.sh")
    assert not (tmp_path / "x").exists() and not (tmp_path / "s.sh").exists()
    # the CLI: one line, exit 2
    from hiwin_export import cli

    rc = cli.main(["engines", "--export", str(synth_q), "--out", str(tmp_path / "o"), "--target", "orin",
                   "--precision", "fp8trt", "--emit-trtexec", str(tmp_path / "o.sh")])
    assert rc == 2 and "target orin (NVIDIA Jetson Orin, sm_87) has no FP8" in capsys.readouterr().err
    rc = cli.main(["engines", "--export", str(plain), "--out", str(tmp_path / "o"), "--target", "a100",
                   "--precision", "int8trt", "--emit-trtexec", str(tmp_path / "o.sh")])
    assert rc == 2 and "no int8trt vision graphs" in capsys.readouterr().err
    assert not (tmp_path / "o.sh").exists()


def test_verify_engines_uses_parity_bounds_against_the_fp32_reference(synth_q, tmp_path, monkeypatch):
    from hiwin_export import parity

    cuda = FakeCuda(*A100)
    trt = make_fake_trt("10.3.0", cuda)
    E.build_engines(synth_q, tmp_path / "eng", E.EngineOptions(target="a100", precision="int8trt"), trt=trt, cuda=cuda)
    res = E.verify_engines(synth_q, tmp_path / "eng", trt=trt, cuda=cuda)
    assert len(res) == 9 and all(r.passed for r in res), [r.line() for r in res]
    assert all(r.engine.endswith(".int8trt") for r in res)
    outs = [o for r in res for o in r.outputs.values()]
    assert all(o["bound"] == f"cosine>={parity.MIN_COSINE['int8trt']:g}" for o in outs)
    # quantised, so not the fp32 graph's numbers, but within the bound
    assert all(o["cosine"] >= parity.MIN_COSINE["int8trt"] for o in outs)
    assert min(o["cosine"] for o in outs) < 1 - 1e-6, [o["cosine"] for o in outs]
    assert any(o["max_abs"] > o["atol"] for o in outs)  # the fp32 tolerance would fail them: cosine decides
    worst = min(o["cosine"] for o in outs)
    monkeypatch.setitem(parity.MIN_COSINE, "int8trt", (worst + 1) / 2)  # the bound is parity's, not a copy
    res = E.verify_engines(synth_q, tmp_path / "eng", trt=trt, cuda=cuda)
    assert any(r.passed is False for r in res)
    with pytest.raises(ValueError, match="verify int8trt engine sets with --mode runner"):
        E.verify_engines(synth_q, tmp_path / "eng", mode="polygraphy")


def test_runtime_runs_the_quantised_engines_like_onnx_runtime(synth_q, tmp_path):
    from hiwin_runtime.crop_chain import CropChain
    from hiwin_runtime.ort import OnnxRunner
    from hiwin_runtime.trt import EngineError, TrtRunner

    cuda = FakeCuda()
    trt = make_fake_trt("10.3.0", cuda)
    E.build_engines(synth_q, tmp_path / "eng", E.EngineOptions(target="h100", precision="fp8trt", num_profiles=3),
                    trt=trt, cuda=cuda)
    export = E.ExportDir(synth_q)
    crops = [np.random.default_rng(i).standard_normal((3, 14 * h, 14 * w)).astype(np.float32)
             for i, (h, w) in enumerate(((24, 24), (18, 24), (16, 36)))]
    with TrtRunner(tmp_path / "eng", export=export, trt=trt, cuda=cuda) as runner:
        assert runner.precision == "fp8trt"  # from engines.json
        got = CropChain(runner.vision_stages(), patch_size=14, bucket_for=export.bucket_for).encode_crops(crops)
        with pytest.raises(EngineError, match="built from the fp8trt graphs, int8trt was requested"):
            runner.vision_stages("int8trt")
    want = CropChain(OnnxRunner(export).vision_stages("fp8trt"), patch_size=14,
                     bucket_for=export.bucket_for).encode_crops(crops)
    fp32 = CropChain(OnnxRunner(export).vision_stages("fp32"), patch_size=14,
                     bucket_for=export.bucket_for).encode_crops(crops)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, fp32, rtol=1e-6, atol=1e-6)  # the quantised graphs ran, not the fp32 ones
    ran = {Path(c[1]).name for c in trt.calls if c[0] == "build_serialized_network"}
    assert ran == {"vit.fp8trt.onnx", "jbu.fp8trt.onnx", "hiwin.fp8trt.onnx"}


def test_emit_trtexec_for_qdq_graphs(synth_q, tmp_path):
    text = E.emit_trtexec(synth_q, tmp_path / "engines-orin", E.EngineOptions(target="orin", precision="int8trt"),
                          tmp_path / "orin.sh")
    subprocess.run(["bash", "-n", str(tmp_path / "orin.sh")], check=True)
    builds = re.findall(r"^trtexec (?:.*\\\n)*.*$", text, re.M)
    assert sorted(re.search(r'--onnx="\$EXPORT/([^"]+)"', b)[1] for b in builds) == [
        "hiwin.int8trt.onnx", "jbu.int8trt.onnx", "vit.int8trt.onnx"]
    assert all("--stronglyTyped" in b and '--saveEngine="$OUT/' in b for b in builds)  # TensorRT 10.3
    cmds = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for weak in ("--int8", "--fp8", "--fp16", "--best", "--calib", "cmake -S", "--dynamicPlugins"):
        assert weak not in cmds, weak
    assert "ModelOpt int8 Q/DQ graphs" in text
    assert 'hiwin-export engines --index --export "$EXPORT" --out "$OUT" --target orin --precision int8trt' in text
    text = E.emit_trtexec(synth_q, tmp_path / "e", E.EngineOptions(target="h100", precision="fp8trt", trt_major=11),
                          tmp_path / "h100.sh")
    cmds = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    for flag in ("--stronglyTyped", "--fp8", "--int8", "--best"):
        assert flag not in cmds, flag
    assert "vit.fp8trt.onnx" in text and "--precision fp8trt" in text


def test_cli_builds_int8trt_and_index_keeps_provenance(synth_q, tmp_path, monkeypatch, capsys):
    from hiwin_export import cli
    from hiwin_runtime import trt as rt

    cuda = FakeCuda(*A100)
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt("10.3.0", cuda))
    monkeypatch.setattr(rt, "CudaRuntime", lambda: cuda)
    rc = cli.main(["engines", "--export", str(synth_q), "--out", str(tmp_path / "e"), "--target", "a100",
                   "--precision", "int8trt", "--num-profiles", "3"])
    assert rc == 0 and "3 engines" in capsys.readouterr().out
    built = read_engine_set(tmp_path / "e")
    (tmp_path / "e" / "engines.json").unlink()  # as after the trtexec script
    rc = cli.main(["engines", "--index", "--export", str(synth_q), "--out", str(tmp_path / "e"), "--target", "a100",
                   "--precision", "int8trt", "--num-profiles", "3"])
    idx = read_engine_set(tmp_path / "e")
    assert rc == 0 and idx["quantization"] == built["quantization"] and idx["engines"] == built["engines"]
    assert cli.main(["verify-engines", "--export", str(synth_q), "--engines", str(tmp_path / "e")]) == 0


# ------------------------------------------------------------------------------------ the real thing
def _real_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt if hasattr(trt, "Builder") else None


@pytest.mark.skipif(_real_tensorrt() is None, reason="needs TensorRT and a GPU")
def test_real_tensorrt_builds_and_verifies_qdq_engines(synth_q, tmp_path):
    from hiwin_runtime.trt import CudaRuntime

    cc = CudaRuntime().device().compute_capability
    target = next((n for n, t in E.TARGETS.items() if t.compute_capability == cc), None)
    if target is None:
        pytest.skip(f"no hiwin target for compute capability {cc}")
    for precision in ("int8trt", "fp8trt") if E.TARGETS[target].has_fp8 else ("int8trt",):
        out = tmp_path / precision
        info = E.build_engines(synth_q, out, E.EngineOptions(target=target, precision=precision, num_profiles=2))
        res = E.verify_engines(synth_q, out)
        assert info["quantization"]["mode"] == E.QDQ_MODES[precision]
        assert all(r.passed for r in res), [r.line() for r in res]
