"""Fused-kernel switch (models.kernels) and the training job's checks of it.
``native`` runs anywhere and is checked against Phi-3's own norm here;
Liger's Triton kernels need CUDA: here only the refusals can be checked. The
GPU benchmark times both (bench/train_bench.py's job_native and job_liger)."""
from __future__ import annotations

import pytest

from models.config import ConfigError
from models.kernels import apply_kernels


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model.llm(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.llm.named_parameters() if p.requires_grad}


def test_kernels_are_refused_where_they_cannot_run(tiny_model):
    apply_kernels(tiny_model.llm, "none", "cpu")  # Phi-3's own modules: nothing changes
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        apply_kernels(tiny_model.llm, "liger", "cpu")
    with pytest.raises(ConfigError, match="must be one of none, native, liger"):
        apply_kernels(tiny_model.llm, "triton", "cuda")
    norm = type(tiny_model.llm.get_base_model().model.norm).__name__
    assert norm == "Phi3RMSNorm"  # the refusals patched nothing


def test_the_training_job_refuses_kernels_without_gpus(tmp_path):
    from ray_jobs.train import TrainSettings, run

    s = TrainSettings(stage="qlora", data=str(tmp_path), embeddings=str(tmp_path), out=str(tmp_path), kernels="liger")
    with pytest.raises(ValueError, match="--kernels liger runs on GPUs only"):
        run(s)
    with pytest.raises(ValueError, match="--kernels must be one of"):
        run(TrainSettings(stage="qlora", data=str(tmp_path), embeddings=str(tmp_path), out=str(tmp_path),
                          kernels="fast", gpu=True))


def test_native_norms_match_phi3s_own_and_come_off_again(tiny_cfg):
    import torch

    from models.multimodal import MultimodalPhi3

    torch.manual_seed(0)
    model = MultimodalPhi3.from_config(tiny_cfg, device="cpu", with_vision=False, trainable=True)
    with torch.no_grad():  # norm weights away from 1, so a norm that ignored them would show
        for n, p in model.llm.named_parameters():
            if "layernorm" in n or n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    ids = torch.randint(5, 1000, (2, 32))

    ref_loss, ref = _loss_and_grads(model, ids)
    layers = tiny_cfg.llm.random_init["num_hidden_layers"]
    assert apply_kernels(model.llm, "native", "cpu") == 2 * layers + 1  # two per layer and the final one
    calls = []
    real = torch.nn.functional.rms_norm
    torch.nn.functional.rms_norm = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        loss, got = _loss_and_grads(model, ids)
    finally:
        torch.nn.functional.rms_norm = real
    assert len(calls) == 2 * layers + 1
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)
    assert apply_kernels(model.llm, "none", "cpu") == 2 * layers + 1
    assert not any("forward" in m.__dict__ for m in model.llm.modules() if type(m).__name__ == "Phi3RMSNorm")


def test_native_rotary_is_phi3s_and_comes_off_again(tiny_cfg):
    """``native`` swaps Phi-3's rotary function for the three-kernel one: the
    same loss and gradients through the whole model (full and partial rotary
    dims), and ``none`` puts Phi-3's back."""
    import torch
    from transformers.models.phi3 import modeling_phi3 as mp

    from models.kernels import _native_rope
    from models.multimodal import MultimodalPhi3

    torch.manual_seed(0)
    model = MultimodalPhi3.from_config(tiny_cfg, device="cpu", with_vision=False, trainable=True)
    apply_kernels(model.llm, "none", "cpu")  # whatever ran before in this process
    hf = mp.apply_rotary_pos_emb
    assert hf is not _native_rope
    g = torch.Generator().manual_seed(0)
    for rotary_dims in (64, 32):  # head_dim 64: full, then partial (the rest passes through)
        q, k = torch.randn(2, 4, 7, 64, generator=g), torch.randn(2, 4, 7, 64, generator=g)
        cos, sin = torch.randn(2, 7, rotary_dims, generator=g), torch.randn(2, 7, rotary_dims, generator=g)
        for got, want in zip(_native_rope(q, k, cos, sin), hf(q, k, cos, sin)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)

    ids = torch.randint(5, 1000, (2, 32))

    ref_loss, ref = _loss_and_grads(model, ids)
    try:
        apply_kernels(model.llm, "native", "cpu")
        assert mp.apply_rotary_pos_emb is _native_rope
        calls = []
        real = torch.Tensor.roll
        torch.Tensor.roll = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
        try:
            loss, got = _loss_and_grads(model, ids)
        finally:
            torch.Tensor.roll = real
        assert len(calls) == 2 * tiny_cfg.llm.random_init["num_hidden_layers"]  # q and k of each layer
        assert loss == pytest.approx(ref_loss, rel=1e-5)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-4, atol=1e-6)
    finally:
        apply_kernels(model.llm, "none", "cpu")
    assert mp.apply_rotary_pos_emb is hf


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones_and_evaluation_stays_eager(tiny_cfg):
    """``--compile``: every decoder layer compiled in place (one graph for all,
    no graph breaks, gradient checkpointing on) gives the eager loss and
    gradients; parameter names do not change; ``eager()`` runs ``generate``
    without compiling anything; ``compile_layers(..., False)`` undoes it."""
    import dataclasses

    import torch
    from torch._dynamo.utils import counters

    from models.kernels import compile_layers, eager
    from models.multimodal import MultimodalPhi3

    cfg = dataclasses.replace(tiny_cfg, llm=dataclasses.replace(tiny_cfg.llm, gradient_checkpointing=True))
    torch.manual_seed(0)
    model = MultimodalPhi3.from_config(cfg, device="cpu", with_vision=False, trainable=True)
    apply_kernels(model.llm, "native", "cpu")
    model.train()
    ids = torch.randint(5, 1000, (2, 40))


    names = [n for n, _ in model.named_parameters()]
    ref = {n: _loss_and_grads(model, ids[:, :n]) for n in (40, 23)}
    torch._dynamo.reset()
    counters.clear()
    layers = cfg.llm.random_init["num_hidden_layers"]
    try:
        assert compile_layers(model.llm) == layers
        assert [n for n, _ in model.named_parameters()] == names
        for n in (40, 23):  # two lengths: dynamic shapes, no recompilation needed
            loss, got = _loss_and_grads(model, ids[:, :n])
            assert loss == pytest.approx(ref[n][0], rel=1e-5)
            for k in ref[n][1]:
                torch.testing.assert_close(got[k], ref[n][1][k], rtol=1e-4, atol=1e-5)
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] >= 1
        graphs = counters["stats"]["unique_graphs"]
        model.eval()
        with torch.no_grad(), eager():
            model.llm.generate(input_ids=ids[:1, :10], max_new_tokens=4, do_sample=False)
        assert counters["stats"]["unique_graphs"] == graphs  # generate ran eagerly
    finally:
        assert compile_layers(model.llm, False) == layers
    assert all(layer._compiled_call_impl is None for layer in model.llm.get_base_model().model.layers)


