"""Real low-bit inference (``runtime=real``): quantized linears executed by low-bit kernels.

One job: real low-bit linears and the conversion of a fake-quantized model to them. Every kernel is
a torch core op (no hand-written CUDA, no extra package):

* ``int8`` (W8A8, per-output-channel int8 weights, per-token dynamic int8 activations):
  ``torch._int_mm`` (CPU and CUDA; int32 accumulation), scales applied to the int32 result in float32.
  The activation codes are the fake quantizer's own (``quantizer.quant_params``/``quantize``: same
  grid, symmetry and clip ratio), and zero points are corrected exactly in integer arithmetic:
  with ``xq = q - a`` (int8) and ``c = u - 128`` (int8), ``sum (xq + o_x)(c + o_w) = xq c^T +
  o_w rowsum(xq) + o_x colsum(c) + K o_x o_w``; so asymmetric activations (the default
  ``quant.act_sym=false``) and asymmetric per-channel weights run real with the fake run's codes.
  Grouped weights (``w8a8g128``) have no int8 kernel here (one scale per output channel): refused.
* ``int4`` (W4A16, 4-bit weights in groups of 32/64/128/256, asymmetric integer zero points as
  GPTQ/AWQ produce): torch's tinygemm kernel ``aten._weight_int4pack_mm`` on CUDA (bf16 only) and
  ``aten._weight_int4pack_mm_for_cpu`` on CPU, the kernels torchao's int4 weight-only config calls.
  tinygemm's zero is a float offset, ``w = (q - 8) s + zero``: an integer zero point ``z`` maps to
  ``zero = (8 - z) s`` (exact in real arithmetic; the kernel runs in bf16, on CPU too, where its
  float32 path is ~70x slower than sgemm: activations, scales and zeros in bf16 are kernel rounding). An input width that is not a multiple of
  ``lcm(group, 16 inner_k_tiles)`` is zero-padded (weights and input), which changes nothing.
* ``fp8`` (W8A8 e4m3, per-row scales; ``torch._scaled_mm``, CUDA sm89+): for the benchmark on
  random weights (``Fp8Linear.from_weight``) only. An int8 artifact's codes (up to 127) are not e4m3
  values, so converting an artifact to FP8 would be another quantization, not its arithmetic.

W4A4 and W4A8 have no kernel on the H100/H200 (Hopper has no int4 tensor-core MMA): with
``runtime=real`` they run fake, and the record says so (``plan``'s ``fake_reason``). Any other
format with ``runtime=real`` fails before loading (``RealRuntimeError``, naming the fix).

Exact integer codes come from the fake-quantized weights themselves (``artifacts.codes.recover``),
so a model loaded from its artifact or quantized in this run converts the same way. Each kernel is
checked once per device and format against the dequantized weight on a random input (``_probe``):
a wrong packing fails loudly instead of giving wrong results.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from qdlm_bench.quant.quantizer import group, qrange, quant_params, quantize
from qdlm_bench.quant.spec import QuantSpec

RUNTIMES = ("fake", "real")
INT4_GROUPS = (32, 64, 128, 256)
INNER_K_TILES = 8  # tinygemm: K padded to a multiple of 16 * 8 = 128
KERNELS = {"int8": "torch._int_mm (int8 x int8 -> int32)",
           "int4": "aten._weight_int4pack_mm (tinygemm; CPU: _weight_int4pack_mm_for_cpu)",
           "fp8": "torch._scaled_mm (e4m3, row-wise scales)"}
NO_INT4_MMA = ("H100/H200 (Hopper) have no int4 tensor-core MMA, so {bits} has no real kernel here; "
               "it runs fake-quantized (weights and activations rounded, bf16 arithmetic)")
FP8_MAX = 448.0
FP8_FAST_ACCUM = True  # Hopper's fast FP8 accumulation, as torchao's float8 inference default


class RealRuntimeError(ValueError):
    """``runtime=real`` cannot execute this setting with a real kernel; the message names the fix."""


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise RealRuntimeError(f"runtime={runtime!r}; valid: {', '.join(RUNTIMES)}")
    return runtime


def plan(quant: QuantSpec, device: str = "cpu", dtype: str = "bfloat16") -> dict:
    """How ``runtime=real`` executes ``quant``: ``{"format", "kernel", "fake_reason"}`` (format None:
    nothing converted; ``fake_reason`` says why). Raises ``RealRuntimeError`` for a setting with no
    kernel, before anything loads."""
    fixes = ("real kernels exist for w8a8 (int8, per-channel weights) and w4a16g{32,64,128,256} "
             "(int4 tinygemm); use one of those or runtime=fake")
    if quant.is_fp:
        return {"format": None, "kernel": None, "fake_reason": "full precision: nothing to convert"}
    if quant.w_bits == 4 and quant.a_bits in (4, 8):
        return {"format": None, "kernel": None, "fake_reason": NO_INT4_MMA.format(bits=quant.name)}
    if quant.w_bits == 8 and quant.a_bits == 8:
        if quant.group_size is not None:
            raise RealRuntimeError(f"runtime=real: bits={quant.name} has grouped weights; the int8 kernel "
                                   "(torch._int_mm) scales per output channel: use bits=w8a8 (no g) or runtime=fake")
        return {"format": "int8", "kernel": KERNELS["int8"],
                "fake_reason": "K/V quantizers stay fake (attention runs in the model dtype)"
                if quant.kv_bits < 16 else None}
    if quant.w_bits == 4 and quant.a_bits == 16:
        if quant.group_size not in INT4_GROUPS:
            raise RealRuntimeError(f"runtime=real: bits={quant.name}: the int4 kernel (tinygemm) needs a group "
                                   f"size in {INT4_GROUPS}: use e.g. bits=w4a16g128 or runtime=fake")
        if device.startswith("cuda") and dtype != "bfloat16":
            raise RealRuntimeError(f"runtime=real: the CUDA int4 kernel runs in bfloat16 only; dtype={dtype}: "
                                   "use dtype=bfloat16 (or auto) or runtime=fake")
        return {"format": "int4", "kernel": KERNELS["int4"], "fake_reason": None}
    raise RealRuntimeError(f"runtime=real: no low-bit kernel for bits={quant.name}; {fixes}")


# --------------------------------------------------------------------------------- modules


def _pad_rows(x: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    m = x.shape[0]
    target = max(minimum, -(-m // multiple) * multiple)
    return x if target == m else F.pad(x, (0, 0, 0, target - m))


class Int8Linear(nn.Module):
    """W8A8 int8: ``torch._int_mm`` on per-token activation codes (the fake quantizer's grid) and
    int8 weight codes, zero points corrected exactly (module docstring)."""

    def __init__(self, qweight: torch.Tensor, w_scale: torch.Tensor, w_offset: torch.Tensor | None,
                 bias: torch.Tensor | None, a_sym: bool = True, a_clip_ratio: float = 1.0, a_grid: str = "absmax",
                 input_transform: nn.Module | None = None, out_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.to(torch.int8).contiguous())  # [N, K]
        self.register_buffer("w_scale", w_scale.float().reshape(1, -1).contiguous())  # [1, N]
        self.register_buffer("w_offset", None if w_offset is None else w_offset.float().reshape(1, -1))
        self.register_buffer("colsum", self.qweight.sum(1, dtype=torch.int32).float().reshape(1, -1))
        self.bias = bias
        self.a_sym, self.a_clip_ratio, self.a_grid = a_sym, a_clip_ratio, a_grid
        self.a_low = qrange(8, a_sym, a_grid)[0] + 128  # activation codes q = xq + a_low
        self.input_transform = input_transform
        self.out_dtype = out_dtype

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias=None, **kw) -> Int8Linear:
        """RTN per-channel symmetric int8 of a float weight (the benchmark's random weights)."""
        w = weight.float()
        scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
        q = torch.round(w / scale).clamp(-128, 127)
        return cls(q.to(torch.int8), scale, None, bias, out_dtype=weight.dtype, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        if x2.is_cuda and m <= 16:  # cuBLASLt int8 needs M > 16 (K and N multiples of 8): zero rows
            x2 = F.pad(x2, (0, 0, 0, 17 - m))
        out = _call(_int8_linear, x2, self.qweight, self.w_scale, self.colsum, self.w_offset, self.a_sym,
                    self.a_clip_ratio, self.a_grid, self.a_low, self.out_dtype)[:m]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8 W8A8, "
                f"a_sym={self.a_sym}, weight_zero={'yes' if self.w_offset is not None else 'no'}")


class Int4Linear(nn.Module):
    """W4A16 int4 groups: tinygemm (``aten._weight_int4pack_mm``; CPU: ``..._for_cpu``)."""

    nibble_high_first = True  # CUDA packing: even column in the high nibble (checked by _probe)

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None, input_transform: nn.Module | None = None,
                 out_dtype: torch.dtype = torch.bfloat16):
        """``codes`` uint8 [N, K] in [0, 15], ``scale`` float32 [N, G], ``zero`` integer [N, G]:
        ``W = (codes - zero) * scale`` per group (the last group may be shorter)."""
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size, self.out_dtype = group_size, out_dtype
        self.kernel_dtype = torch.bfloat16  # CUDA: bf16 only; CPU: its fp32 path is ~70x slower than sgemm
        step = math.lcm(group_size, 16 * INNER_K_TILES)
        self.padded_in = -(-self.in_features // step) * step
        n_groups = self.padded_in // group_size
        pad_g = n_groups - scale.shape[1]
        scale = F.pad(scale.float(), (0, pad_g), value=1.0)
        zero = F.pad(zero.float(), (0, pad_g), value=8.0)
        codes = F.pad(codes.to(torch.int32), (0, self.padded_in - self.in_features), value=8)
        sz = torch.stack([scale, (8 - zero) * scale], -1).transpose(0, 1).contiguous()  # [G, N, 2]
        self.register_buffer("scales_and_zeros", sz.to(self.kernel_dtype))
        self.register_buffer("packed", self._pack(codes))
        self.bias = bias
        self.input_transform = input_transform

    def _pack(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.is_cuda:
            hi, lo = (codes[:, ::2], codes[:, 1::2]) if self.nibble_high_first else (codes[:, 1::2], codes[:, ::2])
            return torch.ops.aten._convert_weight_to_int4pack((hi << 4 | lo).to(torch.uint8).contiguous(),
                                                              INNER_K_TILES)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), INNER_K_TILES)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, group_size: int = 128, bias=None, **kw) -> Int4Linear:
        """RTN asymmetric int4 groups of a float weight (the benchmark's random weights)."""
        g = group(weight, group_size)
        scale, zero = quant_params(g, 4, False)
        codes = quantize(g, scale, zero, 4, False).flatten(-2)[:, :weight.shape[1]].to(torch.uint8)
        return cls(codes, scale[..., 0], zero[..., 0], group_size, bias, out_dtype=weight.dtype, **kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.kernel_dtype)
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
        if x2.is_cuda and x2.shape[0] >= DEQUANT_ROWS and not DEQUANT_ERRORS:  # tinygemm: a small-batch kernel
            try:
                out = F.linear(x2, self.dequantized())
            except RuntimeError as err:  # an unexpected packing: tinygemm from then on (recorded)
                DEQUANT_ERRORS.append(f"{type(err).__name__}: {str(err)[:300]}")
                return self.forward(x)
        elif x2.is_cuda:
            out = torch.ops.aten._weight_int4pack_mm(x2.contiguous(), self.packed, self.group_size,
                                                    self.scales_and_zeros)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size,
                                                            self.scales_and_zeros)
        out = out.to(self.out_dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight ``[N, padded K]`` in the kernel dtype, unpacked from ``packed`` (``nibble_order``)
        and dequantized as tinygemm does, ``(q - 8) s + zero``: for inputs of many rows, where one
        dense GEMM on the dequantized weight beats tinygemm (a temporary, freed after the call)."""
        n, k = self.out_features, self.padded_in
        order = nibble_order(self.packed, n, k, self._pack)
        codes = _nibbles(self.packed)[order].view(n, k // self.group_size, self.group_size)
        sz = self.scales_and_zeros.transpose(0, 1)  # [N, G, 2]
        w = (codes.to(self.kernel_dtype) - 8) * sz[..., :1] + sz[..., 1:]
        return w.view(n, k)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 W4A16 g{self.group_size}"


DEQUANT_ROWS = 256  # CUDA W4A16: inputs of at least this many rows take the dequantize + dense GEMM path
DEQUANT_ERRORS: list = []
_ORDERS: dict = {}


def order_cache_bytes() -> int:
    """Bytes of the learnt packing orders (``nibble_order``), one per distinct int4 layer shape."""
    return sum(o.numel() * o.element_size() for o in _ORDERS.values())


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The 4-bit values of a packed tensor, low then high nibble of each byte, in memory order."""
    b = packed.contiguous().view(torch.uint8).flatten()
    return torch.stack([b & 0xF, b >> 4], -1).flatten()


def nibble_order(packed: torch.Tensor, n: int, k: int, pack) -> torch.Tensor:
    """``order`` [N K] with ``_nibbles(pack(codes))[order] == codes.flatten()`` for any codes ``[n, k]``:
    the kernel's packing learnt once per (shape, device) by packing the base-16 digits of each
    position's index (int32 indices, 4 bytes per weight of each distinct shape, kept for reuse)."""
    key = (n, k, packed.device, packed.dtype, tuple(packed.shape))
    order = _ORDERS.get(key)
    if order is None:
        if packed.numel() * packed.element_size() * 2 != n * k:
            raise RuntimeError(f"packed int4 tensor {tuple(packed.shape)} {packed.dtype} does not hold exactly "
                               f"{n} x {k} nibbles")
        index = torch.arange(n * k, device=packed.device, dtype=torch.int64)
        order = torch.zeros(n * k, device=packed.device, dtype=torch.int64)
        for digit in range(max(1, math.ceil(math.log2(max(n * k, 2)) / 4))):
            codes = ((index >> (4 * digit)) & 0xF).to(torch.int32).view(n, k)
            order |= _nibbles(pack(codes)).to(torch.int64) << (4 * digit)  # position -> the index it holds
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(n * k, device=packed.device)
        order = _ORDERS[key] = inverse.to(torch.int32)
        del index, inverse, codes
    return order


class Fp8Linear(nn.Module):
    """W8A8 FP8 e4m3, per-row weight scales and per-token dynamic activation scales: ``torch._scaled_mm``."""

    def __init__(self, weight_fp8: torch.Tensor, w_scale: torch.Tensor, bias=None, out_dtype=torch.bfloat16):
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.register_buffer("weight_fp8", weight_fp8.contiguous())  # [N, K]
        self.register_buffer("w_scale", w_scale.float().reshape(1, -1).contiguous())  # [1, N]
        self.bias, self.out_dtype = bias, out_dtype

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias=None) -> Fp8Linear:
        w = weight.float()
        scale = (w.abs().amax(1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return cls(q, scale, bias, out_dtype=weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        m = x2.shape[0]
        out = _call(_fp8_linear, _pad_rows(x2, 16), self.weight_fp8, self.w_scale, self.out_dtype)[:m]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def _int8_linear(x2, qweight, w_scale, colsum, w_offset, sym: bool, clip_ratio: float, grid: str, low: int,
                 dtype):
    """``x2 [M, K] @ W^T`` of an ``Int8Linear``: per-token int8 codes ``xq = q - low`` of the fake
    quantizer's grid (float32 scale, integer offset ``o_x = low - zero``), ``torch._int_mm``, then
    ``s_x s_w (acc + o_w rowsum(xq) + o_x colsum(c) + K o_x o_w)`` in float32, cast to ``dtype``.
    One function, so that on CUDA one compiled graph fuses the quantization and the epilogue."""
    scale, zero = quant_params(x2, 8, sym, clip_ratio, grid)
    q = quantize(x2, scale, zero, 8, sym, grid) - low
    acc = torch._int_mm(q.to(torch.int8), qweight.t()).float()
    k = x2.shape[1]
    offset = low - zero  # [M, 1]: 0 for symmetric absmax
    if w_offset is not None:  # rowsum exact: integers below 2^24 in float32
        acc = acc + q.sum(-1, keepdim=True) * w_offset + k * offset * w_offset
    if not sym or low:
        acc = acc + offset * colsum
    return (acc * scale * w_scale).to(dtype)


def _fp8_linear(x2: torch.Tensor, weight_fp8: torch.Tensor, w_scale: torch.Tensor, dtype) -> torch.Tensor:
    """``x2 [M, K] @ W^T`` of an ``Fp8Linear``: per-token e4m3 activations (float32 scale ``max|x| /
    448``), then ``torch._scaled_mm`` with both scales; one function, so that one compiled graph
    holds the quantization and the GEMM (H200, ``bench runtime``: the exact forward x1.30 of bf16,
    against x1.23 with the quantization compiled apart)."""
    scale = (x2.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp(min=1e-12)  # [M, 1]
    xq = (x2.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, weight_fp8.t(), scale_a=scale, scale_b=w_scale, bias=None, out_dtype=dtype,
                            use_fast_accum=FP8_FAST_ACCUM)


COMPILE = True  # on CUDA, the activation quantization and the epilogue run torch.compile'd (fused)
_COMPILED: dict = {}
COMPILE_ERRORS: dict = {}  # function name -> the error that made it run eager


def _call(fn, x: torch.Tensor, *args):
    """``fn(x, *args)``, compiled (``torch.compile``, the row count of ``x`` dynamic) on CUDA when ``COMPILE``: the
    elementwise passes of eager mode would cost more than the low-bit GEMM saves. A compilation
    failure runs it eager from then on and is kept in ``COMPILE_ERRORS`` (records and the bench)."""
    if not (COMPILE and x.is_cuda) or fn.__name__ in COMPILE_ERRORS:
        return fn(x, *args)
    compiled = _COMPILED.get(fn.__name__)
    if compiled is None:
        config = torch._dynamo.config  # one graph per layer setting and row count class: more than 8
        if hasattr(config, "recompile_limit"):
            config.recompile_limit = max(config.recompile_limit, 64)
        else:
            config.cache_size_limit = max(config.cache_size_limit, 64)
        compiled = _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    torch._dynamo.mark_dynamic(x, 0)  # the row count varies; the layer's widths stay static (faster kernels)
    try:
        return compiled(x, *args)
    except Exception as err:  # noqa: BLE001 - the eager function computes the same
        COMPILE_ERRORS[fn.__name__] = f"{type(err).__name__}: {str(err)[:300]}"
        return fn(x, *args)


REAL_MODULES = (Int8Linear, Int4Linear, Fp8Linear)
_PROBED: set = set()


def _probe(module: nn.Module, weight: torch.Tensor, fmt: str) -> None:
    """Check a converted layer against its dequantized weight once per (format, device): a packing
    or kernel-semantics mismatch raises instead of giving silently wrong results. ``weight``: the
    float weight the layer must reproduce (``W`` of ``x W^T``)."""
    key = (fmt, weight.device.type)
    if key in _PROBED:
        return
    g = torch.Generator(device="cpu").manual_seed(0)
    transform = getattr(module, "input_transform", None)
    module.input_transform = None
    try:
        for rows in (32, DEQUANT_ROWS) if fmt == "int4" and weight.is_cuda else (32,):
            x = torch.randn(rows, module.in_features, generator=g).to(weight.device, weight.dtype)
            with torch.no_grad():
                ref = F.linear(x.float(), weight.float())
                out = module(x).float() - (0 if module.bias is None else module.bias.float())
            err = ((out - ref).norm() / ref.norm().clamp(min=1e-12)).item()
            limit = 0.05 if fmt == "int4" else 0.08  # int8 activations add up to ~2% per-token rounding
            if not math.isfinite(err) or err > limit:
                raise RuntimeError(f"real {fmt} kernel self-check failed on {weight.device.type} ({rows} rows): "
                                   f"relative error {err:.3g} against the dequantized weight (limit {limit})")
    finally:
        module.input_transform = transform
    _PROBED.add(key)


# ------------------------------------------------------------------------------ conversion


def _dense_weight(codes) -> torch.Tensor:
    from qdlm_bench.artifacts.codes import dequantize

    return dequantize(codes.codes, codes.scale, codes.zero, codes.group_size, torch.float32)


def real_linear(layer: nn.Module, fmt: str, name: str = "") -> nn.Module | None:
    """The real module of the fake-quantized ``QuantLinear`` ``layer`` in ``fmt``, built from its exact
    integer codes; None when the layer stays as it is (an int8 layer whose input is not quantized)."""
    from qdlm_bench.artifacts.codes import recover

    spec = layer.spec
    if fmt == "int8" and layer.act_quant.bits >= 16:
        return None  # an 8-bit weight with a full-precision input: no W8A8 GEMM; kept fake
    bits, gs = (8, None) if fmt == "int8" else (4, spec.group_size)
    codes = recover(layer.weight.data, bits, gs)
    if codes is None:
        raise RealRuntimeError(f"runtime=real: layer {name} has no exact {bits}-bit integer codes on its grid "
                               f"(e.g. GPTQ act_order without static_groups: non-contiguous groups); "
                               "use runtime=fake for this method")
    bias = layer.bias
    if fmt == "int8":
        act = layer.act_quant
        if act.head_range is not None or act.bits != 8:
            raise RealRuntimeError(f"runtime=real: layer {name}'s input quantizer is not 8-bit per-token; "
                                   "use runtime=fake")
        c = codes.codes.to(torch.int16) - 128
        offset = None if codes.symmetric else (128 - codes.zero[:, 0]).float()
        module = Int8Linear(c.to(torch.int8), codes.scale[:, 0], offset, bias, act.sym, act.clip_ratio, act.grid,
                            layer.input_transform, layer.weight.dtype)
    else:
        module = Int4Linear(codes.codes, codes.scale, codes.zero, gs, bias, layer.input_transform,
                            layer.weight.dtype)
    if (fmt, layer.weight.device.type) not in _PROBED:
        try:
            _probe(module, _dense_weight(codes).to(layer.weight.device, layer.weight.dtype), fmt)
        except RuntimeError:
            if fmt != "int4" or not layer.weight.is_cuda:
                raise
            Int4Linear.nibble_high_first = not Int4Linear.nibble_high_first  # the other packing, once
            module = Int4Linear(codes.codes, codes.scale, codes.zero, gs, bias, layer.input_transform,
                                layer.weight.dtype)
            _probe(module, _dense_weight(codes).to(layer.weight.device, layer.weight.dtype), fmt)
    return module


@torch.no_grad()
def convert(model: nn.Module, fmt: str) -> dict:
    """Replace every fake-quantized linear of ``model`` by its real ``fmt`` module, in place; returns
    ``{"layers_real", "layers_fake", "convert_s"}``. Raises ``RealRuntimeError`` naming a layer that
    cannot be converted exactly."""
    from qdlm_bench.quant.linear import QuantLinear

    start = time.perf_counter()
    real = kept = 0
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, QuantLinear):
            continue
        module = real_linear(layer, fmt, name)
        if module is None:
            kept += 1
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
        real += 1
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"layers_real": real, "layers_fake": kept, "convert_s": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------------------------- measuring


def _bytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def linear_bytes(model: nn.Module) -> dict:
    """Bytes of the linears' weights as stored (real modules: every buffer: codes, scales, zeros,
    sums) next to the bf16 bytes of the same weights: all linears (``linear_*``, the LM head
    included) and the quantized ones only (``quantized_*``, what a format compresses; their ratio
    ``weight_ratio_vs_bf16``). ``model_bytes``: every parameter and buffer (shared tensors once)."""
    sizes = {"linear_weight_bytes": 0, "bf16_linear_weight_bytes": 0, "quantized_linear_bytes": 0,
             "bf16_quantized_linear_bytes": 0}
    for module in model.modules():
        if isinstance(module, REAL_MODULES):
            stored = sum(_bytes(b) for b in module.buffers(recurse=False))
            bf16, quantized = 2 * module.in_features * module.out_features, True
        elif isinstance(module, nn.Linear) or type(module).__name__ == "QuantLinear":
            stored, bf16 = _bytes(module.weight), 2 * module.weight.numel()
            quantized = type(module).__name__ == "QuantLinear"
        else:
            continue
        sizes["linear_weight_bytes"] += stored
        sizes["bf16_linear_weight_bytes"] += bf16
        if quantized:
            sizes["quantized_linear_bytes"] += stored
            sizes["bf16_quantized_linear_bytes"] += bf16
    bf16 = sizes["bf16_quantized_linear_bytes"]
    sizes["weight_ratio_vs_bf16"] = round(sizes["quantized_linear_bytes"] / bf16, 4) if bf16 else None
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += _bytes(t)
    sizes["model_bytes"] = total
    return sizes


@torch.inference_mode()
def forward_latency(model: nn.Module, batch: int = 1, seq_len: int = 256, repeats: int = 3) -> dict:
    """Median ms of one forward over ``batch`` x ``seq_len`` random tokens (after one warm-up) and,
    on CUDA, the peak memory allocated meanwhile (GiB)."""
    cfg = model.config
    seq_len = min(seq_len, getattr(cfg, "max_seq_len", seq_len) or seq_len)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=g).to(model.device)
    cuda = model.device.type == "cuda"
    model(ids)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"forward_shape": [batch, seq_len], "forward_ms": round(statistics.median(times) * 1e3, 3),
            "forward_peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None}
