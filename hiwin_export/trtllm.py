"""``hiwin-export trtllm``: the LLM as a checkpoint for TensorRT-LLM's LLM API (docs/trtllm.md).

    out/config.json                 the Llama config; architectures ["HiwinLlamaForCausalLM"] (TensorRT-LLM's
                                    Llama + our visual rows, registered by hiwin_runtime.trtllm_model)
    out/model*.safetensors          fp16 weights, or ModelOpt's quantized ones (fp8: float8_e4m3fn weights +
                                    per-tensor weight/input scales; int4_awq: two int4 per uint8, one fp
                                    scale per group of 128 inputs, pre_quant_scale where not folded)
    out/hf_quant_config.json        (fp8, int4_awq) ModelOpt's quantization facts, which TensorRT-LLM reads
    out/generation_config.json, tokenizer files
    out/hiwin_trtllm.json           sizes, token ids, template, precision, recipe (ModelOpt config,
                                    calibration set and its sha256), the quantized checkpoint's logits
                                    cosine against the source, sha256 of every file

Quantization is ModelOpt's PyTorch post-training quantization (``mtq.quantize`` with ``FP8_DEFAULT_CFG``
or ``INT4_AWQ_CFG``) calibrated on prompts that look like the real ones (the template around visual rows
from our vision path, and text-only prompts), exported with ``export_hf_checkpoint`` (its "unified HF
checkpoint"). It runs on the CPU (fp32 calibration; ~4 bytes per parameter of RAM) or on a GPU
(``device="cuda"``, fp16). Written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from hiwin_model.checkpoint import atomic_directory
from hiwin_runtime.manifest import sha256
from hiwin_runtime.trtllm import ARCHITECTURE, FACTS, PRECISIONS

from .llama_dir import read_llama_facts, write_llama_dir

log = logging.getLogger("hiwin_export")

RECIPES = {"fp8": "FP8_DEFAULT_CFG", "int4_awq": "INT4_AWQ_CFG"}
QUANT_ALGOS = {"fp8": "FP8", "int4_awq": "W4A16_AWQ"}
CALIBRATION_QUESTIONS = (
    "What is written on this page?", "Describe the image in detail.", "What is the title of the document?",
    "How many columns does the table have?", "Summarise the text.", "What colour is the largest shape?",
    "Read the numbers in the first row.", "Is there a signature at the bottom?")
CALIBRATION_TEXT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: Explain what a transformer model is. ASSISTANT:",
    "USER: Write a short note about the weather in Paris in spring. ASSISTANT: Spring in Paris is mild,",
    "The invoice lists three items: paper (12.50), ink (40.00) and delivery (5.00); the total is 57.50.",
    "def area(r):\n    return 3.14159 * r * r\n\nprint(area(2.0))",
)


class TrtLlmExportError(RuntimeError):
    pass


# ------------------------------------------------------------------------------------ calibration
def calibration_set(model, images, *, questions=CALIBRATION_QUESTIONS, texts=CALIBRATION_TEXT) -> list[np.ndarray]:
    """Input embeddings [L, hidden] (float32) of prompts like the real ones: the template around the
    visual rows of ``images`` (our PyTorch vision path, through the crop chain), and text-only prompts."""
    from hiwin_runtime.pipeline import Pipeline

    pipe = Pipeline.from_model(model, max_concurrency=1)
    samples = []
    for i, image in enumerate(images):
        pre, post = pipe.tokenize(questions[i % len(questions)])
        visual = pipe.encode_image(image)
        emb = pipe.backend.embed
        samples.append(np.concatenate([emb(np.array(pre, np.int64)), visual, emb(np.array(post, np.int64))])
                       .astype(np.float32))
    tok = model.processor.tokenizer
    for t in texts:
        ids = np.array(tok(t)["input_ids"], np.int64)
        samples.append(pipe.backend.embed(ids).astype(np.float32))
    return samples


def text_calibration_set(llm, tokenizer, texts=CALIBRATION_TEXT) -> list[np.ndarray]:
    """Text-only prompts (a Llama directory alone has no vision path)."""
    import torch

    out = []
    with torch.no_grad():
        for t in texts:
            ids = torch.tensor(tokenizer(t)["input_ids"])[None]
            out.append(llm.get_input_embeddings()(ids)[0].float().numpy())
    return out


def samples_sha256(samples: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(np.ascontiguousarray(s, np.float32).tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ checkpoints
def quantize(llm, precision: str, samples: list[np.ndarray], *, device: str = "cpu"):
    """ModelOpt PTQ of a transformers Llama in place: ``mtq.quantize`` with the recipe's config and a
    forward loop over ``samples`` (input embeddings)."""
    import copy

    import modelopt.torch.quantization as mtq
    import torch

    cfg = copy.deepcopy(getattr(mtq, RECIPES[precision]))
    dtype = next(llm.parameters()).dtype

    def forward_loop(model):
        with torch.no_grad():
            for i, s in enumerate(samples):
                model(inputs_embeds=torch.from_numpy(s)[None].to(device=device, dtype=dtype), use_cache=False)
                log.info("  calibration %d/%d (%d tokens)", i + 1, len(samples), s.shape[0])

    return mtq.quantize(llm, cfg, forward_loop=forward_loop)


def _unpack_int4(packed, scale, group: int):
    """ModelOpt's int4 packing (two output rows per byte, low nibble first) -> float weight [out, in]."""
    import torch

    p = packed.to(torch.int16)
    lo, hi = p & 0x0F, (p >> 4) & 0x0F
    q = torch.stack([lo, hi], dim=1).reshape(p.shape[0] * 2, p.shape[1])  # rows 2j, 2j+1
    q = torch.where(q >= 8, q - 16, q).float()
    return q * scale.float().repeat_interleave(group, dim=1)


