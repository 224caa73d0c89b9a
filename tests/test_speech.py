"""Whisper wrapper: audio decoding of every common container, clear errors for
bad input, and a deterministic random ``tiny`` Whisper that transcribes fast."""
from __future__ import annotations

import dataclasses
import subprocess
import urllib.error
import urllib.request
import wave
from pathlib import Path

import numpy as np
import pytest
import torch

from models import speech
from models.config import SpeechConfig, load_config
from models.speech import SAMPLE_RATE, AudioDecodeError, SpeechRecognizer, decode_audio, load_whisper
from models.weights import cache_root, spec_key

TONE_HZ = 440.0
SECONDS = 2.0
# extension -> ffmpeg encoder (None: the container's default codec is always there)
FORMATS = {
    "wav": None,
    "flac": "flac",
    "mp3": "libmp3lame",
    "ogg": "libvorbis",
    "m4a": "aac",
    "webm": "libopus",
}
LOSSLESS = ("wav", "flac")


@pytest.fixture(scope="module", autouse=True)
def offline_cache(tmp_path_factory):
    """No network, and a private weights cache instead of the home folder."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("MMPHI_CACHE", str(tmp_path_factory.mktemp("mmphi-cache")))
        yield


@pytest.fixture(scope="module")
def cfg() -> SpeechConfig:
    return load_config("tiny").speech


@pytest.fixture(scope="module")
def recognizer(cfg) -> SpeechRecognizer:
    return SpeechRecognizer(cfg, device="cpu")


def tone(seconds: float = SECONDS, hz: float = TONE_HZ) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def write_wav(path: Path, audio: np.ndarray) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes((audio * 32767).astype("<i2").tobytes())
    return path


def _encoders() -> str:
    return subprocess.run(["ffmpeg", "-hide_banner", "-encoders"], capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def audio_files(tmp_path_factory) -> dict[str, Path]:
    """The test tone in every container whose encoder this ffmpeg has."""
    folder = tmp_path_factory.mktemp("audio")
    wav = write_wav(folder / "tone.wav", tone())
    available = _encoders()
    files = {"wav": wav}
    for ext, encoder in FORMATS.items():
        if encoder is None or f" {encoder} " not in available:
            continue
        out = folder / f"tone.{ext}"
        subprocess.run(
            ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), "-c:a", encoder, str(out)],
            check=True,
        )
        files[ext] = out
    return files


def cached_checkpoint(cfg: SpeechConfig) -> Path:
    key = spec_key("whisper", speech.random_spec(cfg))
    return cache_root() / f"whisper-{key}" / "model.pt"


def dominant_hz(audio: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(audio))
    return float(np.argmax(spectrum) * SAMPLE_RATE / len(audio))


@pytest.mark.parametrize("ext", list(FORMATS))
def test_every_container_decodes_and_transcribes(ext, audio_files, recognizer):
    if ext not in audio_files:
        pytest.skip(f"this ffmpeg has no {FORMATS[ext]} encoder to make a .{ext} file")
    path = audio_files[ext]
    for source in (path, str(path), path.read_bytes()):
        audio = decode_audio(source)
        assert audio.dtype == np.float32 and audio.ndim == 1
        assert abs(len(audio) - SECONDS * SAMPLE_RATE) <= 0.05 * SECONDS * SAMPLE_RATE
        assert np.abs(audio).max() <= 1.0
        if ext in LOSSLESS:
            assert abs(dominant_hz(audio) - TONE_HZ) < 3
    assert isinstance(recognizer.transcribe(path), str)
    assert isinstance(recognizer.transcribe(path.read_bytes()), str)


def test_bad_inputs_raise_audio_decode_error(tmp_path, audio_files):
    text = tmp_path / "notes.wav"
    text.write_text("this is not audio\n" * 20)
    with pytest.raises(AudioDecodeError, match=r"could not decode audio from '.*notes\.wav': ffmpeg says: .*Invalid data"):
        decode_audio(text)
    with pytest.raises(AudioDecodeError, match=r"could not decode audio from <\d+ bytes>: ffmpeg says"):
        decode_audio(text.read_bytes())
    with pytest.raises(AudioDecodeError, match="empty bytes"):
        decode_audio(b"")
    with pytest.raises(AudioDecodeError, match="no such file"):
        decode_audio(tmp_path / "missing.mp3")
    with pytest.raises(AudioDecodeError, match=r"from '.*': it is a folder, not an audio file$"):
        decode_audio(tmp_path)
    with pytest.raises(AudioDecodeError, match=r"from '/dev/null': it is not a regular file$"):
        decode_audio("/dev/null")
    with pytest.raises(AudioDecodeError, match=r"more than 1 s long; the limit is 1 s"):
        decode_audio(audio_files["wav"], max_seconds=1)
    with pytest.raises(AudioDecodeError, match=r"audio is 2\.0 s long; the limit is 1\.5 s"):
        decode_audio(tone(), max_seconds=1.5)
    with pytest.raises(AudioDecodeError, match="cannot read audio from a int"):
        decode_audio(42)
    silent = write_wav(tmp_path / "zero.wav", np.zeros(0, np.float32))
    with pytest.raises(AudioDecodeError, match="no audio samples"):
        decode_audio(silent)


def test_too_long_audio_is_refused_by_the_recognizer(cfg, recognizer):
    short = SpeechRecognizer(dataclasses.replace(cfg, max_seconds=1.0), device="cpu")
    with pytest.raises(AudioDecodeError, match="the limit is 1 s"):
        short.transcribe(tone())


def test_missing_ffmpeg_is_named(monkeypatch, audio_files):
    monkeypatch.setattr(speech, "FFMPEG", "ffmpeg-that-is-not-installed")
    with pytest.raises(RuntimeError, match=r"ffmpeg not found; install it \(apt-get install -y ffmpeg\)"):
        decode_audio(audio_files["wav"])


def test_numpy_input(recognizer):
    audio = tone()
    assert isinstance(recognizer.transcribe(audio), str)
    ints = np.array([32767, -32768, 0, 16384], dtype=np.int16)
    scaled = decode_audio(ints)
    assert scaled.dtype == np.float32
    np.testing.assert_allclose(scaled, [32767 / 32768, -1.0, 0.0, 0.5])
    assert decode_audio(audio[:, None]).shape == audio.shape
    assert decode_audio(audio[None, :]).shape == audio.shape
    with pytest.raises(AudioDecodeError, match=r"shape \(2, 32000\)"):
        decode_audio(np.stack([audio, audio]))
    with pytest.raises(AudioDecodeError, match="dtype int32"):
        decode_audio(audio.astype(np.int32))
    with pytest.raises(AudioDecodeError, match="NaN"):
        decode_audio(np.array([0.0, np.nan], np.float32))
    with pytest.raises(AudioDecodeError, match="no audio samples"):
        decode_audio(np.zeros(0, np.float32))


def test_random_tiny_whisper_is_deterministic_and_cached_once(cfg, recognizer):
    path = cached_checkpoint(cfg)
    assert path.is_file()
    mtime = path.stat().st_mtime_ns

    again = SpeechRecognizer(cfg, device="cpu")
    assert path.stat().st_mtime_ns == mtime
    assert not list(cache_root().glob("whisper-*.tmp-*"))
    first, second = recognizer.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    # every weight is drawn (openai-whisper leaves one torch.empty; NaN there made this flaky)
    assert all(torch.isfinite(v).all() for v in first.values() if v.is_floating_point())
    assert first["decoder.positional_embedding"].std() == pytest.approx(0.01, rel=0.1)
    assert all(torch.equal(first[k], second[k]) for k in first)

    audio = tone()
    assert recognizer.transcribe(audio) == again.transcribe(audio)
    assert recognizer.transcribe_many([audio, audio]) == [again.transcribe(audio)] * 2

    other = load_whisper(dataclasses.replace(cfg, seed=cfg.seed + 1))
    name = "decoder.token_embedding.weight"
    assert not torch.equal(other.state_dict()[name], first[name])


def flatten(recognizer: SpeechRecognizer) -> SpeechRecognizer:
    """The random Whisper repeats its last token with probability ~1 (its tied
    embedding dominates the logits), so sampling would change nothing: shrink
    the embedding until the next-token distribution is broad."""
    with torch.no_grad():
        recognizer.model.decoder.token_embedding.weight.mul_(0.05)
    return recognizer


def test_temperature_and_language_per_call(cfg):
    """A call's temperature overrides the config's (0: the same text each
    time; 1: sampled, so texts differ); ``recognize`` reports the language
    decoded in, the one given or the one detected, and the audio's seconds."""
    recognizer = flatten(SpeechRecognizer(cfg, device="cpu"))
    audio = tone()
    greedy = recognizer.recognize(audio)
    assert (greedy.language, greedy.duration) == ("en", SECONDS) and greedy.text
    assert {recognizer.transcribe(audio, temperature=0.0) for _ in range(2)} == {greedy.text}
    torch.manual_seed(0)
    sampled = {recognizer.transcribe(audio, temperature=1.0) for _ in range(3)}
    assert len(sampled) == 3, sampled
    assert recognizer.recognize(audio, language="de").language == "de"
    from whisper.tokenizer import LANGUAGES

    detecting = SpeechRecognizer(dataclasses.replace(cfg, language=None), device="cpu")
    assert detecting.recognize(audio).language in LANGUAGES


