"""Image decoding and CPU-side preprocessing with PIL and NumPy only (no
torch), so data-loading workers stay light."""
from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 64_000_000
_INTERPOLATION = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS}


class ImageDecodeError(ValueError):
    """The bytes or file are not an image we can use; the message says why."""


def load_image(source, max_pixels: int = DEFAULT_MAX_PIXELS,
               draft: Callable[[int, int], tuple[int, int]] | None = None) -> Image.Image:
    """Open a path, bytes or PIL image as upright RGB; refuse what is not an
    image, is truncated, or exceeds ``max_pixels`` (decompression bombs).

    ``draft``: given the stored width and height, the smallest size the
    caller needs; a JPEG not yet decoded is then decoded at 1/2, 1/4 or 1/8
    scale where that still covers it (libjpeg's DCT scaling: a 12-megapixel
    photo for a 336 px crop in about a tenth of the time). Other formats,
    and images already decoded, load whole."""
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
        if draft is not None and img.format == "JPEG":
            img.draft(None, draft(w, h))  # a no-op on an image already decoded
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


class ImageCropper:
    """Resize + centre crop to ``size`` x ``size`` uint8 RGB, exactly as
    open_clip's evaluation transform does before ``ToTensor`` (torchvision's
    ``Resize(size)`` on the shorter side then ``CenterCrop``, or a plain
    resize for ``resize_mode: squash``).

    ``jpeg_draft``: decode a JPEG at the smallest DCT scale (1/2, 1/4, 1/8)
    still at least the resize's size, then resize as above; the pixels differ
    slightly from a whole decode's (a fraction of a grey level on average)
    where the image is at least twice the resize, and not at all below."""

    def __init__(self, size: int, interpolation: str = "bicubic", resize_mode: str = "shortest",
                 jpeg_draft: bool = False):
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"unsupported interpolation {interpolation!r}")
        if resize_mode not in ("shortest", "squash"):
            raise ValueError(f"unsupported open_clip resize_mode {resize_mode!r} (supported: shortest, squash)")
        self.size, self.interpolation, self.resize_mode = int(size), interpolation, resize_mode
        self.jpeg_draft = bool(jpeg_draft)

    @classmethod
    def from_preprocess_cfg(cls, pp: dict, jpeg_draft: bool = False) -> "ImageCropper":
        size = pp["size"] if isinstance(pp["size"], int) else pp["size"][0]
        return cls(size, pp.get("interpolation", "bicubic"), pp.get("resize_mode", "shortest"), jpeg_draft)

    def resized(self, w: int, h: int) -> tuple[int, int]:
        """The size a ``w`` x ``h`` image is resized to before the centre crop."""
        s = self.size
        if self.resize_mode == "squash":
            return s, s
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        return (s, new_long) if w <= h else (new_long, s)

    def __call__(self, source, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
        img = load_image(source, max_pixels, draft=self.resized if self.jpeg_draft else None)
        s, resample = self.size, _INTERPOLATION[self.interpolation]
        new_w, new_h = self.resized(*img.size)
        if (new_w, new_h) != img.size:
            img = img.resize((new_w, new_h), resample)
        if (new_w, new_h) != (s, s):
            left, top = int(round((new_w - s) / 2.0)), int(round((new_h - s) / 2.0))
            img = img.crop((left, top, left + s, top + s))
        return np.asarray(img, dtype=np.uint8)
