"""Training at scale on this CPU: FSDP2 over 2 gloo ranks (torchrun), a real kill and resume, the final
gather to the official layout, LoRA merge.

The guarantee tested (docs/training.md, "Reproducibility"): with ``--deterministic`` (one thread per
rank, deterministic kernels) and fp32 compute, 2 FSDP2 ranks with batch 1 compute the same step
losses as one process with 2 accumulated micro-batches of 1, up to the order of floating-point
additions (the gradient reduction adds the two ranks' gradients in another order than the
accumulation does, and AdamW carries the difference on): relative difference <= 1e-5 over the 4
steps here (measured: ~5e-8). The same bound covers a run SIGKILLed after its step-2 checkpoint and
resumed. Bitwise equality is not claimed across the two strategies; it is independent of load
because every kernel runs single-threaded in a fixed order. The two ranks see different crop shapes
in every step (one an overview-only image, the other an image with two slice shapes: 1 vs 2 CLIP
calls, 1 vs 3 crops), which the per-block CLIP and projector FSDP units survive only because the
training pads the calls (train.vision_batch); a hang fails the test after RUN_TIMEOUT instead of
blocking.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hiwin_model.synthetic import write_training_data
from hiwin_model.train.common import Dist, global_batches, micro_batches
from hiwin_model.train.distributed import choose_strategy, ddp_bytes_per_rank
from hiwin_model.train.llm_stages import StageArgs, train_stage

REPO = Path(__file__).resolve().parents[2]
RTOL = 1e-5
STEPS = 4
RUN_TIMEOUT = 240  # s per torchrun run (each takes ~20 s): a hang fails instead of blocking
MAX_SLICES = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two samples, so every global batch of 2 holds both and the ranks always differ: sample 0 is
    336x336 (overview only), sample 1 500x300 (2 slices of another shape + the overview)."""
    return write_training_data(tmp_path_factory.mktemp("data"), n=2)


def _stage2_args(tiny_dir, data, out) -> list[str]:
    return ["train", "stage2", "--model", str(tiny_dir), "--data", str(data / "sft.json"),
            "--image-folder", str(data / "images"), "--output", str(out), "--steps", str(STEPS),
            "--max-slices", str(MAX_SLICES), "--lr", "1e-3", "--log-every", "1", "--deterministic"]


def _torchrun(args: list[str], log: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), "-m", "hiwin_model.cli", *args]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait(p: subprocess.Popen, log: Path, what: str, timeout: float = RUN_TIMEOUT) -> int:
    """The run's exit status; on a timeout its whole process group is killed and the test fails."""
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        pytest.fail(f"{what} did not finish in {timeout} s (a hang?):\n{_log_excerpt(log)}")


def _log_excerpt(log: Path) -> str:
    """The lines of a torchrun log that say what failed (errors of every rank), then its tail."""
    text = log.read_text(errors="replace")
    keys = ("Error", "error:", "Traceback", "terminate", "Abort", "abort", "Signal")
    hits = [ln for ln in text.splitlines() if any(k in ln for k in keys)]
    return "\n".join(hits[:40]) + "\n...\n" + text[-2000:]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _losses(path: Path) -> list[float]:
    """Step losses from a --loss-log file; a step logged twice (killed run, then resumed) keeps the last."""
    by_step = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        by_step[r["step"]] = r["loss"]
    return [by_step[s] for s in sorted(by_step)]


