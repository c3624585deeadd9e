"""The three training stages run on the tiny model on this CPU, and the loss measurably drops."""

import pytest
import torch

from hiwin_model.demo import write_training_data
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
    common = dict(stage=1, model=str(tiny_dir), data=str(data / "pretrain.json"), image_folder=str(data / "images"),
                  batch_size=2, log_every=100)
    full = train_stage(StageArgs(output=str(tmp_path / "full"), steps=12, **common))
    first6 = _run_until(common, tmp_path / "resumed", 6)  # as if killed right after the step-6 save
    rest = train_stage(StageArgs(output=str(tmp_path / "resumed"), steps=12, resume=True, **common))
    assert len(rest) == 6 and first6 + rest == full
    a = torch.load(tmp_path / "full" / "mm_projector.bin", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "mm_projector.bin", weights_only=True)
    assert a.keys() == b.keys()
    assert {k: float((a[k] - b[k]).abs().max()) for k in a if not torch.equal(a[k], b[k])} == {}


def _run_until(common, out, stop):
    """Run a 12-step schedule but stop after ``stop`` steps (as if killed right after a save)."""
    import hiwin_model.train.llm_stages as stages

    real = stages.run_loop

    def truncated(step_fn, params, opt, sched, cfg, start, save, d):
        losses = []
        for step in range(start, stop):
            opt.zero_grad(set_to_none=True)
            losses.append(step_fn(step))
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
        save(stop)
        return losses

    stages.run_loop = truncated
    try:
        return train_stage(StageArgs(output=str(out), steps=12, **common))
    finally:
        stages.run_loop = real


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


def test_bad_training_data(tiny_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"image": "x.png"}]')
    with pytest.raises(ValueError, match="lacks 'image' or 'conversations'"):
        train_stage(StageArgs(stage=1, model=str(tiny_dir), data=str(bad), image_folder=str(tmp_path),
                              output=str(tmp_path / "o"), steps=1))
