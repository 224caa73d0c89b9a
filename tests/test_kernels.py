"""Fused-kernel switch (models.kernels) and the training job's checks of it.
Liger's Triton kernels need CUDA: here only the refusals can be checked; the
GPU benchmark times them (bench/train_bench.py's job_liger variant)."""
from __future__ import annotations

import pytest

from models.config import ConfigError
from models.kernels import apply_kernels


def test_kernels_are_refused_where_they_cannot_run(tiny_model):
    apply_kernels(tiny_model.llm, "none", "cpu")  # the default: nothing changes
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        apply_kernels(tiny_model.llm, "liger", "cpu")
    with pytest.raises(ConfigError, match="must be one of none, liger"):
        apply_kernels(tiny_model.llm, "triton", "cuda")
    norm = type(tiny_model.llm.get_base_model().model.norm).__name__
    assert norm == "Phi3RMSNorm"  # the refusals patched nothing


def test_the_training_job_refuses_kernels_without_gpus(tmp_path):
    from ray_jobs.train import TrainSettings, run

    s = TrainSettings(stage="qlora", data=str(tmp_path), embeddings=str(tmp_path), out=str(tmp_path), kernels="liger")
    with pytest.raises(ValueError, match="--kernels liger runs on GPUs only"):
        run(s)
    with pytest.raises(ValueError, match="--kernels must be one of"):
        run(TrainSettings(stage="qlora", data=str(tmp_path), embeddings=str(tmp_path), out=str(tmp_path),
                          kernels="fast", gpu=True))
