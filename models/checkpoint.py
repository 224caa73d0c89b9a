"""One checkpoint folder: projector + LoRA adapter + tokenizer + the config.

Layout (all tensors in safetensors)::

    mmphi.json                 format, version, config, vision identity, fingerprints, extra
    projector.safetensors      projector weights (float32)
    adapter/                   PEFT LoRA folder (adapter_config.json, adapter_model.safetensors)
    tokenizer/                 tokenizer files

The adapter folder loads in plain transformers + peft::

    base = AutoModelForCausalLM.from_pretrained(cfg["llm"]["name_or_path"])
    model = PeftModel.from_pretrained(base, "CKPT/adapter")

Loading refuses a checkpoint whose vision encoder, token mode, feature layer,
patch pooling, projector or base model differ from what it is combined with.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ModelConfig
from .vision import vision_identity
from .weights import fingerprint

FORMAT = "mmphi-checkpoint"
VERSION = 1
META = "mmphi.json"


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read: a file missing, cut short or
    not what it should be (the message names the file)."""


class CheckpointMismatch(CheckpointError):
    """A checkpoint does not fit the model or data it is combined with."""


def _llm_identity(cfg: ModelConfig) -> dict:
    return {"name_or_path": cfg.llm.name_or_path, "random_init": cfg.llm.random_init, "seed": cfg.llm.seed
            if cfg.llm.random_init is not None else None}


def identity(cfg: ModelConfig) -> dict:
    """The facts two things must share to be used together."""
    return {"vision": vision_identity(cfg.vision), "projector": {"kind": cfg.projector.kind, "normalize": cfg.projector.normalize}, "llm": _llm_identity(cfg)}


def differences(have: dict, want: dict, what: str, wanted: str = "expected") -> list[str]:
    """Every field where two nested identities differ, as
    ``"vision.model: WHAT has 'a', WANTED 'b'"``."""
    diffs = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b)):
                walk(a.get(k), b.get(k), f"{prefix}{k}.")
        elif a != b:
            diffs.append(f"{prefix[:-1]}: {what} has {a!r}, {wanted} {b!r}")

    walk(have, want, "")
    return diffs


def assert_compatible(have: dict, want: dict, what: str = "checkpoint") -> None:
    """Raise CheckpointMismatch naming every field where two identities differ."""
    diffs = differences(have, want, what)
    if diffs:
        raise CheckpointMismatch(f"{what} does not match: " + "; ".join(diffs))


def _not_a_checkpoint(path: Path) -> str:
    """Why ``path`` holds no checkpoint, pointing at the one a user most
    likely meant: a training run's folder (``RUNS/NAME``) is given where its
    ``final`` checkpoint (or, before the run finished, its latest one) was."""
    if not path.exists():
        return f"{path} does not exist (a checkpoint is a folder holding {META}, e.g. RUNS/NAME/final)"
    if not path.is_dir():
        return f"{path} is a file, not an mmphi checkpoint (a folder holding {META}, e.g. RUNS/NAME/final)"
    if (path / "final" / META).is_file():
        return f"{path} is a training run's folder, not a checkpoint: its finished model is {path / 'final'}"
    saved = sorted(p for p in path.glob("checkpoint_*") if (p / META).is_file())  # Ray names them by time
    if saved:
        return (f"{path} is a training run's folder, not a checkpoint, and it has no final/ yet (the run did "
                f"not finish; the same train command resumes it): its latest checkpoint is {saved[-1]}")
    return f"{path} is not an mmphi checkpoint (no {META})"


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / META
    if not meta_file.exists():
        raise FileNotFoundError(_not_a_checkpoint(path))
    try:
        meta = json.loads(meta_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{meta_file} is not valid JSON ({e}): the checkpoint is damaged") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file} holds a JSON {type(meta).__name__}, not a checkpoint's description")
    if meta.get("format") != FORMAT or meta.get("version", 0) > VERSION:
        raise CheckpointMismatch(f"{meta_file}: unsupported format {meta.get('format')!r} v{meta.get('version')}")
    missing = [k for k in ("config", "identity") if not isinstance(meta.get(k), dict)]
    if missing:
        raise CheckpointError(f"{meta_file} has no {' or '.join(missing)} mapping: the checkpoint is damaged")
    return meta


def check_files(path: str | Path, meta: dict, sizes: bool = True) -> None:
    """Refuse a checkpoint folder whose files are not all there (with
    ``sizes``: with the sizes) its ``mmphi.json`` lists (a copy cut short),
    naming the first such file. Checkpoints written before ``mmphi.json``
    listed its files pass."""
    path = Path(path)
    for name, size in (meta.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f} is missing: the checkpoint is incomplete ({META} lists it)")
        if sizes and f.stat().st_size != size:
            raise CheckpointError(f"{f} is {f.stat().st_size} bytes, {META} lists {size}: "
                                  "the file is cut short or damaged")


def read_projector(path: str | Path) -> dict[str, torch.Tensor]:
    """The projector weights of a checkpoint folder; a ``CheckpointError``
    naming the file when it is missing or not readable as safetensors."""
    f = Path(path) / "projector.safetensors"
    if not f.is_file():
        raise CheckpointError(f"{f} is missing: the checkpoint is incomplete")
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors' SafetensorError (a header or length that does not add up), OSError
        raise unreadable(f, e) from None


