"""Seeded random weights, materialised once into a local cache folder.

Offline presets describe a model by its architecture and a seed. The first
use builds the weights and saves them exactly as a published checkpoint would
be laid out; every later use, in any process on the machine, loads that
folder through the ordinary loading code. Writes are atomic (build in a
temporary folder, then rename), so concurrent workers never see half a model.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

import torch


def cache_root() -> Path:
    root = os.environ.get("MMPHI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mmphi"
    )
    return Path(root)


def spec_key(kind: str, spec: dict) -> str:
    blob = json.dumps({"kind": kind, **spec}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def materialize(kind: str, spec: dict, build: Callable[[Path], None]) -> Path:
    """Return the cache folder for ``(kind, spec)``, calling ``build(folder)``
    to create it the first time."""
    final = cache_root() / f"{kind}-{spec_key(kind, spec)}"
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        build(tmp)
        (tmp / "spec.json").write_text(json.dumps({"kind": kind, **spec}, indent=2, sort_keys=True, default=str))
        (tmp / ".complete").touch()
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first, or a stale partial folder
            if not (final / ".complete").exists():
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def fingerprint(tensor: torch.Tensor, n: int = 65536) -> str:
    """A short, dtype-independent digest of a weight tensor (its shape and first
    ``n`` values rounded to bfloat16): tells two base models apart cheaply."""
    t = tensor.detach().flatten()[:n].to("cpu", torch.bfloat16).float().numpy()
    h = hashlib.sha256(str(tuple(tensor.shape)).encode())
    h.update(t.tobytes())
    return h.hexdigest()[:16]
