"""Shared fixtures: offline, a private weights cache, the tiny preset."""
from __future__ import annotations

import os
import tempfile

# Before anything imports transformers / huggingface_hub: never wait on the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "MMPHI_CACHE" not in os.environ:
    os.environ["MMPHI_CACHE"] = tempfile.mkdtemp(prefix="mmphi-test-cache-")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    from models.config import load_config

    return load_config("tiny")


@pytest.fixture(scope="session")
def tok(tiny_cfg):
    from models.tokenizer import load_tokenizer

    return load_tokenizer(tiny_cfg)


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg):
    """A frozen (inference) tiny model with its vision tower; do not train it."""
    from models.multimodal import MultimodalPhi3

    model = MultimodalPhi3.from_config(tiny_cfg, device="cpu", trainable=False)
    model.eval()
    return model
