"""GPU check of the model at real size: Phi-3-mini-shaped random weights in
4-bit NF4 with LoRA (QLoRA) + CLIP ViT-L/14-336 + projector, one forward and
backward with an image per sample, peak memory, and generate with an image.

Runs offline: weights are random (no hub), the tokenizer is the offline BPE
(the embedding still has Phi-3-mini's 32,064 rows). Prints a table and
writes JSON (``--out``).

    python bench/gpu_model_check.py --out gpu_model_check.json
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

PHI3_MINI = {
    "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
    "original_max_position_embeddings": 4096,
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="gpu_model_check.json")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024, help="tokens per sample, image tokens included")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU rehearsal at toy size (checks the script, measures nothing)")
    args = ap.parse_args()

    from models.config import load_config
    from models.conversation import collate, encode_for_training
    from models.multimodal import MultimodalPhi3
    from models.tokenizer import tiny_corpus

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("this check needs a GPU (or --dry-run)")
    dev = "cuda" if cuda else "cpu"
    shape = PHI3_MINI if cuda else {**PHI3_MINI, "hidden_size": 128, "intermediate_size": 256,
                                    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4}
    overrides = [
        f"llm.random_init={json.dumps(shape)}", "vision.pretrained=null",
        "tokenizer.build={vocab_size: 2048}", "tokenizer.max_length=4096",
    ] + ([] if cuda else ["vision.model=mmphi-tiny-vit", f"vision.model_config={json.dumps(load_config('tiny').vision.model_config)}",
                          "vision.dtype=float32", "llm.compute_dtype=float32", "llm.dtype=float32"])
    cfg = load_config("phi3-mini", overrides)
    rows = {}
    t = time.time()
    model = MultimodalPhi3.from_config(cfg, device=dev, trainable=True)
    rows["load_s"] = time.time() - t
    rows["load_gib"] = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    lin4 = sum(1 for m in model.llm.modules() if type(m).__name__ == "Linear4bit")
    n_trainable = sum(p.numel() for p in model.trainable_parameters())

    tok = model.tokenizer
    text = " ".join(tiny_corpus(400, seed=1))
    answer_ids = tok.encode_text(text)
    n_text = args.seq - model.num_image_tokens - 16
    answer = tok.decode(answer_ids[: max(n_text, 8)])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
            {"role": "assistant", "content": answer}]
    enc = encode_for_training(tok, msgs, model.num_image_tokens, cfg.tokenizer.max_length)
    batch = collate([enc] * args.batch, tok.ids.pad)
    from PIL import Image

    images = [Image.new("RGB", (400, 300), (30 * i % 255, 90, 160)) for i in range(args.batch)]
    sync()
    t = time.time()
    feats = model.encode_images(images)
    sync()
    rows["vision_encode_s"] = time.time() - t

    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    model.train()
    for step in range(args.steps):
        sync()
        t = time.time()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = model(**batch, image_features=feats).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.time() - t)
        losses.append(loss.item())
    rows["train_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0
    steady = times[1:] or times
    rows["step_s"] = sum(steady) / len(steady)
    rows["tokens_per_s"] = batch["input_ids"].numel() / rows["step_s"]

    model.eval()
    t = time.time()
    reply = model.chat([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
                       images[:1], max_new_tokens=32, min_new_tokens=32)
    sync()
    rows["generate_32_s"] = time.time() - t

    result = {
        "card": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)",
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "llm": "Phi-3-mini shape, random weights, 4-bit NF4 (double quant, bf16 compute) + LoRA r%d" % cfg.llm.lora.r,
        "vision": f"{cfg.vision.model} random, {cfg.vision.token_mode} layer {cfg.vision.feature_layer}, "
                  f"{model.num_image_tokens} tokens/image",
        "linear4bit_layers": lin4, "trainable_params": n_trainable,
        "batch": args.batch, "seq_len": int(batch["input_ids"].shape[1]),
        "gradient_checkpointing": cfg.llm.gradient_checkpointing,
        "losses": losses, "first_loss_vs_ln_vocab": losses[0] / torch.log(torch.tensor(32064.0)).item(),
        "reply_chars": len(reply), **rows,
    }
    print(f"{'metric':<28}value")
    for k, v in result.items():
        print(f"{k:<28}{v:.3f}" if isinstance(v, float) else f"{k:<28}{v}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
