"""The multimodal Phi-3 model: presets, CLIP vision tower, projector, Phi-3 +
(Q)LoRA, chat template with label masking, Whisper speech, checkpoints.

``models`` imports nothing from ``data_pipelines``, ``ray_jobs`` or ``serve``.
"""
from .config import ConfigError, ModelConfig, list_presets, load_config

__all__ = ["ConfigError", "ModelConfig", "list_presets", "load_config"]