@pytest.fixture(scope="module")
def runs(tiny_dir, data, tmp_path_factory):
    """One process with 2 accumulated micro-batches, and FSDP2 on 2 ranks killed after its step-2
    checkpoint (SIGKILL to the whole torchrun process group) then resumed to the end."""
    tmp = tmp_path_factory.mktemp("dist")
    single = tmp / "single"
    ref = train_stage(StageArgs(stage=2, model=str(tiny_dir), data=str(data / "sft.json"),
                                image_folder=str(data / "images"), output=str(single), steps=STEPS,
                                max_slices=MAX_SLICES, lr=1e-3, log_every=100, strategy="ddp", grad_accum=2,
                                deterministic=True))
    fsdp = tmp / "fsdp"
    losses = tmp / "fsdp.jsonl"
    args = _stage2_args(tiny_dir, data, fsdp) + ["--strategy", "fsdp", "--save-every", "2",
                                                 "--loss-log", str(losses)]
    p = _torchrun(args, tmp / "killed.log", _free_port())
    latest = Path(f"{fsdp}.checkpoints") / "latest"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not latest.exists():
        if p.poll() is not None or time.monotonic() > deadline:
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"FSDP run ended (rc {p.returncode}) or hung before its first checkpoint:\n"
                        f"{_log_excerpt(tmp / 'killed.log')}")
        time.sleep(0.02)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    killed_at = latest.read_text().strip()
    assert not fsdp.exists(), "the run finished before the kill: nothing was resumed"
    r = _torchrun(args + ["--resume"], tmp / "resumed.log", _free_port())
    assert _wait(r, tmp / "resumed.log", "the resumed FSDP run") == 0, _log_excerpt(tmp / "resumed.log")
    return dict(ref=ref, single=single, fsdp=fsdp, fsdp_losses=_losses(losses), killed_at=killed_at,
                resumed_log=(tmp / "resumed.log").read_text())


@pytest.mark.slow
def test_fsdp_killed_and_resumed_matches_single_process(runs):
    ref, got = runs["ref"], runs["fsdp_losses"]
    assert runs["killed_at"] == "step-000002"
    assert "resumed from" in runs["resumed_log"] and "step-000002" in runs["resumed_log"]
    assert len(got) == len(ref) == STEPS
    rel = [abs(a - b) / abs(b) for a, b in zip(got, ref)]
    assert max(rel) <= RTOL, (got, ref, rel)
    assert ref[-1] < ref[0]  # it trains


def test_ranks_make_different_vision_calls_in_every_step(data, tiny_model):
    """The premise of the run above: in each of its steps the two ranks' images need different numbers
    of CLIP calls (shape groups) and of crops, so without padding their FSDP collectives would not pair."""
    from hiwin_model.train.common import read_json_list
    from hiwin_model.train.vision_batch import call_counts

    samples = read_json_list(data / "sft.json")
    counts = [call_counts([tiny_model.processor.prepare_image(data / "images" / s["image"],
                                                              max_slices=MAX_SLICES).crops]) for s in samples]
    assert sorted(counts) == [(1, 1), (2, 3)]
    batches = global_batches(len(samples), seed=0, start_step=0, per_step=2)
    for _ in range(STEPS):
        g = next(batches)
        per_rank = [counts[micro_batches(g, Dist(r, 2), 1, 1)[0][0]] for r in range(2)]
        assert per_rank[0][0] != per_rank[1][0] and per_rank[0][1] != per_rank[1][1], per_rank


@pytest.mark.slow
def test_fsdp_final_model_loads_exports_and_matches(runs, tiny_dir, tmp_path):
    """The gathered final weights load strictly with from_pretrained and give the single-process run's
    logits (same tolerance); frozen parts are bit-identical to the base model."""
    from hiwin_model.model import HiwinForCausalLM

    a = HiwinForCausalLM.from_pretrained(runs["fsdp"])
    b = HiwinForCausalLM.from_pretrained(runs["single"])
    base = HiwinForCausalLM.from_pretrained(tiny_dir)
    sa, sb, s0 = a.state_dict(), b.state_dict(), base.state_dict()
    assert sa.keys() == sb.keys()
    assert torch.equal(sa["jbu.up1.range_proj.0.weight"], s0["jbu.up1.range_proj.0.weight"])  # frozen
    assert torch.equal(sa["projector.pos_embed"], s0["projector.pos_embed"])
    assert not torch.equal(sa["llm.lm_head.weight"], s0["llm.lm_head.weight"])
    rel = {k: float((x - y).abs().max()) / max(float(y.abs().max()), 1e-12) for k, x, y in _comparable(sa, sb)}
    assert max(rel.values()) <= RTOL, sorted(rel.items(), key=lambda kv: -kv[1])[:3]
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        la, lb = a.llm(ids).logits, b.llm(ids).logits
    assert float((la - lb).abs().max()) <= RTOL * float(lb.abs().max())
    # The exporter takes it (the smallest graph, to stay fast: the token embedding table, which
    # stage 2 trained), with its parity check against this model passing.
    from hiwin_export.export import export_model

    manifest = export_model(a, tmp_path / "export", graphs=["embed"], bundles=False, parity="quick",
                            precisions=("fp32",))
    assert manifest["parity"]["fp32"]["embed"]["ok"]


