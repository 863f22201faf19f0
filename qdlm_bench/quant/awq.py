"""AWQ (Lin et al., 2024) as reusable primitives: token statistics, scale search, folding, clip search.

Follows the reference (mit-han-lab ``llm-awq``, ``auto_scale`` / ``auto_clip``):

* scale search: for a subset of linears sharing an input ``X``, ``s = mean|X|^alpha`` normalized by
  ``sqrt(max(s) min(s))``, alpha on a grid of ``n_grid`` points in ``[0, 1)``; the loss is the
  subset's output error ``sum_l ||Q(W_l diag(s)) (X / s) - W_l X||^2`` (alpha = 0 is RTN, and it
  is on the grid, so the search never does worse than RTN on its own loss);
* folding: the feeder (RMSNorm weight, or a linear's output rows AND bias) is divided by ``s``,
  the subset's weight columns multiplied by ``s``: the FP function is unchanged;
* clip search: per output channel group, shrink the quantization range by ratios in
  ``[1, 1 - max_shrink]`` and keep the one minimizing that group's output error on sampled tokens.

Every loss takes optional per-token weights ``[T]`` (padding masks, DLLMQuant's CGQ).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .quantizer import fake_quant, group, ungroup


class TokenStats:
    """A ``walk.collect`` statistic: per-channel (weighted) mean |x| over every token, and a
    deterministic sub-sample of at most ``max_tokens`` tokens (every ``stride``-th token) with
    their weights, float32, where ``stride = ceil(total_tokens / max_tokens)``."""

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


def _out_error(weights: list[torch.Tensor], deltas: list[torch.Tensor], x: torch.Tensor,
               token_weight: torch.Tensor | None) -> float:
    """``sum_l mean_t w_t ||D_l x_t||^2`` (weighted mean over tokens)."""
    tw = torch.ones(len(x), device=x.device) if token_weight is None else token_weight.float()
    tw = tw / tw.sum().clamp(min=1e-12)
    return sum((tw @ (x @ d.T).pow(2)).sum().item() for d in deltas)


@torch.no_grad()
def search_scale(weights: list[torch.Tensor], x: torch.Tensor, x_mean: torch.Tensor, bits: int, sym: bool,
                 group_size: int | None, n_grid: int = 20, token_weight: torch.Tensor | None = None):
    """Best AWQ input scale for linears ``weights`` (each ``[out_l, d]``) reading ``x`` ``[T, d]``.

    Returns ``(s [d] float32, info)`` with ``info = {"alpha", "loss", "losses"}``; ``losses[0]`` is
    the alpha = 0 (RTN) loss, and ``loss == min(losses)``.
    """
    x = x.float()
    ws = [w.float() for w in weights]
    losses, best = [], (float("inf"), None, None)
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.float().pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        deltas = [fake_quant(w * s, bits, sym, group_size) / s - w for w in ws]
        loss = _out_error(ws, deltas, x, token_weight)
        losses.append(loss)
        if loss < best[0]:
            best = (loss, alpha, s)
    return best[2], {"alpha": best[1], "loss": best[0], "losses": losses}


@torch.no_grad()
def fold_scales(feeder: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide the feeder's output channels (RMSNorm weight, or a linear's rows and bias) by ``s``
    and multiply the input columns of ``linears`` by ``s``, in place (FP function unchanged)."""
    s = s.to(feeder.weight.device)
    if isinstance(feeder, nn.Linear):
        feeder.weight.div_(s.view(-1, 1).to(feeder.weight.dtype))
        if feeder.bias is not None:
            feeder.bias.div_(s.to(feeder.bias.dtype))
    else:  # a norm with a per-channel weight
        feeder.weight.div_(s.to(feeder.weight.dtype))
    for lin in linears:
        lin.weight.mul_(s.view(1, -1).to(lin.weight.dtype))


def _group_errors(w: torch.Tensor, q: torch.Tensor, xg: torch.Tensor, tw: torch.Tensor) -> torch.Tensor:
    """Per ``[out, group]``: ``sum_t tw_t (sum_{j in group} (q - w)_j x_tj)^2`` with grouped
    ``w``/``q`` ``[out, G, gs]`` and ``xg`` ``[T, G, gs]``."""
    d = (q - w).transpose(0, 1)  # [G, out, gs]
    out = torch.bmm(d, xg.permute(1, 2, 0))  # [G, out, T]
    return (out.pow(2) @ tw).T  # [out, G]


@torch.no_grad()
def search_clip(W: torch.Tensor, x: torch.Tensor, bits: int, sym: bool, group_size: int | None,
                n_grid: int = 20, max_shrink: float = 0.5, token_weight: torch.Tensor | None = None,
                max_tokens: int = 512, oc_batch: int = 256):
    """Per-group clip ratios for ``W`` ``[out, d]`` reading ``x`` ``[T, d]`` (``max_tokens`` of them,
    evenly strided). Returns ``(ratios [out, n_groups, 1] for fake_quant's clip_ratio, info)`` with
    ``info = {"loss": chosen summed per-group error, "loss_noclip": the same at ratio 1}``."""
    stride = max(1, math.ceil(len(x) / max_tokens))
    x = x[::stride].float()
    tw = torch.ones(len(x), device=x.device) if token_weight is None else token_weight[::stride].float()
    tw = tw / tw.sum().clamp(min=1e-12)
    xg = group(x, group_size)
    wg_all = group(W, group_size)
    ratios_grid = torch.linspace(1.0, 1.0 - max_shrink, n_grid).tolist()
    best_r, best_e, noclip = [], [], []
    for o in range(0, W.shape[0], oc_batch):
        wg = wg_all[o:o + oc_batch]
        err_best = torch.full(wg.shape[:2], float("inf"), device=W.device)
        r_best = torch.ones(wg.shape[:2], device=W.device)
        for r in ratios_grid:  # fake_quant on grouped [out, G, gs] with group_size=None: per group
            err = _group_errors(wg, fake_quant(wg, bits, sym, None, r), xg, tw)
            if r == 1.0:
                noclip.append(err.sum())
            better = err < err_best
            err_best = torch.where(better, err, err_best)
            r_best = torch.where(better, r, r_best)
        best_r.append(r_best)
        best_e.append(err_best.sum())
    ratios = torch.cat(best_r).unsqueeze(-1)
    return ratios, {"loss": sum(best_e).item(), "loss_noclip": sum(noclip).item()}


def quantize_clipped(W: torch.Tensor, bits: int, sym: bool, group_size: int | None,
                     ratios: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quant`` with per-group clip ratios ``[out, n_groups, 1]`` (from ``search_clip``)."""
    if ratios is None:
        return fake_quant(W, bits, sym, group_size)
    g = group(W, group_size)
    return ungroup(fake_quant(g, bits, sym, None, ratios.unsqueeze(-1)), W.shape[-1]).to(W.dtype)
