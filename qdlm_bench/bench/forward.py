"""The forward benchmark:

    python -m qdlm_bench.bench forward [shape=llada-8b] [batch=8] [seq_len=512] [bits=w4a4]
        [warmup=3] [repeats=10] [compile=0] [seed=0] [out=bench.json]

forward: one forward of a random-weight model (bf16 on GPU, fp32 on CPU) over ``batch`` random
sequences of ``seq_len`` tokens, timed in FP and then on the same model, transformed in place,
fake-quantized by QuaRot with RTN weights (rotations, online Hadamards on the down_proj and o_proj
inputs, per-token activation quantizers; K/V quantizers and the Q/K rotation when ``bits`` has
kv). Reports the median time of each, the ratio quantized / FP (target <= 1.5), the peak memory of
each, the time the transform took, and the quantized logits' relative error on the first 64
positions. ``compile=1`` compiles the blocks (``compile_blocks``) for both.
"""

from __future__ import annotations

import statistics
import time

import torch

from qdlm_bench import methods
from qdlm_bench.quant import QuantSpec

from .common import bench_model, device_peak, forward_flops, parse_args, sync

TARGET_RATIO = 1.5
KEPT_POSITIONS = 64



@torch.inference_mode()
def time_forward(model, ids: torch.Tensor, warmup: int, repeats: int) -> dict:
    """Median wall time of ``model(ids)`` after ``warmup`` calls, the peak memory of the timed
    calls (CUDA), and the logits of the first positions (on the CPU, float32)."""
    for _ in range(warmup):
        model(ids)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        logits = model(ids)
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return {"ms": statistics.median(times) * 1e3, "peak_mem_gib": peak and round(peak, 2),
            "logits": logits[:, :KEPT_POSITIONS].float().cpu()}


def run(argv: list[str]) -> dict:
    a = parse_args(argv, dict(shape="llada-8b", batch=8, seq_len=512, bits="w4a4", warmup=3, repeats=10,
                              compile=0, seed=0, out=""))
    spec = QuantSpec.parse(a["bits"])
    if spec.is_fp:
        raise SystemExit(f"bits={a['bits']} is full precision; give a quantized spec such as w4a4")
    model = bench_model(a["shape"], a["seed"], a["compile"])
    device, dtype = model.device.type, model.dtype
    cfg = model.config
    g = torch.Generator().manual_seed(a["seed"])
    ids = torch.randint(0, min(cfg.vocab_size, cfg.mask_token_id), (a["batch"], a["seq_len"]), generator=g).to(device)

    fp = time_forward(model, ids, a["warmup"], a["repeats"])
    sync()
    start = time.perf_counter()
    quarot = methods.get("quarot")
    state = methods.QuantState(model, spec)  # QuaRot with RTN weights reads no calibration set
    with torch.no_grad():
        for step in quarot.recipe(methods.build_options("quarot", {"weights": "rtn"})):
            step(state)  # in place: one model in memory
    sync()
    quantize_s = time.perf_counter() - start
    q = time_forward(model, ids, a["warmup"], a["repeats"])

    ref, out = fp.pop("logits"), q.pop("logits")
    gpu, peak = device_peak()
    tflops = forward_flops(cfg, a["seq_len"]) * a["batch"] / (fp["ms"] / 1e3) / 1e12
    return {
        "bench": "forward", "args": a, "device": gpu, "dtype": str(dtype),
        "fp": {**fp, "ms": round(fp["ms"], 2), "achieved_tflops": round(tflops, 1), "peak_tflops_bf16": peak},
        "quarot": {**q, "ms": round(q["ms"], 2), "bits": spec.name, "weights": "rtn",
                   "quantize_s": round(quantize_s, 2)},
        "ratio": round(q["ms"] / fp["ms"], 3), "target_ratio": TARGET_RATIO,
        "logits_rel_err": round(((out - ref).norm() / ref.norm()).item(), 4),
    }
