"""Guards of the package structure (docs/architecture.md): dependencies point one way, no module
import circle, and the crop chain is the only per-crop loop."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("hiwin_runtime", "hiwin_model", "hiwin_export")
# who may import whom (a package always imports itself)
ALLOWED = {"hiwin_runtime": set(), "hiwin_model": {"hiwin_runtime"}, "hiwin_export": {"hiwin_runtime", "hiwin_model"}}
# The one exception, inside functions only: Pipeline.from_model / from_pretrained reach the optional
# PyTorch backend (installed with hiwin[model]).
LAZY_EXCEPTIONS = {("hiwin_runtime.pipeline", "hiwin_model.backend")}


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for f in (ROOT / pkg).rglob("*.py"):
            parts = f.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(name: str, path: Path, *, top_level_only: bool) -> set[str]:
    """Modules of ours that ``name`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for n in nodes:
        if isinstance(n, ast.Import):
            found |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            base = n.module or ""
            if n.level:
                up = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                base = ".".join(up + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in n.names}
    mods = _modules()
    return {m for m in found if m in mods and m != name}


def test_packages_depend_one_way():
    bad = []
    for name, path in _modules().items():
        src = name.split(".")[0]
        top = _imports(name, path, top_level_only=True)
        for dep in _imports(name, path, top_level_only=False):  # lazy imports count too
            if dep.split(".")[0] in ALLOWED[src] | {src}:
                continue
            if (name, dep) in LAZY_EXCEPTIONS and dep not in top:
                continue
            bad.append(f"{name} -> {dep}")
    assert bad == []


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of ``graph`` (module -> modules it imports at load time), or []."""
    done: set[str] = set()

    def visit(m: str, stack: list[str]) -> list[str]:
        if m in stack:
            return stack[stack.index(m):] + [m]
        if m in done:
            return []
        for d in sorted(graph.get(m, ())):
            found = visit(d, stack + [m])
            if found:
                return found
        done.add(m)
        return []

    for m in sorted(graph):
        found = visit(m, [])
        if found:
            return found
    return []


def test_no_import_circle():
    graph = {m: _imports(m, p, top_level_only=True) for m, p in _modules().items()}
    assert find_cycle(graph) == []


def test_the_guard_sees_a_circle():
    """Negative control: the same walk finds a planted circle."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_one_crop_chain():
    """Only the crop chain groups crops by shape and walks them; everyone else calls it."""
    users = sorted(name for name, path in _modules().items()
                   if "shape_groups(" in path.read_text() and name != "hiwin_runtime.crop_chain")
    # PreparedImage.shape_groups() delegates to it; training's micro-batch walk (all CLIP calls of the
    # micro-batch first, then JBU + projector: a fixed unit order for FSDP2) uses the chain's grouping
    assert users == ["hiwin_model.train.vision_batch", "hiwin_runtime.processor"]


def test_public_names_stay_importable():
    """Names users import from before the runtime moved out keep working."""
    from hiwin_export.runtime import GenerationConfig, OnnxRunner, Pipeline, TorchBackend  # noqa: F401
    from hiwin_model.image import ImageError, load_image  # noqa: F401
    from hiwin_model.jbu import JBUStack  # noqa: F401
    from hiwin_model.layout import layout_image_tokens, num_image_tokens  # noqa: F401
    from hiwin_model.model import HiwinForCausalLM  # noqa: F401
    from hiwin_model.processor import HiwinProcessor  # noqa: F401
    from hiwin_model.projector import HiwinProjector, sampling_grid  # noqa: F401
    from hiwin_model.slicing import normalize, plan_slices, slice_image
    from hiwin_runtime import Pipeline as RuntimePipeline

    assert Pipeline is RuntimePipeline
    from PIL import Image

    img = Image.new("RGB", (500, 300), (10, 20, 30))
    assert slice_image(img).plan == plan_slices((500, 300))
    assert type(normalize(img)).__module__.startswith("torch")  # the reference's normalize stays a tensor
