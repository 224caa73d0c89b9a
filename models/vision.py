"""CLIP vision tower (open_clip) returning pooled or patch-token features.

``token_mode: pooled`` gives one vector per image (the projected CLIP image
embedding); ``patches`` gives every patch token of ``feature_layer`` (raw
block output, no final norm, as LLaVA-1.5), optionally average-pooled over
the patch grid. Features have shape ``(images, tokens, dim)`` either way.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ConfigError, VisionConfig
from .images import DEFAULT_MAX_PIXELS, ImageCropper, ImageDecodeError, load_image  # noqa: F401 (re-exported)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_REGISTERED: set[str] = set()


def _register(cfg: VisionConfig) -> None:
    """Make an inline ``vision.model_config`` known to open_clip under ``vision.model``."""
    import open_clip

    if cfg.model_config is None or open_clip.get_model_config(cfg.model) == cfg.model_config:
        return
    if cfg.model in open_clip.list_models() and cfg.model not in _REGISTERED:
        raise ConfigError(
            f"vision.model_config is set but vision.model {cfg.model!r} is a built-in open_clip model; "
            "give the inline config a name of its own (or set vision.model_config to null)"
        )
    _REGISTERED.add(cfg.model)
    # open_clip reads the file at once and keeps the config in memory (a path
    # it no longer finds is skipped by later rescans), so the folder goes now
    with tempfile.TemporaryDirectory(prefix="mmphi-openclip-") as folder:
        path = Path(folder) / f"{cfg.model}.json"
        path.write_text(json.dumps(cfg.model_config))
        open_clip.add_model_config(path)


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
    out = {
        "model": cfg.model, "pretrained": cfg.pretrained, "token_mode": cfg.token_mode,
        "feature_layer": cfg.feature_layer if cfg.token_mode == "patches" else None,
        "patch_pool": cfg.patch_pool, "image_size": spec["image_size"],
        "num_tokens": spec["num_tokens"], "feature_dim": spec["feature_dim"],
    }
    if cfg.random_pos_embed != "random":  # only then: identities written before the option stay valid
        out["random_pos_embed"] = cfg.random_pos_embed
    if cfg.jpeg_draft:  # likewise
        out["jpeg_draft"] = True
    return out


SINCOS_BASE = 100.0  # longest wavelength ~ 2*pi*100 patches; the grids here are at most 24 patches wide


def sincos_2d(grid: int, dim: int, base: float = SINCOS_BASE) -> torch.Tensor:
    """Fixed 2-D sine-cosine position codes ``(grid * grid, dim)``, row-major
    like the patch tokens: half the channels encode the row, half the column,
    each as sin/cos pairs at ``dim // 4`` geometric frequencies (MAE's layout)."""
    if dim % 4:
        raise ValueError(f"2-D sine-cosine codes need a width divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / base ** (torch.arange(q, dtype=torch.float64) / q)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")

    def code(pos: torch.Tensor) -> torch.Tensor:
        angle = pos.flatten()[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=1)

    return torch.cat([code(rows), code(cols)], dim=1).float()


@torch.no_grad()
def _set_sincos_pos_embed(visual: nn.Module) -> None:
    """Replace the patch tokens' position embeddings of a random open_clip tower by
    2-D sine-cosine codes with the same mean norm (the class token's stays)."""
    pe = getattr(visual, "positional_embedding", None)
    grid = getattr(visual, "grid_size", None)
    if pe is None or grid is None or grid[0] != grid[1] or pe.shape[0] != grid[0] * grid[1] + 1:
        raise ConfigError("vision.random_pos_embed 'sincos2d' needs an open_clip ViT with a square patch grid "
                          "and a class token")
    codes = sincos_2d(grid[0], pe.shape[1])
    norm = pe[1:].norm(dim=-1).mean()
    pe[1:] = codes / codes.norm(dim=-1, keepdim=True) * norm


def preprocess_cfg(cfg: VisionConfig) -> dict:
    """open_clip's evaluation preprocessing for this tower: defaults, then the
    model config's ``preprocess_cfg``, then the pretrained tag's, as
    ``open_clip.create_model_and_transforms`` merges them."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    import open_clip

    _register(cfg)
    out = dataclasses.asdict(PreprocessCfg())
    out = merge_preprocess_dict(out, (open_clip.get_model_config(cfg.model) or {}).get("preprocess_cfg", {}))
    if cfg.pretrained and not Path(cfg.pretrained).exists():
        out = merge_preprocess_dict(out, open_clip.get_pretrained_cfg(cfg.model, cfg.pretrained) or {})
    out["size"] = vision_spec(cfg)["image_size"]
    return out


def image_cropper(cfg: VisionConfig, pp: dict | None = None) -> ImageCropper:
    """The CPU half of this tower's preprocessing (decode, resize, crop), as
    every path that feeds it uses it: the embedding job, serving, chat.
    ``pp``: ``preprocess_cfg(cfg)`` when the caller has it already."""
    return ImageCropper.from_preprocess_cfg(pp or preprocess_cfg(cfg), jpeg_draft=cfg.jpeg_draft)


class PixelPipeline:
    """Preprocessing split in two: ``crop`` runs on the CPU (decode, RGB,
    resize, centre crop -> uint8 HxWx3, a quarter of float32's bytes to move),
    ``normalize`` on the tower's device (scale, mean/std, dtype). Together
    they equal open_clip's evaluation transform."""

    def __init__(self, cfg: VisionConfig):
        pp = preprocess_cfg(cfg)
        self.cropper = image_cropper(cfg, pp)
        self.size = self.cropper.size
        self.mean = torch.tensor(pp["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(pp["std"]).view(1, 3, 1, 1)

    def crop(self, source, max_pixels: int = DEFAULT_MAX_PIXELS):
        """Image (path / bytes / PIL) -> uint8 array (size, size, 3)."""
        return self.cropper(source, max_pixels)

    def normalize(self, batch, device, dtype) -> torch.Tensor:
        """uint8 (N, H, W, 3) array or tensor -> normalised (N, 3, H, W) on ``device``."""
        with warnings.catch_warnings():  # a read-only array (Ray Data's zero-copy batches) is only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            x = torch.as_tensor(batch)
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        x = (x - self.mean.to(device)) / self.std.to(device)
        return x.to(dtype).contiguous(memory_format=torch.channels_last)


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
        if cfg.random_pos_embed == "sincos2d":
            _set_sincos_pos_embed(self.visual)
        self.visual.requires_grad_(False).eval()
        self.visual.to(device=device, dtype=DTYPES[cfg.dtype])
        self.preprocess = preprocess  # open_clip's own transform (PIL -> normalised tensor)
        self.pipeline = PixelPipeline(cfg)
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
        import numpy as np

        crops = np.stack([self.pipeline.crop(im) for im in images])
        return self.pipeline.normalize(crops, self.device, DTYPES[self.cfg.dtype])

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
