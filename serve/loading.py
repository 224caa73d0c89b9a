"""Load what each deployment needs from a checkpoint folder or a preset.

The ingress needs only the tokenizer (to count and trim prompts); the image
encoder needs the CLIP tower; the LLM needs Phi-3 (+ LoRA adapter) and the
projector. Raw CLIP features cross from the image encoder to the LLM, which
applies the projector: they are narrower than projected ones (1024 against
Phi-3-mini's 3072 per token), and the projector was trained with the adapter
and ships in the same checkpoint.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .settings import ServeSettings

log = logging.getLogger(__name__)


@dataclass
class Source:
    """The resolved model config and where its weights come from."""

    cfg: object  # models.config.ModelConfig
    checkpoint: Path | None
    meta: dict | None

    @property
    def description(self) -> str:
        if self.checkpoint is not None:
            return f"checkpoint {self.checkpoint}"
        random = self.cfg.llm.random_init is not None
        return (f"preset {self.cfg.name!r} with random weights (no checkpoint given)" if random
                else f"preset {self.cfg.name!r} base weights (no checkpoint given)")

    @property
    def context_length(self) -> int:
        return int(self.cfg.tokenizer.max_length)


def system_fingerprint(source: Source, settings: ServeSettings) -> str:
    """OpenAI's ``system_fingerprint``: one value for every server that answers
    with the same weights (the checkpoint's files by content, or the preset),
    resolved config, device setting and library versions. With the same
    ``seed``, answers repeat while it does not change."""
    import hashlib
    import json
    from importlib import metadata

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "absent"

    h = hashlib.sha256()
    ident = {"config": source.cfg.to_dict(), "device": settings.device,
             "versions": {p: version(p) for p in ("mmphi", "torch", "transformers", "peft")}}
    h.update(json.dumps(ident, sort_keys=True, default=str).encode())
    if source.checkpoint is not None:
        for name in sorted((source.meta or {}).get("files") or {}):
            h.update(name.encode() + b"\0")
            with open(source.checkpoint / name, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return "fp_" + h.hexdigest()[:12]


def resolve(settings: ServeSettings) -> Source:
    """The config of a checkpoint (with runtime overrides) or of the preset."""
    from models.checkpoint import checkpoint_config, read_meta
    from models.config import load_config

    if settings.checkpoint:
        path = Path(settings.checkpoint).expanduser().resolve()
        meta = read_meta(path)
        return Source(checkpoint_config(path, meta, settings.overrides), path, meta)
    return Source(load_config(settings.preset, settings.overrides), None, None)


def set_threads(settings: ServeSettings) -> None:
    import torch

    if settings.torch_threads > 0:
        torch.set_num_threads(settings.torch_threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_tokenizer(source: Source):
    from models.tokenizer import ChatTokenizer, load_tokenizer as build

    if source.checkpoint is not None:
        return ChatTokenizer.load(source.checkpoint / "tokenizer", source.cfg.tokenizer.image_token)
    return build(source.cfg)


def load_vision(source: Source, device: str | None):
    """The CLIP tower; refuses one whose weights differ from the checkpoint's."""
    import torch

    from models.checkpoint import CheckpointMismatch
    from models.vision import VisionEncoder
    from models.weights import fingerprint

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    vision = VisionEncoder(source.cfg.vision, device)
    want = (source.meta or {}).get("fingerprints", {}).get("vision")
    if want is not None and fingerprint(next(vision.parameters())) != want:
        raise CheckpointMismatch(f"{source.checkpoint}: vision encoder weights differ from those it was trained with")
    return vision


def load_llm(source: Source, settings: ServeSettings):
    """Phi-3 (+ adapter) and the projector, without the vision tower. Unless
    the base is 4-bit, the LoRA adapter is merged into the base weights: the
    same function, without two extra matrix products per projection per
    token. A 4-bit base cannot take the sum, so its adapter stays apart, in
    the compute dtype, with the fused LoRA forward (``models.lora_forward``)."""
    from models.multimodal import MultimodalPhi3

    if source.checkpoint is not None:
        model = MultimodalPhi3.from_checkpoint(source.checkpoint, overrides=settings.overrides,
                                               device=settings.device, with_vision=False)
    else:
        model = MultimodalPhi3.from_config(source.cfg, device=settings.device, with_vision=False, trainable=False)
    if not source.cfg.llm.load_in_4bit and hasattr(model.llm, "merge_and_unload"):
        model.llm = model.llm.merge_and_unload()
        log.info("LoRA adapter merged into the base weights")
    elif hasattr(model.llm, "peft_config"):
        from models.lora_forward import lora_for_inference
        from models.vision import DTYPES

        n = lora_for_inference(model.llm, DTYPES[source.cfg.llm.compute_dtype])
        log.info("LoRA adapter kept apart from the 4-bit base: %d layers in %s, fused forward",
                 n, source.cfg.llm.compute_dtype)
    model.eval()
    return model
