"""The typed config lives in the torch-free :mod:`hiwin_runtime.config` (every runtime reads it from
the export manifest); re-exported here, plus the Llama config of the language model."""

from hiwin_runtime.config import (CLIP_L14_336, CLIP_MEAN, CLIP_STD, SUPPORTED_FEATURE_MODE, SUPPORTED_PROJECTOR,
                                  SUPPORTED_SCALE_MASK, ConfigError, HiwinConfig, JBUConfig, ProjectorConfig,
                                  SliceConfig, VisionConfig)

__all__ = ["CLIP_L14_336", "CLIP_MEAN", "CLIP_STD", "SUPPORTED_FEATURE_MODE", "SUPPORTED_PROJECTOR",
           "SUPPORTED_SCALE_MASK", "ConfigError", "HiwinConfig", "JBUConfig", "ProjectorConfig", "SliceConfig",
           "VisionConfig", "llama_config"]


def llama_config(config: HiwinConfig):
    """transformers' ``LlamaConfig`` of the language model (the config.json's non-multimodal keys)."""
    from transformers import LlamaConfig

    kw = {k: v for k, v in config.llm.items() if k not in ("model_type", "architectures", "auto_map")}
    return LlamaConfig(**kw)
