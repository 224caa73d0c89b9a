"""The image feature caches: bounded least-recently-used features by image
content; the chat pipeline asking the ImageEncoder only for images it has
not seen, with each image's hash for the encoder's router; and the
ImageEncoder's own cache (without Ray; the served path is in test_serve.py,
the routing in test_routing.py)."""
from __future__ import annotations

import asyncio
import base64
import io

import numpy as np
import pytest
from PIL import Image

from serve.image_cache import FeatureCache
from serve.settings import ServeSettings, SettingsError


def feats(value: float, n: int = 4) -> np.ndarray:
    return np.full((n, 8), value, np.float32)  # 32 n bytes


def test_least_recently_used_entries_go_first_within_the_byte_bound():
    cache = FeatureCache(3 * 128)  # three arrays of 128 bytes
    keys = [FeatureCache.key(bytes([i])) for i in range(4)]
    for i in range(3):
        cache.put(keys[i], feats(i))
    assert cache.get(keys[0])[0, 0] == 0  # now the most recently used
    cache.put(keys[3], feats(3))  # over the bound: the least recently used (1) goes
    assert cache.get(keys[1]) is None and len(cache) == 3 and cache.bytes == 3 * 128
    assert [cache.get(k)[0, 0] for k in (keys[0], keys[2], keys[3])] == [0, 2, 3]
    cache.put(keys[3], feats(30))  # the same image again replaces, not adds
    assert cache.bytes == 3 * 128 and cache.get(keys[3])[0, 0] == 30
    assert (cache.hits, cache.misses) == (5, 1)


def test_kept_features_are_a_read_only_copy_and_oversize_ones_are_not_kept():
    cache = FeatureCache(256)
    key, arr = FeatureCache.key(b"img"), feats(1.0)
    kept = cache.put(key, arr)
    arr[:] = 7  # the caller's array is not what the next request gets
    assert cache.get(key)[0, 0] == 1.0 and kept is cache.get(key)
    with pytest.raises(ValueError):
        cache.get(key)[0, 0] = 2.0
    big = feats(2.0, n=9)  # 288 bytes > 256
    assert cache.put(FeatureCache.key(b"big"), big) is big and cache.get(FeatureCache.key(b"big")) is None
    off = FeatureCache(0)
    off.put(key, feats(1.0))
    assert len(off) == 0 and off.get(key) is None
    assert FeatureCache.key(b"a") != FeatureCache.key(b"b") and len(FeatureCache.key(b"a")) == 16


@pytest.mark.parametrize("name", ["image_cache_mb", "encoder_cache_mb"])
@pytest.mark.parametrize("value", [-1, "big", True])
def test_a_wrong_cache_size_is_refused(name, value):
    with pytest.raises(SettingsError, match=name):
        ServeSettings.from_dict({name: value})


class CountingEncoder:
    """The ImageEncoder handle: features that depend on the image, counted."""

    def __init__(self):
        self.calls = 0
        self.keys = []  # the affinity_key of each call

    @property
    def encode(self):
        return self

    async def remote(self, data: bytes, affinity_key=None):
        from models.images import load_image

        self.calls += 1
        self.keys.append(affinity_key)
        return np.full((4, 8), float(np.asarray(load_image(data)).mean()), np.float32)


def png(colour) -> str:
    b = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(b, "PNG")
    return "data:image/png;base64," + base64.b64encode(b.getvalue()).decode()


def conversation(*turns) -> list[dict]:
    """User turns (text, image data URI or None) with an assistant answer between them."""
    out = []
    for k, (text, image) in enumerate(turns):
        parts = [{"type": "image_url", "image_url": {"url": image}}] if image else []
        out.append({"role": "user", "content": parts + [{"type": "text", "text": text}]})
        if k < len(turns) - 1:
            out.append({"role": "assistant", "content": "An answer."})
    return out


