"""Serving settings: which weights, request limits, HTTP options.

One :class:`ServeSettings` travels (as a plain dict) to every deployment, so
the ingress and the model replicas agree on the weights and limits. The same
keys are the application ``args`` of ``serve/config.yaml`` (``serve deploy``)
and are filled from the flags of ``mmphi serve``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


class SettingsError(ValueError):
    """A serving setting is wrong; the message names it."""


@dataclass
class Limits:
    # whole request body (JSON with base64 images/audio, or multipart upload)
    max_body_bytes: int = 20 * 1024 * 1024
    # width x height of one image, checked before decoding (decompression bombs)
    max_image_pixels: int = 25_000_000
    # image parts in one request, counting the whole history
    max_images: int = 4
    # audio parts in one request, and the length of each
    max_audio_parts: int = 4
    max_audio_seconds: float = 60.0
    # messages in one request
    max_messages: int = 256
    # upper bound on max_tokens; the default when a request gives none
    max_new_tokens: int = 512
    default_max_tokens: int = 128
    # prompt + max_tokens must fit this; null means the model's tokenizer.max_length
    context_length: int | None = None
    # stop strings per request (OpenAI allows 4)
    max_stop: int = 4
    # answers (choices, "n") one request may ask for: each is a sequence of its own in the LLM's batch
    max_choices: int = 8
    # a response_format's JSON schema, or a request's tool definitions together, as JSON text
    max_schema_bytes: int = 65536
    # functions one request may offer (tools)
    max_tools: int = 128
    # seconds the ingress may spend compiling one new schema (or tools); a slower one is a 400
    max_schema_seconds: float = 5.0
    # tokens one request's logit_bias may name
    max_logit_bias: int = 300


@dataclass
class ServeSettings:
    # checkpoint folder written by training; null serves the preset's weights
    checkpoint: str | None = None
    # preset (or config file) used when no checkpoint is given
    preset: str = "tiny"
    # runtime config overrides (llm.load_in_4bit=true, llm.dtype=bfloat16 ...)
    overrides: list[str] = field(default_factory=list)
    # torch device of the model replicas; null: cuda when the replica has a GPU, else cpu
    device: str | None = None
    # the id clients send as "model" and /v1/models lists
    model_name: str = "mmphi"
    # environment variable holding the API key; unset or empty variable: no key needed
    api_key_env: str = "MMPHI_API_KEY"
    # fetch http(s) image URLs (off: only data: URIs are accepted)
    allow_remote_images: bool = False
    remote_image_timeout_s: float = 10.0
    # torch threads per model replica (0: leave torch's default)
    torch_threads: int = 1
    # replica retries of one request when a model replica dies under it
    retries: int = 3
    # the Gradio chat page at /; false serves the HTTP API alone (machines without gradio)
    ui: bool = True
    # CLIP features of the images each ingress replica saw last, in MiB (a conversation sends its
    # image again with every turn; a hit skips decoding and encoding it); 0 turns the cache off
    image_cache_mb: float = 256.0
    # the same in each ImageEncoder replica, which gets every request for an image it kept from any
    # ingress replica (routed by the image's hash); 0 turns it off
    encoder_cache_mb: float = 256.0
    limits: Limits = field(default_factory=Limits)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict | "ServeSettings" | None) -> "ServeSettings":
        if isinstance(data, ServeSettings):
            return data
        data = dict(data or {})
        limits = data.pop("limits", None) or {}
        s = cls(**_check_keys(cls, data, ""), limits=Limits(**_check_keys(Limits, limits, "limits.")))
        return s.validate()

    def validate(self) -> "ServeSettings":
        lim = self.limits
        for name in ("max_body_bytes", "max_image_pixels", "max_new_tokens", "default_max_tokens", "max_messages",
                     "max_choices", "max_schema_bytes", "max_tools", "max_logit_bias"):
            if getattr(lim, name) < 1:
                raise SettingsError(f"limits.{name} must be at least 1, got {getattr(lim, name)}")
        for name in ("max_images", "max_audio_parts", "max_stop"):
            if getattr(lim, name) < 0:
                raise SettingsError(f"limits.{name} must not be negative, got {getattr(lim, name)}")
        for name in ("max_audio_seconds", "max_schema_seconds"):
            if getattr(lim, name) <= 0:
                raise SettingsError(f"limits.{name} must be positive, got {getattr(lim, name)}")
        if lim.default_max_tokens > lim.max_new_tokens:
            raise SettingsError("limits.default_max_tokens must not exceed limits.max_new_tokens")
        if self.device is not None:
            from models.config import check_device_name

            try:
                check_device_name(self.device)
            except ValueError as e:
                raise SettingsError(f"device: {e}") from None
        for name in ("image_cache_mb", "encoder_cache_mb"):
            mb = getattr(self, name)
            if not isinstance(mb, (int, float)) or isinstance(mb, bool) or mb < 0:
                raise SettingsError(f"{name} must be a number of MiB, 0 or more, got {mb!r}")
        if self.retries < 0:
            raise SettingsError(f"retries must not be negative, got {self.retries}")
        if not isinstance(self.overrides, list) or not all(isinstance(o, str) for o in self.overrides):
            raise SettingsError("overrides must be a list of 'key=value' strings")
        return self


def _check_keys(cls: type, data: Any, where: str) -> dict:
    if not isinstance(data, dict):
        raise SettingsError(f"{where.rstrip('.') or 'settings'} must be a mapping, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)} - {"limits"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise SettingsError(f"unknown serving setting(s) {', '.join(where + k for k in unknown)}; "
                            f"valid: {', '.join(where + n for n in sorted(names))}")
    return data
