"""The training's vision path with equal FSDP2 unit calls on every rank (hiwin_model.train.vision_batch),
on the tiny model in one process: the tokens are the reference's bit for bit, padding to other ranks'
call counts makes exactly those calls and changes no token, RNG draw or gradient, and the loss module
computes what the per-sample formula computes. The 2-rank run with different crop shapes per rank is
in test_training_dist.py."""

from __future__ import annotations

import pytest
import torch

from hiwin_model.train.vision_batch import call_counts, encode_micro_batch
from tests.conftest import random_image

SIZES = [(336, 336), (500, 300), (420, 560)]  # overview only; 2 slices + overview (2 shapes); 4 + overview (1 shape)


@pytest.fixture(scope="module")
def model(tiny_dir):
    from hiwin_model.model import HiwinForCausalLM

    return HiwinForCausalLM.from_pretrained(tiny_dir)


def _prepared(model, sizes=SIZES, max_slices=7):
    return [model.processor.prepare_image(random_image(w, h, seed=i), max_slices=max_slices)
            for i, (w, h) in enumerate(sizes)]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_micro_batch_tokens_are_the_reference_bit_for_bit(model, train):
    """Same calls on the same crops as encode_prepared, grouped differently: equal tokens, and in
    train mode the JBU dropout masks are drawn in the same order (same seed, same tokens)."""
    prepared = _prepared(model)
    assert [call_counts([p.crops]) for p in prepared] == [(1, 1), (2, 3), (1, 5)]  # differ per image
    model.train(train)
    try:
        torch.manual_seed(5)
        with torch.no_grad():
            ref = [model.encode_prepared(p) for p in prepared]
        torch.manual_seed(5)
        with torch.no_grad():
            got, zero = encode_micro_batch(model, [p.crops for p in prepared])
    finally:
        model.eval()
    assert zero is None and len(got) == len(ref)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.fixture
def one_thread():
    """Bit-for-bit gradient comparisons on one intra-op thread: with two, a gradient summed over
    several calls once differed in its last bits under load (the order of a parallel accumulation)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("pad_to", [(3, 4), (1, 3)], ids=["clip-and-crops", "crops-only"])
def test_padding_makes_the_calls_and_changes_nothing(model, pad_to, one_thread):
    """pad_to = (CLIP calls, crops) of a rank with more work: an overview-only image then makes
    exactly that many CLIP-block and projector calls (forward and backward), its tokens, the RNG
    state after the call and every parameter gradient stay as without padding, and the zero term
    is exactly 0. (crops-only: the dummy crops are cut from the image's own CLIP output.)"""
    model.train()
    crops = [_prepared(model, SIZES[:1])[0].crops]
    calls = {"clip": 0, "proj": 0, "clip_bw": 0, "proj_bw": 0}
    block, proj = model.vision_tower.vision_model.encoder.layers[0], model.projector

    def count(key):
        def hook(*_):
            calls[key] += 1
        return hook

    handles = [block.register_forward_hook(count("clip")), proj.register_forward_hook(count("proj")),
               block.register_full_backward_hook(count("clip_bw")), proj.register_full_backward_hook(count("proj_bw"))]
    w = torch.randn(1, 144, model.projector.dim, generator=torch.Generator().manual_seed(0))

    def run(pad_to):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        tokens, zero = encode_micro_batch(model, crops, pad_to=pad_to)
        rng = torch.get_rng_state()
        loss = (tokens[0] * w).sum()
        (loss if zero is None else loss + zero).backward()
        return tokens[0].detach(), zero, rng, {n: p.grad.clone() for n, p in model.named_parameters()
                                                if p.grad is not None}

    try:
        ref_tokens, no_zero, ref_rng, ref_grads = run(None)
        assert no_zero is None and calls == {"clip": 1, "proj": 1, "clip_bw": 1, "proj_bw": 1}
        for k in calls:
            calls[k] = 0
        tokens, zero, rng, grads = run(pad_to)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.eval()
    assert calls == {"clip": pad_to[0], "proj": pad_to[1], "clip_bw": pad_to[0], "proj_bw": pad_to[1]}
    assert zero.requires_grad and float(zero) == 0.0
    assert torch.equal(tokens, ref_tokens) and torch.equal(rng, ref_rng)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    assert all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    with pytest.raises(ValueError, match="cannot pad"):
        encode_micro_batch(model, crops, pad_to=(0, 4))


def test_loss_module_computes_the_per_sample_formula(model, tmp_path):
    """_LossModule (one embedding call, the batched vision path) gives the loss of the per-sample
    composition encode_prepared -> layout -> build_sequence -> pad_batch -> LLM, bit for bit."""
    from hiwin_model.conversation import get_template
    from hiwin_model.train.common import build_sequence, conversation_turns, pad_batch
    from hiwin_model.train.llm_stages import _LossModule

    for i, (w, h) in enumerate(SIZES[:2]):
        random_image(w, h, seed=i).save(tmp_path / f"{i}.png")
    samples = [{"image": f"{i}.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": f"Shape {i}."},
        {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "Blue."}]} for i in range(2)]
    root = _LossModule(model, 2, tmp_path, max_slices=2, max_length=4096)
    with torch.no_grad():
        got = root(samples)
        seqs = []
        eos = model.processor.tokenizer.eos_token
        for s in samples:
            prepared = model.processor.prepare_image(tmp_path / s["image"], max_slices=2)
            visual = model.layout(prepared, model.encode_prepared(prepared))
            segments = get_template("vicuna_v1").segments(conversation_turns(s), eos)
            seqs.append(build_sequence(model, segments, visual, 4096))
        embeds, mask, labels = pad_batch(seqs)
        ref = model.llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss
    assert torch.equal(got, ref)
