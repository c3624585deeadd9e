"""Stage 0: JBU pre-training (FeatUp multi-view reconstruction, as modified by LLaVA-UHD v2).

CLIP is frozen. Each step takes a batch of square crops, up-samples the CLIP features 2x and 4x
with the JBU stack (the 4x stage on a *detached* 2x input), and for ``n_jitters`` jittered views
(flip p=.5, zoom in [1, 2) p=.5, reflect pad 30, random crop) asks, per level, an attention
down-sampler to map the jittered up-sampled features back onto the CLIP features of the jittered
image. Loss per level: mean(mse / (2 s^2) + log s) on a random 30-d projection, with
s = exp(Conv1x1(lowres) + 0.1) (the paper's "semantic uncertainty"); plus 0.001 x a sampled CRF
smoothness term on the first view. NAdam, lr 1e-3. Images: COCO-style folder, resized (nearest)
and centre-cropped, ImageNet normalisation (as released). The checkpoint is the official
``clip-large-jbu.ckpt`` layout: ``state_dict`` with ``upsampler.*`` (+ ``downsampler*``,
``scale_net*``), read back with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ..checkpoint import CheckpointError, ignored_reason, load_into, read_official, to_ours
from ..config import HiwinConfig
from ..image import load_image
from ..jbu import JBUStack
from ..vision import VisionTower
from .common import (LoopConfig, atomic_torch_save, finish_distributed, run_loop, sample_stream,
                     setup_distributed, wrap_ddp)

log = logging.getLogger("hiwin.train")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


class ImageFolder(torch.utils.data.Dataset):
    def __init__(self, folder: str | os.PathLike, res: int, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"{root}: image folder not found")
        self.files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS)
        if not self.files:
            raise ValueError(f"{root}: no images ({', '.join(sorted(IMAGE_EXTS))})")
        self.res, self.mean, self.std = res, np.asarray(mean, np.float32), np.asarray(std, np.float32)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        img = load_image(self.files[i])
        w, h = img.size
        s = self.res / min(w, h)
        img = img.resize((max(self.res, round(w * s)), max(self.res, round(h * s))), Image.Resampling.NEAREST)
        w, h = img.size
        left, top = (w - self.res) // 2, (h - self.res) // 2
        img = img.crop((left, top, left + self.res, top + self.res))
        a = (np.asarray(img, np.float32) / 255.0 - self.mean) / self.std
        return torch.from_numpy(a.transpose(2, 0, 1).copy())


def gaussian_blur(x: Tensor, k: int = 5, sigma: float = 1.0) -> Tensor:
    r = torch.arange(k, dtype=x.dtype, device=x.device) - (k - 1) / 2
    g = torch.exp(-r.square() / (2 * sigma ** 2))
    g = g / g.sum()
    C = x.shape[1]
    x = F.pad(x, [k // 2] * 4, mode="reflect")
    x = F.conv2d(x, g.reshape(1, 1, 1, k).expand(C, 1, 1, k), groups=C)
    return F.conv2d(x, g.reshape(1, 1, k, 1).expand(C, 1, k, 1), groups=C)


class AttentionDownsampler(nn.Module):
    """Learned attention pooling of k x k patches (stride chosen to give ``final`` rows)."""

    def __init__(self, dim: int, kernel_size: int = 14, final_size: int = 24):
        super().__init__()
        self.k, self.final = kernel_size, final_size
        self.attention_net = nn.Sequential(nn.Dropout(0.2), nn.Linear(dim, 1))
        self.w = nn.Parameter(torch.ones(kernel_size, kernel_size) + 0.01 * torch.randn(kernel_size, kernel_size))
        self.b = nn.Parameter(torch.zeros(kernel_size, kernel_size) + 0.01 * torch.randn(kernel_size, kernel_size))

    def forward(self, hr: Tensor) -> Tensor:
        B, C, H, W = hr.shape
        x = gaussian_blur(hr)
        stride = (H - self.k) // (self.final - 1)
        fw = self.final * int(W / H)
        patches = F.unfold(x, self.k, stride=stride).reshape(B, C, self.k ** 2, self.final, fw).permute(0, 3, 4, 2, 1)
        logits = self.attention_net(patches).squeeze(-1)  # (B, h, w, k*k)
        if self.training:
            logits = logits * (torch.rand(*logits.shape[:3], 1, device=x.device) > 0.2)
        attn = F.softmax(logits * self.w.flatten() + self.b.flatten(), dim=-1)
        return torch.einsum("bhwpc,bhwp->bchw", patches, attn)


class ScaleNet(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Conv2d(dim, 1, 1)
        with torch.no_grad():
            self.net.weight.mul_(0.1)
            self.net.bias.mul_(0.1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.exp(self.net(x) + 0.1).clamp_min(1e-4)


def sampled_crf_loss(guidance: Tensor, feats: Tensor, n: int = 1000, alpha=0.1, beta=0.15, gamma=0.005,
                     w1=10.0, w2=3.0, shift=0.0) -> Tensor:
    H, W = guidance.shape[-2:]
    ys = torch.randint(0, H, (n,), device=feats.device)
    xs = torch.randint(0, W, (n,), device=feats.device)
    coords = torch.stack([ys / H, xs / W])  # (2, n)
    g = guidance[:, :, ys, xs]
    f = feats[:, :, ys, xs]
    cd = (coords[:, :, None] - coords[:, None, :]).square().sum(0)[None]
    gd = (g[..., None] - g[..., None, :]).square().sum(1)
    sim = w1 * torch.exp(-cd / (2 * alpha) - gd / (2 * beta)) + w2 * torch.exp(-cd / (2 * gamma)) - shift
    return ((f[..., None] - f[..., None, :]).square().sum(1) * sim).mean()


@dataclass(frozen=True)
class Jitter:
    x: int
    y: int
    zoom: float
    flip: bool

    @staticmethod
    def sample(h: int, w: int, max_pad: int, max_zoom: float, rng: random.Random) -> "Jitter":
        flip = rng.random() > 0.5
        zoom = rng.random() * (max_zoom - 1) + 1 if rng.random() > 0.5 else 1.0
        vh = int((h + 2 * max_pad) * zoom) - h + 1
        vw = int((w + 2 * max_pad) * zoom) - w + 1
        return Jitter(rng.randrange(vh), rng.randrange(vw), zoom, flip)

    def apply(self, x: Tensor, max_pad: int) -> Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, [max_pad] * 4, mode="reflect")
        if self.zoom > 1.0:
            x = F.interpolate(x, scale_factor=self.zoom, mode="bilinear")
        x = x[:, :, self.x:self.x + h, self.y:self.y + w]
        return torch.flip(x, [3]) if self.flip else x


class JBUTrainer(nn.Module):
    def __init__(self, vision: VisionTower, jbu: JBUStack, res: int, n_jitters: int = 2, max_pad: int = 30,
                 max_zoom: float = 2.0, proj_dim: int = 30, crf_weight: float = 1e-3, crf_samples: int = 1000,
                 seed: int = 0):
        super().__init__()
        self.vision, self.upsampler = vision.eval(), jbu
        for p in self.vision.parameters():
            p.requires_grad_(False)
        dim, final = vision.cfg.hidden_size, res // vision.cfg.patch_size
        self.downsampler = AttentionDownsampler(dim, vision.cfg.patch_size, final)  # 4x level
        self.downsampler_2x = AttentionDownsampler(dim, vision.cfg.patch_size, final)
        self.scale_net, self.scale_net_2x = ScaleNet(dim), ScaleNet(dim)
        self.n_jitters, self.max_pad, self.max_zoom = n_jitters, max_pad, max_zoom
        self.proj_dim, self.crf_weight, self.crf_samples = proj_dim, crf_weight, crf_samples
        self.rng = random.Random(seed)

    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()  # frozen feature extractor
        return self

    def trainable(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("vision.")]

    def forward(self, img: Tensor) -> Tensor:
        """Loss of one multi-view step (summed over the jittered views)."""
        with torch.no_grad():
            lr = self.vision(img)
        total = img.new_zeros(())
        for i in range(self.n_jitters):
            f2, f4 = self.upsampler.forward_levels(lr, img, detach_2x=True)
            f2 = F.interpolate(f2, img.shape[-2:], mode="bilinear")
            f4 = F.interpolate(f4, img.shape[-2:], mode="bilinear")
            jit = Jitter.sample(*img.shape[-2:], self.max_pad, self.max_zoom, self.rng)
            with torch.no_grad():
                lr_jit = self.vision(jit.apply(img, self.max_pad))
            proj = torch.randn(lr.shape[0], lr.shape[1], self.proj_dim, device=lr.device)
            proj = proj / proj.square().sum(1, keepdim=True).sqrt()
            target = torch.einsum("bchw,bcd->bdhw", lr_jit, proj)
            loss = img.new_zeros(())
            for feats, down, scale_net in ((f4, self.downsampler, self.scale_net),
                                           (f2, self.downsampler_2x, self.scale_net_2x)):
                hr_jit = jit.apply(feats, self.max_pad)
                down_p = torch.einsum("bchw,bcd->bdhw", down(hr_jit), proj)
                s = scale_net(lr_jit)
                loss = loss + ((down_p - target).square() / (2 * s ** 2) + s.log()).mean() / self.n_jitters
                if self.crf_weight > 0 and i == 0:
                    loss = loss + self.crf_weight * sampled_crf_loss(
                        img, torch.einsum("bchw,bcd->bdhw", hr_jit, proj), n=self.crf_samples)
            total = total + loss
        return total

    def checkpoint_state(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("vision.")}


def load_vision_parts(path: str | os.PathLike, device=None) -> tuple[VisionTower, JBUStack]:
    """CLIP tower + JBU stack of a checkpoint directory, without building the LLM."""
    cfg = HiwinConfig.from_pretrained(path)
    holder = nn.Module()
    holder.vision_tower = VisionTower(cfg.vision)
    holder.jbu = JBUStack(cfg.jbu.dim, cfg.jbu.key_dim, cfg.jbu.radius, cfg.jbu.fixup_scale)
    entries = ((k, f, s) for k, f, s in read_official(Path(path))
               if (to_ours(k) or "").startswith(("vision_tower.", "jbu.")) or ignored_reason(k) is not None)
    load_into(holder, entries, rename=to_ours, ignore=lambda k: ignored_reason(k, cfg.vision.layers_built),
              source=str(path), device=device)
    return holder.vision_tower.to(device), holder.jbu.to(device)


@dataclass
class Stage0Args:
    model: str
    images: str
    output: str
    steps: int = 2000
    batch_size: int = 16
    lr: float = 1e-3
    res: int = 336
    n_jitters: int = 2
    crf_samples: int = 1000
    seed: int = 0
    resume: bool = False
    log_every: int = 10
    save_every: int = 0
    device: str | None = None
    deterministic: bool = False  # bitwise-reproducible loop on CPU (resume excepted: see train.common)


CKPT_NAME = "clip-large-jbu.ckpt"


def train_stage0(args: Stage0Args) -> list[float]:
    d = setup_distributed(args.device)
    torch.manual_seed(args.seed + d.rank)
    vision, jbu = load_vision_parts(args.model, d.device)
    if args.res % vision.cfg.patch_size:
        raise ValueError(f"--res {args.res} is not a multiple of the patch size {vision.cfg.patch_size}")
    trainer = JBUTrainer(vision, jbu, args.res, args.n_jitters, crf_samples=args.crf_samples,
                         seed=args.seed + d.rank).to(d.device).train()
    params = trainer.trainable()
    opt = torch.optim.NAdam(params, lr=args.lr)
    out = Path(args.output)
    ckpt = out / CKPT_NAME
    start = 0
    if args.resume and ckpt.is_file():
        st = torch.load(ckpt, map_location="cpu", weights_only=True)
        missing = trainer.load_state_dict(st["state_dict"], strict=False)
        bad = [k for k in missing.missing_keys if not k.startswith("vision.")] + missing.unexpected_keys
        if bad:
            raise CheckpointError(f"{ckpt}: does not match the stage-0 trainer: {bad}")
        opt.load_state_dict(st["optimizer_states"][0])
        start = int(st["global_step"])
    data = ImageFolder(args.images, args.res)
    batches = sample_stream(len(data), d, args.seed, start, args.batch_size)
    module = wrap_ddp(trainer, d)
    if d.main:
        log.info("stage 0: %d images, %d steps from %d, batch %d", len(data), args.steps, start, args.batch_size)

    def step_fn(step: int) -> float:
        img = torch.stack([data[i] for i in next(batches)]).to(d.device)
        loss = module(img)
        loss.backward()
        return float(loss.detach())

    def save(step: int) -> None:
        if not d.main:
            return
        out.mkdir(parents=True, exist_ok=True)
        atomic_torch_save({"state_dict": trainer.checkpoint_state(), "global_step": step,
                           "optimizer_states": [opt.state_dict()]}, ckpt)
        log.info("saved step %d to %s", step, ckpt)

    losses = run_loop(step_fn, params, opt, None, LoopConfig(args.steps, args.log_every, args.save_every,
                                                             deterministic=args.deterministic), start, save, d)
    finish_distributed(d)
    return losses
