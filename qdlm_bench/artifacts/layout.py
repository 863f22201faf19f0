"""Tensor layouts of an artifact: compressed-tensors ``pack-quantized`` where it fits, ours elsewhere.

Both keep every tensor of the quantized model's state dict (the artifact is self-contained: no FP
checkpoint is read to load it); the quantized linears' weights are stored as integer codes:

* ``compressed-tensors`` (llm-compressor, vLLM, transformers): for weight-only, transform-free
  models whose every quantized weight has an exact integer form and whose groups divide the
  input width. Tensors under the family's Hugging Face names (``models.layout.key_map``):
  ``<linear>.weight_packed`` int32 (``b`` bits per code, 8 int4 or 4 int8 per word),
  ``.weight_scale`` float32 ``[out, groups]``, ``.weight_zero_point`` (asymmetric only, int32
  packed along ``out``) and ``.weight_shape``; ``config.json`` is the family's HF config with a
  ``quantization_config`` (``quant_method: compressed-tensors``, ``format: pack-quantized``).
* ``qdlm-bench`` (everything else: activation or K/V quantization, online Hadamards, DuQuant's
  rotations, IA-AQ ranges, an untied head, groups that do not divide a width): tensors under
  this package's module paths; ``<linear>.weight_packed`` uint8 (two codes per byte up to 4
  bits, one per byte above), ``.weight_scale`` float32 ``[out, groups]``,
  ``.weight_zero_point`` (omitted where every group's zero is ``2^(b-1)``: the signed codes are
  symmetric), the rest of the state dict (online rotations' buffers, folded norms, rotated
  embeddings) as is.

A quantized layer without an exact integer form (``codes.recover`` found none: e.g. GPTQ with
``act_order`` and no ``static_groups``) is stored unpacked in the model's dtype in either layout,
and the manifest says so with the reason (``layers[name].storage == "dense"``).
"""

from __future__ import annotations

from fnmatch import fnmatch
from pathlib import Path

import torch
from torch import nn

from qdlm_bench.models.config import DLLMConfig
from qdlm_bench.models.layout import key_map, shapes
from qdlm_bench.quant.linear import QuantLinear
from qdlm_bench.quant.spec import QuantSpec

from . import codes as C
from .structure import DTYPES, is_plain

CT_FORMAT, OWN_FORMAT = "compressed-tensors", "qdlm-bench"
PACKED, DENSE = "packed", "dense"
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def linear_names(model) -> list[str]:
    """Every linear of the blocks (``nn.Linear`` or ``QuantLinear``), then the LM head."""
    return [*(f"blocks.{n}" for n, m in model.blocks.named_modules() if isinstance(m, (nn.Linear, QuantLinear))),
            "lm_head"]


def target_names(model, spec: QuantSpec) -> list[str]:
    """The linears ``spec`` quantizes (``quant.targets`` without its side effect of untying a head)."""
    return [n for n in linear_names(model) if (n != "lm_head" or spec.lm_head)
            and not any(fnmatch(n, p) for p in spec.exclude)]


def _zero_dtype(zero: torch.Tensor) -> torch.dtype:
    lo, hi = int(zero.min()), int(zero.max())
    return next(t for t in (torch.uint8, torch.int16, torch.int32) if torch.iinfo(t).min <= lo and hi <= torch.iinfo(t).max)


def _ct_fits(model, structure: dict, found: dict, state: dict) -> str | None:
    """Why the compressed-tensors layout does not fit (None: it does)."""
    if not is_plain(structure):
        return "activation/KV quantizers or online transforms (not a weight-only compressed-tensors scheme)"
    if not found or len({(c.bits, c.group_size) for c in found.values()}) != 1:
        return "no packed layer" if not found else "layers of different bits or groups"
    for name, c in found.items():
        if c.group_size is not None and c.codes.shape[1] % c.group_size:
            return f"{name}: group size {c.group_size} does not divide its width {c.codes.shape[1]}"
        if int(c.zero.min()) < 0 or int(c.zero.max()) > 2**c.bits - 1:
            return f"{name}: a zero point outside the {c.bits}-bit range"
    if set(state) != set(key_map(model.config)):
        return "tensors outside the family's checkpoint layout (e.g. an untied head of a tied model)"
    return None


