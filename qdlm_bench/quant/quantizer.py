"""Uniform fake quantizers: the one primitive every method uses.

Everything quantizes along the LAST dimension, optionally in groups of ``group_size``: a weight
``[out, in]`` gets one scale per output channel (or per group of inputs), an activation
``[..., tokens, d]`` one per token. Math runs in float32; results come back in the input dtype.

Conventions (``q`` = integer code, ``x̂ = (q - zero) * scale``):

* symmetric: ``scale = max|x| / (2^(b-1) - 1)``, ``zero = 0``, ``q ∈ [-2^(b-1), 2^(b-1) - 1]``
  (the max maps to ``2^(b-1) - 1``; the extra negative code is only reached by clipped values);
* asymmetric: the range ``[min(x, 0), max(x, 0)]`` (so 0 is exact) maps onto ``[0, 2^b - 1]``,
  ``scale = (max - min) / (2^b - 1)``, ``zero = round(-min / scale)`` (an integer code);
* ``clip_ratio`` scales the range (min, max or max|x|) before the scale is computed;
* an all-zero row/group gets ``scale = 1`` so nothing divides by zero; it dequantizes to 0.

Within the (clipped) range the error of every element is at most ``scale / 2``.
"""

from __future__ import annotations

import torch


def qrange(bits: int, sym: bool) -> tuple[int, int]:
    """Smallest and largest integer code."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if sym else (0, 2**bits - 1)


def group(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[..., d] -> [..., ceil(d / group_size), group_size]`` in float32 (one group when None).

    When ``group_size`` does not divide ``d`` the last group is shorter (as in the reference
    GPTQ): it is zero-padded here, which changes neither range (both include 0); callers cut
    the padding off with ``ungroup``.
    """
    d = x.shape[-1]
    gs = d if group_size is None else group_size
    x = x.float()
    if d % gs:
        x = torch.nn.functional.pad(x, (0, gs - d % gs))
    return x.unflatten(-1, (x.shape[-1] // gs, gs))


def ungroup(g: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of ``group``: ``[..., n_groups, group_size] -> [..., d]``."""
    return g.flatten(-2)[..., :d]


def quant_params(x: torch.Tensor, bits: int, sym: bool, clip_ratio: float = 1.0):
    """``(scale, zero)`` over the last dim of ``x`` (kept as size 1), float32."""
    x = x.float()
    if sym:
        scale = x.abs().amax(-1, keepdim=True) * clip_ratio / qrange(bits, True)[1]
    else:
        lo = x.amin(-1, keepdim=True).clamp(max=0) * clip_ratio
        hi = x.amax(-1, keepdim=True).clamp(min=0) * clip_ratio
        scale = (hi - lo) / qrange(bits, False)[1]
    scale = torch.where(scale > 0, scale, 1.0)
    zero = torch.zeros_like(scale) if sym else torch.round(-lo / scale)
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool) -> torch.Tensor:
    """Integer codes (as float32 values) of ``x`` for the given broadcastable ``scale``/``zero``."""
    lo, hi = qrange(bits, sym)
    return torch.clamp(torch.round(x.float() / scale) + zero, lo, hi)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def fake_quant(x: torch.Tensor, bits: int, sym: bool, group_size: int | None = None,
               clip_ratio: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize ``x`` per row (or per group of the last dim); same shape and dtype."""
    g = group(x, group_size)
    scale, zero = quant_params(g, bits, sym, clip_ratio)
    return ungroup(dequantize(quantize(g, scale, zero, bits, sym), scale, zero), x.shape[-1]).to(x.dtype)


def int_codes(x: torch.Tensor, bits: int, sym: bool, group_size: int | None = None,
              clip_ratio: float = 1.0):
    """``(codes int32 shaped like x, scale, zero)``; scale/zero are ``[..., n_groups]`` float32."""
    g = group(x, group_size)
    scale, zero = quant_params(g, bits, sym, clip_ratio)
    codes = ungroup(quantize(g, scale, zero, bits, sym), x.shape[-1]).to(torch.int32)
    return codes, scale.squeeze(-1), zero.squeeze(-1)
