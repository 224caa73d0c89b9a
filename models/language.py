"""Phi-3 causal LM: bf16/fp32 or 4-bit NF4 (bitsandbytes), with PEFT LoRA.

Real and offline presets share one path: an offline preset first writes its
seeded random weights to a cache folder (``models.weights``) in the layout of
a published checkpoint, then both load through ``from_pretrained``.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from .config import ConfigError, LLMConfig
from .vision import DTYPES
from .weights import materialize

log = logging.getLogger(__name__)


def base_causal_lm(llm):
    """The transformers causal LM under PEFT's wrapper (or ``llm`` itself)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def random_phi3_folder(cfg: LLMConfig, vocab_size: int, special: dict) -> Path:
    """Materialise seeded random Phi-3 weights of ``cfg.random_init``'s shape."""
    from transformers import AutoModelForCausalLM, Phi3Config

    kwargs = {"vocab_size": vocab_size, **special, **cfg.random_init}
    spec = {"config": kwargs, "seed": cfg.seed, "dtype": cfg.dtype}

    def build(folder: Path) -> None:
        try:
            config = Phi3Config(**kwargs)
        except TypeError as e:
            raise ConfigError(f"llm.random_init is not a valid Phi3Config: {e}") from None
        device = "cuda" if torch.cuda.is_available() else "cpu"
        # a private RNG: building the cache must not change the caller's random
        # stream (a cold cache would otherwise give a different LoRA init)
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device == "cuda" else []):
            torch.manual_seed(cfg.seed)
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[cfg.dtype])
        # written by hand: save_pretrained writes nothing on ranks other than 0
        # once torch.distributed is up (e.g. inside a Ray Train worker)
        from safetensors.torch import save_model

        model.config.save_pretrained(folder)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(folder)
        save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
        log.info("wrote random %s-parameter Phi-3 to %s", f"{model.num_parameters():,}", folder)

    return materialize("phi3", spec, build)


def resolve_llm_source(cfg: LLMConfig, tokenizer) -> str:
    if cfg.random_init is None:
        return cfg.name_or_path
    ids = tokenizer.ids
    special = {"pad_token_id": ids.pad, "bos_token_id": ids.bos, "eos_token_id": ids.eos}
    return str(random_phi3_folder(cfg, len(tokenizer), special))


def upcasts_frozen(cfg: LLMConfig) -> bool:
    """Whether training casts the frozen weights that are not quantised to
    fp32: a 4-bit model with ``frozen_fp32``, or any 4-bit float16 model."""
    return cfg.load_in_4bit and (cfg.frozen_fp32 or cfg.dtype == "float16")


def set_frozen_dtype(llm, dtype: torch.dtype) -> int:
    """Cast the frozen floating-point weights of ``llm`` that are not
    quantised (embeddings, norms, LM head) to ``dtype`` in place, as
    ``prepare_model_for_kbit_training`` does for fp32; trainable weights
    (LoRA, fp32 master copies) stay as they are. Casting bf16 to fp32 and
    back is exact. Returns how many tensors changed."""
    n = 0
    for p in base_causal_lm(llm).parameters():
        if (not p.requires_grad and p.is_floating_point() and p.dtype != dtype
                and type(p).__name__ not in ("Params4bit", "Int8Params")):
            p.data = p.data.to(dtype)
            n += 1
    return n


def _quantization(cfg: LLMConfig):
    if not cfg.load_in_4bit:
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ConfigError(f"llm.load_in_4bit needs bitsandbytes, which failed to import: {e}") from None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=DTYPES[cfg.compute_dtype],
    )


def load_language_model(
    cfg: LLMConfig,
    tokenizer,
    device: str | torch.device = "cpu",
    *,
    adapter: str | Path | None = None,
    trainable: bool = True,
):
    """Load the base Phi-3 (4-bit or not), then attach LoRA: fresh adapters
    from ``cfg.lora`` or the saved PEFT folder ``adapter``."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    source = resolve_llm_source(cfg, tokenizer)
    quant = _quantization(cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=DTYPES[cfg.dtype],
            quantization_config=quant,
            device_map={"": str(device)},
            attn_implementation=cfg.attn_implementation,
        )
    except OSError as e:
        raise ConfigError(f"cannot load the language model from {source!r}: {e}") from None
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.config.use_cache = not (trainable and cfg.gradient_checkpointing)
    if trainable:
        if upcasts_frozen(cfg):
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
        elif cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
    model.requires_grad_(False)
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated alias of is_activation_checkpointing
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable)
        elif cfg.lora.enabled:
            lc = cfg.lora
            model = get_peft_model(
                model,
                LoraConfig(
                    r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                    target_modules=list(lc.target_modules), task_type="CAUSAL_LM", bias="none",
                ),
            )
            if not trainable:
                model.requires_grad_(False)
    return model