def test_compile_auto_compiles_on_cuda_with_ddp_only_and_says_why(monkeypatch):
    """``--compile auto`` (the default): compiled on CUDA with DDP when the
    compiler's prerequisites are there; eager on the CPU, with DeepSpeed or
    Liger's kernels and when Triton or a C compiler is missing, each with its
    reason. ``on``
    refuses clearly where it cannot compile; older settings' booleans still
    mean on / off."""
    import sys

    from models import kernels

    assert kernels.resolve_compile("auto", "cpu") == (False, "auto: eager on cpu (--compile on forces compilation)")
    assert kernels.resolve_compile("off", "cuda") == (False, "off")
    assert kernels.resolve_compile(False, "cuda") == (False, "off")
    monkeypatch.setattr(kernels, "compile_blocker", lambda device: None)
    assert kernels.resolve_compile("auto", "cuda", "ddp") == (True, "auto: compiled (CUDA, ddp)")
    assert kernels.resolve_compile(True, "cpu") == (True, "on")
    compiled, why = kernels.resolve_compile("auto", "cuda", "deepspeed")
    assert not compiled and "deepspeed" in why
    compiled, why = kernels.resolve_compile("auto", "cuda", "ddp", "liger")
    assert not compiled and "Liger" in why
    with pytest.raises(ConfigError, match="compile='fast': choose one of auto, on, off"):
        kernels.resolve_compile("fast", "cuda")
    monkeypatch.undo()

    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)  # a slim image: no C compiler
    assert "no C compiler on PATH" in kernels.compile_blocker("cuda")
    compiled, why = kernels.resolve_compile("auto", "cuda")
    assert not compiled and why.startswith("auto: eager, no C compiler")
    with pytest.raises(ConfigError, match="compile='on' cannot compile on cuda: no C compiler"):
        kernels.resolve_compile("on", "cuda")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton fails
    assert kernels.compile_blocker("cuda").startswith("Triton is not installed")


def test_a_compilation_error_in_auto_mode_falls_back_to_eager_steps(tiny_cfg, monkeypatch):
    """When the compiler fails (here Inductor raises, as a missing toolchain
    or an unsupported op would), ``auto`` turns compilation off and reruns the
    step eagerly: the same loss and gradients as an eager model, the layers
    uncompiled, the reason kept; ``on`` lets the error stand, and errors of
    the model's own never trigger the fallback."""
    import torch
    import torch._inductor.compile_fx as compile_fx

    from models.kernels import CompiledSteps, compile_layers, is_compile_error
    from models.multimodal import MultimodalPhi3

    torch.manual_seed(0)
    model = MultimodalPhi3.from_config(tiny_cfg, device="cpu", with_vision=False, trainable=True)
    model.train()
    ids = torch.randint(5, 1000, (2, 24))
    ref_loss, ref = _loss_and_grads(model, ids)

    def broken_inductor(*args, **kwargs):
        raise RuntimeError("injected: the C compiler is gone")

    monkeypatch.setattr(compile_fx, "compile_fx", broken_inductor)
    torch._dynamo.reset()
    layers = model.llm.get_base_model().model.layers
    zeroed = []
    try:
        compile_layers(model.llm)
        strict = CompiledSteps(model.llm, True, "on", fall_back=False, zero_grad=lambda: zeroed.append("on"))
        with pytest.raises(Exception, match="injected") as err:
            strict(_loss_and_grads, model, ids)
        assert is_compile_error(err.value) and not zeroed
        assert all(layer._compiled_call_impl is not None for layer in layers)  # still compiled

        torch._dynamo.reset()
        steps = CompiledSteps(model.llm, True, "auto: compiled (CUDA, ddp)", fall_back=True,
                              zero_grad=lambda: zeroed.append("auto") or model.zero_grad(set_to_none=True))
        loss, got = steps(_loss_and_grads, model, ids)
        assert zeroed == ["auto"] and not steps.compiled
        assert steps.reason.startswith("auto: eager after a compilation error") and "injected" in steps.reason
        assert all(layer._compiled_call_impl is None for layer in layers)
        assert loss == pytest.approx(ref_loss, rel=1e-6)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k])

        def model_error(*args):
            raise ValueError("a bad batch")

        steps.compiled = True  # even while compiled, the model's own errors stand
        with pytest.raises(ValueError, match="a bad batch"):
            steps(model_error)
        assert not is_compile_error(ValueError("x"))
    finally:
        compile_layers(model.llm, False)
        torch._dynamo.reset()
