"""Typed model configuration: presets are data (YAML/JSON), never code branches.

A preset names every component of the multimodal model: the open_clip vision
tower, the projector, the Phi-3 language model (+ LoRA / 4-bit options), the
tokenizer and the Whisper speech model. ``tiny`` builds each of them with the
real architecture and seeded random weights, so it runs offline; ``phi3-mini``
loads the published weights. Both go through the same code.
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PRESET_DIR = Path(__file__).with_name("presets")


class ConfigError(ValueError):
    """A configuration file or override is wrong; the message names the key."""


DEVICE_NAME = re.compile(r"(cpu|cuda(:\d+)?|mps)")


def check_device_name(value: str) -> str:
    """``value`` if torch can place a model on a device of that name (cpu,
    cuda, cuda:N, mps), else ``ValueError`` naming it; checked without
    importing torch, so a wrong name fails before any model loads."""
    if not isinstance(value, str) or not DEVICE_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a device: choose cpu, cuda, cuda:N or mps")
    return value


@dataclass
class VisionConfig:
    # open_clip model name (e.g. "ViT-L-14-336"); with ``model_config`` set, the
    # name under which that inline open_clip config is registered.
    model: str = "ViT-L-14-336"
    # open_clip pretrained tag ("openai") or a path to a weights file;
    # null means seeded random initialisation (offline).
    pretrained: str | None = "openai"
    model_config: dict | None = None
    # "patches": every patch token of ``feature_layer`` (LLaVA-1.5 style);
    # "pooled": the single pooled, projected CLIP image embedding.
    token_mode: str = "patches"
    # transformer block whose output is used in patches mode (-1 last, -2 penultimate)
    feature_layer: int = -2
    # average-pool the patch grid by this factor (2 -> a quarter of the tokens);
    # ignored with token_mode "pooled"
    patch_pool: int = 1
    # weights/compute dtype of the tower ("float32", "bfloat16", "float16")
    dtype: str = "bfloat16"
    seed: int = 0
    # position embeddings of a randomly initialised tower (pretrained: null):
    # "random" keeps open_clip's N(0, width^-1/2) draw; "sincos2d" sets fixed 2-D
    # sine-cosine codes of the same norm (smooth in x and y, as trained ViTs'
    # learned ones are), which makes patch positions far easier to read
    random_pos_embed: str = "random"
    # decode a JPEG at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when that
    # still covers the resize before the crop, then resize as usual: for
    # images at least twice the crop (a phone photo: about a tenth of the
    # decoding time), with pixels a fraction of a grey level from a whole
    # decode's; smaller images and other formats are untouched. Part of the
    # encoder's identity: embeddings, training and serving must agree on it.
    jpeg_draft: bool = False


@dataclass
class ProjectorConfig:
    # "linear" or "mlp2x_gelu" (Linear -> GELU -> Linear, as in LLaVA-1.5)
    kind: str = "mlp2x_gelu"
    # standardise each feature dimension with the training set's mean and std
    # (measured when a projector is first trained, stored with its weights)
    normalize: bool = False


@dataclass
class LoraSettings:
    enabled: bool = True
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    )


@dataclass
class LLMConfig:
    # hub id or local folder of a Phi-3 checkpoint
    name_or_path: str = "microsoft/Phi-3-mini-4k-instruct"
    # Phi3Config keyword arguments: build seeded random weights of this shape
    # instead of loading ``name_or_path`` (offline presets, benchmarks).
    random_init: dict | None = None
    seed: int = 0
    # "float32", "bfloat16" or "float16": the dtype of non-quantised weights
    dtype: str = "bfloat16"
    # 4-bit NF4 base weights (bitsandbytes, double quantisation)
    load_in_4bit: bool = False
    # compute dtype of the 4-bit layers
    compute_dtype: str = "bfloat16"
    gradient_checkpointing: bool = False
    # 4-bit training only: cast the frozen weights that are not quantised
    # (token embeddings, norms, LM head) to fp32, as peft's
    # prepare_model_for_kbit_training does. false keeps them in ``dtype``, so
    # the residual stream and every activation stay in the compute dtype: no
    # fp32 copies, casts and adds in each layer, half the checkpointed
    # activations. A float16 model is always upcast (fp16 residuals overflow).
    frozen_fp32: bool = False
    attn_implementation: str = "sdpa"
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class TokenizerConfig:
    # hub id or folder; null means "the same as llm.name_or_path"
    name_or_path: str | None = None
    # build a byte-level BPE offline instead of loading one: {"vocab_size": N, "tool_corpus": bool}
    build: dict | None = None
    image_token: str = "<image>"
    max_length: int = 4096
    system_prompt: str | None = None


@dataclass
class SpeechConfig:
    # Whisper size name ("tiny", "base", "small", ...) or a checkpoint path
    model: str = "small"
    # whisper ModelDimensions keyword arguments: seeded random weights
    random_init: dict | None = None
    seed: int = 0
    language: str | None = None
    # upper bound on tokens decoded per 30 s window (null: Whisper's default)
    sample_len: int | None = None
    temperature: float = 0.0
    beam_size: int | None = None
    max_seconds: float = 600.0


@dataclass
class ModelConfig:
    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    speech: SpeechConfig = field(default_factory=SpeechConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def validate(self) -> "ModelConfig":
        v = self.vision
        _choice("vision.token_mode", v.token_mode, ("patches", "pooled"))
        _choice("projector.kind", self.projector.kind, ("linear", "mlp2x_gelu"))
        for key in ("llm.dtype", "llm.compute_dtype", "vision.dtype"):
            _choice(key, _get(self, key), ("float32", "bfloat16", "float16"))
        if v.patch_pool < 1:
            raise ConfigError(f"vision.patch_pool must be >= 1, got {v.patch_pool}")
        _choice("vision.random_pos_embed", v.random_pos_embed, ("random", "sincos2d"))
        if v.random_pos_embed != "random" and v.pretrained:
            raise ConfigError(
                f"vision.random_pos_embed {v.random_pos_embed!r} only applies to a randomly initialised tower "
                f"(vision.pretrained: null), not to pretrained weights {v.pretrained!r}"
            )
        if self.llm.lora.r < 1:
            raise ConfigError(f"llm.lora.r must be >= 1, got {self.llm.lora.r}")
        if self.tokenizer.max_length < 16:
            raise ConfigError(f"tokenizer.max_length is too small: {self.tokenizer.max_length}")
        return self


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(x, item) for x in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _from_dict(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(where + k for k in unknown)}; "
            f"valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _from_dict(tp, value, f"{where}{name}.")
            continue
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not _type_ok(value, tp):
            raise ConfigError(f"{where}{name} has the wrong type: expected {tp}, got {value!r}")
        kwargs[name] = value
    return cls(**kwargs)


def config_from_dict(data: dict) -> ModelConfig:
    return _from_dict(ModelConfig, data, "").validate()


def _merge(base: dict, extra: dict) -> dict:
    """Deep merge: a mapping updates a mapping key by key; anything else
    (null included) replaces. To replace a whole mapping, set it to null first."""
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def list_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_file(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    return data


def _parse_override(item: str) -> dict:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(p.strip() for p in parts):
        raise ConfigError(f"override {item!r} has {'no key' if not key.strip() else f'an empty part in key {key!r}'}; "
                          "overrides look like key.sub=value")
    parts = [p.strip() for p in parts]
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as e:
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise ConfigError(f"override {item!r}: the value {raw!r} is not valid YAML ({problem}); "
                          "quote it to give a string") from None
    out: dict = {}
    node = out
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def load_config(preset: str | Path = "tiny", overrides: list[str] | None = None) -> ModelConfig:
    """Load a preset by name (``tiny``, ``phi3-mini``) or a YAML/JSON file path,
    then apply ``key.sub=value`` overrides (values parsed as YAML)."""
    path = Path(preset)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        data = _read_file(path)
    else:
        candidate = PRESET_DIR / f"{preset}.yaml"
        if not candidate.exists():
            raise ConfigError(
                f"unknown preset {str(preset)!r}; presets: {', '.join(list_presets())} "
                "(or give a path to a .yaml/.json file)"
            )
        data = _read_file(candidate)
    if "base" in data:  # a file may extend a preset: {base: phi3-mini, llm: {...}}
        base = data.pop("base")
        data = _merge(load_config(base).to_dict(), data)
    return apply_overrides(data, overrides)


def apply_overrides(data: dict, overrides: list[str] | None) -> ModelConfig:
    """A config from a mapping plus ``key.sub=value`` overrides (values parsed as YAML)."""
    for item in overrides or []:
        data = _merge(data, _parse_override(item))
    return config_from_dict(data)
