"""QLoRA for real on the CPU: 4-bit NF4 base (bitsandbytes) + LoRA + projector."""
from __future__ import annotations

import pytest
import torch

from models.config import load_config
from models.conversation import collate, encode_for_training
from models.multimodal import MultimodalPhi3


@pytest.fixture(scope="module")
def qlora():
    cfg = load_config("tiny", ["llm.load_in_4bit=true", "llm.gradient_checkpointing=true"])
    return MultimodalPhi3.from_config(cfg, device="cpu", with_vision=False, trainable=True)


def test_base_is_4bit_nf4(qlora):
    import bitsandbytes as bnb

    layers = [mod for mod in qlora.llm.modules() if isinstance(mod, bnb.nn.Linear4bit)]
    assert len(layers) == 4 * qlora.cfg.llm.random_init["num_hidden_layers"]  # qkv, o, gate_up, down
    w = layers[0].weight
    assert w.quant_state.quant_type == "nf4" and w.quant_state.nested  # double quantisation
    assert w.dtype == torch.uint8


def test_qlora_forward_backward_learns(qlora):
    m, tok = qlora, qlora.tokenizer
    assert m.llm.base_model.model.is_gradient_checkpointing
    enc = encode_for_training(tok, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                                    {"role": "assistant", "content": "Yellow."}], m.num_image_tokens, 1024)
    batch = collate([enc] * 4, tok.ids.pad)
    feats = torch.randn(4, m.num_image_tokens, m.projector.in_dim, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(m.trainable_parameters(), lr=5e-3)
    lora_b = next(p for n, p in m.named_parameters() if "lora_B" in n)
    b0 = lora_b.detach().clone()
    losses = []
    m.train()
    for _ in range(10):
        loss = m(**batch, image_features=feats).loss
        loss.backward()
        assert m.projector.net[0].weight.grad is not None and lora_b.grad is not None
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.6, losses
    assert not torch.equal(lora_b, b0)


def _bf16_qlora(frozen_fp32: bool):
    # bitsandbytes' CPU kernel wants every 4-bit row a whole number of 64-value blocks (tiny's MLP has 688)
    cfg = load_config("tiny", ["llm.load_in_4bit=true", "llm.gradient_checkpointing=true", "llm.dtype=bfloat16",
                               "llm.compute_dtype=bfloat16", "llm.random_init.intermediate_size=768",
                               f"llm.frozen_fp32={str(frozen_fp32).lower()}"])
    torch.manual_seed(0)
    return MultimodalPhi3.from_config(cfg, device="cpu", with_vision=False, trainable=True)


def _decoder_output_dtypes(m, batch, feats):
    seen = []
    hooks = [layer.register_forward_hook(lambda mod, args, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).dtype)) for layer in m.llm.base_model.model.model.layers]
    try:
        loss = m(**batch, image_features=feats).loss
    finally:
        for h in hooks:
            h.remove()
    return loss, seen


def test_frozen_weights_stay_bf16_so_the_residual_stream_does():
    """llm.frozen_fp32=false (the default): the 4-bit model's frozen embeddings,
    norms and LM head stay in bf16 and so does every layer's output; true
    upcasts them as peft's prepare_model_for_kbit_training does, and the
    residual stream runs in fp32. The two give the same loss and gradients
    up to bf16 rounding, and the trainable weights stay fp32 either way."""
    from models.language import set_frozen_dtype

    lean, upcast = _bf16_qlora(False), _bf16_qlora(True)
    tok = lean.tokenizer
    enc = encode_for_training(tok, [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                                    {"role": "assistant", "content": "Yellow, with a red border."}], lean.num_image_tokens, 1024)
    batch = collate([enc] * 2, tok.ids.pad)
    feats = torch.randn(2, lean.num_image_tokens, lean.projector.in_dim, generator=torch.Generator().manual_seed(0))

    def frozen(m):
        return {n: p.dtype for n, p in m.llm.named_parameters()
                if not p.requires_grad and type(p).__name__ != "Params4bit"}

    assert set(frozen(lean).values()) == {torch.bfloat16} and len(frozen(lean)) >= 4  # embed, 2 norms a layer, final, head
    assert set(frozen(upcast).values()) == {torch.float32}
    for m in (lean, upcast):  # fp32 master weights of the adapters either way
        assert {p.dtype for n, p in m.llm.named_parameters() if "lora_" in n} == {torch.float32}
    lean.train(), upcast.train()
    results = []
    for m, want in ((lean, torch.bfloat16), (upcast, torch.float32)):
        m.zero_grad(set_to_none=True)
        loss, dtypes = _decoder_output_dtypes(m, batch, feats)
        assert dtypes and set(dtypes) == {want}
        loss.backward()
        grads = {n: p.grad.float() for n, p in m.llm.named_parameters() if p.grad is not None and "lora_B" in n}
        results.append((loss.detach().float(), grads))
    (l0, g0), (l1, g1) = results
    assert torch.isfinite(l0) and abs(l0 - l1) < 0.02 * l1, (l0, l1)  # bf16 rounding of the activations only
    assert set(g0) == set(g1) and g0
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in g0.values()]),
                                                torch.cat([g.flatten() for g in g1.values()]), dim=0)
    assert cos > 0.98, cos
    # the cast is exact both ways and leaves trainable and 4-bit weights alone
    before = {n: p.detach().clone() for n, p in lean.llm.named_parameters()}
    assert set_frozen_dtype(lean.llm, torch.float32) == len(frozen(lean))
    assert set(frozen(lean).values()) == {torch.float32}
    assert set_frozen_dtype(lean.llm, torch.bfloat16) == len(frozen(lean))
    for n, p in lean.llm.named_parameters():
        assert p.dtype == before[n].dtype and torch.equal(p, before[n]), n


def test_the_optional_cpu_kernel_notice_is_dropped_and_nothing_else():
    """bitsandbytes warns in every process that imports it (on CPUs with
    AVX-512 BF16) that an optional kernel package is missing; importing
    ``models`` first drops that one line, and its other warnings still pass."""
    import logging
    import subprocess
    import sys

    notice = "Failed to load CPU gemm_4bit_forward from kernels-community"
    log = logging.getLogger("bitsandbytes.backends.cpu.ops")

    def record(msg: str) -> logging.LogRecord:
        return log.makeRecord(log.name, logging.WARNING, __file__, 0, msg, (), None)

    assert not log.filter(record(notice + ": %s. Please make sure ..."))
    assert log.filter(record("some other bitsandbytes warning"))

    # one fresh interpreter: bitsandbytes warns there when the CPU has AVX-512 BF16 and `kernels` is missing
    code = ("import importlib.util, models, bitsandbytes; from bitsandbytes.functional import has_avx512bf16; "
            "print(has_avx512bf16() and importlib.util.find_spec('kernels') is None)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    if p.stdout.strip() == "True":
        assert notice not in p.stderr
