"""Projector: CLIP features -> Phi-3 token embeddings."""
from __future__ import annotations

import torch
import torch.nn as nn


class Projector(nn.Module):
    """``linear``: one Linear; ``mlp2x_gelu``: Linear -> GELU -> Linear (LLaVA-1.5)."""

    def __init__(self, kind: str, in_dim: int, out_dim: int):
        super().__init__()
        self.kind, self.in_dim, self.out_dim = kind, in_dim, out_dim
        if kind == "linear":
            self.net = nn.Linear(in_dim, out_dim)
        elif kind == "mlp2x_gelu":
            self.net = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            raise ValueError(f"unknown projector kind {kind!r}; use 'linear' or 'mlp2x_gelu'")

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.in_dim:
            raise ValueError(
                f"image features have width {features.shape[-1]} but the projector expects {self.in_dim}"
            )
        weight = next(self.parameters())
        return self.net(features.to(weight.dtype))
