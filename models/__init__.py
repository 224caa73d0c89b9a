"""The multimodal Phi-3 model: presets, CLIP vision tower, projector, Phi-3 +
(Q)LoRA, chat template with label masking, Whisper speech, checkpoints.

``models`` imports nothing from ``data_pipelines``, ``ray_jobs`` or ``serve``.
"""
import logging as _logging

from .config import ConfigError, ModelConfig, list_presets, load_config

__all__ = ["ConfigError", "ModelConfig", "list_presets", "load_config"]


def _not_the_optional_cpu_kernel_notice(record: _logging.LogRecord) -> bool:
    """bitsandbytes warns, on import, in every process (each Ray Train worker
    and Serve replica), that the optional ``kernels`` package for its CPU
    4-bit matmul is missing; it falls back to its own kernel, and that package
    downloads its kernel from the Hugging Face Hub. Only that one notice goes."""
    return not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward")


_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_optional_cpu_kernel_notice)
