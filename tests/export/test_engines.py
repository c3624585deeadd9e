"""TensorRT engine sets: crop-grid enumeration, optimisation profiles, the engine builder, the
emitted trtexec script, the index and verify-engines.

TensorRT and CUDA are replaced by the test doubles of ``tests/trt_fakes.py`` (they record every call
and run the graphs with ONNX Runtime); ``test_real_tensorrt_*`` run only where TensorRT and a GPU are.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hiwin_export import engines as E
from hiwin_export.profiles import (DEFAULT_NUM_PROFILES, BatchRange, GridProfile, choose_profile, grid_candidates, input_shapes,
                                   plan_grid_profiles, profile_plan, reachable_grids)
from hiwin_runtime.slicing import plan_slices
from hiwin_runtime.trt import ENGINES_JSON, TrtUnavailable, read_engine_set
from trt_fakes import FakeCuda, call_names, make_fake_trt, write_synthetic_export


def _real_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt if hasattr(trt, "Builder") else None


needs_trt = pytest.mark.skipif(_real_tensorrt() is None, reason="needs TensorRT and a GPU")


# ------------------------------------------------------------------------------------ enumeration
def _crop_grids(plan, p=14):
    return [(h // p, w // p) for w, h in plan.crop_sizes]


def test_enumeration_is_exact_and_bounded():
    cand = grid_candidates()
    reach = reachable_grids()
    assert set(reach) == cand  # every candidate of the proof has an image that produces it
    for (h, w), size in list(reach.items())[::25]:  # the witnesses really produce their grid
        assert _crop_grids(plan_slices(size, 1)) == [(h, w)]
    assert (24, 24) in reach and reach[(24, 24)] == (1, 1)
    assert max(max(g) for g in reach) == 288  # 4032 px: s^2 / (2p)
    assert min(min(g) for g in reach) == 2
    assert max(h * w for h, w in reach) <= 576  # at most (s/p)^2 patches
    assert plan_slices(reach[(2, 288)], 1).overview_size == (4032, 28)  # a 1:144 image
    assert 500 < len(reach) < 5000


def test_enumeration_contains_every_crop_of_a_brute_force_sweep():
    """All images up to 240 px a side for every max_slices, plus a log-uniform random sweep of large
    and extreme images: every crop grid is in the enumerated set; and the dense sweep finds every
    enumerated grid of the sub-range it covers densely."""
    reach = set(reachable_grids())
    seen, groups = set(), 0
    for w in range(1, 241):
        for h in range(1, 241):
            for ms in (1, 2, 4, 6, 9):
                try:
                    plan = plan_slices((w, h), ms)
                except Exception:  # noqa: BLE001 (too extreme an aspect ratio: ImageError)
                    continue
                g = _crop_grids(plan)
                seen.update(g)
                groups = max(groups, max(g.count(x) for x in g))
    rng = np.random.default_rng(0)
    for _ in range(4000):
        w = int(math.exp(rng.uniform(0, math.log(60000))))
        h = int(math.exp(rng.uniform(0, math.log(60000))))
        try:
            plan = plan_slices((w, h), int(rng.integers(1, 10)))
        except Exception:  # noqa: BLE001
            continue
        g = _crop_grids(plan)
        seen.update(g)
        groups = max(groups, max(g.count(x) for x in g))
    assert seen <= reach, sorted(seen - reach)[:10]
    assert groups <= 10  # 9 slices + an overview of the same shape: the ViT batch bound
    # Dense sub-range: ratios w/h with h = 240 cover r in [1/2, 2] in steps of 1/240; every enumerated
    # grid whose ratio interval there is wider than the step is found.
    dense = set()
    for w in range(120, 481):
        dense.update(_crop_grids(plan_slices((w, 240), 1)))
    near_square = {g for g in reach if 0.55 <= g[1] / g[0] <= 1.8}
    assert near_square <= dense | seen, sorted(near_square - dense - seen)[:10]


# ------------------------------------------------------------------------------------ profiles
def test_profiles_cover_every_reachable_grid_within_the_exported_range():
    plan = profile_plan()
    reach = reachable_grids()
    assert len(plan.profiles) == DEFAULT_NUM_PROFILES == 9
    assert set(plan.covered) | set(plan.outside) == set(reach)
    assert plan.outside == []  # the exported range (2..288 per side) holds every reachable grid
    narrow = profile_plan(patch_range=(2, 256))  # a narrower range reports what it leaves out
    assert narrow.outside == sorted(g for g in reach if max(g) > 256)  # 2 x 257..288 and transposed
    assert narrow.outside and all(min(g) == 2 for g in narrow.outside)
    for g in narrow.outside:
        assert narrow.choose(*g) is None
    for h, w in plan.covered:
        i = plan.choose(h, w)
        assert i is not None and plan.profiles[i].contains(h, w)
        # deterministic: the smallest containing box, first on ties
        boxes = [(p.area, k) for k, p in enumerate(plan.profiles) if p.contains(h, w)]
        assert i == min(boxes)[1]
    for p in plan.profiles:
        assert p.h[0] <= p.h[1] <= p.h[2] and p.w[0] <= p.w[1] <= p.w[2]
    # narrow: together the boxes admit far fewer shapes than one box over the whole range
    one = plan_grid_profiles(plan.covered, 1)[0]
    assert sum(p.area for p in plan.profiles) < one.area / 20


def test_profile_plan_includes_extra_grids_and_the_chooser_ties():
    plan = profile_plan(extra=[(18, 24), (24, 18), (300, 2)])
    assert (18, 24) in plan.extra and (24, 18) in plan.extra and (300, 2) not in plan.extra  # beyond the range
    assert plan.choose(18, 24) is not None and plan.choose(24, 18) is not None
    a = GridProfile("a", (2, 3, 4), (2, 3, 4))
    b = GridProfile("b", (2, 3, 4), (2, 3, 4))
    c = GridProfile("c", (1, 3, 9), (1, 3, 9))
    assert choose_profile([c, a, b], 3, 3) == 1  # smallest, then first
    assert choose_profile([a, b], 9, 9) is None
    assert plan_grid_profiles([], 4) == []
    assert len(plan_grid_profiles([(2, 2), (3, 3)], 8)) <= 2


def test_bucket_graphs_get_profiles_of_their_own_bucket():
    from hiwin_runtime.buckets import sampling_grid

    grids = {g for g in reachable_grids() if sampling_grid(g[1], g[0]) == (3, 3)}
    plan = profile_plan(grids=grids)
    assert set(plan.covered) == {g for g in grids if max(g) <= 256}
    assert all(plan.choose(*g) is not None for g in plan.covered)


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_export(tmp_path_factory.mktemp("synth") / "export", precisions=("fp32", "fp16"))


@pytest.fixture(scope="module")
def synth_plugin(tmp_path_factory):
    return write_synthetic_export(tmp_path_factory.mktemp("synthp") / "export", plugin_jbu=True)


@pytest.fixture
def fake(monkeypatch):
    cuda = FakeCuda()
    trt = make_fake_trt("10.3.0", cuda)
    return trt, cuda


def test_input_shapes_follow_the_manifest_symbols(synth):
    mf = json.loads((synth / "manifest.json").read_text())
    p = GridProfile("p", (16, 24, 24), (20, 24, 36))
    s = input_shapes(mf["graphs"]["hiwin"], p, BatchRange(1, 1, 2))
    assert s["feat1x"] == ([1, 8, 16, 20], [1, 8, 24, 24], [2, 8, 24, 36])
    assert s["feat4x"][2] == [2, 8, 96, 144]
    v = input_shapes(mf["graphs"]["vit"], p, BatchRange(1, 6, 10))["pixel_values"]
    assert v == ([1, 3, 224, 280], [6, 3, 336, 336], [10, 3, 336, 504])


# ------------------------------------------------------------------------------------ build
def test_build_engines_with_fake_tensorrt_10(synth, tmp_path, fake):
    trt, cuda = fake
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"OLD")
    opts = E.EngineOptions(target="h100", timing_cache=str(cache), workspace_gib=4, opt_level=5)
    info = E.build_engines(synth, tmp_path / "eng", opts, trt=trt, cuda=cuda)
    names = call_names(trt)
    # strongly typed network (TensorRT 10: the creation flag), no precision builder flags
    assert [c[1] for c in trt.calls if c[0] == "create_network"] == [1 << 0] * 3
    assert "set_flag" not in names
    assert [c[1:] for c in trt.calls if c[0] == "set_memory_pool_limit"] == [("WORKSPACE", 4 << 30)] * 3
    builds = [c for c in trt.calls if c[0] == "build_serialized_network"]
    assert [Path(c[1]).name for c in builds] == ["hiwin.onnx", "jbu.onnx", "vit.onnx"]
    assert all(c[2] == 5 and c[4] == 9 for c in builds)  # opt level, 9 profiles each
    # one timing cache carried through the three builds and written back
    created = [c[1] for c in trt.calls if c[0] == "create_timing_cache"]
    assert created[0] == b"OLD" and created[1].startswith(b"OLD|hiwin.onnx") and created[2].endswith(b"jbu.onnx+")
    assert cache.read_bytes().endswith(b"|vit.onnx+")
    # engines.json: versions, GPU, sources, profiles, one projector engine
    on_disk = read_engine_set(tmp_path / "eng")
    assert on_disk == info
    assert info["tensorrt"] == {"version": "10.3.0", "major": 10, "strongly_typed": True}
    assert info["gpu"]["compute_capability"] == [9, 0] and info["target"] == "h100"
    assert set(info["engines"]) == {"vit", "jbu", "hiwin"}
    mf = json.loads((synth / "manifest.json").read_text())
    for name, e in info["engines"].items():
        assert e["source"]["sha256"] == mf["graphs"][name]["sha256"]
        assert len(e["profiles"]) == len(e["shapes"]) == 9
    assert info["engines"]["vit"]["batch"] == [1, 6, 10] and info["engines"]["jbu"]["batch"] == [1, 1, 1]
    assert info["projector"]["weight_copies"] == 1 and "one copy" in info["projector"]["note"]
    assert info["plugins"] == {"required": False, "ops": []}
    assert info["coverage"]["vit"]["outside_exported_range"] == []  # 2..288 per side: every crop
    # every profile shape set for every input, as planned
    sets = [c for c in trt.calls if c[0] == "set_shape"]
    assert len(sets) == 9 * (1 + 2 + 3)
    # the atomic write left nothing else behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eng", "timing.cache"]


def test_build_engines_with_fake_tensorrt_11(synth, tmp_path):
    cuda = FakeCuda("NVIDIA A100-SXM4-80GB", (8, 0))
    trt = make_fake_trt("11.1.0", cuda)
    assert not hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    info = E.build_engines(synth, tmp_path / "eng", E.EngineOptions(target="a100", precision="fp16"), trt=trt, cuda=cuda)
    assert [c[1] for c in trt.calls if c[0] == "create_network"] == [0, 0, 0]  # always strongly typed
    assert "set_flag" not in call_names(trt)
    assert set(info["engines"]) == {"vit.fp16", "jbu.fp16", "hiwin.fp16"} and info["precision"] == "fp16"
    assert [c[2] for c in trt.calls if c[0] == "set_memory_pool_limit"] == [8 << 30] * 3


def test_build_refuses_the_wrong_gpu_missing_tensorrt_and_failures(synth, tmp_path, fake, monkeypatch):
    trt, _ = fake
    orin = FakeCuda("NVIDIA Jetson AGX Orin", (8, 7))
    with pytest.raises(E.BuildError, match="needs sm_90.*on the target"):
        E.build_engines(synth, tmp_path / "a", E.EngineOptions(target="h100"), trt=trt, cuda=orin)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TrtUnavailable, match="TensorRT's Python package is not installed"):
        E.build_engines(synth, tmp_path / "b", E.EngineOptions(target="h100"), cuda=orin)
    trt.fail_parse = True
    with pytest.raises(E.BuildError, match="ONNX parser failed: .*UNSUPPORTED_NODE"):
        E.build_engines(synth, tmp_path / "c", E.EngineOptions(target="h100"), trt=trt, cuda=FakeCuda())
    trt.fail_parse, trt.fail_build = False, True
    with pytest.raises(E.BuildError, match="could not build"):
        E.build_engines(synth, tmp_path / "d", E.EngineOptions(target="h100"), trt=trt, cuda=FakeCuda())
    assert not any(p.name.startswith((".a", ".b", ".c", ".d", "a", "b", "c", "d")) for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="TensorRT 10.3"):
        E.EngineOptions(target="orin", trt_major=11)
    with pytest.raises(ValueError, match="unknown target"):
        E.EngineOptions(target="v100")


def test_build_timing_cache_from_another_gpu_starts_afresh(synth, tmp_path, fake):
    trt, cuda = fake
    cache = tmp_path / "t.cache"
    cache.write_bytes(b"OTHER-GPU")
    E.build_engines(synth, tmp_path / "eng", E.EngineOptions(timing_cache=str(cache)), trt=trt, cuda=cuda)
    sets = [c for c in trt.calls if c[0] == "set_timing_cache"]
    assert sets[0][1] == b"OTHER-GPU" and sets[1][1] == b""  # rejected, then a new one
    assert not cache.read_bytes().startswith(b"OTHER-GPU")


def test_plugin_exports_need_the_library_and_carry_it(synth_plugin, tmp_path, fake):
    trt, cuda = fake
    with pytest.raises(E.BuildError, match="plugin ops HiwinJbuConv: pass --plugin-lib"):
        E.build_engines(synth_plugin, tmp_path / "x", E.EngineOptions(), trt=trt, cuda=cuda)
    lib = tmp_path / "libhiwin_plugins.so"
    lib.write_bytes(b"\x7fELF fake plugin library")
    info = E.build_engines(synth_plugin, tmp_path / "eng", E.EngineOptions(plugin_lib=str(lib)), trt=trt, cuda=cuda)
    names = call_names(trt)
    assert names.index("load_library") < names.index("parse_from_file")  # registered before parsing
    assert "builder.get_plugin_registry" in names
    assert info["plugins"]["required"] and info["plugins"]["ops"] == ["HiwinJbuConv"]
    assert (tmp_path / "eng" / info["plugins"]["bundled"]).read_bytes() == lib.read_bytes()
    assert info["engines"]["jbu"]["plugin_ops"] == ["HiwinJbuConv"] and info["engines"]["vit"]["plugin_ops"] == []
    # serialized into the engines: plugins_to_serialize set, the runtime allows host code
    trt2 = make_fake_trt("10.3.0", cuda)
    E.build_engines(synth_plugin, tmp_path / "eng2", E.EngineOptions(plugin_lib=str(lib), serialize_plugins=True),
                    trt=trt2, cuda=cuda)
    assert {tuple(c[5]) for c in trt2.calls if c[0] == "build_serialized_network"} == {(str(lib.resolve()),)}


def test_faithful_export_one_projector_engine_per_bucket(tmp_path, fake):
    from hiwin_runtime.buckets import HIWIN_BUCKETS, sampling_grid
    from hiwin_runtime.crop_chain import CropChain
    from hiwin_runtime.ort import OnnxRunner
    from hiwin_runtime.trt import TrtRunner

    trt, cuda = fake
    exp = write_synthetic_export(tmp_path / "export", faithful=True)
    info = E.build_engines(exp, tmp_path / "eng", E.EngineOptions(num_profiles=3), trt=trt, cuda=cuda)
    buckets = {f"hiwin_{oh}x{ow}" for oh, ow in HIWIN_BUCKETS}
    assert set(info["engines"]) == {"vit", "jbu"} | buckets
    assert info["projector"]["weight_copies"] == 7 and "faithful" in info["projector"]["note"]
    reach = [g for g in reachable_grids() if max(g) <= 256]
    for name in buckets:  # each bucket engine covers exactly its bucket's crops
        b = tuple(int(x) for x in name[6:].split("x"))
        mine = [g for g in reach if sampling_grid(g[1], g[0]) == b]
        assert mine and all(choose_profile(info["engines"][name]["profiles"], *g) is not None for g in mine)
    export = E.ExportDir(exp)
    grids = [min((g for g in reach if sampling_grid(g[1], g[0]) == b), key=lambda g: abs(g[0] - g[1]))
             for b in HIWIN_BUCKETS]  # the squarest reachable crop of every bucket
    crops = [np.random.default_rng(i).standard_normal((3, 14 * h, 14 * w)).astype(np.float32)
             for i, (h, w) in enumerate(grids)]
    assert len({export.bucket_for(c.shape[2] // 14, c.shape[1] // 14) for c in crops}) == 7
    with TrtRunner(tmp_path / "eng", export=export, trt=trt, cuda=cuda) as runner:
        got = CropChain(runner.vision_stages(), patch_size=14, bucket_for=export.bucket_for).encode_crops(crops)
    want = CropChain(OnnxRunner(export).vision_stages(), patch_size=14,
                     bucket_for=export.bucket_for).encode_crops(crops)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    ran = {Path(c[1]).name for c in trt.calls if c[0] == "build_serialized_network"}
    assert ran == {f"{n}.onnx" for n in info["engines"]}


# ------------------------------------------------------------------------------------ index, verify
def test_index_rewrites_engines_json_for_script_built_engines(synth, tmp_path, fake):
    trt, cuda = fake
    info = E.build_engines(synth, tmp_path / "eng", E.EngineOptions(), trt=trt, cuda=cuda)
    (tmp_path / "eng" / ENGINES_JSON).unlink()
    again = E.index_engines(synth, tmp_path / "eng", E.EngineOptions(), trt=trt, cuda=cuda)
    assert again["engines"] == info["engines"] and again["build"]["builder"] == "trtexec"
    assert read_engine_set(tmp_path / "eng")["engines"] == info["engines"]
    (tmp_path / "eng" / "vit.plan").unlink()
    with pytest.raises(E.BuildError, match="vit.plan: missing"):
        E.index_engines(synth, tmp_path / "eng", E.EngineOptions(), trt=trt, cuda=cuda)
    # an engine with other profiles than the plan is refused
    E.build_engines(synth, tmp_path / "e4", E.EngineOptions(num_profiles=4), trt=trt, cuda=cuda)
    with pytest.raises(E.BuildError, match="4 optimisation profiles, planned 9"):
        E.index_engines(synth, tmp_path / "e4", E.EngineOptions(), trt=trt, cuda=cuda)


def test_verify_engines_runner_mode_passes_and_catches_a_wrong_reference(synth, tmp_path, fake, monkeypatch):
    trt, cuda = fake
    E.build_engines(synth, tmp_path / "eng", E.EngineOptions(), trt=trt, cuda=cuda)
    res = E.verify_engines(synth, tmp_path / "eng", trt=trt, cuda=cuda)
    assert len(res) == 9 and all(r.passed for r in res), [r.line() for r in res]
    assert all(o["max_abs"] <= o["atol"] for r in res for o in r.outputs.values())
    # a wrong reference fails (copy of the export with one reference scaled)
    import shutil

    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    bad = tmp_path / "export-bad"
    shutil.copytree(synth, bad)
    f = bad / "bundles" / "jbu" / "24x24" / "reference_outputs.json"
    ref = RunResults.load(str(f))[0][1][0]
    rr = RunResults()
    rr.append(("reference", [IterationResult({k: v * 1.01 for k, v in ref.items()}, runner_name="reference")]))
    rr.save(str(f))
    res = E.verify_engines(bad, tmp_path / "eng", trt=trt, cuda=cuda)
    failed = [r for r in res if r.passed is False]
    assert [r.bundle for r in failed] == ["bundles/jbu/24x24"] and "FAIL" in failed[0].line()
    # the CLI: exit 1 on a failure, JSON report
    from hiwin_export import cli
    from hiwin_runtime import trt as rt

    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(rt, "CudaRuntime", lambda: cuda)
    rc = cli.main(["verify-engines", "--export", str(bad), "--engines", str(tmp_path / "eng"),
                   "--json", str(tmp_path / "v.json")])
    assert rc == 1 and len(json.loads((tmp_path / "v.json").read_text())) == 9
    assert cli.main(["verify-engines", "--export", str(synth), "--engines", str(tmp_path / "eng")]) == 0


def test_verify_engines_fp16_uses_cosine(synth, tmp_path, fake):
    trt, cuda = fake
    E.build_engines(synth, tmp_path / "eng", E.EngineOptions(precision="fp16"), trt=trt, cuda=cuda)
    res = E.verify_engines(synth, tmp_path / "eng", trt=trt, cuda=cuda)
    assert all(r.passed for r in res) and all(r.engine.endswith(".fp16") for r in res)
    assert all(o["cosine"] > 0.999999 for r in res for o in r.outputs.values())
    with pytest.raises(ValueError, match="--mode runner"):
        E.verify_engines(synth, tmp_path / "eng", mode="polygraphy")


def test_verify_engines_polygraphy_commands(synth, synth_plugin, tmp_path, fake):
    trt, cuda = fake
    info = E.build_engines(synth, tmp_path / "eng", E.EngineOptions(), trt=trt, cuda=cuda)
    res = E.verify_engines(synth, tmp_path / "eng", mode="polygraphy", polygraphy="no-such-polygraphy")
    assert len(res) == 9 and all(r.passed is None and "not found" in r.note for r in res)
    cmd = next(r.command for r in res if r.bundle == "bundles/vit/24x24")
    idx = choose_profile(info["engines"]["vit"]["profiles"], 24, 24)
    assert f"--optimization-profile {idx}" in cmd and "--model-type engine --trt" in cmd
    assert str((tmp_path / "eng" / "vit.plan").resolve()) in cmd
    assert "--load-inputs bundles/vit/24x24/inputs.json" in cmd and "--atol features:" in cmd
    assert "--plugins" not in cmd
    lib = tmp_path / "libhiwin_plugins.so"
    lib.write_bytes(b"lib")
    pinfo = E.build_engines(synth_plugin, tmp_path / "peng", E.EngineOptions(plugin_lib=str(lib)), trt=trt, cuda=cuda)
    bundle = json.loads((synth_plugin / "bundles/jbu/24x24/bundle.json").read_text())
    cmd = E.polygraphy_command(tmp_path / "peng", pinfo, "jbu", "bundles/jbu/24x24", bundle,
                               E._atols(bundle["trt_command"]))
    assert f"--plugins {(tmp_path / 'peng' / 'plugins' / lib.name).resolve()}" in cmd


# ------------------------------------------------------------------------------------ trtexec script
def _shapes_in(cmd: str, flag: str) -> list[str]:
    return [t.split("=", 1)[1] for t in cmd.split() if t.startswith(flag + "=")]


def test_emit_trtexec_orin_plugin_script(synth_plugin, tmp_path):
    script = tmp_path / "build-orin.sh"
    text = E.emit_trtexec(synth_plugin, tmp_path / "engines-orin", E.EngineOptions(target="orin",
                          plugin_lib="ignored.so"), script)
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "-DCMAKE_CUDA_ARCHITECTURES=87" in text and "aarch64-linux-gnu" in text and "--target hiwin_plugins" in text
    builds = re.findall(r"^trtexec (?:.*\\\n)*.*$", text, re.M)
    assert len(builds) == 3
    jbu = next(b for b in builds if "jbu.onnx" in b)
    for flag in ("--stronglyTyped", '--dynamicPlugins="$PLUGIN_LIB"', "--memPoolSize=workspace:2048MiB",
                 "--builderOptimizationLevel=3", '--timingCacheFile="$TIMING_CACHE"', "--skipInference",
                 '--saveEngine="$OUT/jbu.plan"'):
        assert flag in jbu, flag
    for weak in ("--fp16", "--int8", "--best", "--bf16", "--noTF32", "--setPluginsToSerialize"):
        assert weak not in text
    # the exact profiles of the plan, in order
    export = E.ExportDir(synth_plugin)
    plans, _ = E.engine_plans(export, E.EngineOptions(target="orin"))
    plan = next(p for p in plans if p.graph.name == "jbu")
    assert [f"--profile={i}" for i in range(9)] == [t for t in jbu.split() if t.startswith("--profile=")]
    want = [",".join(f"{n}:{'x'.join(map(str, s[0]))}" for n, s in sh.items()) for sh in plan.shapes]
    assert _shapes_in(jbu, "--minShapes") == want
    assert len(_shapes_in(jbu, "--maxShapes")) == 9
    assert 'hiwin-export engines --index --export "$EXPORT" --out "$OUT" --target orin' in text
    assert "verify-engines" in text


def test_emit_trtexec_tensorrt_11_has_no_weak_typing_flags(synth, tmp_path):
    text = E.emit_trtexec(synth, tmp_path / "e", E.EngineOptions(target="h100", trt_major=11, precision="fp16",
                                                                  serialize_plugins=True), tmp_path / "h.sh")
    for flag in ("--stronglyTyped", "--fp16", "--int8", "--best", "--dynamicPlugins", "cmake -S"):
        assert flag not in text
    assert "vit.fp16.onnx" in text and "TensorRT 11.x" in text and "memPoolSize=workspace:8192MiB" in text


def test_emitted_script_runs_with_stand_in_tools(synth_plugin, tmp_path):
    """The script's own logic (paths, plugin build, engines into a partial directory, index, move into
    place, verify) with stand-ins for cmake, trtexec and hiwin-export on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "calls.log"
    (bindir / "cmake").write_text(f"""#!/usr/bin/env bash
echo "cmake $*" >> {log}
if [ "$1" = "--build" ]; then touch "$2/libhiwin_plugins.so"; else mkdir -p "$4"; fi
""")
    (bindir / "trtexec").write_text(f"""#!/usr/bin/env bash
echo "trtexec $*" >> {log}
[ "$1" = "--help" ] && echo "&&&& RUNNING TensorRT.trtexec [TensorRT v100300] # trtexec --help" && exit 0
for a in "$@"; do case "$a" in --saveEngine=*) f="${{a#--saveEngine=}}"; f="${{f%\\"}}"; f="${{f#\\"}}"; echo plan > "$f";; esac; done
""")
    (bindir / "hiwin-export").write_text(f"""#!/usr/bin/env bash
echo "hiwin-export $*" >> {log}
if [ "$1" = "engines" ]; then echo '{{}}' > "$6/engines.json"; fi
""")
    for f in bindir.iterdir():
        f.chmod(0o755)
    script = tmp_path / "build.sh"
    E.emit_trtexec(synth_plugin, tmp_path / "engines-orin", E.EngineOptions(target="orin"), script)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "HIWIN_SRC": str(tmp_path / "src"),
           "ENGINES": str(tmp_path / "engines-orin")}
    r = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = log.read_text().splitlines()
    order = [c.split()[0] + (" " + c.split()[1] if c.startswith(("cmake", "hiwin-export")) else "") for c in calls]
    assert order[0] == "trtexec" and order[1].startswith("cmake -S") and order[2] == "cmake --build"
    assert [c for c in calls if "--saveEngine" in c].__len__() == 3
    assert order[-2:] == ["hiwin-export engines", "hiwin-export verify-engines"]
    assert sorted(p.name for p in (tmp_path / "engines-orin").iterdir()) == ["engines.json", "hiwin.plan", "jbu.plan",
                                                                             "vit.plan"]
    assert not (tmp_path / "engines-orin.partial").exists()
    assert any(f"--plugin-lib {tmp_path}/src/build/plugins-orin/libhiwin_plugins.so" in c for c in calls)


