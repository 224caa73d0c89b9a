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
import logging
import os
import shutil
import types

import torch
import torch.nn.functional as F

from .config import ConfigError
from .language import base_causal_lm
from .options import COMPILE_MODES, KERNELS, compile_mode  # noqa: F401 (the choices live in a torch-free module)

log = logging.getLogger(__name__)


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


def compile_blocker(device) -> str | None:
    """Why Inductor cannot compile the layers for ``device`` here, or None. On
    CUDA it needs Triton, and Triton builds its launcher with a C compiler
    the first time; a slim image may have neither."""
    if not hasattr(torch, "compile"):
        return f"this PyTorch ({torch.__version__}) has no torch.compile"
    if str(device).startswith("cuda"):
        try:
            import triton  # noqa: F401
        except ImportError:
            return "Triton is not installed (pip install triton)"
    compilers = [c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c]
    if not any(shutil.which(c) for c in compilers):
        return f"no C compiler on PATH ({', '.join(compilers)}; set CC or install gcc)"
    return None


def resolve_compile(mode, device, strategy: str = "ddp", kernels: str = "native") -> tuple[bool, str]:
    """Whether the training job compiles its decoder layers, and why.

    ``off``: never. ``on``: always (a clear ``ConfigError`` when this machine
    cannot). ``auto`` (the default): on CUDA with DDP when the compiler's
    prerequisites are there (on an H200 the compiled job trained 1.83x as
    many tokens a second as the eager one, bench/NOTES.md try 7); eager on
    the CPU (compiling costs minutes there and gains little), with DeepSpeed
    or Liger's kernels (neither measured compiled) and when a prerequisite is
    missing."""
    mode = compile_mode(mode)
    if mode == "off":
        return False, "off"
    blocker = compile_blocker(device)
    if mode == "on":
        if blocker:
            raise ConfigError(f"compile='on' cannot compile on {device}: {blocker}; use --compile off")
        return True, "on"
    if not str(device).startswith("cuda"):
        return False, f"auto: eager on {device} (--compile on forces compilation)"
    if strategy != "ddp":
        return False, f"auto: eager with strategy {strategy!r} (--compile on forces compilation)"
    if kernels == "liger":
        return False, "auto: eager with Liger's kernels (--compile on forces compilation)"
    if blocker:
        return False, f"auto: eager, {blocker}"
    return True, "auto: compiled (CUDA, ddp)"


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


def is_compile_error(e: BaseException) -> bool:
    """Whether ``e`` came from torch.compile's machinery (Dynamo, Inductor,
    Triton) rather than from the model's own code."""
    return any((t.__module__ or "").startswith(("torch._dynamo", "torch._inductor", "triton"))
               for t in type(e).__mro__)


def compile_error_summary(e: BaseException) -> str:
    """One line naming a compilation error and its root cause (Dynamo wraps
    the backend's exception, whose message is the useful part)."""
    root, seen = e, set()
    while id(root) not in seen:
        seen.add(id(root))
        inner = getattr(root, "inner_exception", None) or root.__cause__
        if inner is None:
            break
        root = inner
    lines = [ln.strip() for ln in str(root).splitlines() if ln.strip()]
    text = f"{type(root).__name__}: {lines[0][:300] if lines else ''}"
    return text if root is e else f"{type(e).__name__}, {text}"


class CompiledSteps:
    """Runs training steps on a model whose decoder layers may be compiled.
    With ``fall_back`` (``--compile auto``), a compilation error, whenever a
    new shape makes the compiler run, turns compilation off for good, drops
    the step's partial gradients (``zero_grad``) and runs the step again
    eagerly, so the default never costs a job; with ``--compile on`` the
    error stands."""

    def __init__(self, llm, compiled: bool, reason: str, fall_back: bool, zero_grad):
        self.llm, self.compiled, self.reason, self.fall_back, self.zero_grad = llm, compiled, reason, fall_back, zero_grad

    @classmethod
    def start(cls, llm, mode, device, strategy: str, kernels: str, zero_grad) -> "CompiledSteps":
        """The training job's rule (``resolve_compile``) applied to ``llm``: its
        layers compiled, or made eager again, and its steps wrapped."""
        compiled, reason = resolve_compile(mode, device, strategy, kernels)
        compile_layers(llm, compiled)
        return cls(llm, compiled, reason, fall_back=compile_mode(mode) == "auto", zero_grad=zero_grad)

    def __call__(self, step, *args):
        try:
            return step(*args)
        except Exception as e:
            if not (self.compiled and self.fall_back and is_compile_error(e)):
                raise
            what = compile_error_summary(e)
            self.reason = f"auto: eager after a compilation error ({what})"
            log.warning("decoder layers: eager from now on, torch.compile failed: %s", what)
            compile_layers(self.llm, False)
            self.compiled = False
            self.zero_grad()
            return step(*args)


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
