"""A leaner forward for PEFT's LoRA linear layers (training speed, same math).

PEFT's ``Linear4bit``/``Linear`` LoRA forward, with the usual fp32 adapter
weights and a bf16 model, spends more device time on elementwise work than
on the adapter itself: it clones the base layer's output, casts the input to
fp32, runs dropout and both adapter matmuls in fp32, scales the fp32 output,
casts it back and adds it. For Phi-3-mini's ``gate_up_proj`` at 8 x 1,024
tokens that is about 3 GB of memory traffic per layer and pass.

``fuse_lora(llm)`` replaces that, on each LoRA linear layer of the model, by

    result = base(x)
    h      = dropout(x) @ A^T                          # in the compute dtype
    result = addmm(result, h, B^T, alpha=scaling)      # one GEMM adds the update

with ``A`` and ``B`` cast to the compute dtype for the matmuls (they stay
fp32 parameters: the optimizer's master weights and the checkpoint are
unchanged), as mixed-precision training computes them. In fp32 it is PEFT's
forward to rounding; in bf16 the low-rank product is rounded once, where PEFT
rounds its fp32 result when it adds it. Layers in a state it does not cover
(adapters disabled or merged, DoRA and other variants, mixed adapter batches,
fan-in-fan-out weights) run PEFT's own forward.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from .options import LORA_FORWARDS  # noqa: F401 (the choices live in a torch-free module)


def _lora_linear_classes() -> tuple[type, ...]:
    from peft.tuners.lora import Linear

    classes: list[type] = [Linear]
    try:
        from peft.tuners.lora.bnb import Linear4bit, Linear8bitLt
    except ImportError:  # PEFT built without bitsandbytes
        pass
    else:
        classes += [Linear4bit, Linear8bitLt]
    return tuple(classes)


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = [a for a in self.active_adapters if a in self.lora_A]
    if (args or kwargs or self.disable_adapters or self.merged or getattr(self, "fan_in_fan_out", False)
            or any(a in getattr(self, "lora_variant", {}) for a in active)
            or any(getattr(self, "use_dora", {}).get(a, False) for a in active)):
        return type(self).forward(self, x, *args, **kwargs)
    result = self.base_layer(x)
    if not active:
        return result
    dtype = result.dtype
    lead = result.shape[:-1]
    out = result.reshape(-1, result.shape[-1])
    for name in active:
        a = self.lora_A[name].weight.to(dtype)
        b = self.lora_B[name].weight.to(dtype)
        h = F.linear(self.lora_dropout[name](x).to(dtype), a)
        out = torch.addmm(out, h.reshape(-1, h.shape[-1]), b.t(), alpha=self.scaling[name])
    return out.view(*lead, out.shape[-1])


def fuse_lora(llm, mode: str = "fused") -> int:
    """Give every LoRA linear layer of ``llm`` the lean forward (``"fused"``)
    or PEFT's own again (``"peft"``); returns how many layers it set."""
    if mode not in LORA_FORWARDS:
        raise ValueError(f"lora forward must be one of {', '.join(LORA_FORWARDS)}, got {mode!r}")
    classes = _lora_linear_classes()
    n = 0
    for m in llm.modules():
        if isinstance(m, classes):
            if mode == "fused":
                m.forward = types.MethodType(_fused_forward, m)
            else:
                m.__dict__.pop("forward", None)
            n += 1
    return n


def lora_for_inference(llm, dtype) -> int:
    """For serving a base that keeps its adapter apart (4-bit): the adapter
    weights cast once to the compute dtype ``dtype`` (no fp32 master copy is
    needed to decode) and the fused forward, so each LoRA layer adds two
    kernels to a decoding step instead of PEFT's seven. Returns the layers."""
    for name, p in llm.named_parameters():
        if "lora_A" in name or "lora_B" in name:
            p.data = p.data.to(dtype)
    return fuse_lora(llm)
