"""``hiwin``: the reference model's command line.

  hiwin generate [--model DIR] [--image FILE] [--prompt TEXT]   answer a question (streams)
  hiwin encode --model DIR --image FILE --out tokens.safetensors  visual tokens of one image
  hiwin make-tiny OUT                                          tiny random checkpoint (official layout)
  hiwin make-data OUT                                          generated images + LLaVA JSON
  hiwin train stage0|stage1|stage2 ...                         the three training stages (torchrun: ddp/fsdp)
  hiwin train demo --output OUT                                the embedded demo model's recipe (docs/demo.md)
  hiwin bench-vision [--width 1008 --height 672]               vision path at real dims: time, peak RSS

Without ``--model``, ``generate`` uses the embedded demo model (trained by ``hiwin train demo`` on
the generated task of :mod:`hiwin_model.demo_task`, docs/demo.md); with neither ``--image`` nor
``--prompt`` it answers a held-out demo question and prints the question, the answer and the
expected answer.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

log = logging.getLogger("hiwin")


def _add_model_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument("--model", required=required, help="HF model directory (released or hiwin-written)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--mm-vision-tower", default=None, help="override config.json's mm_vision_tower")
    p.add_argument("--max-slices", type=int, default=None, help="slice budget (default 9)")
    p.add_argument("--pre-resize", type=int, default=None, help="upscale-only long side before slicing")


def _load(args):
    from .model import HiwinForCausalLM

    kw = dict(dtype=args.dtype, device=args.device, mm_vision_tower=args.mm_vision_tower,
              max_slices=args.max_slices, pre_resize=args.pre_resize)
    if args.model is not None:
        return HiwinForCausalLM.from_pretrained(args.model, **kw)
    from .demo_task import demo_model_dir

    log.info("no --model: using the embedded demo model (trained on the generated task, docs/demo.md)")
    return HiwinForCausalLM.from_pretrained(demo_model_dir(), **kw)


def cmd_generate(args) -> int:
    from .demo_task import demo_question

    model = _load(args)
    image, prompt, expected = args.image, args.prompt, None
    if image is None and prompt is None:  # the main job: a held-out demo question, answer checked
        image, prompt, expected = demo_question()
    elif image is None:
        image = demo_question()[0]
    prompt = prompt or "What is in the image?"
    prepared_plan = model.processor.prepare_image(image, max_slices=args.max_slices).plan
    log.info("image %sx%s -> grid %s, %d crops", *prepared_plan.image_size, prepared_plan.grid,
             len(prepared_plan.crop_sizes))
    out = sys.stdout

    started = []

    def on_text(t: str) -> None:
        if not started:  # the answer's leading space (a word-initial token) is not printed
            t = t.lstrip()
            if not t:
                return
            started.append(True)
        out.write(t)
        out.flush()

    out.write(f"question: {prompt}\nanswer: ")
    answer = model.generate(image, prompt, template=args.template, max_new_tokens=args.max_new_tokens,
                            do_sample=args.sample, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                            max_slices=args.max_slices, on_text=on_text)
    out.write("\n")
    if expected is not None:
        out.write(f"expected: {expected} ({'correct' if answer == expected else 'WRONG'})\n")
    return 0


def cmd_encode(args) -> int:
    from safetensors.torch import save_file

    model = _load(args)
    tokens = model.encode_image(args.image, max_slices=args.max_slices)
    tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
    save_file({"visual_tokens": tokens.float().contiguous()}, str(tmp))
    tmp.replace(args.out)
    print(f"{args.out}: visual_tokens {tuple(tokens.shape)}")
    return 0


def cmd_make_tiny(args) -> int:
    from .tiny import write_tiny_checkpoint

    print(write_tiny_checkpoint(args.out, seed=args.seed, overwrite=args.overwrite))
    return 0


def cmd_make_data(args) -> int:
    from .synthetic import write_training_data

    print(write_training_data(args.out, n=args.n, seed=args.seed))
    return 0


def cmd_bench_vision(args) -> int:
    from .bench import run

    return run(args)


def cmd_train(args) -> int:
    if args.stage == "demo":
        from dataclasses import replace

        from .train.demo import DemoRecipe, train_demo

        recipe = DemoRecipe(seed=args.seed, log_every=args.log_every)
        if args.steps:
            recipe = replace(recipe, stage2_steps=args.steps)
        if args.n_train:
            recipe = replace(recipe, n_train=args.n_train)
        if args.tower_steps is not None:
            recipe = replace(recipe, tower_steps=args.tower_steps)
        if args.vision_tower_lr is not None:
            recipe = replace(recipe, later_tower_lr=args.vision_tower_lr)
        print(train_demo(args.output, recipe, device=args.device))
        return 0
    if not args.model:
        raise SystemExit(f"hiwin train {args.stage}: --model is required")
    if args.stage == "stage0":
        from .train.stage0 import Stage0Args, train_stage0

        train_stage0(Stage0Args(model=args.model, images=args.images, output=args.output, steps=args.steps or 2000,
                                batch_size=args.batch_size or 16, lr=args.lr or 1e-3, res=args.res,
                                crf_samples=args.crf_samples, seed=args.seed,
                                resume=args.resume, log_every=args.log_every, save_every=args.save_every,
                                device=args.device))
        return 0
    from .train.llm_stages import StageArgs, train_stage

    stage = 1 if args.stage == "stage1" else 2
    if not args.data or not args.image_folder:
        raise SystemExit(f"hiwin train {args.stage}: --data and --image-folder are required")
    lora = None
    if args.lora_r:
        from .train.lora import LoraSpec

        lora = LoraSpec(r=args.lora_r, alpha=args.lora_alpha if args.lora_alpha is not None else 2.0 * args.lora_r,
                        dropout=args.lora_dropout, vision=args.lora_vision)
    train_stage(StageArgs(stage=stage, model=args.model, data=args.data, image_folder=args.image_folder,
                          output=args.output, steps=args.steps, batch_size=args.batch_size or 1, lr=args.lr,
                          max_length=args.max_length, max_slices=args.max_slices or 7,
                          projector_weights=args.projector_weights, dtype=args.dtype, seed=args.seed,
                          resume=args.resume, log_every=args.log_every, save_every=args.save_every,
                          device=args.device, strategy=args.strategy, grad_accum=args.grad_accum,
                          activation_checkpointing=args.activation_checkpointing,
                          checkpoint_dir=args.checkpoint_dir, keep_checkpoints=args.keep_checkpoints, lora=lora,
                          loss_log=args.loss_log, tf32=not args.no_tf32, deterministic=args.deterministic,
                          warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
                          projector_lr=args.projector_lr, vision_tower_lr=args.vision_tower_lr))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hiwin", description="LLaVA-UHD v2 reference model")
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    g = sub.add_parser("generate", help="answer a question about an image (streams the answer)")
    _add_model_args(g)
    g.add_argument("--image", help="image file (default: a generated held-out demo image)")
    g.add_argument("--prompt", default=None,
                   help="question (default: the demo question when --image is not given, else 'What is in the image?')")
    g.add_argument("--template", default="vicuna_v1", choices=["vicuna_v1", "plain"])
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("encode", help="write an image's visual tokens (T, C) to safetensors")
    _add_model_args(e, required=True)
    e.add_argument("--image", required=True)
    e.add_argument("--out", required=True)
    e.set_defaults(func=cmd_encode)

    t = sub.add_parser("make-tiny", help="write a tiny random checkpoint in the official layout")
    t.add_argument("out")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=cmd_make_tiny)

    dt = sub.add_parser("make-data", help="write generated images + LLaVA-style JSON for the training stages")
    dt.add_argument("out")
    dt.add_argument("-n", type=int, default=12)
    dt.add_argument("--seed", type=int, default=0)
    dt.set_defaults(func=cmd_make_data)

    b = sub.add_parser("bench-vision", help="time + peak RSS of the vision path at real dims (random weights)")
    from .bench import add_args as add_bench_args

    add_bench_args(b)
    b.set_defaults(func=cmd_bench_vision)

    tr = sub.add_parser("train", help="training stages (multi-GPU: launch with torchrun)")
    tr.add_argument("stage", choices=["stage0", "stage1", "stage2", "demo"],
                    help="demo: the whole recipe of the embedded demo model, stages 0 -> 1 -> 2 (docs/demo.md)")
    tr.add_argument("--model", help="HF model directory to start from (not for demo)")
    tr.add_argument("--n-train", type=int, default=None, help="demo: training images (default 4000)")
    tr.add_argument("--tower-steps", type=int, default=None,
                    help="demo: steps of the demo-only tower pre-training stage (default 4800; 0: off; docs/demo.md)")
    tr.add_argument("--output", required=True)
    tr.add_argument("--images", help="stage0: folder of images")
    tr.add_argument("--data", help="stage1/2: LLaVA-style JSON")
    tr.add_argument("--image-folder", help="stage1/2: root of the JSON's image paths")
    tr.add_argument("--projector-weights", help="stage2: mm_projector.bin from stage 1")
    tr.add_argument("--steps", type=int, default=None)
    tr.add_argument("--batch-size", type=int, default=None)
    tr.add_argument("--lr", type=float, default=None)
    tr.add_argument("--res", type=int, default=336, help="stage0 crop size")
    tr.add_argument("--crf-samples", type=int, default=1000, help="stage0: pixels sampled by the CRF loss")
    tr.add_argument("--max-length", type=int, default=4096)
    tr.add_argument("--max-slices", type=int, default=None)
    tr.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"],
                    help="ddp: weights and compute; fsdp: compute (fp32 master weights) and the saved model")
    tr.add_argument("--device", default=None)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--resume", action="store_true")
    tr.add_argument("--log-every", type=int, default=10)
    tr.add_argument("--save-every", type=int, default=0)
    tr.add_argument("--strategy", default="auto", choices=["auto", "ddp", "fsdp"],
                    help="stage1/2: ddp replicas or FSDP2 sharding (auto: fsdp when a replica would not fit)")
    tr.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    tr.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="recompute each CLIP / Llama block in backward (default: on with fsdp)")
    tr.add_argument("--checkpoint-dir", default=None, help="sharded checkpoints (default OUTPUT.checkpoints)")
    tr.add_argument("--keep-checkpoints", type=int, default=2)
    tr.add_argument("--projector-lr", type=float, default=None, help="stage2: the projector's own lr (default --lr)")
    tr.add_argument("--vision-tower-lr", type=float, default=None,
                    help="stage2: the CLIP tower's own lr (LLaVA-NeXT's mm_vision_tower_lr; default --lr); "
                         "demo: the tower's lr in the vision warm-up and stage 2")
    tr.add_argument("--warmup-ratio", type=float, default=0.03)
    tr.add_argument("--weight-decay", type=float, default=0.0)
    tr.add_argument("--lora-r", type=int, default=0, help="stage2: LoRA rank (0: full fine-tune)")
    tr.add_argument("--lora-alpha", type=float, default=None, help="default 2 x rank")
    tr.add_argument("--lora-dropout", type=float, default=0.05)
    tr.add_argument("--lora-vision", action="store_true", help="stage2 LoRA: adapters on CLIP too")
    tr.add_argument("--loss-log", default=None, help="append {step, loss, lr} JSON lines here (rank 0)")
    tr.add_argument("--no-tf32", action="store_true", help="CUDA: keep fp32 matmuls exact")
    tr.add_argument("--deterministic", action="store_true",
                    help="one CPU thread, deterministic kernels: reproducible losses (slower)")
    tr.set_defaults(func=cmd_train)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .image import ImageError

    try:
        return args.func(args)
    except (ImageError, ConfigError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"hiwin: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