def ct_config(found: dict, ignore: list[str]) -> dict:
    """The ``quantization_config`` of a compressed-tensors pack-quantized checkpoint."""
    c = next(iter(found.values()))
    symmetric = all(x.symmetric for x in found.values())
    weights = {"num_bits": c.bits, "type": "int", "symmetric": symmetric,
               "strategy": "channel" if c.group_size is None else "group", "group_size": c.group_size,
               "dynamic": False, "scale_dtype": "torch.float32", **({} if symmetric else {"zp_dtype": "torch.int8"})}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None,
                                          "output_activations": None, "format": "pack-quantized"}},
            "ignore": sorted(ignore), "kv_cache_scheme": None, "global_compression_ratio": None}


def dedupe(state: dict) -> tuple[dict, dict]:
    """``(state, shared)``: each tensor once, under its first key; ``shared[key] = first key`` for the
    others (a tied head, a module installed at several paths)."""
    kept, shared, first = {}, {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape), t.stride())
        if ident in first and t.numel():
            shared[key] = first[ident]
        else:
            first.setdefault(ident, key)
            kept[key] = t
    return kept, shared


def build(model, spec: QuantSpec, structure: dict):
    """``(format, tensors on the CPU, layers, shared keys, quantization_config or None, why not
    compressed-tensors)`` of a quantized model: every target weight recovered as codes (or kept dense,
    with the reason)."""
    state, shared = dedupe(model.state_dict())
    found, layers = {}, {}
    for name in target_names(model, spec):
        w = state[f"{name}.weight"]
        c = C.recover(w, spec.w_bits, spec.group_size)
        if c is None:
            layers[name] = {"storage": DENSE, "shape": list(w.shape),
                            "reason": f"no exact {spec.w_bits}-bit form on contiguous groups of "
                                      f"{spec.group_size or 'a row'} (kept in {str(w.dtype).removeprefix('torch.')})"}
        else:
            found[name] = c
    why_not = _ct_fits(model, structure, found, state)
    fmt = CT_FORMAT if why_not is None else OWN_FORMAT
    names = key_map(model.config) if fmt == CT_FORMAT else {k: k for k in state}
    tensors, config = {}, None
    for key, t in state.items():
        if key.endswith(".weight") and key[:-len(".weight")] in found:
            continue
        tensors[names[key]] = t.detach().contiguous().cpu()
    for name, c in found.items():
        out, cols = c.codes.shape
        prefix = names[f"{name}.weight"][:-len(".weight")]
        symmetric = c.symmetric if fmt == OWN_FORMAT else all(x.symmetric for x in found.values())
        layers[name] = {"storage": PACKED, "shape": [out, cols], "bits": c.bits, "group_size": c.group_size,
                        "symmetric": symmetric}
        tensors[f"{prefix}.weight_scale"] = c.scale.contiguous().cpu()
        if fmt == CT_FORMAT:
            tensors[f"{prefix}.weight_packed"] = C.pack_int32_rows(c.codes, c.bits).cpu()
            tensors[f"{prefix}.weight_shape"] = torch.tensor([out, cols])
            if not symmetric:
                tensors[f"{prefix}.weight_zero_point"] = C.pack_int32(c.zero.T, c.bits).T.contiguous().cpu()
        else:
            tensors[f"{prefix}.weight_packed"] = C.pack_bytes(c.codes, c.bits).cpu()
            if not symmetric:
                layers[name]["zero_dtype"] = str(_zero_dtype(c.zero)).removeprefix("torch.")
                tensors[f"{prefix}.weight_zero_point"] = c.zero.to(_zero_dtype(c.zero)).contiguous().cpu()
    if fmt == CT_FORMAT:
        ignore = [names[f"{n}.weight"][:-len(".weight")] for n in linear_names(model)
                  if n not in found and f"{n}.weight" in names]
        config = ct_config(found, ignore)
    return fmt, tensors, layers, shared, config, why_not


