"""Fused GPU kernels for Phi-3 training: an optional speed-up, same math.

``apply_kernels(llm, "liger", device)`` swaps Phi-3's RMSNorm, SwiGLU MLP
and rotary embedding for Liger Kernel's fused Triton versions
(``pip install liger-kernel``) on the model's existing modules; LoRA layers
inside them keep working, since the fused MLP still calls the (LoRA-wrapped)
projections. The loss stays the job's own chunked one
(``ray_jobs.packing``), so Liger's fused linear cross-entropy is not used.
The rotary function is patched for every Phi-3 in the process. Triton kernels
run on CUDA only: on the CPU this is refused.
"""
from __future__ import annotations

from .config import ConfigError
from .language import base_causal_lm

KERNELS = ("none", "liger")


def apply_kernels(llm, kernels: str, device) -> None:
    """Fuse ``llm``'s (a Phi-3, PEFT-wrapped or not) norms, MLPs and rotary embedding in place."""
    if kernels in (None, "none"):
        return
    if kernels not in KERNELS:
        raise ConfigError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    if not str(device).startswith("cuda"):
        raise ConfigError(f"kernels={kernels!r} needs a CUDA device (Triton kernels); on {device} use 'none'")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_phi3
    except ImportError as e:
        raise ConfigError(f"kernels='liger' needs the liger-kernel package (pip install liger-kernel): {e}") from None
    base = base_causal_lm(llm)
    if getattr(base.config, "model_type", None) != "phi3":
        raise ConfigError(f"kernels='liger' is wired for Phi-3 models, not {base.config.model_type!r}")
    apply_liger_kernel_to_phi3(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                               fused_linear_cross_entropy=False, model=base)
