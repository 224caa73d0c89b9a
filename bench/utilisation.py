"""What a benchmark figure implies about the card: model FLOPs utilisation
(MFU) or memory-bandwidth utilisation, from the model's shapes and the card's
datasheet peaks. Used by ``bench/gpu_bench.py``; every figure says its basis.

- **Embedding** (images/s): forward FLOPs of the CLIP tower per image, up to
  the block the features come from: per block 24 T w^2 (projections and MLP
  at ratio 4) + 4 T^2 w (attention), T tokens (patches + class), width w;
  plus the patch projection.
- **Training** (real tokens/s): useful FLOPs per token of a frozen base with
  LoRA: forward 2N + input gradients 2N (the base's weight gradients are
  never computed), attention 3 x 4 L d (n/2) for a mean length n; N the
  matrix parameters (projections, MLP, LM head). Recomputation (gradient
  checkpointing), padding and the LoRA matrices are not counted: MFU here is
  useful work over peak, as is customary.
- **Decoding at batch 1** (tokens/s): bytes read per token, every matrix
  parameter once (bf16) + the KV cache of the context, over the card's
  memory bandwidth. At batch 32: 2N FLOPs per token over peak.
"""
from __future__ import annotations

# dense bf16 tensor-core TFLOP/s and HBM TB/s from the vendors' datasheets;
# the first entry whose words all occur in torch's device name wins
CARDS: list[tuple[tuple[str, ...], float, float]] = [
    (("h100", "pcie"), 756.0, 2.0),
    (("h100", "nvl"), 835.0, 3.9),
    (("h100",), 989.0, 3.35),  # SXM, "NVIDIA H100 80GB HBM3"
    (("h200",), 989.0, 4.8),
    (("a100", "pcie"), 312.0, 1.935),
    (("a100", "40gb"), 312.0, 1.555),
    (("a100",), 312.0, 2.039),
    (("l40s",), 362.0, 0.864),
    (("l4",), 121.0, 0.3),
]


def card_peaks(card: str) -> dict | None:
    name = card.lower()
    for words, tflops, tb_s in CARDS:
        if all(w in name for w in words):
            return {"bf16_dense_tflops": tflops, "hbm_tb_s": tb_s, "source": "vendor datasheet"}
    return None


def vit_forward_flops(width: int, layers_run: int, patch: int, image: int, mlp_ratio: float = 4.0) -> float:
    grid = image // patch
    t = grid * grid + 1
    per_block = (8 + 4 * mlp_ratio) * t * width**2 + 4 * t * t * width
    return layers_run * per_block + 2 * grid * grid * 3 * patch * patch * width


def llm_matrix_params(shape: dict) -> float:
    d, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads = shape["num_attention_heads"]
    kv = shape.get("num_key_value_heads") or heads
    head_dim = shape.get("head_dim") or d // heads
    attn = d * (heads * head_dim + 2 * kv * head_dim) + heads * head_dim * d
    return layers * (attn + 3 * d * i) + d * shape["vocab_size"]


def train_flops_per_token(shape: dict, mean_tokens: float) -> float:
    attn = 4 * shape["num_hidden_layers"] * shape["hidden_size"] * mean_tokens / 2
    return 4 * llm_matrix_params(shape) + 3 * attn


def decode_bytes_per_token(shape: dict, context: float, bytes_per_param: int = 2) -> float:
    heads = shape["num_attention_heads"]
    kv = shape.get("num_key_value_heads") or heads
    head_dim = shape.get("head_dim") or shape["hidden_size"] // heads
    kv_per_token = 2 * shape["num_hidden_layers"] * kv * head_dim * bytes_per_param
    return bytes_per_param * llm_matrix_params(shape) + kv_per_token * context


def _share(value: float | None, limit: float | None) -> float | None:
    return None if value is None or not limit else round(value / limit, 4)


def summarise(card: str, vision: dict | None, llm: dict | None, results: dict) -> dict:
    """``vision``: width, layers_run, patch, image (``vision_shape``); ``llm``:
    a Phi-3 shape; ``results``: gpu_bench's per-stage summaries (and the
    serve stage's mean context). Figures without a peak (CPU, unknown card)
    keep their FLOPs and bytes only."""
    peaks = card_peaks(card)
    flops = peaks and peaks["bf16_dense_tflops"] * 1e12
    bw = peaks and peaks["hbm_tb_s"] * 1e12
    out: dict = {"card": card, "peaks": peaks}
    emb = results.get("embed") or {}
    if vision and emb.get("ok"):
        f = vit_forward_flops(**vision)
        out["embed"] = {"gflops_per_image": round(f / 1e9, 2),
                        "compute_limit_images_per_s": round(flops / f, 0) if flops else None,
                        "job_mfu": _share(_mul(emb.get("job_images_per_s"), f), flops),
                        "bare_encoder_mfu": _share(_mul(emb.get("bare_encoder_images_per_s"), f), flops),
                        "encoder_device_mfu": _share(_mul(emb.get("bare_encoder_device_images_per_s"), f), flops),
                        "basis": "forward FLOPs of the tower up to the feature block, over dense bf16 peak"}
    tr = results.get("train") or {}
    if llm and tr.get("ok") and tr.get("mean_tokens"):
        f = train_flops_per_token(llm, tr["mean_tokens"])
        out["train"] = {"gflops_per_token": round(f / 1e9, 3),
                        "job_mfu": _share(_mul(tr.get("job_tokens_per_s"), f), flops),
                        "hf_peft_mfu": _share(_mul(tr.get("hf_peft_tokens_per_s"), f), flops),
                        "eager_mfu": _share(_mul(tr.get("job_eager_tokens_per_s"), f), flops),
                        "liger_mfu": _share(_mul(tr.get("job_liger_tokens_per_s"), f), flops),
                        "basis": "4N + attention per real token (frozen base: forward and input gradients; "
                                 "recomputation and padding not counted), over dense bf16 peak"}
    sv = results.get("serve") or {}
    if llm and sv.get("ok"):
        ctx = sv.get("mean_context_tokens") or 0
        b = decode_bytes_per_token(llm, ctx)
        f = 2 * llm_matrix_params(llm)
        out["serve"] = {"bytes_per_token_batch1_gb": round(b / 1e9, 3), "context_tokens": ctx,
                        "bandwidth_limit_tok_s_batch1": round(bw / b, 1) if bw else None,
                        "served_decode_batch1_hbm_util": _share(_mul(sv.get("decode_tok_s_batch1"), b), bw),
                        "engine_static_batch1_hbm_util": _share(_mul(sv.get("engine_static_decode_tok_s_batch1"), b), bw),
                        "hf_batch1_hbm_util": _share(_mul(sv.get("hf_decode_tok_s_batch1"), b), bw),
                        "served_batch32_mfu": _share(_mul(sv.get("served_tok_s_batch32"), f), flops),
                        "hf_batch32_mfu": _share(_mul(sv.get("hf_tok_s_batch32"), f), flops),
                        "basis": "batch 1: every matrix parameter (bf16) and the context's KV cache read once per "
                                 "token, over HBM bandwidth; batch 32: 2N FLOPs per token over dense bf16 peak"}
    return out


def _mul(a: float | None, b: float) -> float | None:
    return None if a is None else a * b
