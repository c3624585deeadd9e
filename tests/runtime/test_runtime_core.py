"""The torch-free core: graph identities, the bucket rule as data, the crop chain, numpy layout,
the transformers-free tokenizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hiwin_runtime.buckets import HIWIN_BUCKETS, apply_bucket_rule, bucket_rule, sampling_grid
from hiwin_runtime.crop_chain import BatchPolicy, CropChain, Recorder, Stages
from hiwin_runtime.graph_id import GraphId, serving_graph
from hiwin_runtime.layout import layout_indices, layout_tokens, num_image_tokens


# ------------------------------------------------------------------------------------ graph ids
@pytest.mark.parametrize("name,gid", [
    ("vit", GraphId("vit")), ("jbu.fp16", GraphId("jbu", None, "fp16")), ("hiwin_3x3", GraphId("hiwin", (3, 3))),
    ("hiwin_2x4.fp16", GraphId("hiwin", (2, 4), "fp16")), ("llm", GraphId("llm")), ("embed.fp16", GraphId("embed", None, "fp16")),
    ("hiwin", GraphId("hiwin")), ("hiwin.fp16", GraphId("hiwin", None, "fp16")),
])
def test_graph_id_round_trip(name, gid):
    assert GraphId.parse(name) == gid and gid.name == name and GraphId.parse(gid.file) == gid
    assert gid.at("fp32").precision == "fp32" and gid.at("fp16").base == gid.base


@pytest.mark.parametrize("bad", ["hiwin_3", "vit_3x3", "nope", "hiwin_3x3.int3", "hiwin_3x", "../vit"])
def test_graph_id_refuses_bad_names(bad):
    with pytest.raises(ValueError):
        GraphId.parse(bad)


def test_serving_graph_prefers_the_any_grid_projector():
    buckets = {GraphId("hiwin", b) for b in HIWIN_BUCKETS}
    assert serving_graph("hiwin", (2, 3), "fp32", buckets) == GraphId("hiwin", (2, 3))
    assert serving_graph("hiwin", (2, 3), "fp16", buckets | {GraphId("hiwin", None, "fp16")}) == GraphId("hiwin", None, "fp16")
    assert serving_graph("hiwin", (2, 3), "fp32", {"hiwin", "vit"}) == GraphId("hiwin")  # names work too
    assert serving_graph("jbu", None, "fp16", set()) == GraphId("jbu", None, "fp16")
    with pytest.raises(ValueError, match="needs its bucket"):
        serving_graph("hiwin", None, "fp32", buckets)


def test_weights_file_is_shared_per_family_and_precision():
    assert {GraphId("hiwin", b).weights_file for b in HIWIN_BUCKETS} == {"hiwin.weights"}
    assert GraphId("hiwin", (3, 3), "fp16").weights_file == "hiwin.fp16.weights"


# ------------------------------------------------------------------------------------ bucket rule
def test_bucket_rule_as_data_equals_the_reference_rule():
    rule = json.loads(json.dumps(bucket_rule()))  # as a consumer reads it from manifest.json
    seen = set()
    for w in range(2, 80):
        for h in range(2, 80):
            got = apply_bucket_rule(rule, w, h)
            assert got == sampling_grid(w, h), (w, h)
            seen.add(got)
    assert seen == set(HIWIN_BUCKETS)


def test_unknown_bucket_rule_is_refused():
    with pytest.raises(ValueError, match="unknown bucket rule"):
        apply_bucket_rule({"kind": "nearest", "candidates_wh": [[3, 3]]}, 3, 3)


# ------------------------------------------------------------------------------------ layout
@pytest.mark.parametrize("grid", [None, (1, 2), (2, 1), (3, 2), (3, 3), (1, 9)])
def test_numpy_layout_equals_torch_layout(grid):
    from hiwin_model.layout import layout_image_tokens

    n = 1 if grid is None else grid[0] * grid[1] + 1
    rng = np.random.default_rng(0)
    crops, nl, comma = rng.normal(size=(n, 144, 5)), rng.normal(size=5), rng.normal(size=5)
    want = layout_image_tokens(torch.from_numpy(crops), grid, torch.from_numpy(nl), torch.from_numpy(comma))
    got = layout_tokens(crops, grid, nl, comma)
    assert got.shape == (num_image_tokens(grid), 5)
    np.testing.assert_array_equal(got, want.numpy())


def test_layout_indices_cover_every_crop_token_once():
    idx = layout_indices((3, 2), 7)
    body = idx[idx < 7 * 144]
    assert sorted(body.tolist()) == list(range(7 * 144))
    assert (idx == 7 * 144).sum() == 2 * 12 and (idx == 7 * 144 + 1).sum() == 1  # row ends, one ","


# ------------------------------------------------------------------------------------ crop chain
class FakeStages:
    """Stages that encode which crop and which call produced each token, and log batch sizes."""

    def __init__(self):
        self.calls = []

    def stages(self) -> Stages:
        def vit(x):
            self.calls.append(("vit", x.shape[0]))
            return x[:, :1, ::14, ::14] * 1.0  # (B, 1, h, w): the crop's own pixel values

        def jbu(f1, x):
            self.calls.append(("jbu", f1.shape[0]))
            return f1.repeat(2, -1).repeat(2, -2), f1.repeat(4, -1).repeat(4, -2)

        def projector(bucket, f1, f2, f4):
            self.calls.append(("hiwin", f1.shape[0], bucket))
            return np.broadcast_to(f1[:, :1, :1, :1].reshape(-1, 1, 1), (f1.shape[0], 4, 3)).copy()
        return Stages(vit, jbu, projector)


def _crops():
    shapes = [(28, 42), (42, 28), (28, 42), (28, 28), (28, 42)]  # H, W: two groups interleaved
    return [np.full((3, h, w), float(i), np.float32) for i, (h, w) in enumerate(shapes)]


def test_chain_puts_tokens_back_in_crop_order():
    fake = FakeStages()
    tokens = CropChain(fake.stages(), patch_size=14).encode_crops(_crops())
    assert tokens.shape == (5, 4, 3)
    assert [float(t[0, 0]) for t in tokens] == [0, 1, 2, 3, 4]


def test_chain_batching_policy():
    fake = FakeStages()
    CropChain(fake.stages(), patch_size=14, policy=BatchPolicy(vision_batch=2, upsample_batch=1)).encode_crops(_crops())
    vit = [c[1] for c in fake.calls if c[0] == "vit"]
    assert vit == [2, 1, 1, 1]  # group of 3 (28x42) in ViT batches of 2, then the two singletons
    assert all(c[1] == 1 for c in fake.calls if c[0] in ("jbu", "hiwin"))
    fake = FakeStages()
    CropChain(fake.stages(), patch_size=14, policy=BatchPolicy(None, None)).encode_crops(_crops())
    assert [c[1] for c in fake.calls if c[0] == "hiwin"] == [3, 1, 1]
    buckets = {c[2] for c in fake.calls if c[0] == "hiwin"}
    assert buckets == {sampling_grid(3, 2), sampling_grid(2, 3), sampling_grid(2, 2)}


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_batch_policy_refuses_bad_sizes(bad):
    with pytest.raises(ValueError, match="must be None or an int >= 1"):
        BatchPolicy(vision_batch=bad)


def test_recorder_names_stage_io():
    fake, rec = FakeStages(), Recorder()
    CropChain(rec.wrap(fake.stages()), patch_size=14).encode_crops(_crops()[:2])
    fams = [c.family for c in rec.calls]
    assert fams == ["vit", "jbu", "hiwin", "vit", "jbu", "hiwin"]
    assert set(rec.calls[1].inputs) == {"features", "pixel_values"} and set(rec.calls[1].outputs) == {"feat2x", "feat4x"}
    assert rec.calls[2].bucket == sampling_grid(3, 2) and set(rec.calls[2].outputs) == {"tokens"}


# ------------------------------------------------------------------------------------ tokenizer
def test_file_tokenizer_equals_transformers(tiny_dir):
    from transformers import AutoTokenizer

    from hiwin_runtime.processor import resolve_token_ids
    from hiwin_runtime.tokenizer import FileTokenizer, HFTokenizer

    hf, ours = HFTokenizer(AutoTokenizer.from_pretrained(str(tiny_dir))), FileTokenizer(tiny_dir)
    assert (ours.bos_id, ours.eos_id, ours.eos_token) == (hf.bos_id, hf.eos_id, hf.eos_token)
    assert resolve_token_ids(ours) == resolve_token_ids(hf)
    texts = ["USER: What is in the image? ASSISTANT:", " a red square, 3 dogs.\n", "ünïcödé ✓ 🙂", "", "  x  "]
    for t in texts:
        assert ours.encode(t) == hf.encode(t), t
        ids = hf.encode(t) + [2]
        assert ours.decode(ids) == hf.decode(ids), t


def test_file_tokenizer_needs_tokenizer_json(tmp_path):
    from hiwin_runtime.tokenizer import FileTokenizer

    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        FileTokenizer(tmp_path)