def check_safetensors(f: str | Path) -> None:
    """Read the header of the weight file ``f`` (not its tensors): a
    ``CheckpointError`` naming it when it is cut short or overwritten."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="pt") as weights:
            weights.keys()
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: the file is what is wrong
        raise unreadable(f, e) from None


def unreadable(f: str | Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"{f} is not a readable safetensors file ({e}): it is cut short or damaged")


def save_checkpoint(model, path: str | Path, extra: dict | None = None) -> Path:
    from peft import PeftModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.projector.state_dict().items()}
    save_file(state, str(path / "projector.safetensors"))
    if isinstance(model.llm, PeftModel):
        model.llm.save_pretrained(str(path / "adapter"))
    model.tokenizer.save(path / "tokenizer")
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "config": model.cfg.to_dict(),
        "identity": identity(model.cfg),
        "fingerprints": {
            "llm_embeddings": fingerprint(model.llm.get_input_embeddings().weight),
            **({"vision": fingerprint(next(model.vision.parameters()))} if model.vision is not None else {}),
        },
        "tokenizer_size": len(model.tokenizer),
        "has_adapter": isinstance(model.llm, PeftModel),
        "extra": extra or {},
        # every other file of the folder and its size, the files already there (a trainer's state) included:
        # a copy cut short (a crash while storage received it) shows as a file missing or shorter
        "files": {f.relative_to(path).as_posix(): f.stat().st_size
                  for f in sorted(path.rglob("*")) if f.is_file() and f.name != META},
    }
    (path / META).write_text(meta_text(meta))
    return path


def checkpoint_config(path: str | Path, meta: dict, overrides: list[str] | None) -> ModelConfig:
    """A checkpoint's config with runtime ``overrides`` (dtype, 4-bit,
    attention kernel ...), refusing those that change what the checkpoint is:
    its identity, or the LoRA settings its adapter was trained with (the
    adapter's own ``adapter_config.json`` would be loaded regardless)."""
    from dataclasses import asdict

    from .config import apply_overrides, config_from_dict

    cfg = apply_overrides(meta["config"], overrides)
    diffs = differences(identity(cfg), meta["identity"], "the override", "but the checkpoint was trained with")
    if diffs:
        raise CheckpointMismatch(f"{path}: the overrides change what the checkpoint is ({'; '.join(diffs)}): it "
                                 "runs with the vision encoder, projector and base model it was trained with")
    if meta.get("has_adapter") and overrides:
        # ``enabled`` is the training stage's: a projector run on a LoRA model loads the adapter, frozen
        trained = asdict(config_from_dict(meta["config"]).llm.lora) | {"enabled": None}
        diffs = differences(asdict(cfg.llm.lora) | {"enabled": None}, trained, "the override",
                            "but its adapter was trained with")
        if diffs:
            raise CheckpointMismatch(f"{path}: a checkpoint's LoRA adapter keeps the settings it was trained "
                                     f"with ({'; '.join(f'llm.lora.{d}' for d in diffs)}): leave llm.lora.* out "
                                     "of the overrides")
    return cfg


def meta_text(meta: dict) -> str:
    """The text of a checkpoint's ``mmphi.json``."""
    return json.dumps(meta, indent=2, sort_keys=True)


def load_checkpoint(
    path: str | Path,
    *,
    expect: ModelConfig | dict | None = None,
    overrides: list[str] | None = None,
    device: str | torch.device | None = None,
    with_vision: bool = True,
    trainable: bool = False,
):
    """Rebuild a :class:`MultimodalPhi3` from a checkpoint folder.

    ``expect``: a config (or an identity dict, e.g. from an embeddings
    manifest) the checkpoint must match. ``overrides``: runtime settings
    (``llm.load_in_4bit=true``, ``llm.dtype=bfloat16`` ...) that do not change
    what the checkpoint is; changing its identity is refused."""
    from .multimodal import MultimodalPhi3
    from .tokenizer import ChatTokenizer

    path = Path(path)
    meta = read_meta(path)
    check_files(path, meta, sizes=False)  # a file of another size may be one written on purpose: checked on failure
    cfg = checkpoint_config(path, meta, overrides)
    saved = meta["identity"]
    if expect is not None:
        want = expect if isinstance(expect, dict) else identity(expect)
        have = {k: saved[k] for k in want} if set(want) <= set(saved) else saved
        assert_compatible(have, want, f"checkpoint {path}")
    try:
        model = MultimodalPhi3.from_config(
            cfg, device=device, with_vision=with_vision, trainable=trainable,
            adapter=path / "adapter" if meta.get("has_adapter") else None,
        )
        tok = ChatTokenizer.load(path / "tokenizer", cfg.tokenizer.image_token)
    except (OSError, ValueError, RuntimeError):  # the adapter or tokenizer did not load: name a file cut short
        check_files(path, meta)
        raise
    if tok.hf.get_vocab() != model.tokenizer.hf.get_vocab():
        raise CheckpointMismatch(f"{path}: the saved tokenizer differs from the one the config builds")
    model.tokenizer = tok
    fps = meta.get("fingerprints", {})
    got = fingerprint(model.llm.get_input_embeddings().weight)
    if fps.get("llm_embeddings") not in (None, got):
        raise CheckpointMismatch(f"{path}: base language model weights differ from those it was trained on")
    if model.vision is not None and fps.get("vision") not in (None, fingerprint(next(model.vision.parameters()))):
        raise CheckpointMismatch(f"{path}: vision encoder weights differ from those it was trained with")
    state = read_projector(path)
    try:
        model.projector.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointMismatch(f"{path}: projector weights do not fit: {e}") from None
    model.projector.requires_grad_(trainable)
    return model
