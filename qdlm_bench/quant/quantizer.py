"""Uniform fake quantizers: the one primitive every method uses.

Everything quantizes along the LAST dimension, optionally in groups of ``group_size``: a weight
``[out, in]`` gets one scale per output channel (or per group of inputs), an activation
``[..., tokens, d]`` one per token. Math runs in float32; results come back in the input dtype.

A *grid* is a named rule for ``(scale, zero)`` and the integer codes ``q`` (``x̂ = (q - zero) *
scale``; ``M`` = max|x|, ``r`` = ``clip_ratio``, which scales the range ends before the scale is
computed). Each method passes its reference's grid (``GRIDS``; methods/README.md says which):

* ``"absmax"`` (QuaRot ``fake_quant/quant_utils.py``, SmoothQuant ``smoothquant/fake_quant.py``;
  the default, and the activation/KV quantizers'): symmetric ``scale = r M / (2^(b-1) - 1)``,
  ``zero = 0``, ``q ∈ [-2^(b-1), 2^(b-1) - 1]`` (the max maps to ``2^(b-1) - 1``; the extra
  negative code is only reached by clipped values); asymmetric: the range
  ``r [min(x, 0), max(x, 0)]`` (so 0 is exact) onto ``[0, 2^b - 1]``,
  ``scale = (hi - lo) / (2^b - 1)``, ``zero = round(-lo / scale)`` (an integer code);
* ``"gptq"`` (IST-DASLab ``quant.py`` and AutoGPTQ ``auto_gptq/quantization/quantizer.py``,
  ``Quantizer.find_params``): symmetric over all ``2^b`` codes, ``scale = 2 r M / (2^b - 1)``,
  ``q ∈ [-2^(b-1), 2^(b-1) - 1]`` (the reference's codes ``[0, 2^b - 1]`` around the zero point
  ``2^(b-1)``); a row with no negative value keeps the range ``[0, r M]`` as the reference does
  (``scale = r M / (2^b - 1)``: its positive codes then reach only about M / 2); asymmetric as
  ``"absmax"``;
* ``"duquant"`` (DuQuant ``quantize/quantizer.py``, ``UniformAffineQuantizer``, OmniQuant's): the
  range ``r [min x, max x]``, 0 not included; symmetric ``scale = r M / (2^(b-1) - 1)``,
  ``q ∈ [1 - 2^(b-1), 2^(b-1)]`` (the reference's codes ``[0, 2^b - 1]`` around the zero point
  ``2^(b-1) - 1``: the extra code is positive); asymmetric ``scale = (hi - lo) / (2^b - 1)``,
  ``zero = round(-lo / scale)``; ``scale`` clamped to ``[1e-5, 1e4]`` and ``zero`` to ``±1e4``
  as the reference.

An all-zero row/group gets ``scale = 1`` under ``"absmax"`` and ``"gptq"`` (the references use
other placeholders; every one dequantizes it to 0). The references' floors for ranges below
1e-5 (QuaRot's and SmoothQuant's) are not reproduced. Within the (clipped) range the error of
every element is at most ``scale / 2``.
"""

from __future__ import annotations

import torch

from .spec import GRIDS


def _check(grid: str) -> None:
    if grid not in GRIDS:
        raise ValueError(f"unknown quantization grid {grid!r}; valid: {', '.join(GRIDS)}")


def qrange(bits: int, sym: bool, grid: str = "absmax") -> tuple[int, int]:
    """Smallest and largest integer code."""
    _check(grid)
    if not sym:
        return 0, 2**bits - 1
    half = 2 ** (bits - 1)
    return (1 - half, half) if grid == "duquant" else (-half, half - 1)


def group(x: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``[..., d] -> [..., ceil(d / group_size), group_size]`` in float32 (one group when None).

    When ``group_size`` does not divide ``d`` the last group is shorter (as in the reference
    GPTQ): it is zero-padded here (as DuQuant pads it), which changes no range of the grids
    whose range includes 0; callers cut the padding off with ``ungroup``.
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


def quant_params(x: torch.Tensor, bits: int, sym: bool, clip_ratio: float = 1.0, grid: str = "absmax"):
    """``(scale, zero)`` of ``grid`` over the last dim of ``x`` (kept as size 1), float32."""
    _check(grid)
    x = x.float()
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if grid != "duquant":
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    lo, hi = lo * clip_ratio, hi * clip_ratio
    if sym:
        m = torch.maximum(-lo, hi)  # max|x| (lo <= hi)
        if grid == "gptq":
            scale = (m - torch.where(lo < 0, -m, 0.0)) / (2**bits - 1)
        else:
            scale = m / (2 ** (bits - 1) - 1)
    else:
        scale = (hi - lo) / (2**bits - 1)
    scale = scale.clamp(1e-5, 1e4) if grid == "duquant" else torch.where(scale > 0, scale, 1.0)
    zero = torch.zeros_like(scale) if sym else torch.round((-lo / scale).clamp(-1e4, 1e4))
    return scale, zero


def quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, sym: bool,
             grid: str = "absmax") -> torch.Tensor:
    """Integer codes (as float32 values) of ``x`` for the given broadcastable ``scale``/``zero``."""
    lo, hi = qrange(bits, sym, grid)
    return torch.clamp(torch.round(x.float() / scale) + zero, lo, hi)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def fake_quant(x: torch.Tensor, bits: int, sym: bool, group_size: int | None = None,
               clip_ratio: float = 1.0, grid: str = "absmax") -> torch.Tensor:
    """Quantize-dequantize ``x`` on ``grid`` per row (or per group of the last dim); same shape and dtype.

    Bit for bit ``dequantize(quantize(g, scale, zero), scale, zero)`` (``fake_quant_reference``;
    tests/test_quant_speed.py checks it for every grid, sign mode, width, clip ratio and group
    size), with the same operations in the same order on one buffer, in place, instead of a
    new tensor for each; symmetric grids (``zero == 0``) add ``0.0`` as a scalar (which turns a
    rounded ``-0`` into ``+0`` as adding the zero tensor does) and skip subtracting it.
    """
    g = group(x, group_size)
    scale, zero = quant_params(g, bits, sym, clip_ratio, grid)
    lo, hi = qrange(bits, sym, grid)
    q = torch.div(g, scale)  # a new buffer (g may be x itself); everything after runs in place
    q.round_()
    if sym:
        q.add_(0.0).clamp_(lo, hi)
    else:
        q.add_(zero).clamp_(lo, hi).sub_(zero)
    return ungroup(q.mul_(scale), x.shape[-1]).to(x.dtype)


def fake_quant_reference(x: torch.Tensor, bits: int, sym: bool, group_size: int | None = None,
                         clip_ratio: float = 1.0, grid: str = "absmax") -> torch.Tensor:
    """``fake_quant`` spelled as its definition (``quantize`` then ``dequantize``), for the tests."""
    g = group(x, group_size)
    scale, zero = quant_params(g, bits, sym, clip_ratio, grid)
    return ungroup(dequantize(quantize(g, scale, zero, bits, sym, grid), scale, zero), x.shape[-1]).to(x.dtype)


def int_codes(x: torch.Tensor, bits: int, sym: bool, group_size: int | None = None,
              clip_ratio: float = 1.0, grid: str = "absmax"):
    """``(codes int32 shaped like x, scale, zero)``; scale/zero are ``[..., n_groups]`` float32."""
    g = group(x, group_size)
    scale, zero = quant_params(g, bits, sym, clip_ratio, grid)
    codes = ungroup(quantize(g, scale, zero, bits, sym, grid), x.shape[-1]).to(torch.int32)
    return codes, scale.squeeze(-1), zero.squeeze(-1)
