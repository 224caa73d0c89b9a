"""Utilisation figures of the GPU benchmark (bench/utilisation.py): FLOPs and
bytes from model shapes, checked against published counts, and the peaks
matched from torch's device names."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def u():
    spec = importlib.util.spec_from_file_location("utilisation", BENCH / "utilisation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["utilisation"] = mod
    spec.loader.exec_module(mod)
    return mod


PHI3_MINI = {"vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32}


def test_flops_and_bytes_match_published_counts(u):
    # open_clip's table: ViT-L-14 at 224 px, 81.08 GMACs for the image tower (all 24 blocks)
    assert u.vit_forward_flops(1024, 24, 14, 224) / 2e9 == pytest.approx(81.08, rel=0.02)
    # Phi-3-mini: 3.82 B parameters, of which the input embedding (98.5 M) does no matrix product
    n = u.llm_matrix_params(PHI3_MINI)
    assert n + 32064 * 3072 == pytest.approx(3.82e9, rel=0.01)
    assert u.train_flops_per_token(PHI3_MINI, 0) == 4 * n
    # batch-1 decoding reads every matrix parameter once in bf16, plus 384 KiB of KV per context token
    assert u.decode_bytes_per_token(PHI3_MINI, 1000) - u.decode_bytes_per_token(PHI3_MINI, 0) == 1000 * 384 * 1024


def test_card_peaks_by_name(u):
    assert u.card_peaks("NVIDIA H100 80GB HBM3")["hbm_tb_s"] == 3.35
    assert u.card_peaks("NVIDIA H100 PCIe")["bf16_dense_tflops"] == 756.0
    assert u.card_peaks("NVIDIA H200")["hbm_tb_s"] == 4.8
    assert u.card_peaks("NVIDIA L4")["bf16_dense_tflops"] == 121.0
    assert u.card_peaks("cpu (2 cores, AMD EPYC)") is None


def test_summary_implies_utilisation_from_each_figure(u):
    res = {"embed": {"ok": True, "job_images_per_s": 1000.0, "bare_encoder_images_per_s": 1500.0},
           "train": {"ok": True, "mean_tokens": 750.0, "job_tokens_per_s": 10000.0, "hf_peft_tokens_per_s": 8000.0},
           "serve": {"ok": True, "mean_context_tokens": 650.0, "decode_tok_s_batch1": 200.0,
                     "served_tok_s_batch32": 3000.0}}
    vision = {"width": 1024, "layers_run": 23, "patch": 14, "image": 224}
    out = u.summarise("NVIDIA H100 80GB HBM3", vision, PHI3_MINI, res)
    f = u.vit_forward_flops(**vision)
    assert out["embed"]["job_mfu"] == pytest.approx(1000 * f / 989e12, abs=1e-4)
    assert out["train"]["job_mfu"] == pytest.approx(10000 * u.train_flops_per_token(PHI3_MINI, 750) / 989e12, abs=1e-4)
    b = u.decode_bytes_per_token(PHI3_MINI, 650)
    assert out["serve"]["served_decode_batch1_hbm_util"] == pytest.approx(200 * b / 3.35e12, abs=1e-4)
    assert out["serve"]["bandwidth_limit_tok_s_batch1"] == pytest.approx(3.35e12 / b, abs=0.1)
    cpu = u.summarise("cpu (2 cores)", vision, PHI3_MINI, res)  # no peaks: FLOPs and bytes only
    assert cpu["embed"]["job_mfu"] is None and cpu["embed"]["gflops_per_image"] > 0
