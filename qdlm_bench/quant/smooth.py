"""Per-channel scales folded into the op that feeds a subset of linears: ``fold_scales`` (AWQ,
smoothing) and the smoothing scales of SmoothQuant (Xiao et al., 2023), which SmoothQuant and
DuQuant share.

For linears sharing an input ``X`` (a ``walk.SUBSETS`` subset), ``s_j = max|X_j|^alpha /
max|W_j|^(1 - alpha)`` (``max|W_j|`` over the rows of every linear of the subset) moves the
quantization difficulty of outlier channels from the activations to the weights: the feeder
(RMSNorm, or v_proj / up_proj) is divided by ``s`` and the subset's weight columns multiplied by
it (``fold_scales``), so the FP function is unchanged and the subset reads ``X / s``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from .walk import FEEDERS, SUBSETS

EPS = 1e-5


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


def smooth_scales(x_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s = max|X|^alpha / max|W|^(1 - alpha)`` per input channel, float32, both maxima and ``s``
    clamped to at least 1e-5 (dead channels stay finite)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"smoothing alpha must be in [0, 1], got {alpha}")
    w_max = torch.cat([w.detach().abs().float() for w in weights]).amax(0)
    s = x_max.float().clamp(min=EPS).pow(alpha) / w_max.to(x_max.device).clamp(min=EPS).pow(1 - alpha)
    return s.clamp(min=EPS)


def smoothable(block: nn.Module) -> list[tuple[list[str], str]]:
    """``(linear names, feeder)`` of every subset whose feeder can absorb a per-channel scale: all
    but v_proj -> o_proj under GQA (v_proj has fewer output rows than o_proj has input columns)."""
    return [(names, feeder) for names, feeder in zip(SUBSETS, FEEDERS)
            if getattr(block, feeder).weight.shape[0] == getattr(block, names[0]).in_features]


@torch.no_grad()
def smooth_block(block: nn.Module, x_max: Mapping[str, torch.Tensor], alpha: float,
                 wanted: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    """Fold smoothing scales into every ``smoothable`` subset of ``block`` holding a ``wanted``
    linear; ``x_max[name]``: max|x| of that linear's input. All scales are computed on the
    unmodified weights, then folded. Returns ``{name: s}`` for every linear of a smoothed subset
    (its input is now ``x / s``)."""
    found = []
    for names, feeder in smoothable(block):
        if any(wanted(n) for n in names):
            lins = [getattr(block, n) for n in names]
            found.append((names, getattr(block, feeder), lins,
                          smooth_scales(x_max[names[0]], [lin.weight for lin in lins], alpha)))
    for _, fd, lins, s in found:
        fold_scales(fd, lins, s)
    return {n: s for names, *_, s in found for n in names}