def dequantized_state_dict(path: str | os.PathLike) -> dict:
    """The checkpoint's weights as float32 Llama weights: fp8 weight * weight_scale; int4 unpacked * group
    scale, times ``pre_quant_scale`` per input column where AWQ kept it (where ModelOpt folded it into
    the preceding RMSNorm, that norm's exported weight carries it). For checking a checkpoint."""
    import torch
    from safetensors.torch import load_file

    path = Path(path)
    q = json.loads((path / "hf_quant_config.json").read_text())["quantization"] \
        if (path / "hf_quant_config.json").is_file() else {}
    algo, group = q.get("quant_algo"), q.get("group_size")
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out = {}
    for k, t in tensors.items():
        if k.endswith((".weight_scale", ".input_scale", ".pre_quant_scale", ".k_scale", ".v_scale")):
            continue
        if not k.endswith(".weight") or f"{k}_scale" not in tensors:
            out[k] = t.float()
            continue
        base = k[:-len(".weight")]
        if algo == "FP8":
            w = t.float() * tensors[f"{k}_scale"].float()
        elif algo == "W4A16_AWQ":
            w = _unpack_int4(t, tensors[f"{k}_scale"], int(group))
        else:
            raise TrtLlmExportError(f"{path}: cannot dequantize quant_algo {algo!r}")
        pqs = tensors.get(f"{base}.pre_quant_scale")
        if pqs is not None:
            w = w * pqs.float()[None, :]
        out[k] = w
    return out


