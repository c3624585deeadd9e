"""``hiwin-export genai``: the language half as an ONNX Runtime GenAI model directory (docs/genai.md).

    out/model.onnx, model.onnx.data   the GenAI model builder's Llama decoder (inputs_embeds in;
                                      GroupQueryAttention, fp32 / fp16 / int4 MatMulNBits)
    out/embedding.onnx, .onnx.data    input_ids + image_features -> inputs_embeds (the embedding table,
                                      as external data: ONNX Runtime memory-maps it, so only the rows a
                                      prompt uses become resident; the visual rows spliced at the
                                      placeholder ids, in order)
    out/vision.onnx                   pixel_values [1, T, C] -> image_features [T, C], an identity: the
                                      visual rows come from the export's own vision graphs
    out/genai_config.json             the builder's config, model type "phi3v" (a GenAI VLM) + the two parts
    out/tokenizer*.json, ...          the model's tokenizer (GenAI's Tokenizer reads it too)
    out/hiwin_genai.json              sizes, token ids, precision, placeholder id, sha256 of every file

It is a directory of its own, next to the export (the export directory stays as its manifest says):
``Pipeline.from_export(export, language="genai", genai=out)``. Written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from hiwin_model.checkpoint import atomic_directory
from hiwin_runtime.genai import FACTS, PLACEHOLDER
from hiwin_runtime.manifest import sha256

from .llama_dir import read_llama_facts, write_llama_dir

log = logging.getLogger("hiwin_export")

PRECISIONS = ("fp32", "fp16", "int4")
INT4_BLOCK_SIZES = (16, 32, 64, 128, 256)  # the builder's MatMulNBits block sizes
OPSET = 17


class GenAIBuildError(RuntimeError):
    pass


def embedding_graph(table: np.ndarray, *, out_dtype=np.float32) -> onnx.ModelProto:
    """input_ids int64 [batch, seq] + image_features f32 [T, C] -> inputs_embeds [batch, seq, C].

    Ids >= 0 look up ``table``; the i-th negative id (per row) takes visual row i. During decoding GenAI
    feeds an empty [0, C] ``image_features``; a zero row in front keeps every gather in range."""
    V, C = table.shape
    dt = helper.np_dtype_to_tensor_dtype(np.dtype(out_dtype))
    inits = [numpy_helper.from_array(table.astype(out_dtype), "embed_tokens.weight"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.zeros((1, C), out_dtype), "pad_row"),
             numpy_helper.from_array(np.array([-1], np.int64), "last_axis")]
    nodes = [
        helper.make_node("Less", ["input_ids", "zero"], ["is_visual"]),
        helper.make_node("Where", ["is_visual", "zero", "input_ids"], ["token_ids"]),
        helper.make_node("Gather", ["embed_tokens.weight", "token_ids"], ["token_rows"], axis=0),
        helper.make_node("Cast", ["is_visual"], ["visual_count"], to=TensorProto.INT64),
        helper.make_node("CumSum", ["visual_count", "one_axis"], ["visual_number"]),  # 1, 2, ... at visual ids
        helper.make_node("Where", ["is_visual", "visual_number", "zero"], ["visual_index"]),
        helper.make_node("Cast", ["image_features"], ["features"], to=dt),
        helper.make_node("Concat", ["pad_row", "features"], ["padded_features"], axis=0),
        helper.make_node("Gather", ["padded_features", "visual_index"], ["visual_rows"], axis=0),
        helper.make_node("Unsqueeze", ["is_visual", "last_axis"], ["is_visual_row"]),
        helper.make_node("Where", ["is_visual_row", "visual_rows", "token_rows"], ["inputs_embeds"]),
    ]
    inits.append(numpy_helper.from_array(np.array(1, np.int64), "one_axis"))
    graph = helper.make_graph(
        nodes, "hiwin_genai_embedding",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["num_image_tokens", C])],
        [helper.make_tensor_value_info("inputs_embeds", dt, ["batch_size", "sequence_length", C])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hiwin")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def vision_graph(hidden_size: int) -> onnx.ModelProto:
    """pixel_values f32 [num_images, T, C] -> image_features f32 [num_images * T, C] (an identity)."""
    C = hidden_size
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["pixel_values", "rows_shape"], ["image_features"])], "hiwin_genai_vision",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["num_images", "num_image_tokens", C])],
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["total_image_tokens", C])],
        [numpy_helper.from_array(np.array([-1, C], np.int64), "rows_shape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="hiwin")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def run_builder(llama_dir: Path, out: Path, precision: str, *, execution_provider: str = "cpu",
                extra_options: dict | None = None, cache_dir: Path | None = None) -> None:
    """``python -m onnxruntime_genai.models.builder`` on the Llama directory (a subprocess: the
    builder imports torch and transformers and prints a lot)."""
    # prune_lm_head: the prompt's logits only at its last position (all GenAI reads); at real width with
    # a ~1300-token image prompt the LM head over every position is ~25 % of the prefill's FLOPs.
    # Logits identical to the unpruned decoder's (measured: max |diff| 0.0 at 1033 visual rows).
    opts = {"exclude_embeds": "true", "prune_lm_head": "true", **(extra_options or {})}
    with tempfile.TemporaryDirectory(prefix="hiwin-genai-cache-") as cache:
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(llama_dir), "-o", str(out),
               "-p", precision, "-e", execution_provider, "-c", str(cache_dir or cache),
               "--extra_options", *[f"{k}={v}" for k, v in opts.items()]]
        log.info("GenAI model builder: %s", " ".join(cmd[1:]))
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 or not (out / "genai_config.json").is_file():
        tail = (r.stdout + r.stderr)[-4000:]
        raise GenAIBuildError(f"the GenAI model builder failed (exit {r.returncode}):\n{tail}")


def _decoder_embeds_dtype(path: Path):
    m = onnx.load(str(path), load_external_data=False)
    for i in m.graph.input:
        if i.name == "inputs_embeds":
            return helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type)
    raise GenAIBuildError(f"{path.name}: the builder's decoder has no inputs_embeds input "
                          "(built without exclude_embeds?)")


def genai_config(builder_config: dict) -> dict:
    """The builder's Llama config as a GenAI VLM (``phi3v``): vision + embedding + the decoder."""
    cfg = json.loads(json.dumps(builder_config))
    m = cfg["model"]
    if "inputs_embeds" not in m["decoder"]["inputs"]:
        raise GenAIBuildError("the builder's genai_config has no decoder inputs_embeds (exclude_embeds missing)")
    m["decoder"]["inputs"].pop("input_ids", None)
    m["type"] = "phi3v"
    m["vision"] = {"filename": "vision.onnx", "inputs": {"pixel_values": "pixel_values"},
                   "outputs": {"image_features": "image_features"}}
    m["embedding"] = {"filename": "embedding.onnx",
                      "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
                      "outputs": {"inputs_embeds": "inputs_embeds"}}
    cfg["search"]["do_sample"] = False
    return cfg


