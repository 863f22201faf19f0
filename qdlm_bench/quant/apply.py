"""Which layers get quantized, and the model-wide RTN / activation-wrapping passes."""

from __future__ import annotations

from collections.abc import Iterable
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


def quantize_weights_rtn(model: nn.Module, spec: QuantSpec, exclude: Iterable[str] = (),
                         include_lm_head: bool = False) -> int:
    """Round-to-nearest fake quantization of the selected weights, in place; returns the count."""
    layers = linear_layers(model, exclude, include_lm_head)
    with torch.no_grad():
        for layer in layers.values():
            layer.weight.copy_(fake_quant(layer.weight, spec.w_bits, spec.w_sym, spec.group_size))
    return len(layers)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def wrap_activations(model: nn.Module, spec: QuantSpec, exclude: Iterable[str] = (),
                     include_lm_head: bool = False) -> int:
    """Replace each selected linear by a ``QuantLinear`` for ``spec`` (re-wrapping keeps the
    existing weights and input transform) whose input is quantized per token when
    ``spec.quantizes_input(name)`` (``a_bits < 16`` and named in ``spec.act_layers``) and, when
    ``spec.kv_bits < 16``, install per-token per-head asymmetric quantizers on K (after RoPE)
    and V in every block. Returns the number of layers wrapped."""
    layers = linear_layers(model, exclude, include_lm_head)
    for name, layer in layers.items():
        transform = layer.input_transform if isinstance(layer, QuantLinear) else None
        _set_module(model, name, QuantLinear(layer, spec, transform, spec.quantizes_input(name)))
    if spec.kv_bits < 16:
        for block in model.blocks:
            block.k_quant = ActQuantizer(spec.kv_bits)
            block.v_quant = ActQuantizer(spec.kv_bits)
    return len(layers)


def quantized_layer_names(model: nn.Module) -> list[str]:
    """Names of every ``QuantLinear`` in ``model`` (for coverage checks)."""
    return [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
