"""The real low-bit runtime benchmark:

    python -m qdlm_bench.bench runtime [shape=llada-8b] [formats=bf16,int8,fp8,int4] [group=128]
        [exact_batch=16] [exact_len=768] [block=32] [decode_batches=1,16] [warmup=3] [repeats=10]
        [e2e=1] [e2e_batch=16] [prompt_len=256] [gen_length=64] [steps=64]
        [decoders=exact,prefix_cache,dual_cache] [compile=1] [graphs=1] [linears=1] [seed=0] [out=bench.json]

runtime: one random-weight model of ``shape`` (LLaDA-8B's by default; bf16 on GPU, fp32 on CPU),
measured in bf16 and then with its block linears replaced by each real low-bit format of
``qdlm_bench.runtime.real`` (``int8``: W8A8 ``torch._int_mm``; ``fp8``: W8A8 e4m3 ``torch._scaled_mm``;
``int4``: W4A16 g``group`` tinygemm), RTN-quantized from the same weights (the LM head stays bf16, as
the methods keep it). Per format: the linears' weight bytes vs bf16, the model's bytes, and at each
shape the median forward latency and the peak memory (the model's bytes plus the forward's working
memory above what was allocated before it: the bf16 weights stay allocated between formats):

* ``exact``: the exact sampler's forward, ``exact_batch`` x ``exact_len`` tokens, logits on the
  last ``block`` columns (compute-bound);
* ``decode_b<B>``: the cached decoders' forward, ``B`` x one ``block``-token block against a K/V
  cache of ``exact_len - block`` columns (memory-bound); ``decode_b<B>_graph`` (``graphs=1``, CUDA):
  the same forward replayed from a CUDA graph, without eager mode's launch overhead;
* ``e2e``: samples/s of generation with each decoder of ``decoders`` (``qdlm_bench.decoders``),
  ``e2e_batch`` prompts of about ``prompt_len`` random tokens, ``gen_length`` tokens in ``steps`` steps.

``linears=1``: each distinct block-linear shape alone at the exact shape's rows: bf16, each format's
module, and its bare low-bit GEMM on ready operands (``torch._int_mm``, ``torch._scaled_mm``), so
that a format's shortfall is placed in the kernel or around it.

``compile=1``: on CUDA the int8/fp8 activation quantization and epilogue run ``torch.compile``'d
(``runtime.real._call``). Each format's measurement is caught: a failing format (no kernel on this device, a kernel error)
records its error and the run goes on. The targets (issue 14) are checked at the end: W8A8 (int8 or
fp8) exact forward >= 1.6x bf16, W4A16 weights <= 0.3x bf16's bytes, W4A16 faster than bf16 at
decode batch 1. A compact table is printed on stderr; the JSON goes to stdout and ``out``.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F
from torch import nn

from qdlm_bench.decoders.counting import GenerationMeter
from qdlm_bench.decoders.samplers import generate
from qdlm_bench.generation import GenerationConfig
from qdlm_bench.models.transformer import KVCache
from qdlm_bench.runtime import real

from .common import bench_model, device_peak, parse_args, sync
from .common import random_prompts
from .decode import decoder

FORMATS = {"bf16": None, "int8": "W8A8 int8", "fp8": "W8A8 fp8 e4m3", "int4": "W4A16 int4"}
TARGETS = {"w8a8_exact_speedup": 1.6, "w4a16_weight_ratio": 0.3, "w4a16_decode_b1_speedup": 1.0}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def block_linears(model) -> list[tuple[nn.Module, str]]:
    return [(block, name) for block in model.blocks for name in LINEARS]


def real_linear(fmt: str, weight: torch.Tensor, bias, group: int) -> nn.Module:
    """The ``fmt`` module of a float weight, RTN-quantized."""
    if fmt == "int8":
        return real.Int8Linear.from_weight(weight, bias)
    if fmt == "fp8":
        return real.Fp8Linear.from_weight(weight, bias)
    if fmt == "int4":
        return real.Int4Linear.from_weight(weight, group, bias)
    raise ValueError(f"unknown format {fmt!r}; valid: {', '.join(FORMATS)}")


def to_format(model, fmt: str, group: int, originals: dict) -> None:
    """Replace every block linear by its ``fmt`` module built from the bf16 original (kept in ``originals``)."""
    for block, name in block_linears(model):
        lin = originals.setdefault((id(block), name), getattr(block, name))
        setattr(block, name, real_linear(fmt, lin.weight.data, lin.bias, group))


def bare_gemm(fmt: str, x: torch.Tensor, module: nn.Module):
    """The low-bit GEMM of ``module`` alone, on operands already quantized (random codes, unit
    scales): what the kernel gives without the activation quantization and the epilogue; None for
    int4 (its module is the kernel)."""
    rows = x.shape[0]
    if fmt == "int8":
        xq = torch.randint(-127, 128, (rows, module.in_features), dtype=torch.int8, device=x.device)
        return lambda: torch._int_mm(xq, module.qweight.t())
    if fmt == "fp8":
        xq, ones = x.to(torch.float8_e4m3fn), torch.ones(rows, 1, device=x.device)
        return lambda: torch._scaled_mm(xq, module.weight_fp8.t(), scale_a=ones, scale_b=module.w_scale,
                                        out_dtype=x.dtype, use_fast_accum=real.FP8_FAST_ACCUM)
    return None


@torch.inference_mode()
def linears(model, formats: list[str], rows: int, group: int, warmup: int, repeats: int) -> dict:
    """Each distinct block-linear shape (named by its first linear) at ``rows`` input rows: the bf16
    ``F.linear``, each format's module and its bare GEMM (``bare_gemm``), in ms and x bf16."""
    out: dict = {}
    for name in LINEARS:
        lin = getattr(model.blocks[0], name)
        if any((r["in"], r["out"]) == (lin.in_features, lin.out_features) for r in out.values()):
            continue
        x = torch.randn(rows, lin.in_features, device=model.device, dtype=model.dtype)
        w = lin.weight.data
        r = {"rows": rows, "in": lin.in_features, "out": lin.out_features,
             "bf16_ms": timed(lambda: F.linear(x, w), warmup, repeats, 0)["ms"]}
        for fmt in formats:
            if fmt == "bf16":
                continue
            try:
                module = real_linear(fmt, w, None, group)
                r[f"{fmt}_ms"] = timed(lambda: module(x), warmup, repeats, 0)["ms"]
                gemm = bare_gemm(fmt, x, module)
                if gemm is not None:
                    r[f"{fmt}_gemm_ms"] = timed(gemm, warmup, repeats, 0)["ms"]
            except Exception as err:  # noqa: BLE001 - recorded, the other formats still run
                r[f"{fmt}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        for key in [k for k in r if k.endswith("_ms") and k != "bf16_ms"]:
            r[key[:-3] + "_x_bf16"] = round(r["bf16_ms"] / r[key], 3)
        out[name] = r
    return out


def restore(model, originals: dict) -> None:
    for block, name in block_linears(model):
        setattr(block, name, originals[(id(block), name)])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def stored_bytes(model) -> dict:
    """The block linears' weight bytes as stored, their bf16 bytes, and the whole model's bytes."""
    stored = bf16 = 0
    for block, name in block_linears(model):
        m = getattr(block, name)
        if isinstance(m, real.REAL_MODULES):
            stored += sum(b.numel() * b.element_size() for b in m.buffers(recurse=False))
        else:
            stored += m.weight.numel() * m.weight.element_size()
        bf16 += 2 * m.in_features * m.out_features
    total = sum(t.numel() * t.element_size() for t in {id(t): t for t in [*model.parameters(), *model.buffers()]}.values())
    return {"linear_weight_gib": round(stored / 2**30, 3), "bf16_linear_weight_gib": round(bf16 / 2**30, 3),
            "weight_ratio_vs_bf16": round(stored / bf16, 4), "model_gib": round(total / 2**30, 3)}


@torch.inference_mode()
def timed(fn, warmup: int, repeats: int, model_gib: float) -> dict:
    """Median ms of ``fn()`` and the peak memory: the model's bytes plus the working memory the timed
    calls allocated above what was allocated before them (CUDA; None on CPU)."""
    for _ in range(warmup):
        fn()
    sync()
    cuda = torch.cuda.is_available()
    if cuda:
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = None
    if cuda:
        peak = round(model_gib + max(0, torch.cuda.max_memory_allocated() - before) / 2**30, 3)
    return {"ms": round(statistics.median(times) * 1e3, 3), "peak_mem_gib": peak}


@torch.inference_mode()
def cuda_graph(fn):
    """``fn`` captured in a CUDA graph (after warm-up calls on a side stream); returns its replay:
    the launch overhead of eager mode removed, so a memory-bound forward shows its bytes."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def measure(model, fmt: str, a: dict, ids: torch.Tensor, prompts: list, sizes: dict) -> dict:
    row: dict = {"format": FORMATS[fmt] or "bf16", **sizes}
    L, block = a["exact_len"], a["block"]
    cols = slice(L - block, L)
    row["exact"] = timed(lambda: model(ids, positions=cols), a["warmup"], a["repeats"], sizes["model_gib"])
    for b in [int(x) for x in str(a["decode_batches"]).split(",") if x]:
        sub = ids[:b]
        cache = KVCache(len(model.blocks))
        with torch.inference_mode():
            model(sub, cache=cache)  # fills the cache (a full forward over the sequence)
        step = functools.partial(model, sub, positions=cols, cache=cache, fresh=cols)
        row[f"decode_b{b}"] = timed(step, a["warmup"], a["repeats"], sizes["model_gib"])
        if a["graphs"] and torch.cuda.is_available():  # the same forward replayed from a CUDA graph
            try:
                row[f"decode_b{b}_graph"] = timed(cuda_graph(step), a["warmup"], a["repeats"], sizes["model_gib"])
            except Exception as err:  # noqa: BLE001 - recorded; the eager numbers stand
                row[f"decode_b{b}_graph"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        del step, cache
    if a["e2e"]:
        gen = GenerationConfig(gen_length=a["gen_length"], steps=a["steps"], block_length=block, sampler="llada")
        warm = GenerationConfig(gen_length=block, steps=2, block_length=block, sampler="llada")
        e2e = {}
        for name in a["decoders"].split(","):
            try:
                d = decoder(name, 0.9)
                generate(model, prompts[:2], warm, d, batch_size=a["e2e_batch"])
                meter = GenerationMeter(model)
                with meter.measure(len(prompts)):
                    generate(model, prompts, gen, d, batch_size=a["e2e_batch"])
                stats = meter.stats()
                e2e[name] = {k: stats[k] for k in ("samples_per_s", "forward_passes_per_sample", "seconds") if k in stats}
            except Exception as err:  # noqa: BLE001 - one decoder's failure is recorded
                e2e[name] = {"error": f"{type(err).__name__}: {err}"}
        row["e2e"] = e2e
    return row


def targets(rows: dict) -> dict:
    def ms(fmt, shape):
        return ((rows.get(fmt) or {}).get(shape) or {}).get("ms")

    out = {}
    base = ms("bf16", "exact")
    w8 = {f: round(base / ms(f, "exact"), 3) for f in ("int8", "fp8") if base and ms(f, "exact")}
    out["w8a8_exact_speedup"] = {"value": w8, "target": TARGETS["w8a8_exact_speedup"],
                                 "met": bool(w8) and max(w8.values()) >= TARGETS["w8a8_exact_speedup"]}
    ratio = (rows.get("int4") or {}).get("weight_ratio_vs_bf16")
    out["w4a16_weight_ratio"] = {"value": ratio, "target": TARGETS["w4a16_weight_ratio"],
                                 "met": ratio is not None and ratio <= TARGETS["w4a16_weight_ratio"]}
    for shape in ("decode_b1", "decode_b1_graph"):
        b1, q1 = ms("bf16", shape), ms("int4", shape)
        speed = round(b1 / q1, 3) if b1 and q1 else None
        name = "w4a16_decode_b1_speedup" + shape[len("decode_b1"):]
        out[name] = {"value": speed, "target": TARGETS["w4a16_decode_b1_speedup"],
                     "met": speed is not None and speed > TARGETS["w4a16_decode_b1_speedup"]}
    return out


def table(rows: dict) -> str:
    shapes = [k for k in next((r for r in rows.values() if "exact" in r), {}) if k == "exact" or k.startswith("decode")]
    shapes = [k for k in shapes if all("error" not in (r.get(k) or {}) for r in rows.values())]
    decoders = list(next((r["e2e"] for r in rows.values() if r.get("e2e")), {}))
    head = ["format", "weights GiB", "x bf16", *[f"{s} ms" for s in shapes], *[f"{s} peak GiB" for s in shapes],
            *[f"{d} samples/s" for d in decoders]]
    lines = [" | ".join(head)]
    for fmt, r in rows.items():
        if "error" in r:
            lines.append(f"{fmt} | error: {r['error'].splitlines()[0][:150]}")
            continue
        cells = [fmt, r.get("linear_weight_gib"), r.get("weight_ratio_vs_bf16"),
                 *[(r.get(s) or {}).get("ms") for s in shapes], *[(r.get(s) or {}).get("peak_mem_gib") for s in shapes],
                 *[(r.get("e2e") or {}).get(d, {}).get("samples_per_s", "err") for d in decoders]]
        lines.append(" | ".join(str(c) for c in cells))
    return "\n".join(lines)


def run(argv: list[str]) -> dict:
    a = parse_args(argv, dict(shape="llada-8b", formats="bf16,int8,fp8,int4", group=128, exact_batch=16,
                              exact_len=768, block=32, decode_batches="1,16", warmup=3, repeats=10, e2e=1,
                              e2e_batch=16, prompt_len=256, gen_length=64, steps=64,
                              decoders="exact,prefix_cache,dual_cache", compile=1, graphs=1, linears=1, seed=0,
                              out=""))
    real.COMPILE = bool(a["compile"])
    start = time.perf_counter()
    model = bench_model(a["shape"], a["seed"])
    build_s = time.perf_counter() - start
    cfg = model.config
    g = torch.Generator().manual_seed(a["seed"])
    high = min(cfg.vocab_size, cfg.mask_token_id)
    ids = torch.randint(0, high, (a["exact_batch"], a["exact_len"]), generator=g).to(model.device)
    prompts = random_prompts(cfg, a["e2e_batch"], a["prompt_len"], a["seed"])
    gpu, peak = device_peak()
    result = {"bench": "runtime", "args": a, "device": gpu, "dtype": str(model.dtype), "torch": torch.__version__,
              "model_build_s": round(build_s, 1), "kernels": real.KERNELS, "formats": {}}
    originals: dict = {}
    for fmt in a["formats"].split(","):
        t0 = time.perf_counter()
        try:
            if fmt != "bf16":
                to_format(model, fmt, a["group"], originals)
            sync()
            convert_s = time.perf_counter() - t0
            row = measure(model, fmt, a, ids, prompts, stored_bytes(model))
            row["convert_s"] = round(convert_s, 2)
            if fmt == "int4":  # the learnt packing orders of the dequantize path (shared by same-shape layers)
                row["int4_order_cache_gib"] = round(real.order_cache_bytes() / 2**30, 3)
        except Exception as err:  # noqa: BLE001 - a failing format is recorded, the others still run
            row = {"format": FORMATS.get(fmt, fmt), "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()[-2000:]}
        finally:
            if originals:
                restore(model, originals)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        result["formats"][fmt] = row
        print(f"[runtime bench] {fmt}: {row.get('error') or 'done'} ({row['seconds']} s)", file=sys.stderr, flush=True)
    rows = result["formats"]
    for fmt, r in rows.items():
        if fmt != "bf16" and "exact" in r and "exact" in rows.get("bf16", {}):
            r["speedup_vs_bf16"] = {s: round(rows["bf16"][s]["ms"] / r[s]["ms"], 3)
                                    for s in r if (s == "exact" or s.startswith("decode")) and "ms" in r[s]
                                    and "ms" in rows["bf16"].get(s, {})}
    if a["linears"]:
        result["linears"] = linears(model, a["formats"].split(","), a["exact_batch"] * a["exact_len"], a["group"],
                                    a["warmup"], a["repeats"])
    result["targets"] = targets(rows)
    result["compile_errors"] = dict(real.COMPILE_ERRORS)
    result["int4_dequant_errors"] = list(real.DEQUANT_ERRORS)
    result["int4_dequant_rows"] = real.DEQUANT_ROWS
    result["total_s"] = round(time.perf_counter() - start, 1)
    result["table"] = table(rows)
    print(result["table"], file=sys.stderr)
    return result