def test_translation_asks_whisper_to_translate_from_the_detected_language(cfg, monkeypatch):
    """``task="translate"``: Whisper decodes with its translate task and
    detects the spoken language (the config's is a transcription's
    default); an English-only model refuses in words."""
    from models.speech import TranslationUnsupported

    recognizer = flatten(SpeechRecognizer(cfg, device="cpu"))
    seen = []
    real = recognizer.model.transcribe
    monkeypatch.setattr(recognizer.model, "transcribe", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    heard = recognizer.recognize(tone(), task="translate")
    assert (seen[-1]["task"], seen[-1]["language"]) == ("translate", None) and heard.duration == SECONDS
    recognizer.recognize(tone())
    assert (seen[-1]["task"], seen[-1]["language"]) == ("transcribe", cfg.language)
    with pytest.raises(ValueError, match="'transcribe' or 'translate'"):
        recognizer.recognize(tone(), task="summarise")
    monkeypatch.setattr(type(recognizer.model), "is_multilingual", property(lambda self: False))
    with pytest.raises(TranslationUnsupported, match="knows English only; translating needs a multilingual"):
        recognizer.recognize(tone(), task="translate")


def test_asr_deployment_batches_the_default_and_decodes_a_request_temperature_alone(tmp_path):
    """Serve's ASR: requests with the config's options go to the batched
    decode, whose text is the text tokens only (the random model's repeated
    <|notimestamps|> is not text); a request's own temperature decodes it
    alone with that temperature; ``detail`` adds the language and seconds."""
    import asyncio

    from serve.deployments import ASR

    asr = ASR.func_or_class({"preset": "tiny", "device": "cpu"})
    batched = []

    async def decode_batch(clip):  # @serve.batch's queue needs a replica: one clip a batch here
        batched.append(clip.size)
        return asr._decode([clip])[0]

    asr._decode_batch = decode_batch  # on this instance only: the class stays as Serve deploys it
    data = write_wav(tmp_path / "q.wav", tone()).read_bytes()

    async def run():
        assert await asr.transcribe(data) == asr.recognizer.transcribe(data) == ""
        flatten(asr.recognizer)
        greedy = [await asr.transcribe(data, language, temperature) for language, temperature in
                  [(None, None), ("en", 0.0), (None, 0.0)]]  # the config's language and temperature
        assert len(set(greedy)) == 1 and greedy[0] and len(batched) == 4
        torch.manual_seed(0)
        sampled = [await asr.transcribe(data, temperature=1.0) for _ in range(3)]
        assert len(set(sampled)) == 3 and len(batched) == 4, sampled
        assert await asr.transcribe(data, detail=True) == {"text": greedy[0], "language": "en", "duration": SECONDS}
        before = len(batched)
        translated = await asr.transcribe(data, task="translate")  # decoded alone, with Whisper's translate task
        assert translated == asr.recognizer.recognize(data, task="translate").text and len(batched) == before

    asyncio.run(run())


def test_info(recognizer, cfg):
    info = recognizer.info
    assert info["model"] == "random"
    assert info["device"] == "cpu"
    assert info["dims"] == cfg.random_init


def test_unreachable_download_says_how_to_give_a_local_path(monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match=r"could not fetch.*speech\.model=/path/to/small\.pt"):
        load_whisper(SpeechConfig(model="tiny"))


def test_local_checkpoint_path_loads_through_the_same_call(cfg, recognizer):
    model = load_whisper(SpeechConfig(model=str(cached_checkpoint(cfg))))
    assert model.dims == recognizer.model.dims
    name = "encoder.conv1.weight"
    assert torch.equal(model.state_dict()[name], recognizer.model.state_dict()[name])