def _matmulnbits_block_size(decoder: Path) -> int:
    """The block size of the decoder's MatMulNBits nodes (the same for all, as the builder writes them)."""
    m = onnx.load(str(decoder), load_external_data=False)
    sizes = {a.i for n in m.graph.node if n.op_type == "MatMulNBits" for a in n.attribute if a.name == "block_size"}
    if len(sizes) != 1:
        raise GenAIBuildError(f"{decoder.name}: expected one MatMulNBits block size, found {sorted(sizes)}")
    return sizes.pop()


def build_genai(out_dir: str | os.PathLike, *, model=None, llama_dir: str | os.PathLike | None = None,
                precision: str = "fp32", overwrite: bool = False, extra_options: dict | None = None,
                int4_block_size: int | None = None) -> dict:
    """Build the GenAI directory from ``model`` (a :class:`HiwinForCausalLM`, written as a Llama
    directory first) or from ``llama_dir`` (:func:`~hiwin_export.llama_dir.write_llama_dir`'s output);
    returns its ``hiwin_genai.json``. ``int4_block_size``: MatMulNBits block (int4 only; default the
    builder's, 32; 128 decodes faster on CPU at a coarser scale per block, docs/genai.md)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if int4_block_size is not None:
        if precision != "int4":
            raise ValueError(f"int4_block_size applies to precision int4 only, not {precision!r}")
        if int4_block_size not in INT4_BLOCK_SIZES:
            raise ValueError(f"int4_block_size must be one of {', '.join(map(str, INT4_BLOCK_SIZES))}, "
                             f"got {int4_block_size}")
        extra_options = {**(extra_options or {}), "block_size": str(int4_block_size)}
    if (model is None) == (llama_dir is None):
        raise ValueError("give exactly one of model= or llama_dir=")
    try:
        import onnxruntime_genai  # noqa: F401  (the builder ships with it)
    except ImportError as e:
        raise GenAIBuildError("onnxruntime-genai is not installed (pip install onnxruntime-genai)") from e
    facts: dict = {}

    def write(tmp: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="hiwin-llama-") as work:
            src = Path(llama_dir) if llama_dir is not None else write_llama_dir(model, Path(work) / "llama")
            facts.update(read_llama_facts(src))
            run_builder(src, tmp, precision, extra_options=extra_options)
            from safetensors.numpy import load_file

            table = None
            for f in sorted(src.glob("*.safetensors")):
                t = load_file(str(f))
                if "model.embed_tokens.weight" in t:
                    table = t["model.embed_tokens.weight"]
                    break
            if table is None:
                raise GenAIBuildError(f"{src}: no model.embed_tokens.weight")
        builder_cfg = json.loads((tmp / "genai_config.json").read_text())
        decoder = tmp / builder_cfg["model"]["decoder"]["filename"]
        emb_dtype = _decoder_embeds_dtype(decoder)
        # the table as external data: ONNX Runtime memory-maps it and a Gather touches only the rows it reads.
        # Inline in the protobuf it was copied whole into the process (measured at real width: +500 MiB of
        # resident memory, 6148 -> 5649 MiB peak for a 1008x672 request)
        onnx.save_model(embedding_graph(np.asarray(table, np.float32), out_dtype=emb_dtype), str(tmp / "embedding.onnx"),
                        save_as_external_data=True, all_tensors_to_one_file=True,
                        location="embedding.onnx.data", size_threshold=1024)
        onnx.save_model(vision_graph(facts["hidden_size"]), str(tmp / "vision.onnx"))
        (tmp / "genai_config.json").write_text(json.dumps(genai_config(builder_cfg), indent=4))
        import onnxruntime_genai as og

        if precision == "int4":
            facts["int4_block_size"] = _matmulnbits_block_size(decoder)
        facts.update(precision=precision, placeholder_id=PLACEHOLDER, genai_version=og.__version__,
                     decoder_embeds_dtype=str(np.dtype(emb_dtype)), model_type="phi3v")
        facts["files"] = {str(p.relative_to(tmp)): sha256(p) for p in sorted(tmp.rglob("*"))
                          if p.is_file() and p.name != FACTS}
        (tmp / FACTS).write_text(json.dumps(facts, indent=2, sort_keys=True))

    atomic_directory(Path(out_dir), write, overwrite=overwrite)
    return facts
