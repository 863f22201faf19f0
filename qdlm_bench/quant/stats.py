"""Statistics the block walk collects (``walk.collect``: ``stat.add(x, weights)`` per batch of a
subset's input): per-channel max|x| (smoothing) and a token sample with per-channel mean|x| (AWQ,
DuQuant). Both take optional per-token weights (padding masks, DLLMQuant's CGQ)."""

from __future__ import annotations

import math

import torch


class ChannelMax:
    """Per-channel max|x| over every token with a positive weight (padding excluded), float32."""

    def __init__(self, dim: int, device=None):
        self.max = torch.zeros(dim, device=device)

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float().abs()
        if weights is not None:
            x = x * (weights.reshape(-1, 1) > 0)
        self.max = torch.maximum(self.max, x.amax(0))


class TokenStats:
    """Per-channel (weighted) mean |x| over every token, and a deterministic sub-sample of at most
    ``max_tokens`` tokens (every ``stride``-th token) with their weights, float32, where
    ``stride = ceil(total_tokens / max_tokens)``."""

    def __init__(self, dim: int, total_tokens: int, max_tokens: int = 4096, device=None):
        self.stride = max(1, math.ceil(total_tokens / max_tokens))
        self.abs_sum = torch.zeros(dim, device=device)
        self.w_sum = 0.0
        self.seen = 0
        self.xs, self.ws = [], []

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        w = torch.ones(len(x), device=x.device) if weights is None else weights.reshape(-1).float()
        self.abs_sum += w @ x.abs()
        self.w_sum += w.sum().item()
        first = (-self.seen) % self.stride  # global indices that are multiples of stride
        self.xs.append(x[first::self.stride].clone())  # a copy: a strided view would keep all of x alive
        self.ws.append(w[first::self.stride].clone())
        self.seen += len(x)

    @property
    def x_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.w_sum, 1e-12)

    @property
    def x(self) -> torch.Tensor:
        return torch.cat(self.xs)

    @property
    def w(self) -> torch.Tensor:
        return torch.cat(self.ws)
