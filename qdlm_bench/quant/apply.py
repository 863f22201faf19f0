"""Which layers get quantized (a spec's targets), the RTN pass, and the one place that installs the
activation and KV quantizers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatch

import torch
from torch import nn

from .linear import ActQuantizer, QuantLinear
from .quantizer import fake_quant
from .spec import QuantSpec


def linear_layers(model: nn.Module, exclude: Iterable[str] = (), include_lm_head: bool = False) -> dict[str, nn.Module]:
    """Every linear (``nn.Linear`` or ``QuantLinear``) inside ``model.blocks``, by full name.

    Names look like ``"blocks.3.q_proj"``; those matching any fnmatch pattern in ``exclude`` are
    left out. Embeddings and ``lm_head`` are left out unless ``include_lm_head``; a head tied to
    the embedding is then untied (given its own copy) so quantizing it leaves the embedding alone.
    """
    exclude = tuple(exclude)
    layers = {f"blocks.{name}": m for name, m in model.blocks.named_modules()
              if isinstance(m, (nn.Linear, QuantLinear))}
    if include_lm_head:
        if model.lm_head.weight is model.embed.weight:
            model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        layers["lm_head"] = model.lm_head
    return {n: m for n, m in layers.items() if not any(fnmatch(n, p) for p in exclude)}


def targets(model: nn.Module, spec: QuantSpec) -> dict[str, nn.Module]:
    """The linears ``spec`` quantizes: every block linear not in ``spec.exclude``, plus the LM head
    when ``spec.lm_head``."""
    return linear_layers(model, spec.exclude, spec.lm_head)


def act_selection(model: nn.Module, spec: QuantSpec):
    """``(selected, wanted)`` for block ``i``: ``selected(i, name)`` - the linear is quantized;
    ``wanted(i, name)`` - its input is one of ``spec.act_layers`` (the inputs an activation-outlier
    method transforms; quantized only when ``a < 16``, the transform applies at weight-only bits too)."""
    names = set(targets(model, spec))

    def selected(i, name):
        return f"blocks.{i}.{name}" in names

    return selected, lambda i, name: selected(i, name) and name in spec.act_layers


@torch.no_grad()
def quantize_weights_rtn(model: nn.Module, spec: QuantSpec, grid: str) -> int:
    """Round-to-nearest fake quantization of the spec's target weights on ``grid``, in place;
    returns the count."""
    layers = targets(model, spec)
    for layer in layers.values():
        layer.weight.copy_(fake_quant(layer.weight, spec.w_bits, spec.w_sym, spec.group_size, grid=grid))
    return len(layers)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def install_kv_quantizers(block: nn.Module, spec: QuantSpec, v_range: torch.Tensor | None = None) -> None:
    """Per-token per-head asymmetric quantizers of K (after RoPE) and V on ``spec.a_grid`` in ``block``
    when ``spec.kv_bits < 16``; ``v_range`` ``[H_kv]``: a static per-head scale of V's range (IA-AQ)."""
    if spec.kv_bits < 16:
        device = block.attn_norm.weight.device
        block.k_quant = ActQuantizer(spec.kv_bits, grid=spec.a_grid)
        block.v_quant = ActQuantizer(spec.kv_bits, head_range=v_range, grid=spec.a_grid).to(device)


def install_quantizers(model: nn.Module, spec: QuantSpec, v_range: Sequence[torch.Tensor] | None = None) -> int:
    """The one place that installs activation and KV quantizers: every target linear becomes a
    ``QuantLinear`` for ``spec`` (re-wrapping keeps its weights and input transform) whose input is
    quantized per token when ``spec.quantizes_input(name)``, and every block gets its K/V quantizers
    (``install_kv_quantizers``; ``v_range``: one per block, or None). Idempotent. Returns the number
    of layers wrapped."""
    layers = targets(model, spec)
    for name, layer in layers.items():
        transform = layer.input_transform if isinstance(layer, QuantLinear) else None
        _set_module(model, name, QuantLinear(layer, spec, transform, spec.quantizes_input(name)))
    for i, block in enumerate(model.blocks):
        install_kv_quantizers(block, spec, None if v_range is None else v_range[i])
    return len(layers)


def fold_input_transforms(model: nn.Module) -> int:
    """``QuantLinear.fold_input_transform`` on every layer (fake-quantized evaluation at weight-only
    bits: the same function, without the online transforms' cost). Returns how many folded."""
    return sum(m.fold_input_transform() for m in model.modules() if isinstance(m, QuantLinear))


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Names of every ``QuantLinear`` in ``model`` (for coverage checks)."""
    return [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
