"""Speech to text with OpenAI Whisper: audio decoding, model loading, transcription.

``decode_audio`` turns a file path, raw bytes (any container ffmpeg reads) or a
numpy array into float32 mono 16 kHz samples; anything that is not decodable
audio raises :class:`AudioDecodeError` with a message that names the problem.

``load_whisper`` builds the model a :class:`~models.config.SpeechConfig` names.
A ``random_init`` config (the offline ``tiny`` preset) is materialised once as a
checkpoint file in the weights cache, in the layout ``whisper.load_model``
reads; published sizes and local checkpoints go through that same call.

``SpeechRecognizer`` loads the model once and transcribes audio with the
config's decoding options (language and temperature can be given per call).
"""
from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np
import torch
import whisper
from whisper.model import ModelDimensions, Whisper

from models.config import SpeechConfig
from models.weights import cache_root, materialize

log = logging.getLogger(__name__)

SAMPLE_RATE = 16000
FFMPEG = "ffmpeg"

AudioSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, np.ndarray]


@dataclass
class Transcript:
    text: str
    language: str  # the Whisper code it was decoded in ("en")
    duration: float  # seconds of audio


class AudioDecodeError(ValueError):
    """The input is not decodable audio (or is too long); the message says why."""


class TranslationUnsupported(ValueError):
    """Translation asked of an English-only Whisper model."""


def language_code(value: str) -> str:
    """A Whisper language code from a code or a name ('en', 'English',
    'castilian'); a ValueError naming the value for anything else."""
    from whisper.tokenizer import LANGUAGES, TO_LANGUAGE_CODE

    key = value.strip().lower()
    if key in LANGUAGES:
        return key
    if key in TO_LANGUAGE_CODE:
        return TO_LANGUAGE_CODE[key]
    raise ValueError(f"language {value!r} is not supported; use a language code such as 'en' or a name such as "
                     "'english' (the languages Whisper knows)")


# ---------------------------------------------------------------------------
# decoding


def decode_audio(source: AudioSource, *, max_seconds: float | None = None) -> np.ndarray:
    """Return ``source`` as float32 mono samples at 16 kHz in [-1, 1].

    ``source`` is a path, raw bytes of an audio file (wav, mp3, flac, ogg, m4a,
    webm, ...) or a numpy array. A 1-D float array is taken to be 16 kHz mono
    already (values are clipped to [-1, 1]); an int16 array is scaled by
    1/32768; shapes (n, 1) and (1, n) are flattened, other 2-D shapes rejected.
    Audio longer than ``max_seconds`` is rejected.
    """
    if isinstance(source, np.ndarray):
        audio = _from_array(source)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise AudioDecodeError("could not decode audio from empty bytes (0 bytes given)")
        with tempfile.TemporaryDirectory(prefix="mmphi-audio-") as tmp:
            # Written to a file, not piped: m4a/mp4 cannot be demuxed from a pipe.
            path = Path(tmp) / "audio"
            path.write_bytes(data)
            audio = _run_ffmpeg(path, f"<{len(data)} bytes>", max_seconds, temporary=True)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            why = ("no such file" if not path.exists() else
                   "it is a folder, not an audio file" if path.is_dir() else "it is not a regular file")
            raise AudioDecodeError(f"could not decode audio from {str(source)!r}: {why}")
        audio = _run_ffmpeg(path, repr(str(source)), max_seconds)
    else:
        raise AudioDecodeError(
            f"cannot read audio from a {type(source).__name__}; "
            "give a path, bytes or a numpy array"
        )
    if audio.size == 0:
        raise AudioDecodeError("no audio samples were decoded (the audio is empty)")
    _check_length(audio.size, max_seconds)
    return audio