def _comparable(sa, sb):
    """(key, a, b) for the weights whose difference the step-loss bound also bounds.

    Left out: attention *key* biases. softmax(q.(k + b)) does not depend on b, so their gradient is
    zero in exact arithmetic and rounding noise (~1e-12) is all there is; AdamW divides by that
    noise's own magnitude and moves them by about +-lr per step in a direction the noise picks,
    which differs between any two summation orders. They change no output (the logits check covers
    that). The CLIP ``k_proj.bias`` and the key third of the projector's ``in_proj_bias``."""
    for k in sa:
        a, b = sa[k], sb[k]
        if k.endswith("self_attn.k_proj.bias"):
            continue
        if k.endswith("attn.in_proj_bias"):
            c = a.shape[0] // 3
            a, b = torch.cat([a[:c], a[2 * c:]]), torch.cat([b[:c], b[2 * c:]])
        yield k, a, b


def _comms_worker(rank: int, world: int, store_path: str, out_path: str) -> None:
    import traceback

    import torch.distributed as dist

    from hiwin_model.train.distributed import _in_place_gloo_comms

    dist.init_process_group("gloo", store=dist.FileStore(store_path, world), rank=rank, world_size=world)
    code = 1
    try:
        gather, reduce = _in_place_gloo_comms()
        g = torch.Generator().manual_seed(rank)
        res = {}
        for dtype in (torch.float32, torch.bfloat16):
            shard = torch.randn(1000, generator=g).to(dtype)
            want = torch.empty(world * 1000, dtype=dtype)
            dist.all_gather_into_tensor(want, shard)
            got = gather.allocate((world * 1000,), dtype=dtype, device=torch.device("cpu"))
            got.view(world, -1)[rank].copy_(shard)  # FSDP2 gathers from a slice of the output
            gather(got, got.view(world, -1)[rank], dist.group.WORLD)
            res[f"gather {dtype}"] = torch.equal(got, want)
        for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
            full = torch.randn(world * 1000, generator=g)
            want = torch.empty(1000)
            dist.reduce_scatter_tensor(want, full.clone(), op=op)
            got = torch.empty(1000)
            reduce(got, full, dist.group.WORLD, op)
            res[f"reduce {op}"] = bool(torch.allclose(got, want, rtol=1e-6, atol=0))
            res[f"released {op}"] = full.untyped_storage().nbytes() == 0
        torch.save(res, f"{out_path}.{rank}")
        dist.barrier()
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        dist.destroy_process_group()
        # Leave without the interpreter's teardown: gloo's threads can abort it ("terminate called
        # without an active exception", seen once under load), which is not what this test checks.
        os._exit(code)


