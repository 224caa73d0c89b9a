"""Fused kernels for Phi-3 training: an optional speed-up, same math.

- ``native``: every RMSNorm of the model runs as ``torch.nn.functional.rms_norm``
  (one fused kernel each way on CUDA in recent PyTorch; fp32 statistics as
  Phi-3's own, the weight applied before the single rounding to bf16 instead
  of after it), and the rotary embedding of queries and keys runs in three
  kernels each (``x * cos``, ``roll``, ``addcmul``) instead of Phi-3's six
  (two ``cat`` among them, one only to append an empty pass-through slice).
  No extra package; runs anywhere. ``none`` undoes it. The rotary function
  is Phi-3's module-level one, so it changes for every Phi-3 in the process
  (the same math; Liger patches it the same way).
- ``liger``: Liger Kernel's fused Triton RMSNorm, SwiGLU MLP and rotary
  embedding (``pip install liger-kernel``) on the model's existing modules;
  LoRA layers inside them keep working, since the fused MLP still calls the
  (LoRA-wrapped) projections. The loss stays the job's own chunked one
  (``ray_jobs.packing``), so Liger's fused linear cross-entropy is not used.
  The rotary function is patched for every Phi-3 in the process, and Liger's
  patches are not undone. Triton kernels run on CUDA only: on the CPU this is
  refused.
"""
from __future__ import annotations

import contextlib
import types

import torch
import torch.nn.functional as F

from .config import ConfigError
from .language import base_causal_lm

KERNELS = ("none", "native", "liger")


def fused_rms_norm(x, norm):
    """``norm(x)`` for an RMSNorm module with ``weight`` and
    ``variance_epsilon`` (Phi-3's) as torch's fused ``rms_norm`` (fp32
    statistics like the module's own); a norm of another kind runs as itself."""
    weight, eps = getattr(norm, "weight", None), getattr(norm, "variance_epsilon", None)
    if weight is None or eps is None:
        return norm(x)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Phi-3's rotary embedding of ``x`` (dims past ``cos``'s pass through) in
    three kernels: ``rotate_half(x) * sin`` is ``roll(x, d/2) * signed_sin``
    with the first half of ``signed_sin`` negated."""
    d = cos.shape[-1]
    if d == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(d // 2, dims=-1), signed_sin)
    rot = x[..., :d]
    return torch.cat((torch.addcmul(rot * cos, rot.roll(d // 2, dims=-1), signed_sin), x[..., d:]), dim=-1)


def signed(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated (see :func:`rotary`)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def _native_rope(q, k, cos, sin, *args, **kwargs):
    """Drop-in for ``modeling_phi3.apply_rotary_pos_emb`` (q, k, cos, sin, unsqueeze_dim=1)."""
    if args or set(kwargs) - {"unsqueeze_dim"}:  # another signature: the function it replaced
        return _hf_rope(q, k, cos, sin, *args, **kwargs)
    dim = kwargs.get("unsqueeze_dim", 1)
    cos, sin = cos.unsqueeze(dim), sin.unsqueeze(dim)
    ssin = signed(sin)
    return rotary(q, cos, ssin), rotary(k, cos, ssin)


_hf_rope = None  # the function _native_rope replaced


def _set_native_rope(on: bool) -> bool:
    """Swap Phi-3's module-level rotary function; True if it changed."""
    global _hf_rope
    from transformers.models.phi3 import modeling_phi3 as mp

    current = mp.apply_rotary_pos_emb
    if on and current is not _native_rope:
        _hf_rope, mp.apply_rotary_pos_emb = current, _native_rope
        return True
    if not on and current is _native_rope:
        mp.apply_rotary_pos_emb = _hf_rope
        return True
    return False


def _native_rms_norm(self, hidden_states):
    return fused_rms_norm(hidden_states, self)


def _rms_norms(llm):
    return [m for m in base_causal_lm(llm).modules()
            if type(m).__name__.endswith("RMSNorm") and hasattr(m, "weight") and hasattr(m, "variance_epsilon")]


def apply_kernels(llm, kernels: str, device) -> int:
    """Fuse ``llm``'s (a Phi-3, PEFT-wrapped or not) norms (``native``), or
    norms, MLPs and rotary embedding (``liger``), in place; ``none`` removes
    the ``native`` norms. Returns how many modules it changed."""
    if kernels in (None, "none"):
        undone = 0
        for m in _rms_norms(llm):
            if m.__dict__.get("forward") is not None and getattr(m.forward, "__func__", None) is _native_rms_norm:
                del m.forward
                undone += 1
        _set_native_rope(False)
        return undone
    if kernels not in KERNELS:
        raise ConfigError(f"kernels must be one of {', '.join(KERNELS)}, got {kernels!r}")
    base = base_causal_lm(llm)
    if getattr(base.config, "model_type", None) != "phi3":
        raise ConfigError(f"kernels={kernels!r} is wired for Phi-3 models, not {base.config.model_type!r}")
    if kernels == "native":
        norms = _rms_norms(llm)
        for m in norms:
            m.forward = types.MethodType(_native_rms_norm, m)
        _set_native_rope(True)
        return len(norms)
    if not str(device).startswith("cuda"):
        raise ConfigError(f"kernels={kernels!r} needs a CUDA device (Triton kernels); on {device} use 'none' or 'native'")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_phi3
    except ImportError as e:
        raise ConfigError(f"kernels='liger' needs the liger-kernel package (pip install liger-kernel): {e}") from None
    apply_liger_kernel_to_phi3(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                               fused_linear_cross_entropy=False, model=base)
    return len(_rms_norms(llm))


def compile_layers(llm, on: bool = True) -> int:
    """``torch.compile`` every decoder layer of ``llm`` in place (dynamic
    shapes, so every batch length shares one graph; the layers share it too),
    or undo it (``on=False``). In place: parameter names, checkpoints and
    optimizers see no difference. Inductor fuses the elementwise work between
    the GEMMs (norms, residual adds, rotary, SwiGLU, dropout, casts); the first
    steps pay the compilation. Returns how many layers it changed."""
    layers = base_causal_lm(llm).get_decoder().layers
    for layer in layers:
        if on:
            layer.compile(dynamic=True)
        else:
            layer._compiled_call_impl = None
    return len(layers)


@contextlib.contextmanager
def eager():
    """Compiled modules run eagerly inside (evaluation and ``generate``, whose
    cache objects and one-token steps would only make the compiler retrace)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield
