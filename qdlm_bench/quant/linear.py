"""QuantLinear: a linear whose input is fake-quantized on the fly (weights are quantized by methods)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quantizer import fake_quant
from .spec import QuantSpec


class ActQuantizer(nn.Module):
    """Per-token dynamic fake quantizer over the last dim, on ``grid`` (``quantizer.GRIDS``); the
    identity at 16 bits.

    ``head_range`` ``[H]`` (K/V ``[B, H, L, hd]`` only): a static per-head scale of each token's
    range, used instead of ``clip_ratio`` (DLLMQuant's IA-AQ alphas)."""

    def __init__(self, bits: int = 16, sym: bool = False, clip_ratio: float = 1.0,
                 head_range: torch.Tensor | None = None, grid: str = "absmax"):
        super().__init__()
        self.bits, self.sym, self.clip_ratio, self.grid = bits, sym, clip_ratio, grid
        self.register_buffer("head_range", None if head_range is None else head_range.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits >= 16:
            return x
        ratio = self.clip_ratio if self.head_range is None else self.head_range.view(-1, 1, 1, 1)
        return fake_quant(x, self.bits, self.sym, None, ratio, self.grid)

    def extra_repr(self) -> str:
        heads = "" if self.head_range is None else f", heads={len(self.head_range)}"
        return f"bits={self.bits}, sym={self.sym}, clip_ratio={self.clip_ratio}, grid={self.grid}{heads}"


class QuantLinear(nn.Module):
    """``F.linear(act_quant(input_transform(x)), weight, bias)``.

    Shares the wrapped ``nn.Linear``'s weight and bias parameters (no copy), so state-dict keys
    stay ``<name>.weight`` / ``<name>.bias``. ``spec`` records how the layer was quantized;
    ``input_transform`` is a slot for an online transform (e.g. a Hadamard rotation);
    ``quantize_input=False`` keeps the input in full precision whatever ``spec.a_bits``.
    """

    def __init__(self, linear: nn.Linear, spec: QuantSpec, input_transform: nn.Module | None = None,
                 quantize_input: bool = True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.spec = spec
        self.act_quant = ActQuantizer(spec.a_bits if quantize_input else 16, spec.a_sym, spec.a_clip_ratio,
                                      grid=spec.a_grid)
        self.input_transform = input_transform

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        return F.linear(self.act_quant(x), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.name}"
