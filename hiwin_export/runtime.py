"""The runtime moved to the torch-free :mod:`hiwin_runtime`; these names stay importable from here."""

from hiwin_runtime.ort import OnnxRunner, default_providers
from hiwin_runtime.pipeline import (Answer, Backend, GenerationConfig, OrtBackend, Pipeline, RequestError,
                                    prompt_table_ids, sample_next)

__all__ = ["Answer", "Backend", "GenerationConfig", "OnnxRunner", "OrtBackend", "Pipeline", "RequestError",
           "TorchBackend", "default_providers", "prompt_table_ids", "sample_next"]


def __getattr__(name):
    if name == "TorchBackend":
        from hiwin_model.backend import TorchBackend

        return TorchBackend
    raise AttributeError(name)
