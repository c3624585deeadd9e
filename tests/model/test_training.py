"""The three training stages run on the tiny model on this CPU, and the loss measurably drops."""

from dataclasses import replace

import pytest
import torch

from hiwin_model.synthetic import write_training_data
from hiwin_model.train.common import deterministic_mode
from hiwin_model.train.llm_stages import StageArgs, train_stage
from hiwin_model.train.stage0 import CKPT_NAME, Stage0Args, train_stage0

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_training_data(tmp_path_factory.mktemp("data"), n=6)


def _drop(losses, k=5):
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    return first, last


def test_stage0_jbu_pretraining(tiny_dir, data, tmp_path):
    out = tmp_path / "s0"
    losses = train_stage0(Stage0Args(model=str(tiny_dir), images=str(data / "images"), output=str(out), steps=40,
                                     batch_size=2, res=112, crf_samples=100, log_every=100))
    first, last = _drop(losses)
    assert last < first - 0.1, (first, last)
    from hiwin_model.tiny import build_tiny_model

    m = build_tiny_model(seed=9)
    before = m.jbu.up1.range_proj[0].weight.clone()
    m.load_jbu_checkpoint(out / CKPT_NAME)  # the official stage-0 layout loads into the model
    assert not torch.equal(before, m.jbu.up1.range_proj[0].weight)


def test_stage1_projector(tiny_dir, data, tmp_path):
    # Only the projector trains and the tiny LLM is random and frozen: the visual tokens act as a
    # learned soft prompt, so the caption loss falls steadily but not dramatically.
    losses = train_stage(StageArgs(stage=1, model=str(tiny_dir), data=str(data / "pretrain.json"),
                                   image_folder=str(data / "images"), output=str(tmp_path / "s1"), batch_size=2,
                                   log_every=100, steps=40))
    first, last = _drop(losses)
    assert last < first - 0.25, (first, last)
    sd = torch.load(tmp_path / "s1" / "mm_projector.bin", weights_only=True)
    assert "model.mm_projector.query_1" in sd and all(k.startswith("model.mm_projector.") for k in sd)


def test_stage1_resume_is_exact(tiny_dir, data, tmp_path):
    """A run killed after its step-6 save and resumed gives the uninterrupted run's losses and weights,
    bit for bit. Exact by construction: deterministic=True runs every loop on one CPU thread with
    deterministic algorithms (train.common.deterministic_mode), so no kernel's summation order depends
    on thread scheduling or the machine's load (with the default threads, two identical runs in one
    process once differed by 1 ulp on a loaded 2-core machine)."""
    common = dict(stage=1, model=str(tiny_dir), data=str(data / "pretrain.json"), image_folder=str(data / "images"),
                  batch_size=2, log_every=100, deterministic=True)
    before = _determinism_settings()
    full = train_stage(StageArgs(output=str(tmp_path / "full"), steps=12, **common))
    first6 = _run_until(common, tmp_path / "resumed", 6)  # as if killed right after the step-6 save
    rest = train_stage(StageArgs(output=str(tmp_path / "resumed"), steps=12, resume=True, **common))
    assert _determinism_settings() == before  # the loop restores what it changed
    assert len(first6) == 6 and len(rest) == 6
    assert first6 == full[:6]  # two identical runs agree before any resume
    assert first6 + rest == full
    a = torch.load(tmp_path / "full" / "mm_projector.bin", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "mm_projector.bin", weights_only=True)
    assert a.keys() == b.keys()
    assert {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])} == {}


def _run_until(common, out, stop):
    """Run a 12-step schedule but stop after ``stop`` steps (as if killed right after a save).

    The real loop runs (deterministic mode included); only its end is moved: the scheduler was
    built for the 12 steps, and the loop saves at ``stop``."""
    import hiwin_model.train.llm_stages as stages

    real = stages.run_loop

    def truncated(step_fn, params, opt, sched, cfg, start, save, d):
        return real(step_fn, params, opt, sched, replace(cfg, steps=stop), start, save, d)

    stages.run_loop = truncated
    try:
        return train_stage(StageArgs(output=str(out), steps=12, **common))
    finally:
        stages.run_loop = real


def _determinism_settings():
    return (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark)