def test_in_place_gloo_collectives_match_gloos_own(tmp_path):
    """The FSDP2 all-gather / reduce-scatter used on gloo (no full-size scratch copies) give gloo's
    results on 2 processes (gather bit for bit in fp32 and bf16; mean and sum of gradients), and the
    reduction input's memory is released."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_comms_worker, args=(r, 2, str(tmp_path / "store"), str(tmp_path / "res")))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            for q in procs:
                q.kill()
            pytest.fail("collective test processes hung")
        assert p.exitcode == 0
    for r in range(2):
        res = torch.load(tmp_path / f"res.{r}", weights_only=True)
        assert len(res) == 6 and all(res.values()), res


def test_micro_batches_are_rank_independent():
    """world=2 x accum=1 and world=1 x accum=2 see the same micro-batches, in the same order."""
    g = next(global_batches(10, seed=3, start_step=0, per_step=4))
    two_ranks = [micro_batches(g, Dist(r, 2), accum=2, batch_size=1) for r in range(2)]
    one = micro_batches(g, Dist(0, 1), accum=4, batch_size=1)
    assert [two_ranks[k % 2][k // 2] for k in range(4)] == one
    with pytest.raises(ValueError, match="global batch"):
        micro_batches(g, Dist(0, 1), accum=3, batch_size=1)


def test_auto_strategy_by_size():
    one_gb = 1 << 30
    assert ddp_bytes_per_rank(7_000_000_000, 7_000_000_000) == 7_000_000_000 * 16
    d = Dist(0, 8, torch.device("cpu"))
    assert choose_strategy("auto", Dist(0, 1), 10 ** 12, 10 ** 12) == "ddp"  # one rank: nothing to shard
    assert choose_strategy("auto", d, 1000, 1000) == "ddp"
    assert choose_strategy("auto", d, 10 ** 12, 10 ** 12) == "fsdp"
    assert choose_strategy("fsdp", d, 1000, 1000) == "fsdp"
    with pytest.raises(ValueError, match="strategy"):
        choose_strategy("zero3", d, one_gb, one_gb)


def test_lora_merge_gives_the_adapter_logits(tiny_dir, tmp_path):
    from hiwin_model.model import HiwinForCausalLM
    from hiwin_model.train.lora import LoraSpec, add_lora, has_lora, merge_lora
    from tests.conftest import random_image

    m = HiwinForCausalLM.from_pretrained(tiny_dir)
    add_lora(m, LoraSpec(r=4, alpha=8, dropout=0.1, vision=True))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # lora_B starts at zero (the adapter is the identity): make it matter
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    m.eval()
    img = random_image(500, 300, seed=1)
    prompt = m.processor.prompt("What is in the image?", "vicuna_v1")
    with torch.no_grad():
        emb = m.embed_prompt(prompt, m.encode_image(img))
        adapter_logits = m.llm(inputs_embeds=emb).logits
    base_logits = HiwinForCausalLM.from_pretrained(tiny_dir).llm(inputs_embeds=emb).logits.detach()
    assert float((adapter_logits - base_logits).abs().max()) > 1e-2  # the adapters change the output
    n_clip = len(m.vision_tower.vision_model.encoder.layers)  # blocks up to layer -2
    assert merge_lora(m) == 2 * 7 + n_clip * 6 and not has_lora(m)  # 7 Llama linears per layer, 6 per CLIP block
    with torch.no_grad():
        merged = m.llm(inputs_embeds=m.embed_prompt(prompt, m.encode_image(img))).logits
    scale = float(adapter_logits.abs().max())
    assert float((merged - adapter_logits).abs().max()) <= 1e-5 * scale
    m.save_pretrained(tmp_path / "merged")
    back = HiwinForCausalLM.from_pretrained(tmp_path / "merged")  # official layout: strict load
    with torch.no_grad():
        again = back.llm(inputs_embeds=back.embed_prompt(prompt, back.encode_image(img))).logits
    assert torch.equal(again, merged)


def test_lora_stage2_trains_resumes_and_saves_the_official_layout(tiny_dir, tmp_path):
    """LoRA stage 2: 4 steps with a sharded checkpoint at step 2; resuming from it replays steps 3-4
    bit for bit (one process, deterministic); the merged model is the official layout."""
    from hiwin_model.model import HiwinForCausalLM
    from hiwin_model.train.lora import LoraSpec

    data = write_training_data(tmp_path / "data", n=4)
    kw = dict(stage=2, model=str(tiny_dir), data=str(data / "sft.json"), image_folder=str(data / "images"), steps=4,
              max_slices=1, lr=1e-2, projector_lr=1e-3, log_every=100, lora=LoraSpec(r=4, alpha=8), save_every=2,
              deterministic=True, checkpoint_dir=str(tmp_path / "ckpts"))
    out = tmp_path / "lora"
    losses = train_stage(StageArgs(output=str(out), **kw))
    assert (tmp_path / "ckpts" / "latest").read_text().strip() == "step-000002"
    resumed = train_stage(StageArgs(output=str(tmp_path / "lora2"), resume=True, **kw))
    assert len(losses) == 4 and resumed == losses[2:]
    m, base = HiwinForCausalLM.from_pretrained(out), HiwinForCausalLM.from_pretrained(tiny_dir)
    sm, sb = m.state_dict(), base.state_dict()
    assert sm.keys() == sb.keys()  # merged: no adapter keys left
    q = "llm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(sm[q], sb[q])
    assert torch.equal(sm["llm.model.embed_tokens.weight"], sb["llm.model.embed_tokens.weight"])  # not adapted
    fc1 = "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight"
    assert torch.equal(sm[fc1], sb[fc1])  # CLIP frozen without lora.vision
    assert not torch.equal(sm["projector.proj"], sb["projector.proj"])  # projector fully trained
    m2 = HiwinForCausalLM.from_pretrained(tmp_path / "lora2").state_dict()
    assert all(torch.equal(sm[k], m2[k]) for k in sm)  # the resumed run ends with the same weights


def test_bad_combinations_are_refused(tiny_dir, tmp_path):
    from hiwin_model.train.lora import LoraSpec

    kw = dict(model=str(tiny_dir), data=str(tmp_path / "none.json"), image_folder=str(tmp_path),
              output=str(tmp_path / "o"), steps=1)
    with pytest.raises(ValueError, match="LoRA applies to stage 2"):
        train_stage(StageArgs(stage=1, lora=LoraSpec(r=4), **kw))
    with pytest.raises(ValueError, match="grad_accum"):
        train_stage(StageArgs(stage=2, grad_accum=0, **kw))


def test_sharded_checkpoint_refuses_other_world_and_incomplete(tmp_path):
    from hiwin_model.train.distributed import ShardedCheckpoint

    ck = ShardedCheckpoint(tmp_path, Dist(0, 1))
    assert ck.latest() is None  # nothing saved yet: start from step 0
    (tmp_path / "step-000004").mkdir()
    (tmp_path / "latest").write_text("step-000004\n")
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ck.latest()
    (tmp_path / "step-000004" / "trainer.json").write_text(json.dumps({"step": 4, "world": 2, "scheduler": None}))
    with pytest.raises(ValueError, match="saved with 2 ranks, resuming with 1"):
        ck.load(ck.latest(), torch.nn.Linear(2, 2), None, None)


def test_fsdp_in_one_process_matches_ddp(tiny_dir, tmp_path):
    """--strategy fsdp without torchrun (a 1-rank group of its own, removed afterwards; fp32, with
    activation checkpointing) gives the replicated run's losses within RTOL; the gathered model loads."""
    import torch.distributed as dist

    from hiwin_model.model import HiwinForCausalLM

    data = write_training_data(tmp_path / "data", n=4)
    kw = dict(stage=2, model=str(tiny_dir), data=str(data / "sft.json"), image_folder=str(data / "images"), steps=2,
              max_slices=1, lr=1e-3, log_every=100, deterministic=True)
    a = train_stage(StageArgs(output=str(tmp_path / "fsdp"), strategy="fsdp", **kw))
    assert not dist.is_initialized()
    b = train_stage(StageArgs(output=str(tmp_path / "ddp"), strategy="ddp", **kw))
    assert max(abs(x - y) / abs(y) for x, y in zip(a, b)) <= RTOL, (a, b)
    HiwinForCausalLM.from_pretrained(tmp_path / "fsdp")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the nccl / bf16-on-GPU paths)")