def _from_array(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise AudioDecodeError(
            f"audio array must be 1-D mono samples at {SAMPLE_RATE} Hz (or shape (n, 1) / (1, n)), "
            f"got shape {array.shape}"
        )
    if array.dtype == np.int16:
        return array.astype(np.float32) / 32768.0
    if not np.issubdtype(array.dtype, np.floating):
        raise AudioDecodeError(f"audio array must be float or int16, got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise AudioDecodeError("audio array contains NaN or infinite values")
    return np.clip(array.astype(np.float32), -1.0, 1.0)


def _run_ffmpeg(path: Path, label: str, max_seconds: float | None, temporary: bool = False) -> np.ndarray:
    cmd = [FFMPEG, "-nostdin", "-hide_banner", "-loglevel", "error", "-threads", "0", "-i", str(path)]
    if max_seconds is not None:
        # Decode a little past the limit, never all of a (maybe hours-long) file.
        cmd += ["-t", f"{max_seconds + 1:g}"]
    cmd += ["-f", "s16le", "-ac", "1", "-acodec", "pcm_s16le", "-ar", str(SAMPLE_RATE), "-"]
    try:
        proc = subprocess.run(cmd, capture_output=True, check=False)
    except FileNotFoundError:
        raise RuntimeError("ffmpeg not found; install it (apt-get install -y ffmpeg)") from None
    if proc.returncode != 0:
        stderr = proc.stderr.decode("utf-8", "replace")
        if temporary:  # the temporary file's name would only confuse
            stderr = stderr.replace(str(path), "input")
        reason = _last_line(stderr)
        raise AudioDecodeError(f"could not decode audio from {label}: ffmpeg says: {reason}")
    audio = np.frombuffer(proc.stdout, np.int16).astype(np.float32) / 32768.0
    if max_seconds is not None and audio.size > max_seconds * SAMPLE_RATE:
        raise AudioDecodeError(f"audio is more than {max_seconds:g} s long; the limit is {max_seconds:g} s")
    return audio


def _last_line(stderr: str) -> str:
    """The last line of ffmpeg's stderr that says something."""
    lines = [ln.strip() for ln in stderr.splitlines()]
    lines = [ln for ln in lines if ln and ln != "Conversion failed!"]
    return lines[-1] if lines else "unknown error"


def _check_length(n_samples: int, max_seconds: float | None) -> None:
    if max_seconds is not None and n_samples > max_seconds * SAMPLE_RATE:
        raise AudioDecodeError(
            f"audio is {n_samples / SAMPLE_RATE:.1f} s long; the limit is {max_seconds:g} s"
        )


# ---------------------------------------------------------------------------
# model


def load_whisper(cfg: SpeechConfig, device: str | torch.device = "cpu") -> Whisper:
    """Load the Whisper model ``cfg`` names, through ``whisper.load_model``.

    With ``cfg.random_init`` (ModelDimensions keyword arguments), seeded random
    weights are written once to the weights cache as ``model.pt`` and that file
    is loaded. Otherwise ``cfg.model`` is a Whisper size name (downloaded into
    the cache on first use) or a path to a checkpoint file.
    """
    if cfg.random_init is not None:
        spec = random_spec(cfg)
        name = str(materialize("whisper", spec, lambda folder: _build_random(cfg, folder)) / "model.pt")
    else:
        name = str(cfg.model)
    try:
        model = whisper.load_model(name, device=device, download_root=str(cache_root() / "whisper"))
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        raise RuntimeError(
            f"could not fetch the Whisper weights {name!r} ({e}); without network, download the "
            "checkpoint elsewhere and give its local path, e.g. speech.model=/path/to/small.pt"
        ) from e
    model.eval()
    log.info("loaded Whisper %s on %s", "random" if cfg.random_init is not None else name, device)
    return model


def random_spec(cfg: SpeechConfig) -> dict:
    """What the cached random Whisper is keyed by (``init`` names the
    initialisation below; a change to it makes a new cache entry)."""
    return {"random_init": cfg.random_init, "seed": cfg.seed, "init": "decoder-positions-normal-0.01"}


def _build_random(cfg: SpeechConfig, folder: Path) -> None:
    dims = ModelDimensions(**cfg.random_init)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Whisper(dims)
        # openai-whisper leaves the text decoder's learned position embedding as
        # torch.empty: whatever the memory held, NaN included. Draw it instead.
        torch.nn.init.normal_(model.decoder.positional_embedding, std=0.01)
    torch.save({"dims": dims.__dict__, "model_state_dict": model.state_dict()}, folder / "model.pt")
    log.info("materialised random Whisper %s (seed %d) in %s", dims, cfg.seed, folder)


# ---------------------------------------------------------------------------
# recognizer


class SpeechRecognizer:
    """A loaded Whisper model plus the decoding options of a ``SpeechConfig``."""

    def __init__(self, cfg: SpeechConfig, device: str | torch.device | None = None):
        self.cfg = cfg
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = load_whisper(cfg, self.device)

    @property
    def info(self) -> dict[str, Any]:
        """What is loaded, for logs: model name (or "random"), dims, device."""
        return {
            "model": "random" if self.cfg.random_init is not None else str(self.cfg.model),
            "dims": dict(self.model.dims.__dict__),
            "device": str(self.device),
        }

    def transcribe(self, source: AudioSource, *, language: str | None = None,
                   temperature: float | None = None) -> str:
        """Transcribe a path, audio bytes or a 16 kHz array; returns the stripped text.
        ``language`` and ``temperature`` default to the config's."""
        return self.recognize(source, language=language, temperature=temperature).text

    def recognize(self, source: AudioSource, *, language: str | None = None,
                  temperature: float | None = None, task: str = "transcribe") -> Transcript:
        """As :meth:`transcribe`, with the language Whisper decoded in (the one
        given, or the one it detected) and the audio's length in seconds.
        ``task`` "translate": English text of speech in any language Whisper
        knows (a multilingual model only: :class:`TranslationUnsupported`)."""
        if task not in ("transcribe", "translate"):
            raise ValueError(f"task must be 'transcribe' or 'translate', got {task!r}")
        if task == "translate" and not self.model.is_multilingual:
            raise TranslationUnsupported(f"this server's Whisper model ({self.cfg.model}) knows English only; "
                                         "translating needs a multilingual one (speech.model without '.en')")
        audio = decode_audio(source, max_seconds=self.cfg.max_seconds)
        options: dict[str, Any] = {}
        if self.cfg.beam_size is not None:
            options["beam_size"] = self.cfg.beam_size
        if self.cfg.sample_len is not None:
            options["sample_len"] = self.cfg.sample_len
        result = self.model.transcribe(
            audio,
            language=language or (self.cfg.language if task == "transcribe" else None),
            task=task,
            # one float, not a tuple: no temperature fallback loop
            temperature=float(self.cfg.temperature if temperature is None else temperature),
            without_timestamps=True,
            condition_on_previous_text=False,
            fp16=self.device.type == "cuda",
            verbose=None,
            **options,
        )
        return Transcript(result["text"].strip(), result["language"], audio.size / SAMPLE_RATE)

    def transcribe_many(self, sources: Iterable[AudioSource]) -> list[str]:
        """Transcribe each source in turn."""
        return [self.transcribe(s) for s in sources]
