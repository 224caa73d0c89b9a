"""The multimodal Phi-3: projected image features spliced into token embeddings.

Each image occupies ``num_image_tokens`` placeholder positions in
``input_ids`` (see ``models.conversation``). ``embed`` looks up the text
embeddings, then writes the projected features of the images, in order
(batch row, then position), over the placeholder positions. Everything after
that is the plain Hugging Face causal LM, including loss (labels unshifted)
and ``generate``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from .config import ModelConfig
from .conversation import collate, encode_conversation
from .language import load_language_model
from .projector import Projector
from .tokenizer import ChatTokenizer, load_tokenizer
from .vision import DTYPES, VisionEncoder, vision_spec

log = logging.getLogger(__name__)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class MultimodalPhi3(nn.Module):
    def __init__(self, cfg: ModelConfig, tokenizer: ChatTokenizer, llm, projector: Projector,
                 vision: VisionEncoder | None = None):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.llm = llm
        self.projector = projector
        self.vision = vision
        self.num_image_tokens = vision_spec(cfg.vision)["num_tokens"]

    # ---------------------------------------------------------------- building
    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        *,
        device: str | torch.device | None = None,
        with_vision: bool = True,
        trainable: bool = True,
        adapter: str | Path | None = None,
    ) -> "MultimodalPhi3":
        """Build every part from a config: tokenizer, Phi-3 (+LoRA), a freshly
        initialised projector and (optionally) the CLIP tower."""
        device = device or default_device()
        tok = load_tokenizer(cfg)
        llm = load_language_model(cfg.llm, tok, device, adapter=adapter, trainable=trainable)
        hidden = llm.get_input_embeddings().weight.shape[1]
        spec = vision_spec(cfg.vision)
        torch.manual_seed(cfg.llm.seed + 1)
        dtype = DTYPES[cfg.llm.compute_dtype if cfg.llm.load_in_4bit else cfg.llm.dtype]
        projector = Projector(cfg.projector.kind, spec["feature_dim"], hidden, cfg.projector.normalize).to(device=device, dtype=dtype)
        projector.requires_grad_(trainable)
        vision = VisionEncoder(cfg.vision, device) if with_vision else None
        return cls(cfg, tok, llm, projector, vision)

    @classmethod
    def from_checkpoint(cls, path: str | Path, **kwargs) -> "MultimodalPhi3":
        from .checkpoint import load_checkpoint

        return load_checkpoint(path, **kwargs)

    def save_checkpoint(self, path: str | Path, extra: dict | None = None) -> Path:
        from .checkpoint import save_checkpoint

        return save_checkpoint(self, path, extra)

    # ----------------------------------------------------------------- helpers
    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def suppressed_ids(self) -> list[int]:
        """Token ids a reply never contains: the image placeholder, and every
        row of the embedding table past the tokenizer's vocabulary (Phi-3 pads
        its 32,011 tokens to 32,064 rows). Those rows decode to nothing, yet a
        random or lightly trained model can still pick them, which would stream
        an answer with no text."""
        rows = self.llm.get_input_embeddings().weight.shape[0]
        return sorted({self.tokenizer.ids.image, *range(len(self.tokenizer), rows)})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def encode_images(self, images) -> torch.Tensor:
        """Images (PIL / path / bytes) -> raw encoder features ``(n, tokens, dim)``."""
        if self.vision is None:
            raise RuntimeError("this model was built without its vision tower (with_vision=False)")
        return self.vision.encode(images)

    # ----------------------------------------------------------------- forward
    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with image features spliced over the placeholders.

        ``image_features``: raw encoder features ``(n_images, num_image_tokens, dim)``
        in the order the images occur in the batch (row by row)."""
        image_id = self.tokenizer.ids.image
        mask = input_ids == image_id
        n_slots = int(mask.sum())
        embeds = self.llm.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        if n_slots == 0:
            if image_features is not None and image_features.numel():
                raise ValueError(f"{image_features.shape[0]} image(s) given but the text has no image placeholder")
            return embeds
        if image_features is None:
            raise ValueError(f"the text has {n_slots} image placeholder tokens but no image features were given")
        if image_features.dim() == 2:
            image_features = image_features.unsqueeze(1)
        n_img, n_tok = image_features.shape[:2]
        if n_tok != self.num_image_tokens or n_img * n_tok != n_slots:
            raise ValueError(
                f"the text has {n_slots} image placeholder tokens ({n_slots / self.num_image_tokens:g} images of "
                f"{self.num_image_tokens} tokens) but {n_img} image(s) x {n_tok} tokens of features were given"
            )
        projected = self.projector(image_features.to(self.device)).reshape(-1, embeds.shape[-1])
        return embeds.masked_scatter(mask.unsqueeze(-1), projected.to(embeds.dtype))

    def forward(self, input_ids, attention_mask=None, labels=None, image_features=None, **kwargs):
        input_ids = input_ids.to(self.device)
        embeds = self.embed(input_ids, image_features)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        if labels is not None:
            labels = labels.to(self.device)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, image_features=None, **gen_kwargs) -> torch.Tensor:
        """New token ids only (batch, new_tokens); stops at Phi-3's stop tokens."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed(input_ids, image_features)
        gen_kwargs.setdefault("eos_token_id", self.tokenizer.stop_ids)
        gen_kwargs.setdefault("pad_token_id", self.tokenizer.ids.pad)
        gen_kwargs.setdefault("max_new_tokens", 64)
        if not gen_kwargs.get("do_sample"):
            gen_kwargs.setdefault("do_sample", False)
            gen_kwargs.setdefault("temperature", None)
            gen_kwargs.setdefault("top_p", None)
            gen_kwargs.setdefault("top_k", None)
        return self.llm.generate(inputs_embeds=embeds, attention_mask=attention_mask.to(self.device), **gen_kwargs)

    def chat(self, messages: list[dict], images=(), **gen_kwargs) -> str:
        """One answer for one conversation whose user turns hold image parts
        matching ``images`` (PIL / path / bytes) in order."""
        enc = encode_conversation(self.tokenizer, messages, self.num_image_tokens, add_generation_prompt=True,
                                  system_prompt=self.cfg.tokenizer.system_prompt)
        if enc.num_images != len(images):
            raise ValueError(f"the messages hold {enc.num_images} image part(s) but {len(images)} image(s) were given")
        feats = self.encode_images(list(images)) if images else None
        batch = collate([enc], self.tokenizer.ids.pad, padding_side="left")
        out = self.generate(batch["input_ids"], batch["attention_mask"], feats, **gen_kwargs)
        return self.tokenizer.decode(out[0], skip_special_tokens=True).strip()
