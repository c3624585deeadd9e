"""Checkpoint I/O in the released layout (docs/model.md §6): a pure, tested key remapping plus strict loading.

Official key -> our module key is a declarative prefix table (:data:`RENAMES`). Official keys that
the released model stores but never uses are listed by pattern in :func:`ignored_reason` and
skipped by name; anything else that does not match (missing, unexpected or mis-shaped) is an error
listing every offending key. Files are read with safetensors; ``.bin``/``.ckpt`` only through
``torch.load(weights_only=True)``, never plain unpickling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

# (official prefix, our prefix); first match wins, so longer prefixes come first.
RENAMES: tuple[tuple[str, str], ...] = (
    ("model.vision_tower.vision_tower.", "vision_tower."),
    ("model.mm_projector.upsampler.upsampler.", "jbu."),
    ("model.mm_projector.", "projector."),
    ("model.", "llm.model."),
    ("lm_head.", "llm.lm_head."),
)

_IGNORED = (
    (re.compile(r"^model\.mm_projector\.upsampler\.model\.0\."), "unused second CLIP copy inside the projector"),
    (re.compile(r"^model\.mm_projector\.upsampler\.model\.1\."), "unused ChannelNorm"),
    (re.compile(r"^model\.mm_projector\.query$"), "unused single query set"),
    (re.compile(r"^model\.mm_projector\.kv_proj\.weight$"), "unused kv_proj"),
    (re.compile(r"^model\.mm_projector\.(feature_8x_embedding|features_8x_projector\.)"), "unused 8x level"),
    (re.compile(r"\.position_ids$"), "non-persistent buffer saved by old transformers"),
    (re.compile(r"rotary_emb\.inv_freq$"), "non-persistent buffer saved by old transformers"),
)
_VISION_LAYER = re.compile(r"^model\.vision_tower\.vision_tower\.vision_model\.encoder\.layers\.(\d+)\.")
_POST_LN = "model.vision_tower.vision_tower.vision_model.post_layernorm."


class CheckpointError(ValueError):
    """A checkpoint whose keys or shapes do not match the model; the message lists them."""


def to_ours(key: str) -> str | None:
    for official, ours in RENAMES:
        if key.startswith(official):
            return ours + key[len(official):]
    return None


def to_official(key: str) -> str:
    for official, ours in RENAMES:
        if key.startswith(ours):
            return official + key[len(ours):]
    raise KeyError(f"no official name for {key!r}")


def ignored_reason(key: str, vision_layers_built: int | None = None) -> str | None:
    """Why an official key is skipped on load, or ``None`` if it must be used."""
    for pat, why in _IGNORED:
        if pat.search(key):
            return why
    m = _VISION_LAYER.match(key)
    if m and vision_layers_built is not None and int(m.group(1)) >= vision_layers_built:
        return "CLIP block after the selected layer (never runs)"
    if key.startswith(_POST_LN):
        return "CLIP post_layernorm (not used by layer -2 features)"
    return None


# ------------------------------------------------------------------------ reading files
def iter_safetensors(files: Iterable[Path]) -> Iterator[tuple[str, Callable[[], Tensor], tuple[int, ...]]]:
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                yield k, (lambda h=h, k=k: h.get_tensor(k)), tuple(h.get_slice(k).get_shape())


def _torch_load(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - report any unpickling refusal with the file name
        raise CheckpointError(f"{path}: cannot be read with torch.load(weights_only=True): {e}") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def weight_files(path: Path) -> tuple[str, list[Path]]:
    """('safetensors' | 'bin', files) of an HF model directory."""
    for index, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        ip = path / index
        if ip.is_file():
            try:
                wm = json.loads(ip.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{ip}: not a valid shard index ({e})") from e
            files = sorted({path / f for f in wm.values()})
            missing = [str(f.name) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{path}: shard files listed in {index} are missing: {missing}")
            return kind, files
    if (path / "model.safetensors").is_file():
        return "safetensors", [path / "model.safetensors"]
    if (path / "pytorch_model.bin").is_file():
        return "bin", [path / "pytorch_model.bin"]
    raise CheckpointError(f"{path}: no model.safetensors(.index.json) or pytorch_model.bin(.index.json)")


def read_official(path: Path) -> Iterator[tuple[str, Callable[[], Tensor], tuple[int, ...]]]:
    kind, files = weight_files(path)
    if kind == "safetensors":
        yield from iter_safetensors(files)
        return
    for f in files:
        for k, v in _torch_load(f).items():
            yield k, (lambda v=v: v), tuple(v.shape)


# ------------------------------------------------------------------------ strict loading
def load_into(model: torch.nn.Module, entries, *, rename: Callable[[str], str | None],
              ignore: Callable[[str], str | None], expected_prefix: str = "", source: str = "checkpoint",
              dtype: torch.dtype | None = None, device=None) -> dict[str, str]:
    """Load ``entries`` (key, loader, shape) into ``model`` strictly; returns {ignored key: reason}.

    Only model keys under ``expected_prefix`` are required. Tensors are cast to ``dtype`` (floating
    ones only) and assigned, so a model built on the meta device is materialised without copies.
    """
    want = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(expected_prefix)}
    got: dict[str, Tensor] = {}
    ignored: dict[str, str] = {}
    unexpected, bad_shape = [], []
    for key, load, shape in entries:
        why = ignore(key)
        if why is not None:
            ignored[key] = why
            continue
        ours = rename(key)
        if ours is None or ours not in want:
            unexpected.append(key)
            continue
        if shape != want[ours]:
            bad_shape.append(f"{key}: checkpoint {list(shape)} vs model {list(want[ours])}")
            continue
        t = load()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        got[ours] = t.to(device) if device is not None else t
    missing = sorted(set(want) - set(got))
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_official_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {sorted(unexpected)}")
    if bad_shape:
        problems.append(f"mis-shaped keys ({len(bad_shape)}): {bad_shape}")
    if problems:
        raise CheckpointError(f"{source} does not match the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(got, strict=False, assign=True)
    return ignored


def _official_names(keys: list[str]) -> list[str]:
    out = []
    for k in keys:
        try:
            out.append(to_official(k))
        except KeyError:
            out.append(k)
    return out


# ------------------------------------------------------------------------ writing
def official_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    return {to_official(k): v for k, v in model.state_dict().items()}


def save_sharded(state: dict[str, Tensor], out: Path, max_shard_bytes: int = 4 << 30) -> None:
    """Write ``state`` as safetensors shards + ``model.safetensors.index.json`` into ``out``."""
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v.detach().contiguous().cpu()
        size += nbytes
    n = len(shards)
    weight_map, total = {}, 0
    for i, sd in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(sd, str(out / name), metadata={"format": "pt"})
        for k, v in sd.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


def atomic_directory(final: Path, write: Callable[[Path], None], *, overwrite: bool = False) -> Path:
    """Run ``write(tmpdir)`` and move the result to ``final`` only once it is complete."""
    final = Path(final)
    if final.exists() and any(final.iterdir()) and not overwrite:
        raise FileExistsError(f"{final} exists and is not empty (pass overwrite=True to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the result is an ordinary directory
    try:
        write(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
