"""CLIP vision tower (open_clip) returning pooled or patch-token features.

``token_mode: pooled`` gives one vector per image (the projected CLIP image
embedding); ``patches`` gives every patch token of ``feature_layer`` (raw
block output, no final norm, as LLaVA-1.5), optionally average-pooled over
the patch grid. Features have shape ``(images, tokens, dim)`` either way.
"""
from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps

from .config import ConfigError, VisionConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes or file are not an image we can use; the message says why."""


def _register(cfg: VisionConfig) -> None:
    import open_clip

    if cfg.model_config is None or open_clip.get_model_config(cfg.model) == cfg.model_config:
        return
    folder = Path(tempfile.mkdtemp(prefix="mmphi-openclip-"))
    (folder / f"{cfg.model}.json").write_text(json.dumps(cfg.model_config))
    open_clip.add_model_config(folder)


def vision_spec(cfg: VisionConfig) -> dict:
    """Shape facts of the tower, read from its config without building it."""
    import open_clip

    _register(cfg)
    mc = open_clip.get_model_config(cfg.model)
    if mc is None:
        raise ConfigError(f"vision.model {cfg.model!r} is not an open_clip model (see open_clip.list_models())")
    vc = mc["vision_cfg"]
    size = vc["image_size"] if isinstance(vc["image_size"], int) else vc["image_size"][0]
    patch = vc["patch_size"]
    layers = vc["layers"]
    if cfg.token_mode == "pooled":
        tokens, dim = 1, mc["embed_dim"]
    else:
        if not -layers <= cfg.feature_layer < layers:
            raise ConfigError(f"vision.feature_layer {cfg.feature_layer} is outside the tower's {layers} layers")
        grid = size // patch
        if grid % cfg.patch_pool:
            raise ConfigError(f"vision.patch_pool {cfg.patch_pool} does not divide the {grid}x{grid} patch grid")
        tokens, dim = (grid // cfg.patch_pool) ** 2, vc["width"]
    return {"image_size": size, "patch_size": patch, "layers": layers, "num_tokens": tokens, "feature_dim": dim}


def vision_identity(cfg: VisionConfig) -> dict:
    """What must match between embeddings, checkpoints and a serving model."""
    spec = vision_spec(cfg)
    return {
        "model": cfg.model, "pretrained": cfg.pretrained, "token_mode": cfg.token_mode,
        "feature_layer": cfg.feature_layer if cfg.token_mode == "patches" else None,
        "patch_pool": cfg.patch_pool, "image_size": spec["image_size"],
        "num_tokens": spec["num_tokens"], "feature_dim": spec["feature_dim"],
    }


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open a path, bytes or PIL image as upright RGB; refuse what is not an
    image, is truncated, or exceeds ``max_pixels`` (decompression bombs)."""
    try:
        if isinstance(source, Image.Image):
            img = source
        elif isinstance(source, (bytes, bytearray, memoryview)):
            if not len(source):
                raise ImageDecodeError("image is empty (0 bytes)")
            img = Image.open(io.BytesIO(bytes(source)))
        else:
            img = Image.open(source)
        w, h = img.size
        if w * h > max_pixels:
            raise ImageDecodeError(f"image is {w}x{h} = {w * h} pixels; the limit is {max_pixels}")
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            img = img.point(lambda v: v / 256).convert("L")
        if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            rgba = img.convert("RGBA")
            bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(bg, rgba)
        return img.convert("RGB")
    except ImageDecodeError:
        raise
    except FileNotFoundError:
        raise ImageDecodeError(f"image file not found: {source}") from None
    except (Image.DecompressionBombError,) as e:
        raise ImageDecodeError(f"image is too large: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        name = source if isinstance(source, (str, Path)) else "the given bytes"
        raise ImageDecodeError(f"could not decode an image from {name}: {e}") from None


class VisionEncoder(nn.Module):
    """open_clip's visual tower; ``forward(pixels) -> (B, tokens, dim)``."""

    def __init__(self, cfg: VisionConfig, device: str | torch.device = "cpu"):
        super().__init__()
        import open_clip

        self.cfg = cfg
        self.spec = vision_spec(cfg)
        torch.manual_seed(cfg.seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                cfg.model, pretrained=cfg.pretrained, device="cpu"
            )
        except RuntimeError as e:
            raise ConfigError(f"cannot load open_clip {cfg.model!r} weights {cfg.pretrained!r}: {e}") from None
        self.visual = model.visual
        del model
        self.visual.requires_grad_(False).eval()
        self.visual.to(device=device, dtype=DTYPES[cfg.dtype])
        self.preprocess = preprocess
        layers = self.spec["layers"]
        self._block = cfg.feature_layer % layers

    @property
    def device(self) -> torch.device:
        return next(self.visual.parameters()).device

    @property
    def num_tokens(self) -> int:
        return self.spec["num_tokens"]

    @property
    def feature_dim(self) -> int:
        return self.spec["feature_dim"]

    def pixels(self, images) -> torch.Tensor:
        """Decode/convert and preprocess images into a pixel batch on the tower's device."""
        batch = torch.stack([self.preprocess(load_image(im)) for im in images])
        return batch.to(self.device, DTYPES[self.cfg.dtype])

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = pixels.to(self.device, DTYPES[self.cfg.dtype])
        if self.cfg.token_mode == "pooled":
            return self.visual(pixels).unsqueeze(1)
        out = self.visual.forward_intermediates(
            pixels, indices=[self._block], stop_early=True, intermediates_only=True, output_fmt="NCHW"
        )["image_intermediates"][0]
        if self.cfg.patch_pool > 1:
            out = F.avg_pool2d(out, self.cfg.patch_pool)
        return out.flatten(2).transpose(1, 2).contiguous()

    def encode(self, images) -> torch.Tensor:
        """PIL images / paths / bytes -> features ``(len(images), tokens, dim)``."""
        return self(self.pixels(images))
