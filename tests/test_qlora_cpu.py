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