def test_deterministic_mode_sets_and_restores():
    before = _determinism_settings()
    with deterministic_mode():
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        assert not torch.is_deterministic_algorithms_warn_only_enabled() and torch.backends.cudnn.deterministic
    assert _determinism_settings() == before
    with pytest.raises(KeyError):
        with deterministic_mode(threads=1):
            raise KeyError("restored on errors too")
    assert _determinism_settings() == before
    with deterministic_mode(enabled=False):
        assert _determinism_settings() == before


def test_stage0_is_reproducible(tiny_dir, data, tmp_path):
    """Stage 0 from scratch, twice in one process: identical losses (jitters, dropout and CRF samples
    are seeded; deterministic=True fixes the kernels' summation order)."""
    kw = dict(model=str(tiny_dir), images=str(data / "images"), steps=3, batch_size=2, res=112, crf_samples=50,
              log_every=100, deterministic=True)
    a = train_stage0(Stage0Args(output=str(tmp_path / "a"), **kw))
    b = train_stage0(Stage0Args(output=str(tmp_path / "b"), **kw))
    assert len(a) == 3 and a == b
    sa = torch.load(tmp_path / "a" / CKPT_NAME, weights_only=True)["state_dict"]
    sb = torch.load(tmp_path / "b" / CKPT_NAME, weights_only=True)["state_dict"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_stage2_full_finetune(tiny_dir, data, tmp_path):
    out = tmp_path / "s2"
    losses = train_stage(StageArgs(stage=2, model=str(tiny_dir), data=str(data / "sft.json"),
                                   image_folder=str(data / "images"), output=str(out), steps=30, batch_size=2,
                                   lr=1e-3, max_slices=4, log_every=100))
    first, last = _drop(losses)
    assert last < 0.7 * first, (first, last)
    from hiwin_model.model import HiwinForCausalLM

    m = HiwinForCausalLM.from_pretrained(out)  # official layout, loads strictly
    base = HiwinForCausalLM.from_pretrained(tiny_dir)
    assert not torch.equal(m.llm.lm_head.weight, base.llm.lm_head.weight)
    assert not torch.equal(m.jbu.fixup_proj[1].weight, base.jbu.fixup_proj[1].weight)
    assert torch.equal(m.jbu.up1.range_proj[0].weight, base.jbu.up1.range_proj[0].weight)  # frozen in stage 2
    assert torch.equal(m.projector.pos_embed, base.projector.pos_embed)


def test_stage2_vision_tower_lr_is_its_own(tiny_dir, data, tmp_path):
    """``vision_tower_lr`` (LLaVA-NeXT's mm_vision_tower_lr) is the tower's lr alone: at 0 the tower
    stays bit for bit while the LLM and the projector train at ``lr``."""
    from hiwin_model.model import HiwinForCausalLM

    out = tmp_path / "s2"
    train_stage(StageArgs(stage=2, model=str(tiny_dir), data=str(data / "sft.json"), image_folder=str(data / "images"),
                          output=str(out), steps=2, batch_size=1, lr=1e-3, max_slices=1, log_every=100,
                          vision_tower_lr=0.0))
    m, base = HiwinForCausalLM.from_pretrained(out), HiwinForCausalLM.from_pretrained(tiny_dir)
    tower, tower0 = m.vision_tower.state_dict(), base.vision_tower.state_dict()
    assert all(torch.equal(tower[k], tower0[k]) for k in tower)
    assert not torch.equal(m.llm.lm_head.weight, base.llm.lm_head.weight)
    assert not torch.equal(m.projector.proj, base.projector.proj)


def test_param_groups_give_each_module_its_own_lr():
    from torch import nn

    from hiwin_model.train.llm_stages import param_groups

    a, b, c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    params = [*a.parameters(), *b.parameters(), *c.parameters()]
    g = param_groups(params, {b: 0.5, c: None})
    assert [len(x["params"]) for x in g] == [4, 2] and "lr" not in g[0] and g[1]["lr"] == 0.5
    assert all(p is q for p, q in zip(g[1]["params"], b.parameters()))
    assert len(param_groups(params, {})) == 1
    assert len(param_groups(list(a.parameters()), {b: 0.5})) == 1  # no empty group


def test_bad_training_data(tiny_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image": "x.png"}]')
    with pytest.raises(ValueError, match="lacks 'image' or 'conversations'"):
        train_stage(StageArgs(stage=1, model=str(tiny_dir), data=str(bad), image_folder=str(tmp_path),
                              output=str(tmp_path / "o"), steps=1))