@pytest.mark.parametrize("cache_mb, encoder_mb", [(256, 256), (0, 256), (0, 0)])
def test_each_turn_of_a_chat_about_an_image_encodes_it_once(tiny_cfg, cache_mb, encoder_mb):
    from serve.chat import ChatService
    from serve.loading import Source
    from serve.protocol import parse_chat_request

    from models.tokenizer import load_tokenizer

    enc = CountingEncoder()
    service = ChatService(None, enc, None, load_tokenizer(tiny_cfg), Source(tiny_cfg, None, None),
                          ServeSettings.from_dict({"image_cache_mb": cache_mb, "encoder_cache_mb": encoder_mb}))

    def prepare(messages):
        return asyncio.run(service.prepare(parse_chat_request({"messages": messages}, service.limits)))

    red, green = png("red"), png("green")  # (255, 0, 0) and (0, 128, 0): other means
    first = prepare(conversation(("What is it?", red)))
    second = prepare(conversation(("What is it?", red), ("And its colour?", None)))  # the image sent again
    third = prepare(conversation(("What is it?", red), ("And this one?", green)))
    np.testing.assert_array_equal(first.image_features, second.image_features)
    assert third.image_features.shape[0] == 2 and third.image_features[0, 0, 0] != third.image_features[1, 0, 0]
    assert enc.calls == (2 if cache_mb else 4)  # red once, green once; without the cache every image every turn
    cache = service.image_cache
    assert (cache.hits, cache.misses, len(cache)) == ((2, 2, 2) if cache_mb else (0, 0, 0))  # off: no lookups
    # each call names its image by the hash of its bytes, for the encoder's router (unless neither cache is on)
    data = [base64.b64decode(uri.split(",", 1)[1]) for uri in (red, green)]
    hashes = [FeatureCache.key(d).hex() for d in data]
    if cache_mb:
        assert enc.keys == hashes
    else:
        assert enc.keys == ([hashes[0]] * 3 + hashes[1:] if encoder_mb else [None] * 4)


class SlowEncoder(CountingEncoder):
    """Takes a while, so that requests overlap; fails on a non-image."""

    async def remote(self, data: bytes, affinity_key=None):
        await asyncio.sleep(0.05)
        return await super().remote(data, affinity_key)


def test_concurrent_requests_for_a_new_image_encode_it_once(tiny_cfg):
    from serve.chat import ChatService
    from serve.loading import Source
    from serve.protocol import APIError, parse_chat_request

    from models.tokenizer import load_tokenizer

    enc = SlowEncoder()
    service = ChatService(None, enc, None, load_tokenizer(tiny_cfg), Source(tiny_cfg, None, None),
                          ServeSettings.from_dict({"image_cache_mb": 16}))

    def request(image):
        return parse_chat_request({"messages": conversation(("What is it?", image))}, service.limits)

    broken = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\nbroken").decode()

    async def go():
        red = request(png("red"))
        first = asyncio.ensure_future(service.prepare(red))
        await asyncio.sleep(0.01)  # the first is encoding now
        others = [service.prepare(red) for _ in range(3)]
        first.cancel()  # its client left: the encoding goes on for the others
        got = await asyncio.gather(*others)
        assert enc.calls == 1 and service.image_cache.making == 0
        for p in got[1:]:
            np.testing.assert_array_equal(p.image_features, got[0].image_features)
        results = await asyncio.gather(*[service.prepare(request(broken)) for _ in range(2)], return_exceptions=True)
        assert enc.calls == 2  # one failed encoding, both told
        assert all(isinstance(r, APIError) and r.code == "invalid_image" for r in results), results
        await service.prepare(request(png("blue")))
        assert enc.calls == 3 and service.image_cache.making == 0

    asyncio.run(go())


@pytest.mark.parametrize("encoder_mb", [16, 0])
def test_an_image_encoder_replica_encodes_an_image_once(encoder_mb):
    """The ImageEncoder (tiny preset, no Ray): the same bytes again, or
    meanwhile, from any caller, get the kept features of one CLIP pass, equal
    to an uncached pass's; an image that fails to decode is not kept."""
    from models.images import ImageDecodeError
    from serve.deployments import ImageEncoder

    enc = ImageEncoder.func_or_class({"preset": "tiny", "device": "cpu", "encoder_cache_mb": encoder_mb})
    passes, forward = [], enc._forward

    async def one_pass(crop):  # serve.batch needs a replica: one image a pass here
        passes.append(1)
        return (await asyncio.to_thread(forward, [crop]))[0]

    enc._encode_batch = one_pass
    red, green = (base64.b64decode(png(c).split(",", 1)[1]) for c in ("red", "green"))

    async def go():
        together = await asyncio.gather(enc.encode(red, affinity_key="x"), enc.encode(red))
        later = await enc.encode(red)
        other = await enc.encode(green)
        for _ in range(2):
            with pytest.raises(ImageDecodeError):
                await enc.encode(b"\x89PNG\r\n\x1a\nbroken")
        return together + [later], other

    reds, other = asyncio.run(go())
    want = forward([enc.vision.pipeline.crop(red, enc.max_pixels)])[0]
    for got in reds:
        np.testing.assert_array_equal(got, want)
    assert not np.array_equal(other, want)
    cache = enc.cache
    if encoder_mb:
        assert sum(passes) == 2 and (cache.hits, cache.misses, len(cache)) == (2, 4, 2)  # broken: a miss each time
        assert cache.making == 0
    else:
        assert sum(passes) == 4 and (cache.hits, cache.misses, len(cache)) == (0, 0, 0)
