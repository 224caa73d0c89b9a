"""Training-side data helpers: length-bucketed shards and feature statistics."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ray_jobs.data import Features, length_batches


def test_length_batches_shard_without_overlap_and_bucket_by_length():
    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(20, 400, size=1000)]
    shards = [length_batches(lengths, 8, seed=1, epoch=2, rank=r, world=2) for r in range(2)]
    seen = [i for shard in shards for b in shard for i in b]
    assert len(seen) == len(set(seen))                      # no sample on two workers
    assert len(shards[0]) == len(shards[1])                 # every worker the same number of steps
    assert all(len(b) == 8 for shard in shards for b in shard)
    assert len(seen) >= 1000 - 2 * 8 * 16                   # at most one window per worker dropped
    # padding: sorted windows keep a batch's lengths close together, far closer than random batches
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in shards[0]])
    order = rng.permutation(len(lengths))
    random_spread = np.mean([np.ptp([lengths[i] for i in order[k:k + 8]]) for k in range(0, 992, 8)])
    assert spread < 0.25 * random_spread
    # a step waits for its slowest worker: at every step the workers' batches are about as long as each other
    step_gap = np.mean([abs(max(lengths[i] for i in a) - max(lengths[i] for i in b)) for a, b in zip(*shards)])
    assert step_gap < 0.02 * random_spread, (step_gap, random_spread)
    # deterministic per (seed, epoch, rank): a resumed run sees the same order; the next epoch another
    assert shards[0] == length_batches(lengths, 8, seed=1, epoch=2, rank=0, world=2)
    assert shards[0] != length_batches(lengths, 8, seed=1, epoch=3, rank=0, world=2)
    # one worker: every sample of the full batches; fewer samples than a step: one short batch per worker
    alone = [i for b in length_batches(lengths, 8, seed=1, epoch=2, rank=0, world=1) for i in b]
    assert len(alone) == len(set(alone)) == 1000
    few = [length_batches(lengths[:11], 8, seed=0, epoch=0, rank=r, world=2) for r in range(2)]
    assert [len(b) for shard in few for b in shard] == [5, 5] and not set(few[0][0]) & set(few[1][0])
    assert length_batches(lengths[:1], 8, seed=0, epoch=0, rank=0, world=2) == []


def test_feature_stats_and_blind_mean():
    rng = np.random.default_rng(1)
    store = {f"{i}.png": (rng.normal(size=(4, 6)) * np.arange(1, 7) + 10).astype(np.float16) for i in range(50)}
    feats = Features(store, list(store))
    some = sorted(store)[:30]
    mean, std = feats.stats(some)
    rows = np.concatenate([store[p].astype(np.float64) for p in some])   # every token of those images
    assert torch.allclose(mean, torch.from_numpy(rows.mean(0)).float(), atol=1e-4)
    assert torch.allclose(std, torch.from_numpy(rows.std(0)).float(), atol=1e-4)
    blind = feats.mean(some)
    assert blind.shape == (4, 6)  # the blind input keeps the token axis
    # the mean of the images asked for (the training images), whatever else is loaded
    assert torch.allclose(blind, torch.from_numpy(np.mean([store[p].astype(np.float32) for p in some], 0)), atol=1e-4)
    assert not torch.allclose(blind, feats.mean(list(store)), atol=1e-4)
    with pytest.raises(FileNotFoundError, match="no embedding"):
        Features(store, ["missing.png"])
