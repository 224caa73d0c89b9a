"""CLIP vision tower (open_clip): feature shapes per token mode, agreement
with open_clip itself, robust image decoding, and config validation."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.config import ConfigError, load_config
from models.vision import ImageDecodeError, VisionEncoder, load_image, vision_spec

N = 3  # images per batch in the shape tests
GRID = 6  # tiny: 96 px / 16 px patches (the preset pools them 2x2 into 9 tokens)
WIDTH = 128  # tiny: ViT width == embed_dim


def vcfg(*overrides: str):
    """The tiny tower as open_clip draws it (its own random position embeddings,
    the penultimate block), so it can be compared with open_clip itself."""
    return load_config("tiny", ["vision.random_pos_embed=random", "vision.feature_layer=-2", "vision.patch_pool=1",
                                *overrides]).vision


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(N, 3, 96, 96, generator=g)


@pytest.fixture(scope="module")
def encoder() -> VisionEncoder:
    return VisionEncoder(vcfg())


@pytest.fixture(scope="module")
def patch_features(encoder, pixels) -> torch.Tensor:
    return encoder(pixels)


# ---------------------------------------------------------------- shapes / modes


def test_patches_mode_shape(encoder, patch_features):
    assert patch_features.shape == (N, GRID * GRID, WIDTH)
    assert encoder.num_tokens == GRID * GRID and encoder.feature_dim == WIDTH
    assert torch.isfinite(patch_features).all()
    # different images give different features
    assert not torch.allclose(patch_features[0], patch_features[1])


def test_pooled_mode_shape(pixels):
    feats = VisionEncoder(vcfg("vision.token_mode=pooled"))(pixels)
    assert feats.shape == (N, 1, 128)


def test_patch_pool_is_avg_pool_of_the_grid(patch_features, pixels):
    pooled = VisionEncoder(vcfg("vision.patch_pool=2"))(pixels)
    assert pooled.shape == (N, 9, WIDTH)
    # tokens are the row-major patch grid: (N, 36, C) -> (N, C, 6, 6)
    grid = patch_features.transpose(1, 2).reshape(N, WIDTH, GRID, GRID)
    expected = F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2)
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=0)
    # the first pooled token is the mean of patches (0,0), (0,1), (1,0), (1,1)
    manual = patch_features[:, [0, 1, GRID, GRID + 1]].mean(1)
    torch.testing.assert_close(pooled[:, 0], manual, atol=1e-5, rtol=0)


def test_last_layer_differs_from_penultimate(patch_features, pixels):
    last = VisionEncoder(vcfg("vision.feature_layer=-1"))(pixels)
    assert last.shape == patch_features.shape
    assert not torch.allclose(last, patch_features, atol=1e-3)


@pytest.mark.parametrize(
    "overrides",
    [[], ["vision.token_mode=pooled"], ["vision.patch_pool=2"], ["vision.patch_pool=3"],
     ["vision.patch_pool=6"], ["vision.feature_layer=0"]],
    ids=["patches", "pooled", "pool2", "pool3", "pool6", "layer0"],
)
def test_vision_spec_matches_output(overrides, pixels):
    cfg = vcfg(*overrides)
    spec = vision_spec(cfg)
    out = VisionEncoder(cfg)(pixels[:1])
    assert out.shape == (1, spec["num_tokens"], spec["feature_dim"])
    assert spec["image_size"] == 96 and spec["patch_size"] == 16 and spec["layers"] == 4


def test_phi3_mini_spec_from_open_clip_config():
    spec = vision_spec(load_config("phi3-mini").vision)
    assert spec["num_tokens"] == 576
    assert spec["feature_dim"] == 1024
    assert spec["image_size"] == 336
    assert spec["patch_size"] == 14 and spec["layers"] == 24


def test_phi3_mini_pooled_spec():
    spec = vision_spec(load_config("phi3-mini", ["vision.token_mode=pooled"]).vision)
    assert (spec["num_tokens"], spec["feature_dim"]) == (1, 768)


# ---------------------------------------------------------------- agreement with open_clip


@pytest.fixture(scope="module")
def reference_clip(encoder):
    """The same tower built directly through open_clip (config registered by VisionEncoder)."""
    import open_clip

    cfg = encoder.cfg
    torch.manual_seed(cfg.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=None)
    return model.eval(), preprocess


def test_patch_features_equal_open_clip_intermediates(reference_clip, patch_features, pixels):
    model, _ = reference_clip
    with torch.no_grad():
        # indices=2: the last two blocks -> [penultimate, last]; NLC without the class token
        out = model.visual.forward_intermediates(pixels, indices=2, intermediates_only=True, output_fmt="NLC")
    penultimate, last = out["image_intermediates"]
    assert penultimate.shape == (N, GRID * GRID, WIDTH)
    torch.testing.assert_close(patch_features, penultimate, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(patch_features, last, atol=1e-3)


def test_last_layer_equals_open_clip_last_block(reference_clip, pixels):
    model, _ = reference_clip
    with torch.no_grad():
        (last,) = model.visual.forward_intermediates(
            pixels, indices=1, intermediates_only=True, output_fmt="NLC")["image_intermediates"]
    ours = VisionEncoder(vcfg("vision.feature_layer=-1"))(pixels)
    torch.testing.assert_close(ours, last, atol=1e-5, rtol=1e-5)


def test_pooled_features_equal_open_clip_encode_image(reference_clip, pixels):
    model, _ = reference_clip
    with torch.no_grad():
        ref = model.encode_image(pixels)
    ours = VisionEncoder(vcfg("vision.token_mode=pooled"))(pixels)
    torch.testing.assert_close(ours[:, 0], ref, atol=1e-5, rtol=1e-5)


def test_seed_changes_weights(patch_features, pixels):
    other = VisionEncoder(vcfg("vision.seed=1"))(pixels)
    assert not torch.allclose(other, patch_features, atol=1e-3)


# ---------------------------------------------------------------- load_image


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _jpeg() -> bytes:
    rng = np.random.RandomState(0)
    return _encode(Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=95)


@pytest.fixture(params=["bytes", "path"])
def as_source(request, tmp_path):
    """Turn image bytes into the source form under test (the bytes, or a file path)."""

    def make(data: bytes, suffix: str = ".img"):
        if request.param == "bytes":
            return data
        path = tmp_path / f"image{suffix}"
        path.write_bytes(data)
        return str(path)

    make.kind = request.param
    return make


def _decode_error(source, **kw) -> str:
    with pytest.raises(ImageDecodeError) as info:
        load_image(source, **kw)
    return str(info.value)


def test_corrupt_bytes_refused(as_source):
    src = as_source(np.random.RandomState(1).bytes(2000), ".png")
    msg = _decode_error(src)
    assert "could not decode an image" in msg
    assert "cannot identify image file" in msg
    if as_source.kind == "path":
        assert src in msg
    else:
        assert "the given bytes" in msg


def test_truncated_jpeg_refused(as_source):
    data = _jpeg()
    src = as_source(data[: len(data) // 2], ".jpg")
    msg = _decode_error(src)
    assert "could not decode an image" in msg and "truncated" in msg
    if as_source.kind == "path":
        assert src in msg


def test_empty_input_refused(as_source):
    src = as_source(b"", ".png")
    msg = _decode_error(src)
    if as_source.kind == "bytes":
        assert "empty" in msg and "0 bytes" in msg
    else:
        # an empty file: PIL cannot identify it; the message names the file
        assert "could not decode an image" in msg and src in msg


def test_missing_path_refused(tmp_path):
    missing = tmp_path / "nope" / "missing.png"
    msg = _decode_error(str(missing))
    assert "not found" in msg and str(missing) in msg
    assert "not found" in _decode_error(missing)  # a Path works too


def test_decompression_bomb_refused(as_source):
    big = _encode(Image.new("L", (5000, 5000)), "PNG")  # small file, 25 M pixels
    src = as_source(big, ".png")
    msg = _decode_error(src, max_pixels=1_000_000)
    assert "25000000" in msg and "1000000" in msg and "5000x5000" in msg
    # the same image under a sufficient limit decodes
    assert load_image(src, max_pixels=25_000_000).size == (5000, 5000)


def _rgb(source) -> Image.Image:
    img = load_image(source)
    assert isinstance(img, Image.Image) and img.mode == "RGB"
    return img


def test_grayscale_to_rgb(as_source):
    img = _rgb(as_source(_encode(Image.new("L", (40, 30), 77), "PNG"), ".png"))
    assert img.size == (40, 30) and img.getpixel((3, 3)) == (77, 77, 77)


def test_cmyk_jpeg_to_rgb(as_source):
    data = _encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    r, g, b = _rgb(as_source(data, ".jpg")).getpixel((5, 5))
    assert r > 200 and g < 50 and b < 50  # cyan 0, magenta+yellow full: red


def test_palette_png_with_transparency_to_rgb(as_source):
    pal = Image.new("P", (40, 30), 0)
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.paste(1, (0, 0, 20, 30))  # left half blue (index 1), right half index 0 = transparent
    data = _encode(pal, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    img = _rgb(as_source(data, ".png"))
    assert img.getpixel((5, 5)) == (0, 0, 255)
    assert img.getpixel((30, 5)) == (255, 255, 255)  # transparent -> white, not the hidden red


def test_rgba_png_to_rgb(as_source):
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    rgba.paste((0, 200, 0, 255), (0, 0, 20, 30))
    img = _rgb(as_source(_encode(rgba, "PNG"), ".png"))
    assert img.getpixel((5, 5)) == (0, 200, 0)
    assert img.getpixel((30, 5)) == (255, 255, 255)


def test_16bit_grayscale_png_to_rgb(as_source):
    values = np.array([[0, 256, 32768, 65535]], dtype=np.uint16)
    data = _encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    img = _rgb(as_source(data, ".png"))
    got = [img.getpixel((x, 0))[0] for x in range(4)]
    assert got == [0, 1, 128, 255]  # scaled to 8 bits, not clipped to white


def test_exif_rotated_jpeg_is_upright(as_source):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    img = Image.new("RGB", (40, 30), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # marker in the stored top-left corner
    data = _encode(img, "JPEG", exif=exif.tobytes(), quality=95)
    assert Image.open(io.BytesIO(data)).size == (40, 30)
    out = _rgb(as_source(data, ".jpg"))
    assert out.size == (30, 40)
    assert out.getpixel((27, 2))[0] > 200  # the marker is now top-right
    assert out.getpixel((2, 2))[0] < 60


def test_encode_accepts_pil_path_and_bytes(encoder, tmp_path):
    rng = np.random.RandomState(3)
    img = Image.fromarray(rng.randint(0, 255, (80, 64, 3), dtype=np.uint8))
    data = _encode(img, "PNG")
    path = tmp_path / "x.png"
    path.write_bytes(data)
    other = Image.fromarray(rng.randint(0, 255, (64, 64, 3), dtype=np.uint8))
    feats = encoder.encode([img, str(path), data, path, other])
    assert feats.shape == (5, GRID * GRID, WIDTH)
    for i in (1, 2, 3):
        torch.testing.assert_close(feats[i], feats[0], atol=1e-6, rtol=0)
    assert not torch.allclose(feats[4], feats[0], atol=1e-3)
    # and it is the forward pass on the preprocessed pixels
    torch.testing.assert_close(feats[:1], encoder(encoder.preprocess(img).unsqueeze(0)), atol=1e-6, rtol=0)


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth gradients, a few discs and mild noise."""
    rng = np.random.RandomState(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x / w * 255, y / h * 255, (x + y) / (w + h) * 255], -1) + rng.normal(0, 4, (h, w, 3))
    for _ in range(6):
        cx, cy, r = rng.randint(0, w), rng.randint(0, h), rng.randint(h // 10, h // 3)
        rgb[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.randint(0, 255, 3)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def test_jpeg_draft_decodes_a_large_jpeg_at_a_smaller_scale(as_source):
    from models.images import ImageCropper

    data = _encode(_photo(1000, 800), "JPEG", quality=92)
    # the decoder's scale: the smallest of 1/2, 1/4, 1/8 that still covers what the caller asks for
    assert load_image(as_source(data, ".jpg"), draft=lambda w, h: (250, 200)).size == (250, 200)
    assert load_image(as_source(data, ".jpg"), draft=lambda w, h: (251, 200)).size == (500, 400)
    assert load_image(as_source(data, ".jpg"), draft=lambda w, h: (600, 100)).size == (1000, 800)
    whole, draft = ImageCropper(96)(as_source(data, ".jpg")), ImageCropper(96, jpeg_draft=True)(as_source(data, ".jpg"))
    assert whole.shape == draft.shape == (96, 96, 3)
    diff = np.abs(whole.astype(int) - draft.astype(int))
    assert 0 < diff.mean() < 1.5, diff.mean()  # decoded at 1/8 (125 x 100 covers 120 x 96), nearly the same crop


def test_jpeg_draft_leaves_small_jpegs_and_other_formats_alone(as_source):
    from models.images import ImageCropper

    small = _encode(_photo(180, 150), "JPEG", quality=92)  # under twice the 96 px resize: decoded whole
    png = _encode(_photo(1000, 800), "PNG")
    for data, suffix in ((small, ".jpg"), (png, ".png")):
        np.testing.assert_array_equal(ImageCropper(96)(as_source(data, suffix)),
                                      ImageCropper(96, jpeg_draft=True)(as_source(data, suffix)))
    decoded = load_image(_encode(_photo(1000, 800), "JPEG"))  # an image already decoded is used as it is
    np.testing.assert_array_equal(ImageCropper(96)(decoded), ImageCropper(96, jpeg_draft=True)(decoded))


def test_jpeg_draft_keeps_the_exif_rotation_and_the_pixel_limit(as_source):
    from models.images import ImageCropper

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    data = _encode(_photo(1000, 600), "JPEG", exif=exif.tobytes(), quality=92)
    for mode in ("shortest", "squash"):
        whole = ImageCropper(96, resize_mode=mode)(as_source(data, ".jpg"))
        draft = ImageCropper(96, resize_mode=mode, jpeg_draft=True)(as_source(data, ".jpg"))
        assert np.abs(whole.astype(int) - draft.astype(int)).mean() < 1.5, mode
    # the limit reads the stored size, not the smaller one a draft decodes
    msg = _decode_error(as_source(data, ".jpg"), max_pixels=500_000, draft=lambda w, h: (125, 75))
    assert "1000x600" in msg and "500000" in msg


def test_jpeg_draft_follows_the_config_and_is_part_of_the_identity():
    from models.vision import PixelPipeline, image_cropper, vision_identity

    off, on = vcfg(), vcfg("vision.jpeg_draft=true")
    assert not image_cropper(off).jpeg_draft and image_cropper(on).jpeg_draft
    assert PixelPipeline(on).cropper.jpeg_draft  # what serving and chat crop with
    assert "jpeg_draft" not in vision_identity(off)  # identities written before the option stay valid
    assert vision_identity(on)["jpeg_draft"] is True
    assert load_config("phi3-mini").vision.jpeg_draft  # the real-weights preset decodes uploads fast
    with pytest.raises(ConfigError, match="jpeg_draft"):
        load_config("tiny", ["vision.jpeg_draft=maybe"])


def test_encode_refuses_a_bad_image(encoder):
    with pytest.raises(ImageDecodeError):
        encoder.encode([b"not an image"])


# ---------------------------------------------------------------- config validation


def test_patch_pool_must_divide_the_grid():
    cfg = vcfg("vision.patch_pool=4")
    with pytest.raises(ConfigError, match=r"patch_pool 4 does not divide the 6x6"):
        vision_spec(cfg)
    with pytest.raises(ConfigError, match="patch_pool"):
        VisionEncoder(cfg)


@pytest.mark.parametrize("layer", [10, 4, -5])
def test_feature_layer_out_of_range(layer):
    cfg = vcfg(f"vision.feature_layer={layer}")
    with pytest.raises(ConfigError, match=rf"feature_layer {layer} is outside the tower's 4 layers"):
        vision_spec(cfg)


def test_feature_layer_edges_are_valid():
    assert vision_spec(vcfg("vision.feature_layer=3"))["num_tokens"] == GRID * GRID
    assert vision_spec(vcfg("vision.feature_layer=-4"))["num_tokens"] == GRID * GRID


def test_unknown_open_clip_model():
    cfg = vcfg("vision.model=no-such-vit", "vision.model_config=null")
    with pytest.raises(ConfigError, match="no-such-vit"):
        vision_spec(cfg)
    with pytest.raises(ConfigError, match="not an open_clip model"):
        VisionEncoder(cfg)
    cfg = load_config("phi3-mini", ["vision.model=ViT-Q-99"]).vision
    with pytest.raises(ConfigError, match="ViT-Q-99"):
        vision_spec(cfg)


def test_inline_config_may_not_shadow_a_builtin_model():
    from models.config import ConfigError, load_config
    from models.vision import vision_spec

    with pytest.raises(ConfigError, match="built-in open_clip model"):
        vision_spec(load_config("tiny", ["vision.model=ViT-L-14-336"]).vision)
    assert vision_spec(load_config("phi3-mini").vision)["num_tokens"] == 576


def test_an_inline_config_leaves_no_folder_behind_and_stays_registered(tmp_path, monkeypatch):
    """Each process that registers an inline tower (every Ray worker does) must
    not leave a temporary folder, and the config must outlive later rescans."""
    import tempfile

    import open_clip

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cfg = vcfg("vision.model=mmphi-vit-leak-check")
    assert vision_spec(cfg)["num_tokens"] == GRID * GRID
    assert list(tmp_path.iterdir()) == []
    other = tmp_path / "other"
    other.mkdir()
    open_clip.add_model_config(other)  # a rescan, as another registration would do
    assert open_clip.get_model_config("mmphi-vit-leak-check") == cfg.model_config


# ---------------------------------------------------------------- 2-D sine-cosine position embeddings


def test_sincos_codes_are_smooth_in_both_directions():
    from models.vision import sincos_2d

    codes = sincos_2d(8, WIDTH).view(8, 8, WIDTH)
    assert torch.isfinite(codes).all()
    d = lambda a, b: float((codes[a] - codes[b]).norm())  # noqa: E731
    # neighbours are closer than far cells, along rows, columns and diagonals
    for near, far in (((0, 1), (0, 7)), ((1, 0), (7, 0)), ((1, 1), (6, 6))):
        assert d((0, 0), near) < 0.5 * d((0, 0), far)
    # every cell has its own code
    flat = codes.view(64, WIDTH)
    assert torch.cdist(flat, flat).add(torch.eye(64) * 1e9).min() > 1e-3
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(4, 30)


def test_tiny_preset_uses_sincos_position_embeddings(pixels):
    from models.vision import sincos_2d, vision_identity

    cfg = load_config("tiny").vision
    assert cfg.random_pos_embed == "sincos2d"
    ours = VisionEncoder(cfg)
    drawn = VisionEncoder(vcfg(f"vision.feature_layer={cfg.feature_layer}", f"vision.patch_pool={cfg.patch_pool}"))
    pe, pe0 = ours.visual.positional_embedding, drawn.visual.positional_embedding
    # same class token, same mean norm, patch codes are the normalised sine-cosine codes
    torch.testing.assert_close(pe[0], pe0[0])
    torch.testing.assert_close(pe[1:].norm(dim=-1).mean(), pe0[1:].norm(dim=-1).mean())
    codes = sincos_2d(GRID, WIDTH)
    torch.testing.assert_close(pe[1:], codes / codes.norm(dim=-1, keepdim=True) * pe[1:].norm(dim=-1, keepdim=True))
    # every other weight is open_clip's own draw, so only the position embeddings differ
    others = {k: v for k, v in ours.visual.state_dict().items() if k != "positional_embedding"}
    for k, v in drawn.visual.state_dict().items():
        if k != "positional_embedding":
            torch.testing.assert_close(others[k], v)
    assert not torch.allclose(ours(pixels), drawn(pixels), atol=1e-3)
    # embeddings made with one kind are not taken for the other
    assert vision_identity(cfg)["random_pos_embed"] == "sincos2d"
    assert "random_pos_embed" not in vision_identity(vcfg())


def test_sincos_position_embeddings_tell_patches_apart_better():
    """Where a patch is can be read linearly from its features far better with
    the sine-cosine codes than with open_clip's random draw: a least-squares
    probe from the features of a uniform image to the patch's (row, col)."""
    flat = torch.full((1, 3, 96, 96), 0.1)

    def residual(cfg) -> float:
        f = VisionEncoder(cfg)(flat)[0]                      # (36 patches, width)
        rows, cols = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
        y = torch.stack([rows.flatten(), cols.flatten()], 1).float()
        # the 8 main directions of the features only, so the probe cannot memorise 36 points
        u, _, _ = torch.linalg.svd(f - f.mean(0), full_matrices=False)
        x = torch.cat([u[:, :8], torch.ones(len(f), 1)], 1)
        sol = torch.linalg.lstsq(x, y).solution
        return float((x @ sol - y).pow(2).mean())

    layer = load_config("tiny").vision.feature_layer
    assert residual(load_config("tiny", ["vision.patch_pool=1"]).vision) < \
        0.25 * residual(vcfg(f"vision.feature_layer={layer}"))


def test_sincos_only_for_random_towers():
    with pytest.raises(ConfigError, match="random_pos_embed"):
        load_config("tiny", ["vision.pretrained=openai"])
    with pytest.raises(ConfigError, match="random_pos_embed"):
        load_config("tiny", ["vision.random_pos_embed=learned"])
