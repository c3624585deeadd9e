"""The demo task, its recipe and the embedded trained demo model (docs/demo.md)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from hiwin_model import demo_task as task


def test_task_splits_are_deterministic_disjoint_and_cover_the_pipeline():
    train, held = task.items(60, task.TRAIN_SEED), task.items(60, task.HELDOUT_SEED)
    assert task.split_hash(20, task.TRAIN_SEED) == task.split_hash(20, task.TRAIN_SEED)
    assert task.split_hash(20, task.TRAIN_SEED) != task.split_hash(20, task.HELDOUT_SEED)
    assert {it.seed for it in train}.isdisjoint({it.seed for it in held})
    assert {it.kind for it in train} == {"scene", "doc"}
    assert all(a in task.ANSWERS for it in train for _, _, a in it.qa)
    assert set(Counter(k for it in train for k, _, _ in it.qa)) == set(task.QUESTIONS)
    # sliced (2x1 / 1x2) and unsliced images both occur, at max 7 slices as trained
    from hiwin_runtime.slicing import plan_slices

    grids = {plan_slices(it.size, 7).grid for it in train}
    assert None in grids and {(2, 1), (1, 2)} <= grids
    # the questions a scene asks follow from what was drawn
    for it in train:
        if it.kind == "scene":
            shapes = [s for s, _ in it.spec]
            qa = {k: a for k, _, a in it.qa}
            assert qa["count"] == task.COUNTS[len(shapes) - 1]
            if len(shapes) > 1:
                assert (qa["left"], qa["right"]) == (shapes[0], shapes[-1])


def test_every_answer_is_one_token_of_the_demo_tokenizer():
    tok = task.build_tokenizer()
    for a in task.ANSWERS:
        assert len(tok.encode(" " + a, add_special_tokens=False)) == 1, a


def test_write_split_is_llava_format(tmp_path):
    from hiwin_model.train.common import conversation_turns, read_json_list

    out = task.write_split(tmp_path / "d", 6)
    sft = read_json_list(out / "sft.json")
    assert len(sft) == 6 and all((out / "images" / s["image"]).is_file() for s in sft)
    turns = conversation_turns(sft[0])
    assert turns[0][0].startswith("<image>\n") and all(a in task.ANSWERS for _, a in turns)
    assert len(read_json_list(out / "pretrain.json")) == 6


def test_embedded_demo_model_is_small_official_and_carded():
    d = task.demo_model_dir()
    size = sum(p.stat().st_size for p in d.iterdir())
    assert size < 8 << 20
    card = json.loads((d / "card.json").read_text())
    assert card["train_split"]["seed"] == task.TRAIN_SEED and card["heldout"]["seed"] == task.HELDOUT_SEED
    from dataclasses import asdict

    from hiwin_model.train.demo import DemoRecipe

    assert card["recipe"] == asdict(DemoRecipe())  # `hiwin train demo` with no options trains what ships
    assert card["heldout"]["questions"] == task.HELDOUT_SIZE
    import hashlib

    for f, h in card["sha256"].items():
        assert hashlib.sha256((d / f).read_bytes()).hexdigest() == h, f
    from conftest import official_keys
    from safetensors import safe_open

    with safe_open(str(d / "model-00001-of-00001.safetensors"), "np") as f:
        keys = set(f.keys())
    # every multimodal key the model has is a released key name (shapes differ: tiny widths)
    mm = {k for k in keys if k.startswith(("model.mm_projector", "model.vision_tower"))}
    assert mm and mm <= set(official_keys())


@pytest.mark.slow
def test_demo_recipe_runs_resumes_and_refuses_another_recipe(tmp_path, monkeypatch):
    """The orchestration of `hiwin train demo` on a toy budget (the stages themselves are tested in
    test_training.py): every stage writes its output, a second run skips them, a changed recipe is
    refused."""
    from hiwin_model.train.demo import DemoRecipe, train_demo

    monkeypatch.setattr(task, "HELDOUT_SIZE", 2)  # the final held-out scoring, on two questions
    r = DemoRecipe(n_train=4, stage0_steps=1, stage0_batch=1, stage0_res=56, stage1_steps=1, stage1_batch=1,
                   tower_steps=2, tower_batch=2, vision_steps=1, vision_batch=1, stage2_steps=2, stage2_batch=1,
                   save_every=1)
    final = train_demo(tmp_path / "run", r)
    card = json.loads((final / "card.json").read_text())
    assert card["recipe"]["stage2_steps"] == 2 and card["heldout"]["questions"] == 2
    assert 0.0 <= card["accuracy_torch_fp32"] <= 1.0
    # the demo-only attribute head: beside the warm-up's model, in stage 2's trainer state, never shipped
    import torch

    from hiwin_model.train.demo_aux import HEAD_FILE

    assert (tmp_path / "run" / "vision" / HEAD_FILE).is_file()
    # the tower stage trained the tower only, and stage 0 started from it
    from hiwin_model.model import HiwinForCausalLM

    init_m = HiwinForCausalLM.from_pretrained(tmp_path / "run" / "init")
    tower_m = HiwinForCausalLM.from_pretrained(tmp_path / "run" / "tower")
    s0_m = HiwinForCausalLM.from_pretrained(tmp_path / "run" / "stage0" / "model")
    ti, tt, t0 = init_m.state_dict(), tower_m.state_dict(), s0_m.state_dict()
    assert all(torch.equal(ti[k], tt[k]) != k.startswith("vision_tower.") for k in ti)
    assert all(torch.equal(tt[k], t0[k]) for k in tt if k.startswith("vision_tower."))
    state = torch.load(tmp_path / "run" / "stage2" / "trainer_state.pt", weights_only=True)
    assert set(state["aux"]) == {"linear.weight", "linear.bias"}
    assert HEAD_FILE not in {p.name for p in final.iterdir()}
    shipped = json.loads((final / "model.safetensors.index.json").read_text())["weight_map"]
    init = json.loads((tmp_path / "run" / "init" / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(shipped) == set(init)  # the released structure and key layout, nothing added
    calls = []
    monkeypatch.setattr(task, "score", lambda *a, **k: calls.append(a))
    assert train_demo(tmp_path / "run", r) == final and calls == []  # nothing left to do
    with pytest.raises(ValueError, match="another recipe"):
        train_demo(tmp_path / "run", DemoRecipe(n_train=5))


def test_attribute_targets_follow_what_was_drawn():
    """The demo recipe's training aid (train/demo_aux.py): per-window targets from the pixels of the
    crops the model sees and the image's attributes, as written to sft.json."""
    import numpy as np
    import torch

    from hiwin_model.train import demo_aux as aux
    from hiwin_model.processor import HiwinProcessor
    from hiwin_runtime.slicing import apply_plan

    proc = HiwinProcessor(task.build_tokenizer())
    colours = list(task.COLOURS)
    scenes = docs = 0
    for it in task.items(12, task.TRAIN_SEED):
        attrs = task.attributes(it)
        img = it.image()
        prepared = proc.prepare_image(img, max_slices=7)
        overview = apply_plan(img, prepared.plan).overview
        rgb = aux.crop_rgb(prepared.crops[-1], proc.slicing.mean, proc.slicing.std)
        assert np.abs(rgb - np.asarray(overview, dtype=np.float32)).max() < 1.0  # un-normalised crop == pixels
        t = aux.window_targets(rgb, attrs, image_x=aux.crop_image_x(prepared.plan, len(prepared.crops) - 1))
        assert t.shape == (144, 4)
        fg = t[:, 0] > 0
        assert 0 < fg.sum() < 144
        if it.kind == "scene":
            scenes += 1
            drawn = {colours.index(c) + 1: task.SHAPES.index(s) + 1 for s, c in it.spec}
            assert set(t[fg, 0]) == set(drawn)  # every shape is seen, nothing else
            assert all(drawn[c] == k for c, k in t[fg, :2])
            assert not t[:, 2].any()
            # the place of each shape: leftmost / rightmost of two or more, "other" for the middle or only one
            n = len(it.spec)
            want = {colours.index(c) + 1: aux.PLACES.index("leftmost" if n > 1 and i == 0 else "rightmost"
                                                            if n > 1 and i == n - 1 else "other")
                    for i, (_, c) in enumerate(it.spec)}
            assert all(want[c] == p for c, p in t[fg][:, [0, 3]])
        else:
            docs += 1
            assert set(t[fg, 0]) == {colours.index(it.spec[1]) + 1}
            assert set(t[fg, 1]) == {aux.KINDS.index("text")} and not t[:, 3].any()
            # letters in reading order across the windows' columns: the word itself
            cols = {}
            for n in np.flatnonzero(t[:, 2]):
                cols.setdefault(n % 12, []).append(aux.LETTERS[t[n, 2] - 1])
            seq = [max(set(v), key=v.count) for _, v in sorted(cols.items())]
            read = "".join(c for i, c in enumerate(seq) if i == 0 or c != seq[i - 1])
            assert read == "".join(c for i, c in enumerate(it.spec[0]) if i == 0 or c != it.spec[0][i - 1]), read
        assert not t[~fg].any()
        # the tower's patch grid (rows, cols): the same labels at patch resolution, row-major
        h, w = prepared.crops[-1].shape[1] // 14, prepared.crops[-1].shape[2] // 14
        tp = aux.window_targets(rgb, attrs, (h, w), image_x=aux.crop_image_x(prepared.plan, len(prepared.crops) - 1))
        assert tp.shape == (h * w, 4) and set(tp[:, 0]) >= set(t[:, 0]) and set(tp[:, 1]) >= set(t[:, 1])
        assert np.array_equal(aux.window_targets(rgb, attrs, (12, 12), image_x=aux.crop_image_x(
            prepared.plan, len(prepared.crops) - 1)), t)
    assert scenes and docs
    head = aux.WindowAttributeHead(128, weight=0.5)
    tokens = torch.randn(len(prepared.crops), 144, 128, generator=torch.Generator().manual_seed(0))
    sample = {"id": "0", "attributes": attrs}
    loss = head.loss(sample, prepared, tokens, proc.slicing)
    assert loss.ndim == 0 and loss.item() > 0
    tt = head.targets(prepared, attrs, proc.slicing.mean, proc.slicing.std, 12)
    n_sl = prepared.plan.num_slices
    assert (tt[:144 * n_sl, 3] == aux.IGNORE).all() and (tt[144 * n_sl:, 3] >= 0).all()  # place: overview only
    with pytest.raises(ValueError, match="attributes"):
        head.loss({"id": "7"}, prepared, tokens, proc.slicing)
