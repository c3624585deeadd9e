"""hiwin's deployable runtime: image + question -> answer from an export directory, without torch.

Needs numpy, Pillow, onnxruntime and tokenizers only (``pip install hiwin[runtime]``). The
modules shared with the PyTorch reference (image decoding, slicing, layout, templates, the bucket
rule, the crop chain) live here and are re-exported by ``hiwin_model``. See docs/architecture.md.
"""

__all__ = ["Pipeline", "ExportDir", "ExportError", "RequestError", "GraphId"]


def __getattr__(name):  # lazy: `import hiwin_runtime` stays cheap
    if name in ("Pipeline", "RequestError"):
        from . import pipeline

        return getattr(pipeline, name)
    if name in ("ExportDir", "ExportError"):
        from . import manifest

        return getattr(manifest, name)
    if name == "GraphId":
        from .graph_id import GraphId

        return GraphId
    raise AttributeError(f"module 'hiwin_runtime' has no attribute {name!r}")
