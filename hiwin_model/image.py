"""Image decoding lives in the torch-free :mod:`hiwin_runtime.image`; re-exported here."""

from hiwin_runtime.image import WHITE, ImageError, ImageSource, load_image, to_rgb

__all__ = ["WHITE", "ImageError", "ImageSource", "load_image", "to_rgb"]
