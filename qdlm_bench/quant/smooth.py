"""Smoothing (SmoothQuant, Xiao et al., 2023) as reusable primitives: per-channel max|x|, scales, folding.

For linears sharing an input ``X`` (a ``walk.SUBSETS`` subset), ``s_j = max|X_j|^alpha /
max|W_j|^(1 - alpha)`` (``max|W_j|`` over the rows of every linear of the subset) moves the
quantization difficulty of outlier channels from the activations to the weights: the feeder
(RMSNorm, or v_proj / up_proj) is divided by ``s`` and the subset's weight columns multiplied by
it (``awq.fold_scales``), so the FP function is unchanged and the subset reads ``X / s``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from .apply import linear_layers
from .awq import fold_scales
from .spec import QuantSpec
from .walk import FEEDERS, SUBSETS

EPS = 1e-5


class ChannelMax:
    """A ``walk.collect`` statistic: per-channel max|x| over every token with a positive weight
    (padding excluded), float32."""

    def __init__(self, dim: int, device=None):
        self.max = torch.zeros(dim, device=device)

    def add(self, x: torch.Tensor, weights: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float().abs()
        if weights is not None:
            x = x * (weights.reshape(-1, 1) > 0)
        self.max = torch.maximum(self.max, x.amax(0))


def act_selection(model: nn.Module, spec: QuantSpec, exclude: Iterable[str], method: str):
    """``(selected, wanted)`` for block ``i``: ``selected(i, name)`` - the linear is quantized;
    ``wanted(i, name)`` - its input is quantized too. Raises when no activation is quantized."""
    if spec.a_bits == 16:
        raise ValueError(f"method {method!r} targets activation outliers and needs quantized activations "
                         f"(e.g. w8a8, w4a4), got {spec.name}; use rtn/gptq/awq for weight-only runs")
    names = set(linear_layers(model, exclude))

    def selected(i, name):
        return f"blocks.{i}.{name}" in names

    return selected, lambda i, name: selected(i, name) and spec.quantizes_input(name)


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