def test_cuda_fsdp_bf16_resume_and_lora(tiny_dir, tmp_path):
    """On a GPU: FSDP2 bf16 in one process (nccl 1-rank group), a checkpoint at step 2, resume
    from it (steps 3-4 close to the uninterrupted run: bf16 on CUDA is not bitwise reproducible),
    and LoRA on a bf16 base with activation checkpointing; both outputs load."""
    from hiwin_model.model import HiwinForCausalLM
    from hiwin_model.train.lora import LoraSpec

    data = write_training_data(tmp_path / "data", n=4)
    kw = dict(stage=2, model=str(tiny_dir), data=str(data / "sft.json"), image_folder=str(data / "images"), steps=4,
              max_slices=2, lr=1e-3, log_every=100, device="cuda", dtype="bf16")
    ck = str(tmp_path / "ck")
    full = train_stage(StageArgs(output=str(tmp_path / "f"), strategy="fsdp", save_every=2, checkpoint_dir=ck, **kw))
    again = train_stage(StageArgs(output=str(tmp_path / "f2"), strategy="fsdp", checkpoint_dir=ck, resume=True, **kw))
    assert len(again) == 2 and max(abs(a - b) / abs(b) for a, b in zip(again, full[2:])) <= 1e-2, (again, full)
    lora = train_stage(StageArgs(output=str(tmp_path / "l"), lora=LoraSpec(r=8, alpha=16),
                                 activation_checkpointing=True, **kw))
    assert all(map(math.isfinite, full + lora))
    for d in ("f", "f2", "l"):
        assert json.loads((tmp_path / d / "config.json").read_text())["torch_dtype"] == "bfloat16"
        HiwinForCausalLM.from_pretrained(tmp_path / d)
