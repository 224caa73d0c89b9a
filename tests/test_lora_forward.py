"""models.lora_forward: the training job's LoRA forward against PEFT's own,
on the tiny preset (fp32, bf16 and 4-bit NF4 bases on CPU)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models.lora_forward import LORA_FORWARDS, fuse_lora


def _model(tiny_cfg, **llm):
    from models.multimodal import MultimodalPhi3

    cfg = dataclasses.replace(tiny_cfg, llm=dataclasses.replace(tiny_cfg.llm, **llm)) if llm else tiny_cfg
    torch.manual_seed(0)
    model = MultimodalPhi3.from_config(cfg, device="cpu", with_vision=False, trainable=True)
    with torch.no_grad():  # PEFT starts B at zero: give the update a size so a wrong one shows
        for n, p in model.llm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    model.train()
    return model


def _loss_and_grads(model, ids):
    torch.manual_seed(1)  # the same dropout masks on both sides
    model.zero_grad()
    loss = model.llm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.llm.named_parameters() if p.requires_grad}


def _compare(model, rtol):
    ids = torch.randint(5, 1000, (2, 48))
    assert fuse_lora(model.llm, "peft") > 0
    ref_loss, ref = _loss_and_grads(model, ids)
    n = fuse_lora(model.llm, "fused")
    loss, got = _loss_and_grads(model, ids)
    assert loss == pytest.approx(ref_loss, rel=rtol)
    for k in ref:
        assert got[k].dtype == ref[k].dtype == torch.float32, k  # fp32 master weights stay fp32
        err = (got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(1e-12)
        assert err < rtol * 10, (k, float(err))
    return n


def test_fp32_equals_peft(tiny_cfg):
    model = _model(tiny_cfg)
    layers = tiny_cfg.llm.random_init["num_hidden_layers"] * len(tiny_cfg.llm.lora.target_modules)
    assert _compare(model, rtol=1e-5) == layers


def test_bf16_base_matches_peft_to_bf16_rounding(tiny_cfg):
    assert _compare(_model(tiny_cfg, dtype="bfloat16"), rtol=1e-2) > 0


def test_4bit_base_matches_peft(tiny_cfg):
    from peft.tuners.lora.bnb import Linear4bit

    model = _model(tiny_cfg, load_in_4bit=True, compute_dtype="float32")
    assert any(isinstance(m, Linear4bit) for m in model.llm.modules())
    assert _compare(model, rtol=1e-4) > 0


def test_the_fused_forward_runs_and_steps_back(tiny_cfg):
    """Every LoRA layer runs the fused forward; ``peft`` restores PEFT's; states
    it does not cover (adapters disabled) run PEFT's forward."""
    import models.lora_forward as lf

    model = _model(tiny_cfg)
    n = fuse_lora(model.llm)
    calls = []
    for m in model.llm.modules():
        if "forward" in m.__dict__:
            m.forward = (lambda f: lambda x, *a, **k: calls.append(1) or f(x, *a, **k))(m.forward)
    ids = torch.randint(5, 1000, (1, 16))
    with torch.no_grad():
        on = model.llm(input_ids=ids).logits
        with model.llm.disable_adapter():
            off = model.llm(input_ids=ids).logits
        fuse_lora(model.llm, "peft")
        assert not any("forward" in m.__dict__ for m in model.llm.modules())
        with model.llm.disable_adapter():
            off_peft = model.llm(input_ids=ids).logits
    assert len(calls) == 2 * n
    assert torch.allclose(off, off_peft) and not torch.allclose(on, off, atol=1e-4)
    assert lf.LORA_FORWARDS == LORA_FORWARDS
    with pytest.raises(ValueError, match="lora forward must be one of"):
        fuse_lora(model.llm, "triton")


def test_the_job_validates_its_lora_forward(tmp_path):
    from ray_jobs.train import TrainSettings, run

    s = TrainSettings(stage="qlora", data=str(tmp_path), embeddings=str(tmp_path), out=str(tmp_path),
                      lora_forward="fast")
    with pytest.raises(ValueError, match="--lora-forward must be one of fused, peft"):
        run(s)
    assert TrainSettings(stage="qlora", data="", embeddings="", out="").lora_forward == "fused"