def logits_cosine(source_dir: Path, checkpoint_dir: Path, samples: list[np.ndarray]) -> list[float]:
    """Last-position logits cosine, source Llama vs the (dequantized) checkpoint, per sample (fp32, CPU)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    ref = LlamaForCausalLM.from_pretrained(str(source_dir), dtype=torch.float32).eval()
    cfg = LlamaConfig.from_pretrained(str(source_dir))
    got = LlamaForCausalLM(cfg).eval()
    missing, unexpected = got.load_state_dict(dequantized_state_dict(checkpoint_dir), strict=False)
    missing = [m for m in missing if "rotary" not in m]
    if missing or unexpected:
        raise TrtLlmExportError(f"{checkpoint_dir}: weights do not map onto the Llama "
                                f"(missing {missing[:4]}, unexpected {unexpected[:4]})")
    cos = []
    with torch.no_grad():
        for s in samples:
            x = torch.from_numpy(s)[None]
            a, b = ref(inputs_embeds=x).logits[0, -1].double(), got(inputs_embeds=x).logits[0, -1].double()
            cos.append(float(a @ b / (a.norm() * b.norm())))
    return cos


def build_trtllm(out_dir: str | os.PathLike, *, model=None, llama_dir: str | os.PathLike | None = None,
                 precision: str = "fp16", images=None, device: str = "cpu", overwrite: bool = False,
                 check: bool = True) -> dict:
    """Write the TensorRT-LLM directory from ``model`` (a :class:`HiwinForCausalLM`: written as a Llama
    directory first; calibration prompts carry visual rows of ``images``) or from ``llama_dir``
    (text-only calibration). Returns its ``hiwin_trtllm.json``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if (model is None) == (llama_dir is None):
        raise ValueError("give exactly one of model= or llama_dir=")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {device!r}")
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    if device == "cuda" and not torch.cuda.is_available():
        raise TrtLlmExportError("device='cuda' but torch sees no CUDA device")
    quantized = precision in RECIPES
    if quantized:
        try:
            import modelopt
            import modelopt.torch.quantization  # noqa: F401
            from modelopt.torch.export import export_hf_checkpoint
        except ImportError as e:
            raise TrtLlmExportError("fp8 / int4_awq need NVIDIA ModelOpt (pip install nvidia-modelopt)") from e
    facts: dict = {}

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="hiwin-llama-") as work:
            if llama_dir is not None:
                src = Path(llama_dir)
                facts.update(read_llama_facts(src))
            else:
                src = write_llama_dir(model, Path(work) / "llama")
                facts.update(read_llama_facts(src))
            samples, calib = [], None
            if quantized or check:
                if model is not None:
                    from hiwin_model.synthetic import parity_pages

                    imgs = list(images) if images is not None else parity_pages(DEFAULT_CALIBRATION_SIZES)
                    samples = calibration_set(model, imgs)
                    calib = {"visual_prompts": len(imgs), "text_prompts": len(CALIBRATION_TEXT)}
                else:
                    tok = AutoTokenizer.from_pretrained(str(src))
                    tmp_llm = LlamaForCausalLM.from_pretrained(str(src), dtype=torch.float32)
                    samples = text_calibration_set(tmp_llm, tok)
                    del tmp_llm
                    calib = {"visual_prompts": 0, "text_prompts": len(CALIBRATION_TEXT)}
                calib.update(tokens=int(sum(s.shape[0] for s in samples)), sha256=samples_sha256(samples))
            dtype = torch.float16 if (device == "cuda" or not quantized) else torch.float32
            llm = LlamaForCausalLM.from_pretrained(str(src), dtype=dtype).to(device).eval()
            recipe: dict = {"precision": precision, "source_dtype": "float32"}
            if quantized:
                log.info("ModelOpt %s (%s) on %s: calibrating on %d prompts ...", precision, RECIPES[precision],
                         device, len(samples))
                llm = quantize(llm, precision, samples, device=device)
                llm = llm.to(torch.float16)  # calibrated in fp32 on the CPU; TensorRT-LLM runs the checkpoint in fp16
                export_hf_checkpoint(llm, dtype=torch.float16, export_dir=str(tmp))
                qcfg = json.loads((tmp / "hf_quant_config.json").read_text())["quantization"]
                if qcfg.get("quant_algo") != QUANT_ALGOS[precision]:
                    raise TrtLlmExportError(f"ModelOpt wrote quant_algo {qcfg.get('quant_algo')!r}, "
                                            f"expected {QUANT_ALGOS[precision]}")
                recipe.update(tool="nvidia-modelopt", modelopt_version=modelopt.__version__,
                              config=f"modelopt.torch.quantization.{RECIPES[precision]}",
                              export="modelopt.torch.export.export_hf_checkpoint (unified HF checkpoint)",
                              quant_algo=qcfg["quant_algo"], group_size=qcfg.get("group_size"),
                              exclude_modules=qcfg.get("exclude_modules"), calibration=calib, device=device)
            else:
                llm.save_pretrained(str(tmp))
                recipe.update(tool="transformers", dtype="float16")
            del llm
            conf = json.loads((tmp / "config.json").read_text())
            conf["architectures"] = [ARCHITECTURE]
            if not quantized:
                conf.pop("quantization_config", None)
            (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True))
            for f in src.iterdir():  # tokenizer and generation config
                if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens")) or f.name in
                                    ("generation_config.json", "chat_template.jinja")):
                    shutil.copy2(f, tmp / f.name)
            if check and samples:
                cos = logits_cosine(src, tmp, samples[:2] + samples[-1:])
                recipe["check"] = {"what": "last-position logits cosine vs the fp32 source (dequantized weights, "
                                           "fp32, CPU), on calibration prompts", "cosine_min": min(cos),
                                   "cosine": cos}
                log.info("  logits cosine vs source: min %.5f", min(cos))
        facts.update(precision=precision, architecture=ARCHITECTURE, base_architecture="LlamaForCausalLM",
                     recipe=recipe, placeholder="prompt-table ids vocab_size .. vocab_size+T-1")
        facts["files"] = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*"))
                          if p.is_file() and p.name != FACTS}
        (tmp / FACTS).write_text(json.dumps(facts, indent=2, sort_keys=True))

    atomic_directory(Path(out_dir), write, overwrite=overwrite)
    return facts


# a few page shapes (aspect ratios 1:2 .. 2:1), none a parity page size
DEFAULT_CALIBRATION_SIZES = ((1000, 660), (660, 1000), (700, 700), (1200, 600))
