"""Training samples from a data set folder plus its precomputed embeddings.

Stage 1 (projector) learns from the first exchange of every image record;
stage 2 (instruction tuning) from whole conversations, text-only ones
included. Features come from the embedding job's shards, never from JPEGs.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from data_pipelines.embed import EmbeddingStore
from data_pipelines.llava import dataset_paths, read_llava
from models.conversation import Encoded, encode_for_training

@dataclass
class Sample:
    id: str
    image: str | None
    messages: list[dict]
    qtypes: list[str]
    tools: list[dict] | None = None  # functions the conversation offers (models.tools)


def load_samples(data: str, split: str, stage: str) -> list[Sample]:
    paths = dataset_paths(data)
    records = read_llava(paths[split], paths["images"], check_images=False).records
    out = []
    for r in records:
        msgs = r.messages
        qtypes = list(r.meta.get("qtypes", []))
        if stage == "projector":
            if not r.image:
                continue
            start = 1 if msgs[0]["role"] == "system" else 0
            msgs = msgs[: start + 2]
            qtypes = qtypes[:1]
        out.append(Sample(str(r.id), r.image, msgs, qtypes, r.tools))
    return out


def first_exchanges(samples: list[Sample]) -> list[Sample]:
    """Held-out answer accuracy: the first question of each image conversation."""
    out = []
    for s in samples:
        if not s.image:
            continue
        start = 1 if s.messages[0]["role"] == "system" else 0
        out.append(Sample(s.id, s.image, s.messages[: start + 2], s.qtypes[:1] or ["?"], s.tools))
    return out


class Features:
    """Image features by path from an embedding store, checked against the model."""

    def __init__(self, store: EmbeddingStore, paths: list[str]):
        missing = [p for p in paths if p not in store]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images have no embedding (first: {missing[0]}); "
                                    "run the embedding job on this data set first")
        self._rows = {p: store[p] for p in sorted(set(paths))}

    def batch(self, images: list[str]) -> torch.Tensor | None:
        if not images:
            return None
        return torch.from_numpy(np.stack([self._rows[p].astype(np.float32) for p in images]))

    def stats(self, images: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and std over every token of ``images``' features."""
        acc = torch.zeros(2, next(iter(self._rows.values())).shape[-1], dtype=torch.float64)
        n = 0
        for p in sorted(set(images)):
            x = torch.from_numpy(self._rows[p].astype(np.float64)).reshape(-1, acc.shape[1])
            acc[0] += x.sum(0)
            acc[1] += (x * x).sum(0)
            n += x.shape[0]
        mean = acc[0] / max(n, 1)
        std = (acc[1] / max(n, 1) - mean * mean).clamp_min(0).sqrt()
        return mean.float(), std.float()

    def mean(self, images: list[str]) -> torch.Tensor:
        """The mean of ``images``' features (per token position); of the
        training images: the 'blind' input (the same whatever else is loaded)."""
        return torch.from_numpy(np.mean(np.stack([self._rows[p].astype(np.float32) for p in sorted(set(images))]),
                                        axis=0))


def encode_all(tok, samples: list[Sample], num_image_tokens: int, max_length: int) -> list[Encoded]:
    return [encode_for_training(tok, s.messages, num_image_tokens, max_length, tools=s.tools) for s in samples]


def length_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[list[int]]:
    """This worker's batches for one epoch: shuffled, grouped by similar length
    inside windows of 16 steps so padding stays small, and dealt so that at
    every step each worker's batch holds about the same lengths as the others'
    (the samples of one step across all workers are neighbours in length, dealt
    round-robin): a step waits for its slowest worker, so unequal batches
    would leave the others idle. Every sample on one worker at most; every
    worker the same number of full batches. Deterministic in (seed, epoch,
    rank, world): a resumed run sees the same order."""
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    group = batch_size * world  # one step, all workers
    window = group * 16
    steps = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        steps += [chunk[i:i + group] for i in range(0, len(chunk), group)]
    full = [st for st in steps if len(st) == group]
    if not full:  # fewer samples than one step of full batches: one short step, the same size on every worker
        usable = len(order) - len(order) % world
        full = [sorted(order[:usable], key=lambda i: lengths[i])] if usable else []
    rng.shuffle(full)
    return [st[rank::world] for st in full]
