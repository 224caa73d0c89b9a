"""Projector: CLIP features -> Phi-3 token embeddings."""
from __future__ import annotations

import torch
import torch.nn as nn


class Projector(nn.Module):
    """``linear``: one Linear; ``mlp2x_gelu``: Linear -> GELU -> Linear (LLaVA-1.5).

    With ``normalize`` the features are first standardised per dimension with
    the ``feature_mean`` / ``feature_std`` buffers (saved with the weights),
    which :meth:`set_feature_stats` fills from the training set. Frozen vision
    features are often dominated by one shared offset (in a random ViT its
    norm is several times that of what differs between patches); removing it
    lets the projector see the differences from the first step."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, normalize: bool = False):
        super().__init__()
        self.kind, self.in_dim, self.out_dim, self.normalize = kind, in_dim, out_dim, normalize
        if normalize:
            self.register_buffer("feature_mean", torch.zeros(in_dim))
            self.register_buffer("feature_std", torch.ones(in_dim))
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
        x = features.to(weight.dtype)
        if self.normalize:
            x = (x - self.feature_mean.to(x.dtype)) / self.feature_std.to(x.dtype)
        return self.net(x)

    @torch.no_grad()
    def set_feature_stats(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        """Per-dimension mean and std of the training features (any leading shape is averaged)."""
        if not self.normalize:
            raise ValueError("this projector was built without normalize=True")
        mean, std = mean.reshape(-1, self.in_dim), std.reshape(-1, self.in_dim)
        if mean.shape[0] != 1 or std.shape[0] != 1:
            raise ValueError(f"feature stats must have width {self.in_dim}")
        self.feature_mean.copy_(mean[0])
        self.feature_std.copy_(std[0].clamp_min(eps))
