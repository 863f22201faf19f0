"""QuantLinear: a linear whose input is fake-quantized on the fly (weights are quantized by methods)."""

from __future__ import annotations

import threading
import weakref

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
        return F.linear(self.prepared_input(x), self.weight, self.bias)

    def prepared_input(self, x: torch.Tensor) -> torch.Tensor:
        """``act_quant(input_transform(x))``, computed once for linears that read one input.

        q/k/v_proj read one tensor, and gate/up_proj another, through the same transform (none,
        or DuQuant's shared ``BlockRotation``) and equal quantizer settings: the last result in
        this thread is reused when ``x`` is the very tensor it was computed from (same object, and
        same version counter where the tensor has one), with the same transform module and the
        same quantizer settings, so the values are those a fresh computation gives. Not reused
        when a hook watches the transform or the quantizer (``outliers`` hooks each linear's
        ``act_quant``; ``faults`` every module) or under ``torch.compile``. The entry holds only
        a weak reference to ``x`` and is dropped with it."""
        transform, aq = self.input_transform, self.act_quant
        if transform is None and aq.bits >= 16:
            return x
        key = (transform, aq.bits, aq.sym, aq.clip_ratio, aq.grid)
        shared = (type(aq) is ActQuantizer and aq.head_range is None and not _hooked(aq) and not _hooked(transform)
                  and not torch.compiler.is_compiling())
        if shared:
            hit = _LAST.get(x, key)
            if hit is not None:
                return hit
        out = aq(x if transform is None else transform(x))
        if shared:
            _LAST.put(x, key, out)
        return out

    @torch.no_grad()
    def fold_input_transform(self) -> bool:
        """Fold the online input transform ``M`` (orthogonal: it has ``inverse``, ``x -> x M^T``) into
        the weight when the input is not quantized: ``(x M) W^T = x (W M^T)^T``, so the forward
        skips the transform. Float32 weights only, where the folded weight rounds at 1e-7 (in
        bf16 it would add a rounding of 4e-3 to every weight). Returns whether it folded."""
        transform = self.input_transform
        if (transform is None or self.act_quant.bits < 16 or not hasattr(transform, "inverse")
                or self.weight.dtype != torch.float32):
            return False
        self.weight.copy_(transform.inverse(self.weight))
        self.input_transform = None
        return True

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec.name}"


def _hooked(module: nn.Module | None) -> bool:
    """Whether a forward hook would see ``module`` run (its own hooks, or global ones)."""
    from torch.nn.modules import module as m
    return (module is not None and bool(module._forward_pre_hooks or module._forward_hooks)) or bool(
        m._global_forward_pre_hooks or m._global_forward_hooks)


def _version(x: torch.Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:  # an inference tensor has no version counter (nothing here writes to one in place)
        return None


class _LastInput(threading.local):
    """One thread's last prepared input of a ``QuantLinear``: a weak reference to the input (the
    entry dies with it), its version, the key (transform, quantizer settings) and the result."""

    ref = version = key = out = None

    def get(self, x: torch.Tensor, key: tuple) -> torch.Tensor | None:
        if self.ref is not None and self.ref() is x and self.key == key and self.version == _version(x):
            return self.out
        return None

    def put(self, x: torch.Tensor, key: tuple, out: torch.Tensor) -> None:
        self.clear()
        self.ref, self.version, self.key, self.out = weakref.ref(x, self._drop), _version(x), key, out

    def _drop(self, ref) -> None:
        if self.ref is ref:
            self.clear()

    def clear(self) -> None:
        self.ref = self.version = self.key = self.out = None


_LAST = _LastInput()
