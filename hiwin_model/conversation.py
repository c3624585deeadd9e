"""Prompt templates live in the torch-free :mod:`hiwin_runtime.conversation`; re-exported here."""

from hiwin_runtime.conversation import IMAGE_PLACEHOLDER, TEMPLATES, VICUNA_SYSTEM, Template, get_template

__all__ = ["IMAGE_PLACEHOLDER", "TEMPLATES", "VICUNA_SYSTEM", "Template", "get_template"]