def unpack(tensors: dict, fmt: str, cfg: DLLMConfig, layers: dict, dtype: torch.dtype,
           shared: dict | None = None) -> dict[str, torch.Tensor]:
    """The state dict (our names) of an artifact's tensors: packed layers dequantized exactly."""
    names = key_map(cfg) if fmt == CT_FORMAT else None
    ours = {v: k for k, v in names.items()} if names else None
    prefixes = {name: (names[f"{name}.weight"][:-len(".weight")] if names else name) for name in layers}
    packed = {f"{prefixes[n]}.{s}" for n, layer in layers.items() if layer["storage"] == PACKED for s in SUFFIXES}
    state = {(ours[k] if ours else k): t for k, t in tensors.items() if k not in packed}
    for name, layer in layers.items():
        if layer["storage"] != PACKED:
            continue
        p, bits, (out, cols) = prefixes[name], layer["bits"], layer["shape"]
        scale = tensors[f"{p}.weight_scale"]
        if fmt == CT_FORMAT:
            codes = C.unpack_int32_rows(tensors[f"{p}.weight_packed"], bits, cols)
            zero = (C.unpack_int32(tensors[f"{p}.weight_zero_point"].T.contiguous(), bits, out).T
                    if not layer["symmetric"] else None)
        else:
            codes = C.unpack_bytes(tensors[f"{p}.weight_packed"], bits, cols)
            zero = tensors[f"{p}.weight_zero_point"] if not layer["symmetric"] else None
        if zero is None:
            zero = torch.full(scale.shape, 2 ** (bits - 1), dtype=torch.int32, device=scale.device)
        state[f"{name}.weight"] = C.dequantize(codes, scale, zero.to(torch.int32), layer["group_size"], dtype)
    for key, first in (shared or {}).items():
        state[key] = state[first]
    return state


def planned_bytes(cfg: DLLMConfig, spec: QuantSpec, dtype: str, fmt: str, symmetric: bool | None = None) -> dict:
    """Bytes of the tensors an artifact of ``cfg`` holds when every target linear is packed (no
    transform buffers): computed from the layout alone, no weights needed. ``symmetric`` defaults to
    ``spec.w_sym`` (zero points stored otherwise). Returns ``{"tensors": total, "packed": ...,
    "scales": ..., "zero_points": ..., "dense": ..., "fp": the FP checkpoint's tensors}``."""
    size = torch.empty((), dtype=DTYPES[dtype]).element_size()
    symmetric = spec.w_sym if symmetric is None else symmetric
    b = spec.w_bits
    fp = sum(_numel(s) for s in shapes(cfg).values()) * size
    targets = [k[:-len(".weight")] for k in shapes(cfg) if k.startswith("blocks.") and k.endswith("_proj.weight")]
    if spec.lm_head:
        targets.append("lm_head")
    targets = [n for n in targets if not any(fnmatch(n, p) for p in spec.exclude)]
    out = {"packed": 0, "scales": 0, "zero_points": 0, "dense": 0, "shape": 0}
    tensor_shapes = dict(shapes(cfg))
    if spec.lm_head and "lm_head.weight" not in tensor_shapes:
        tensor_shapes["lm_head.weight"] = tensor_shapes["embed.weight"]
    for name in targets:
        rows, cols = tensor_shapes.pop(f"{name}.weight")
        groups = 1 if spec.group_size is None else -(-cols // spec.group_size)
        if fmt == CT_FORMAT:
            out["packed"] += rows * -(-cols * b // 32) * 4
            out["zero_points"] += 0 if symmetric else -(-rows * b // 32) * groups * 4
            out["shape"] += 2 * 8
        else:
            out["packed"] += rows * (-(-cols // 2) if b <= 4 else cols)
            out["zero_points"] += 0 if symmetric else rows * groups  # uint8 zeros (in range)
        out["scales"] += rows * groups * 4
    out["dense"] = sum(_numel(s) for s in tensor_shapes.values()) * size
    out["tensors"] = sum(out.values())
    out["fp"] = fp
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_bytes(path: Path) -> int:
    """Bytes of the tensors in a safetensors file (its header left out)."""
    from safetensors import safe_open

    total = 0
    with safe_open(path, "pt") as f:
        for k in f.keys():
            sl = f.get_slice(k)
            total += _numel(sl.get_shape()) * torch.empty((), dtype=_SAFE_DTYPES[sl.get_dtype()]).element_size()
    return total


_SAFE_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}
