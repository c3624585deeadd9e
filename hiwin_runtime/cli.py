"""``hiwin-run``: answer a question about an image from an export directory, without torch.

  hiwin-run --model EXPORT_DIR --image FILE --prompt TEXT [--precision fp16] [--max-new-tokens N]
            [--engines ENGINE_DIR]      (vision on TensorRT engines, the LLM on ONNX Runtime)
            [--language auto|onnx|genai|trtllm --genai GENAI_DIR --trtllm TRTLLM_DIR]
                                        (the LLM on ONNX Runtime GenAI -- the default when the export
                                        holds one --, hiwin's own ONNX loop, or TensorRT-LLM)

The answer streams to stdout, the timings go to stderr. ``hiwin-export run`` is the same command
with defaults that need the exporter (the embedded demo model, a held-out demo question).
"""

from __future__ import annotations

import argparse
import logging
import sys

log = logging.getLogger("hiwin_runtime")


def add_run_args(r: argparse.ArgumentParser, *, model_required: bool = True) -> None:
    r.add_argument("--model", required=model_required,
                   help="export directory (ONNX Runtime) or HF model directory (PyTorch, needs hiwin[model])")
    r.add_argument("--image", required=model_required, help="image file")
    r.add_argument("--prompt", default=None, help="question (default: 'What is in the image?')")
    r.add_argument("--backend", default="auto", choices=["auto", "onnxruntime", "torch"])
    r.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "int8"],
                   help="which exported graphs (ORT); int8: the int8 vision graphs (hiwin-export quantize) "
                        "with the fp32 LLM")
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampling")
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int, default=None)
    r.add_argument("--max-slices", type=int, default=None)
    r.add_argument("--template", default=None, choices=["vicuna_v1", "plain"])
    r.add_argument("--engines", default=None,
                   help="TensorRT engine set of the export (hiwin-export engines): the vision path runs on it")
    r.add_argument("--language", default="auto", choices=["auto", "onnx", "genai", "trtllm"],
                   help="where the LLM runs: auto (default: genai when the export holds a GenAI directory or "
                        "--genai is given, trtllm with --trtllm, else onnx), onnx (the export's llm graph, "
                        "hiwin's own loop), genai (ONNX Runtime GenAI: the export's genai/ or --genai DIR), "
                        "trtllm (TensorRT-LLM, --trtllm DIR)")
    r.add_argument("--genai", default=None, help="ONNX Runtime GenAI directory (default: the export's own genai/)")
    r.add_argument("--trtllm", default=None, help="TensorRT-LLM checkpoint directory (hiwin-export trtllm)")


def run(a, path: str, image, on_answer=None) -> int:
    """Load ``path``, answer about ``image`` streaming to stdout, timings to stderr; ``on_answer``
    receives the whole answer text."""
    from .pipeline import Pipeline

    settings = dict(max_new_tokens=a.max_new_tokens, do_sample=a.temperature > 0,
                    temperature=a.temperature if a.temperature > 0 else 1.0, top_p=a.top_p, seed=a.seed,
                    max_slices=a.max_slices, template=a.template)
    kw = {} if a.backend == "torch" else {"precision": a.precision}
    if getattr(a, "engines", None):
        kw["engines"] = a.engines
    language = getattr(a, "language", "auto")
    genai_dir, trtllm_dir = getattr(a, "genai", None), getattr(a, "trtllm", None)
    if a.backend == "torch":
        if language != "auto" or genai_dir or trtllm_dir:
            raise ValueError("--language / --genai / --trtllm run on an export directory, not the PyTorch backend")
    else:
        if language == "onnx" and (genai_dir or trtllm_dir):
            raise ValueError("--genai / --trtllm need --language genai / trtllm (or auto)")
        if (language == "genai" and trtllm_dir) or (language == "trtllm" and genai_dir):
            raise ValueError(f"--language {language} does not take --{'trtllm' if genai_dir is None else 'genai'}")
        if language == "trtllm" and trtllm_dir is None:
            raise ValueError("--language trtllm needs --trtllm DIR")
        kw["language"] = "onnxruntime" if language == "onnx" else language
        kw.update({k: v for k, v in (("genai", genai_dir), ("trtllm", trtllm_dir)) if v is not None})
    pipe = Pipeline.load(path, backend=a.backend, **kw)
    log.info("backend: %s", pipe.backend.name)

    started = []

    def on_text(t: str) -> None:
        if not started:  # the answer's leading space (a word-initial token) is not printed
            t = t.lstrip()
            if not t:
                return
            started.append(True)
        sys.stdout.write(t)
        sys.stdout.flush()

    ans = pipe.generate(image, a.prompt or "What is in the image?", on_text=on_text, **settings)
    sys.stdout.write("\n")
    if on_answer is not None:
        on_answer(ans.text.strip())
    t = ans.timings
    print(f"[{pipe.backend.name}] {ans.visual_tokens} visual + {ans.prompt_tokens - ans.visual_tokens} text "
          f"prompt tokens; {len(ans.token_ids)} new tokens ({ans.finish_reason}); vision {t['vision_s']:.2f} s, "
          f"prefill {t['prefill_s']:.2f} s, time to first token {t['ttft_s']:.2f} s, decode "
          f"{ans.decode_tokens_per_s:.1f} tokens/s", file=sys.stderr)
    return 0


def user_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the input's fault: reported in one line, exit status 2."""
    from .config import ConfigError
    from .image import ImageError
    from .manifest import ExportError
    from .trt import TrtUnavailable
    from .genai import GenAIUnavailable
    from .trtllm import TrtLlmUnavailable

    return (ExportError, ConfigError, ImageError, FileNotFoundError, FileExistsError, ValueError, TrtUnavailable,
            GenAIUnavailable, TrtLlmUnavailable)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hiwin-run", description=__doc__.split("\n\n")[0])
    add_run_args(ap)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        return run(a, a.model, a.image)
    except user_errors() as e:
        print(f"hiwin-run: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
