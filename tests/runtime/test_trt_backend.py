"""The runtime's TensorRT backend (hiwin_runtime.trt) and its Pipeline hook.

TensorRT and CUDA are the test doubles of ``tests/trt_fakes.py`` (a fake ``tensorrt`` whose contexts
run the graphs with ONNX Runtime on fake device memory, a fake CUDA memory layer, a fake
``cuda.bindings.runtime``), so every path up to the real TensorRT / CUDA calls runs here;
``test_real_*`` runs only where TensorRT and a GPU are.
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from hiwin_runtime import trt as rt
from hiwin_runtime.crop_chain import BatchPolicy, CropChain
from hiwin_runtime.manifest import ExportDir, ExportError
from hiwin_runtime.trt import CudaRuntime, EngineError, TrtRunner, TrtUnavailable, choose_profile
from trt_fakes import FakeCuda, call_names, make_fake_cudart, make_fake_trt, write_synthetic_export


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_export(tmp_path_factory.mktemp("synth") / "export")


@pytest.fixture(scope="module")
def built(synth, tmp_path_factory):
    """An engine set of the synthetic export, built with the fake TensorRT 10.3 on a fake H100."""
    from hiwin_export.engines import EngineOptions, build_engines

    out = tmp_path_factory.mktemp("eng") / "engines"
    build_engines(synth, out, EngineOptions(target="h100"), trt=make_fake_trt("10.3.0", FakeCuda()), cuda=FakeCuda())
    return out


def _runner(built, synth=None, *, version="10.3.0", cuda=None, **kw):
    cuda = cuda or FakeCuda()
    trt = make_fake_trt(version, cuda)
    export = ExportDir(synth) if synth is not None else None
    return TrtRunner(built, export=export, trt=trt, cuda=cuda, **kw), trt, cuda


def _crops(shapes, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((3, 14 * h, 14 * w)).astype(np.float32) for h, w in shapes]


# ------------------------------------------------------------------------------------ what is missing
def test_missing_tensorrt_stubs_cuda_bindings_and_gpu_are_named(built, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TrtUnavailable, match="TensorRT's Python package is not installed"):
        TrtRunner(built, cuda=FakeCuda())
    stubs = types.ModuleType("tensorrt")  # what `pip install tensorrt-stubs` leaves: a namespace, no Runtime
    stubs.__path__ = ["/site-packages/tensorrt"]
    monkeypatch.setitem(sys.modules, "tensorrt", stubs)
    with pytest.raises(TrtUnavailable, match="only type stubs"):
        TrtRunner(built, cuda=FakeCuda())
    with pytest.raises(TrtUnavailable, match="TensorRT 9.0.1 is installed; hiwin supports TensorRT 10.x and 11.x"):
        TrtRunner(built, trt=make_fake_trt("9.0.1"), cuda=FakeCuda())
    for mod in ("cuda", "cuda.bindings", "cuda.bindings.runtime", "cuda.cudart"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(TrtUnavailable, match="CUDA Python bindings are not installed.*cuda-python"):
        TrtRunner(built, trt=make_fake_trt("10.3.0"))
    with pytest.raises(TrtUnavailable, match="no usable CUDA GPU"):
        CudaRuntime(module=make_fake_cudart(devices=-1))
    with pytest.raises(TrtUnavailable, match="no CUDA GPU is visible"):
        CudaRuntime(module=make_fake_cudart(devices=0))


def test_cuda_runtime_wrapper_calls(monkeypatch):
    cr = make_fake_cudart(name=b"NVIDIA A100-SXM4-80GB", cc=(8, 0))
    cuda = CudaRuntime(module=cr)
    dev = cuda.device()
    assert dev.name == "NVIDIA A100-SXM4-80GB" and dev.compute_capability == (8, 0) and dev.sm == "sm_80"
    s = cuda.stream()
    ptr = cuda.malloc(64)
    a = np.zeros(4, np.float32)
    cuda.h2d(ptr, a, s)
    cuda.d2h(a, ptr, s)
    cuda.sync(s)
    cuda.free(ptr)
    assert s == 0x5150 and ptr == 0xABC000
    assert cr.calls == ["cudaGetDeviceCount", "cudaSetDevice", "cudaGetDeviceProperties", "cudaStreamCreate",
                        "cudaMalloc", "cudaMemcpyAsync:H2D", "cudaMemcpyAsync:D2H", "cudaStreamSynchronize", "cudaFree"]
    bad = CudaRuntime(module=make_fake_cudart(fail={"cudaMalloc"}))
    with pytest.raises(RuntimeError, match="cudaMalloc failed: fake error 2"):
        bad.malloc(16)
    # the module is found under either name
    fake_pkg = types.ModuleType("cuda")
    fake_bindings = types.ModuleType("cuda.bindings")
    fake_bindings.runtime = make_fake_cudart()
    monkeypatch.setitem(sys.modules, "cuda", fake_pkg)
    monkeypatch.setitem(sys.modules, "cuda.bindings", fake_bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", fake_bindings.runtime)
    assert CudaRuntime().rt is fake_bindings.runtime


# ------------------------------------------------------------------------------------ refusals
def test_refuses_other_tensorrt_version_gpu_modified_files_and_other_exports(built, synth, tmp_path):
    with pytest.raises(EngineError, match=r"built with TensorRT 10\.3\.0, this process has TensorRT 10\.4\.1.*rebuild"):
        _runner(built, version="10.4.1")
    with pytest.raises(EngineError, match=r"built on NVIDIA H100 80GB HBM3 \(sm_90.*this GPU is .*sm_87.*rebuild them on this GPU"):
        _runner(built, cuda=FakeCuda("NVIDIA Jetson AGX Orin", (8, 7)))
    import shutil

    copy = tmp_path / "eng"
    shutil.copytree(built, copy)
    with open(copy / "vit.plan", "ab") as f:
        f.write(b" ")
    with pytest.raises(EngineError, match="vit.plan modified"):
        _runner(copy)
    (copy / "vit.plan").unlink()
    with pytest.raises(EngineError, match="vit.plan missing"):
        _runner(copy)
    with pytest.raises(EngineError, match="no engines.json"):
        _runner(tmp_path)
    with pytest.raises(EngineError, match="not found"):
        _runner(tmp_path / "nope")
    other = write_synthetic_export(tmp_path / "other", channels=8, bundles=())
    mf = json.loads((other / "manifest.json").read_text())
    import onnx

    m = onnx.load(str(other / "hiwin.onnx"))
    m.graph.initializer[1].float_data[:] = []
    m.graph.initializer[1].raw_data = (np.ones((8, 24), np.float32)).tobytes()
    onnx.save_model(m, str(other / "hiwin.onnx"))
    from hiwin_runtime.manifest import sha256

    mf["graphs"]["hiwin"]["sha256"] = sha256(other / "hiwin.onnx")
    (other / "manifest.json").write_text(json.dumps(mf))
    with pytest.raises(EngineError, match="built from another hiwin.onnx.*rebuild the engines for this export"):
        _runner(built, other)
    runner, _, _ = _runner(built)
    with pytest.raises(EngineError, match="built from the fp32 graphs, fp16 was requested"):
        runner.vision_stages("fp16")


# ------------------------------------------------------------------------------------ running
def test_stages_match_onnx_runtime_and_reuse_buffers(built, synth):
    from hiwin_runtime.ort import OnnxRunner

    export = ExportDir(synth)
    runner, trt, cuda = _runner(built, synth)
    chain_trt = CropChain(runner.vision_stages(), patch_size=14, bucket_for=export.bucket_for)
    chain_ort = CropChain(OnnxRunner(export).vision_stages(), patch_size=14, bucket_for=export.bucket_for)
    crops = _crops([(24, 24)] * 3 + [(16, 36), (36, 16), (2, 250)])
    got, want = chain_trt.encode_crops(crops), chain_ort.encode_crops(crops)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    assert got.dtype == np.float32 and got.shape == want.shape
    mallocs = sum(c[0] == "malloc" for c in cuda.calls)
    switches = [c[1] for c in trt.calls if c[0] == "set_optimization_profile_async"]
    # the same crops again: no new device memory, no profile switch beyond what the shapes need
    trt.calls.clear()
    np.testing.assert_allclose(chain_trt.encode_crops(crops[:3]), want[:3], rtol=1e-6, atol=1e-6)
    assert sum(c[0] == "malloc" for c in cuda.calls) == mallocs
    vit = runner.engines["vit"]
    assert vit.active == choose_profile(vit.profiles, 24, 24)
    assert len(set(switches)) >= 3  # square, tall, wide and the thin 2x250 crop use different profiles
    # one stream, synchronised once per engine call, outputs copied back
    assert {c[1] for c in cuda.calls if c[0] == "sync"} == {77}
    runner.close()
    assert not cuda.mem  # every buffer freed


def test_batches_beyond_the_profile_are_split(built, synth):
    from hiwin_runtime.ort import OnnxRunner

    export = ExportDir(synth)
    runner, trt, _ = _runner(built, synth)
    policy = BatchPolicy(vision_batch=None, upsample_batch=None)  # 12 crops at once: vit max is 10, jbu max 1
    chain = CropChain(runner.vision_stages(), patch_size=14, policy=policy, bucket_for=export.bucket_for)
    ref = CropChain(OnnxRunner(export).vision_stages(), patch_size=14, policy=policy, bucket_for=export.bucket_for)
    crops = _crops([(24, 24)] * 12, seed=3)
    np.testing.assert_allclose(chain.encode_crops(crops), ref.encode_crops(crops), rtol=1e-6, atol=1e-6)
    vit_batches = [c[2][0] for c in trt.calls if c[0] == "set_input_shape" and c[1] == "pixel_values"]
    assert vit_batches[:2] == [10, 2]
    assert max(c[2][0] for c in trt.calls if c[0] == "set_input_shape" and c[1] == "feat1x") == 1


def test_uncovered_crops_and_bad_feeds_are_clear_errors(built, synth):
    runner, _, _ = _runner(built, synth)
    stages = runner.vision_stages()
    with pytest.raises(ExportError, match="outside the exported range"):  # ExportDir's own check, 300 > 256
        stages.vit(_crops([(2, 300)])[0][None])
    bare, _, _ = _runner(built)  # without the export: the engine's profiles refuse it
    with pytest.raises(EngineError, match="no optimisation profile covers a crop of 2x300 patches"):
        bare.vision_stages().vit(_crops([(2, 300)])[0][None])
    with pytest.raises(EngineError, match="no engine for graph 'llm'"):
        bare.run("llm", {})
    assert choose_profile([], 3, 3) is None


def test_plugin_library_is_loaded_from_the_set_before_deserialising(tmp_path):
    from hiwin_export.engines import EngineOptions, build_engines

    exp = write_synthetic_export(tmp_path / "export", plugin_jbu=True, bundles=())
    lib = tmp_path / "libhiwin_plugins.so"
    lib.write_bytes(b"plugin")
    build_engines(exp, tmp_path / "eng", EngineOptions(plugin_lib=str(lib)), trt=make_fake_trt("10.3.0"),
                  cuda=FakeCuda())
    runner, trt, _ = _runner(tmp_path / "eng", exp)
    names = call_names(trt)
    assert names.index("load_library") < names.index("deserialize_cuda_engine")
    assert trt.loaded_libraries == [str(tmp_path / "eng" / "plugins" / lib.name)]
    other = tmp_path / "other.so"
    other.write_bytes(b"another build")
    with pytest.raises(EngineError, match="not the plugin library the engines were built with"):
        _runner(tmp_path / "eng", exp, plugin_lib=str(other))
    # without the library registered, the runtime cannot deserialize: a clear error
    (tmp_path / "eng2").mkdir()
    info = json.loads((tmp_path / "eng" / "engines.json").read_text())
    info["plugins"] = {"required": False, "ops": []}  # as if the library were not needed
    import shutil

    for f in ("vit.plan", "jbu.plan", "hiwin.plan"):
        shutil.copy(tmp_path / "eng" / f, tmp_path / "eng2" / f)
    (tmp_path / "eng2" / "engines.json").write_text(json.dumps(info))
    with pytest.raises(EngineError, match="could not deserialize the engine"):
        _runner(tmp_path / "eng2")


# ------------------------------------------------------------------------------------ Pipeline hook
@pytest.fixture(scope="module")
def tiny_export(tiny_model, tmp_path_factory):
    from hiwin_export.export import export_model

    out = tmp_path_factory.mktemp("tiny") / "export"
    export_model(tiny_model, out, precisions=("fp32",), parity=None, bundles=False)
    return out


def test_pipeline_runs_its_vision_path_on_the_engines(tiny_export, tmp_path, monkeypatch):
    from conftest import random_image
    from hiwin_export.engines import EngineOptions, build_engines
    from hiwin_runtime import Pipeline

    cuda = FakeCuda()
    trt = make_fake_trt("10.3.0", cuda)
    build_engines(tiny_export, tmp_path / "eng", EngineOptions(target="h100", num_profiles=3), trt=trt, cuda=cuda)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(rt, "CudaRuntime", lambda: cuda)
    pipe = Pipeline.from_export(tiny_export, engines=tmp_path / "eng")
    ref = Pipeline.from_export(tiny_export)
    assert pipe.backend.name == "onnxruntime (vision: tensorrt)" and ref.backend.name == "onnxruntime"
    img = random_image(700, 460, seed=5)
    np.testing.assert_allclose(pipe.encode_image(img), ref.encode_image(img), rtol=1e-5, atol=1e-5)
    a = pipe.generate(img, "What is it?", max_new_tokens=6)
    b = ref.generate(img, "What is it?", max_new_tokens=6)
    assert a.token_ids == b.token_ids and a.visual_tokens == b.visual_tokens
    assert "execute_async_v3" in call_names(trt)
    assert not any(n.startswith(("vit", "jbu", "hiwin")) for n in pipe.backend.runner.sessions)  # no ORT vision
    with pytest.raises(ValueError, match="needs engines="):
        Pipeline.from_export(tiny_export, vision="tensorrt")
    with pytest.raises(rt.EngineError, match="built from the fp32 graphs, int8trt was requested"):
        Pipeline.from_export(tiny_export, engines=tmp_path / "eng", precision="int8trt")  # the set decides
    with pytest.raises(ValueError, match="onnxruntime or tensorrt"):
        Pipeline.from_export(tiny_export, vision="openvino")
    # hiwin-run --engines
    from hiwin_runtime import cli

    img.save(tmp_path / "p.png")
    assert cli.main(["--model", str(tiny_export), "--image", str(tmp_path / "p.png"), "--engines",
                     str(tmp_path / "eng"), "--max-new-tokens", "3"]) == 0
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    assert cli.main(["--model", str(tiny_export), "--image", str(tmp_path / "p.png"), "--engines",
                     str(tmp_path / "eng")]) == 2


# ------------------------------------------------------------------------------------ real CUDA
def _real_cuda():
    try:
        return CudaRuntime()
    except (TrtUnavailable, RuntimeError):
        return None


needs_cuda = pytest.mark.skipif(_real_cuda() is None, reason="needs cuda-python and a GPU")


@needs_cuda
def test_real_cuda_layer_round_trip():
    cuda = CudaRuntime()
    dev = cuda.device()
    assert dev.name and dev.compute_capability >= (7, 0)
    s = cuda.stream()
    a = np.arange(1 << 20, dtype=np.float32)
    p = cuda.malloc(a.nbytes)
    cuda.h2d(p, a, s)
    b = np.zeros_like(a)
    cuda.d2h(b, p, s)
    cuda.sync(s)
    cuda.free(p)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(RuntimeError, match="cudaMalloc failed"):
        cuda.malloc(1 << 60)


@needs_cuda
def test_runner_on_real_device_memory_with_fake_tensorrt(tmp_path):
    """TrtRunner's buffers, copies and stream on the real GPU; only the engines are the fake's."""
    from hiwin_export.engines import TARGETS, EngineOptions, build_engines
    from hiwin_runtime.ort import OnnxRunner
    from trt_fakes import DeviceMemory

    mem = DeviceMemory()
    cc = mem.device().compute_capability
    target = next((n for n, t in TARGETS.items() if t.compute_capability == cc), None)
    if target is None:
        pytest.skip(f"no hiwin target for compute capability {cc}")
    exp = write_synthetic_export(tmp_path / "export", bundles=())
    trt = make_fake_trt("10.3.0", mem)
    build_engines(exp, tmp_path / "eng", EngineOptions(target=target, num_profiles=3), trt=trt, cuda=mem)
    export = ExportDir(exp)
    with TrtRunner(tmp_path / "eng", export=export, trt=trt, cuda=mem) as runner:
        chain = CropChain(runner.vision_stages(), patch_size=14, policy=BatchPolicy(None, None),
                          bucket_for=export.bucket_for)
        crops = _crops([(24, 24)] * 12 + [(16, 36), (2, 250)], seed=9)
        got = chain.encode_crops(crops)
    ref = CropChain(OnnxRunner(export).vision_stages(), patch_size=14, policy=BatchPolicy(None, None),
                    bucket_for=export.bucket_for).encode_crops(crops)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ the real thing
def _real_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt if hasattr(trt, "Builder") else None


@pytest.mark.skipif(_real_tensorrt() is None, reason="needs TensorRT and a GPU")
def test_real_tensorrt_runner_matches_onnx_runtime(synth, tmp_path):
    from hiwin_export.engines import TARGETS, EngineOptions, build_engines
    from hiwin_runtime.ort import OnnxRunner

    cc = CudaRuntime().device().compute_capability
    target = next((n for n, t in TARGETS.items() if t.compute_capability == cc), None)
    if target is None:
        pytest.skip(f"no hiwin target for compute capability {cc}")
    build_engines(synth, tmp_path / "eng", EngineOptions(target=target, num_profiles=2))
    export = ExportDir(synth)
    with TrtRunner(tmp_path / "eng", export=export) as runner:
        crops = _crops([(24, 24), (16, 36)])
        got = CropChain(runner.vision_stages(), patch_size=14, bucket_for=export.bucket_for).encode_crops(crops)
    want = CropChain(OnnxRunner(export).vision_stages(), patch_size=14, bucket_for=export.bucket_for).encode_crops(crops)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