def test_cli_engines(synth, tmp_path, monkeypatch, capsys):
    from hiwin_export import cli

    rc = cli.main(["engines", "--export", str(synth), "--out", str(tmp_path / "e"), "--target", "orin",
                   "--emit-trtexec", str(tmp_path / "o.sh")])
    assert rc == 0 and (tmp_path / "o.sh").is_file() and "3 trtexec builds for orin" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    rc = cli.main(["engines", "--export", str(synth), "--out", str(tmp_path / "e"), "--target", "h100"])
    assert rc == 2 and "TensorRT's Python package is not installed" in capsys.readouterr().err
    cuda = FakeCuda()
    monkeypatch.setitem(sys.modules, "tensorrt", make_fake_trt("10.3.0", cuda))
    from hiwin_runtime import trt as rt

    monkeypatch.setattr(rt, "CudaRuntime", lambda: cuda)
    rc = cli.main(["engines", "--export", str(synth), "--out", str(tmp_path / "e"), "--target", "h100",
                   "--workspace-gib", "2", "--opt-level", "4", "--num-profiles", "3"])
    assert rc == 0 and "3 engines" in capsys.readouterr().out
    info = read_engine_set(tmp_path / "e")
    assert info["build"]["opt_level"] == 4 and len(info["engines"]["vit"]["profiles"]) == 3


# ------------------------------------------------------------------------------------ the real thing
@needs_trt
def test_real_tensorrt_builds_and_verifies_the_synthetic_engines(synth, tmp_path):
    info = E.build_engines(synth, tmp_path / "eng", E.EngineOptions(target=_local_target(), num_profiles=2))
    res = E.verify_engines(synth, tmp_path / "eng")
    assert info["tensorrt"]["version"] and all(r.passed for r in res), [r.line() for r in res]


def _local_target() -> str:
    from hiwin_runtime.trt import CudaRuntime

    cc = CudaRuntime().device().compute_capability
    for name, t in E.TARGETS.items():
        if t.compute_capability == cc:
            return name
    pytest.skip(f"no hiwin target for compute capability {cc}")
