"""The choices of the training forward's optional speed-ups, without
importing torch, so the command line can offer and check them at once
(``mmphi --help``). ``models.kernels``, ``models.lora_forward`` and
``ray_jobs.packing`` implement them."""
from __future__ import annotations

from .config import ConfigError

KERNELS = ("none", "native", "liger")  # fused kernels (models.kernels.apply_kernels)
COMPILE_MODES = ("auto", "on", "off")  # torch.compile of the decoder layers (models.kernels.resolve_compile)
LORA_FORWARDS = ("fused", "peft")  # LoRA layers' forward (models.lora_forward.fuse_lora)
# with the chunked loss, the last decoder layer at answer positions only, or everywhere (ray_jobs.packing)
LAST_LAYER = ("answers", "all")


def compile_mode(mode) -> str:
    """``mode`` as one of ``COMPILE_MODES`` (settings written before the three
    modes hold booleans: on / off); a clear ``ConfigError`` for anything else."""
    if isinstance(mode, bool):
        mode = "on" if mode else "off"
    mode = str(mode).lower()
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile={mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    return mode


def check_last_layer(value: str, name: str = "last_layer") -> None:
    """A clear error for a ``last_layer`` setting that is not one of :data:`LAST_LAYER`."""
    if value not in LAST_LAYER:
        raise ValueError(f"{name} must be one of {', '.join(LAST_LAYER)}, got {value!r}")
