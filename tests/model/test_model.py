import pytest
import torch

from conftest import random_image
from hiwin_model.image import ImageError
from hiwin_model.layout import num_image_tokens
from hiwin_model.slicing import plan_slices
from hiwin_model.vision import VisionTower


@pytest.mark.parametrize("w,h", [(336, 336), (500, 300), (300, 500), (1024, 768), (1200, 300), (300, 1200),
                                 (100, 100), (2000, 500)])
def test_encode_image_token_counts(tiny_model, w, h):
    img = random_image(w, h, seed=w + h)
    v = tiny_model.encode_image(img)
    plan = plan_slices((w, h), 9)
    assert v.shape == (num_image_tokens(plan.grid), 128)
    assert torch.isfinite(v).all()


def test_batched_crops_equal_single_crops(tiny_model):
    prepared = tiny_model.processor.prepare_image(random_image(1024, 768, seed=3))
    crops = tiny_model.encode_prepared(prepared)
    with torch.no_grad():
        singles = torch.cat([tiny_model.encode_crops(torch.from_numpy(c)[None]) for c in prepared.crops])
    torch.testing.assert_close(crops, singles, rtol=1e-5, atol=1e-5)


def test_vision_tower_matches_transformers_clip(tiny_model):
    """Our tower vs transformers' own CLIPVisionModel (interpolate_pos_encoding, hidden_states[-2])."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    ours: VisionTower = tiny_model.vision_tower
    c = ours.cfg
    hf_cfg = CLIPVisionConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                              num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                              image_size=c.image_size, patch_size=c.patch_size, hidden_act=c.hidden_act,
                              layer_norm_eps=c.layer_norm_eps)
    hf = CLIPVisionModel(hf_cfg).eval()
    sd = {k.replace("vision_model.", "", 1): v for k, v in ours.state_dict().items()}
    hf_sd = hf.state_dict()
    prefix = "" if "pre_layrnorm.weight" in hf_sd else "vision_model."
    missing = hf.load_state_dict({prefix + k: v for k, v in sd.items()}, strict=False).missing_keys
    assert all("post_layernorm" in k or f"layers.{c.num_hidden_layers - 1}." in k or "position_ids" in k
               for k in missing), missing
    for hw in [(336, 336), (336, 448), (252, 406), (28, 70)]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            want = hf(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-2][:, 1:]
            got = ours(x)
        h, w = hw[0] // 14, hw[1] // 14
        torch.testing.assert_close(got, want.transpose(1, 2).reshape(2, -1, h, w), rtol=1e-5, atol=1e-5)


def test_vision_tower_rejects_bad_crops(tiny_model):
    with pytest.raises(ValueError, match="multiples of 14"):
        tiny_model.vision_tower(torch.randn(1, 3, 30, 28))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_model.vision_tower(torch.randn(3, 28, 28))


def _manual_greedy(model, embeds, n, eos):
    ids, cur = [], embeds
    emb = model.llm.get_input_embeddings()
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model.llm(inputs_embeds=cur).logits[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
            cur = torch.cat([cur, emb(torch.tensor([[nxt]]))], dim=1)
    return ids


def test_greedy_generation_matches_a_manual_loop_and_streams(tiny_model):
    img = random_image(640, 480, seed=5)
    chunks = []
    answer = tiny_model.generate(img, "What is in the image?", max_new_tokens=12, on_text=chunks.append)
    proc = tiny_model.processor
    embeds = tiny_model.embed_prompt(proc.prompt("What is in the image?"), tiny_model.encode_image(img))
    ids = _manual_greedy(tiny_model, embeds, 12, proc.ids.eos)
    assert answer == proc.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert "".join(chunks).strip() == answer
    assert tiny_model.generate(img, "What is in the image?", max_new_tokens=12) == answer


def test_prompt_layout(tiny_model):
    proc = tiny_model.processor
    prompt = proc.prompt("Describe it.")
    assert prompt.endswith("USER: <image>\nDescribe it. ASSISTANT:")
    assert prompt.startswith("A chat between a curious user")
    pre, post = proc.tokenize_around_image(prompt)
    assert pre[0] == proc.ids.bos and proc.ids.bos not in post
    assert proc.tokenizer.decode(post) == "\nDescribe it. ASSISTANT:"
    embeds = tiny_model.embed_prompt(prompt, torch.zeros(445, 128))
    assert embeds.shape == (1, len(pre) + 445 + len(post), 128)


def test_separator_ids_come_from_the_tokenizer(tiny_model):
    tok, ids = tiny_model.processor.tokenizer, tiny_model.processor.ids
    assert tok.decode([ids.newline]) == "\n" and tok.decode([ids.comma]) == ","


def test_sampling_is_seeded(tiny_model):
    img = random_image(400, 400, seed=6)
    a = tiny_model.generate(img, "Hi?", do_sample=True, temperature=1.5, top_p=0.9, seed=3, max_new_tokens=8)
    b = tiny_model.generate(img, "Hi?", do_sample=True, temperature=1.5, top_p=0.9, seed=3, max_new_tokens=8)
    assert a == b


@pytest.mark.parametrize("kw,exc,match", [
    (dict(question=""), ValueError, "question is empty"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens must be > 0"),
    (dict(do_sample=True, temperature=0.0), ValueError, "temperature > 0"),
    (dict(max_new_tokens=5000), ValueError, "exceeds the context of 4096 tokens"),
    (dict(image=b"not an image"), ImageError, "not a recognised image"),
    (dict(template="chatml"), ValueError, "unknown template 'chatml'"),
])
def test_bad_generation_inputs(tiny_model, kw, exc, match):
    args = dict(image=random_image(336, 336), question="What?", max_new_tokens=4)
    args.update(kw)
    with pytest.raises(exc, match=match):
        tiny_model.generate(**args)
    assert tiny_model.generate(random_image(336, 336), "What?", max_new_tokens=2) is not None  # still usable


@pytest.mark.parametrize("dtype,min_cos", [(torch.bfloat16, 0.999), (torch.float16, 0.9999)])
def test_reduced_precision_model_encodes_close_to_fp32(tiny_dir, tiny_model, dtype, min_cos):
    from hiwin_model.model import HiwinForCausalLM

    m = HiwinForCausalLM.from_pretrained(tiny_dir, dtype=dtype)
    img = random_image(500, 300)
    v = m.encode_image(img)
    ref = tiny_model.encode_image(img)
    assert v.dtype == dtype and v.shape == (445, 128) and torch.isfinite(v.float()).all()
    cos = torch.nn.functional.cosine_similarity(v.float(), ref, dim=-1)
    assert cos.min() > min_cos, float(cos.min())
