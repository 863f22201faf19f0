"""The quantized model's structure as plain JSON, and its re-application on an FP skeleton.

A method changes the module tree in a few known ways: linears become ``QuantLinear`` (with an
``ActQuantizer`` and an optional online ``input_transform``: an ``OnlineHadamard`` or DuQuant's
``BlockRotation``), blocks get K/V quantizers (``ActQuantizer``, IA-AQ's ``head_range`` buffer)
and a Q/K rotation (``OnlineHadamard``), and the LM head may be untied from the embedding.
``describe`` lists every such module by path with its settings (its tensors go to the tensor
file with the rest of the state dict); ``apply`` rebuilds them on a freshly built model. A module
of any other type is refused (``ArtifactError``): an artifact never drops what it cannot describe.
No code is pickled: settings are JSON, tensors safetensors.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qdlm_bench.models.transformer import Block, DiffusionLM, RMSNorm
from qdlm_bench.quant.hadamard import OnlineHadamard
from qdlm_bench.quant.linear import ActQuantizer, QuantLinear
from qdlm_bench.quant.rotation import BlockRotation
from qdlm_bench.quant.spec import QuantSpec

from . import ArtifactError

PLAIN = (DiffusionLM, nn.ModuleList, Block, RMSNorm, nn.Linear, nn.Embedding, nn.Identity)
DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float32, torch.bfloat16, torch.float16, torch.float64)}


def spec_dict(spec: QuantSpec) -> dict:
    return {f.name: list(v) if isinstance(v, tuple) else v
            for f in dataclasses.fields(spec) for v in [getattr(spec, f.name)]}


def _act(m: ActQuantizer) -> dict:
    return {"type": "ActQuantizer", "bits": m.bits, "sym": m.sym, "clip_ratio": m.clip_ratio, "grid": m.grid,
            "head_range": m.head_range is not None}


def describe(model: DiffusionLM) -> dict:
    """``{"tied": ..., "modules": {path: settings}}`` for every module a method added or replaced; a
    module installed at several paths is described at its first, and ``{"type": "alias", "of": first}``
    at the others."""
    modules, seen, aliases = {}, {}, ()
    for name, m in model.named_modules(remove_duplicate=False):
        if aliases and name.startswith(aliases):
            continue  # inside a module described at its first path
        if id(m) in seen and not isinstance(m, PLAIN):
            modules[name] = {"type": "alias", "of": seen[id(m)]}  # one module at two paths (DuQuant's q/k/v)
            aliases += (f"{name}.",)
            continue
        seen.setdefault(id(m), name)
        if isinstance(m, QuantLinear):
            modules[name] = {"type": "QuantLinear", "in_features": m.in_features, "out_features": m.out_features,
                             "bias": m.bias is not None, "spec": spec_dict(m.spec)}
        elif isinstance(m, ActQuantizer):
            if not isinstance(m.clip_ratio, (int, float)):
                raise ArtifactError(f"{name}: a clip ratio of type {type(m.clip_ratio).__name__} cannot be saved")
            modules[name] = _act(m)
        elif isinstance(m, OnlineHadamard):
            factor = next(m.buffers(), None)
            modules[name] = {"type": "OnlineHadamard", "n": m.n, "inner": m.inner,
                             "dtype": None if factor is None else str(factor.dtype).removeprefix("torch.")}
        elif isinstance(m, BlockRotation):
            modules[name] = {"type": "BlockRotation"}
        elif not isinstance(m, PLAIN):
            raise ArtifactError(f"module {name or '<model>'} is a {type(m).__module__}.{type(m).__name__}, which an "
                                "artifact cannot describe (known: QuantLinear, ActQuantizer, OnlineHadamard, "
                                "BlockRotation and the model's own modules)")
    return {"tied": model.lm_head.weight is model.embed.weight, "modules": modules}


def is_plain(structure: dict) -> bool:
    """Weight-only and transform-free: every added module is a QuantLinear whose input stays in full
    precision, with no online transform, K/V quantizer or Q/K rotation (what compressed-tensors'
    weight-only schemes describe)."""
    for name, m in structure["modules"].items():
        if m["type"] == "QuantLinear":
            continue
        if m["type"] == "ActQuantizer" and name.endswith(".act_quant") and m["bits"] >= 16 and not m["head_range"]:
            continue
        return False
    return True


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def apply(model: DiffusionLM, structure: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Rebuild ``structure`` on ``model`` (an FP model of the same config, on its device), taking the
    buffers the new modules hold (``head_range``, ``r1``/``perm``/``r2``) from ``tensors``."""
    device = model.device
    if not structure["tied"] and model.lm_head.weight is model.embed.weight:
        model.lm_head.weight = nn.Parameter(torch.empty_like(model.embed.weight))
    for path, m in structure["modules"].items():  # parents come before their children
        kind = m["type"]
        if kind == "QuantLinear":
            linear = model.get_submodule(path)
            if (linear.in_features, linear.out_features, linear.bias is not None) != (
                    m["in_features"], m["out_features"], m["bias"]):
                raise ArtifactError(f"{path}: the artifact's linear does not match the model's")
            spec = QuantSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in m["spec"].items()})
            _set(model, path, QuantLinear(linear, spec))
        elif kind == "ActQuantizer":
            head_range = tensors[f"{path}.head_range"].to(device) if m["head_range"] else None
            _set(model, path, ActQuantizer(m["bits"], m["sym"], m["clip_ratio"], head_range, m["grid"]).to(device))
        elif kind == "OnlineHadamard":
            _set(model, path, OnlineHadamard(m["n"], m["inner"], device, DTYPES.get(m["dtype"])))
        elif kind == "alias":
            _set(model, path, model.get_submodule(m["of"]))
        elif kind == "BlockRotation":
            _set(model, path, BlockRotation(*(tensors[f"{path}.{b}"].to(device) for b in ("r1", "perm", "r2"))))
        else:
            raise ArtifactError(f"{path}: unknown module type {kind!r} in the artifact")
