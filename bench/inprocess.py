"""What the in-process LLM benchmarks (``chunk_bench``, ``format_bench``)
share: the preset's model on the CPU or a GPU, and a one-question chat
prompt as the ingress would encode it."""
from __future__ import annotations

import argparse


def parser(doc: str) -> argparse.ArgumentParser:
    """An argument parser with the flags every in-process benchmark takes:
    ``--preset``, ``--set`` (overrides), ``--gpu``, ``--threads``, ``--out``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--gpu", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    ap.add_argument("--out", default=None)
    return ap


def percentile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load_model(args):
    """``args.preset`` with ``args.overrides`` on ``cuda`` (``args.gpu``) or
    the CPU (``args.threads`` torch threads), in inference mode; returns
    (model, device name)."""
    import torch

    from models.config import load_config
    from models.multimodal import MultimodalPhi3

    if not args.gpu:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.preset, args.overrides)
    device = "cuda" if args.gpu else "cpu"
    model = MultimodalPhi3.from_config(cfg, device=device, trainable=False)
    model.eval()
    return model, device


def chat_prompt(model, text: str) -> list[int]:
    """The ids of a one-message user turn asking ``text``, ready for the answer."""
    from models.conversation import encode_conversation

    return encode_conversation(model.tokenizer, [{"role": "user", "content": [{"type": "text", "text": text}]}],
                               model.num_image_tokens, add_generation_prompt=True,
                               system_prompt=model.cfg.tokenizer.system_prompt).input_ids
