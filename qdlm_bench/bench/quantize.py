"""The quantization benchmark:

    python -m qdlm_bench.bench quantize [method=gptq] [method.<option>=<value> ...] [shape=llada-8b]
        [n_samples=128] [seqlen=2048] [bits=w4a16g128] [batch_size=8] [seed=0] [out=bench.json]

The method's options are built as a run builds them: ``conf/method/<method>.yaml`` with the
``method.<option>`` overrides (and ``batch_size`` as the method's when it has one), validated.

Quantizes a random-weight model of ``shape`` (bf16 on GPU, fp32 on CPU) with ``method`` on
``n_samples x seqlen`` random calibration tokens, and reports wall time and peak GPU memory.
Baseline, in the same run on the same model: one plain forward pass of the calibration set
through every block (the floor any block walk pays once per statistic it collects). Random
weights and tokens cost what real ones do: the work depends on shapes only. Issue targets on
LLaDA-8B with 128 x 2048 tokens: GPTQ <= 8 minutes, AWQ <= 10 minutes, peak <= 40 GB.
"""

from __future__ import annotations

import time

import torch

from qdlm_bench import analysis, methods, runspec
from qdlm_bench.calibration import CalibSet
from qdlm_bench.quant import QuantSpec
from qdlm_bench.quant.walk import Batches, block_inputs, run_block

from .common import bench_model, device_peak, parse_args, sync


@torch.no_grad()
def forward_pass(model, calib: CalibSet, batch_size: int) -> float:
    """Seconds of one pass of the calibration set through every block, as the walk runs it."""
    sync()
    start = time.perf_counter()
    batches = Batches(model, calib, batch_size, None)
    xs = block_inputs(model, calib.input_ids, batch_size)
    for block in model.blocks:
        xs = run_block(block, xs, batches)
    sync()
    return time.perf_counter() - start


def run(argv: list[str]) -> dict:
    overrides = [x for x in argv if x.startswith("method.")]
    a = parse_args([x for x in argv if x not in overrides], dict(
        method="gptq", shape="llada-8b", n_samples=128, seqlen=2048, bits="w4a16g128", batch_size=8, seed=0, out=""))
    method = methods.get(a["method"])
    if "batch_size" in methods.defaults(a["method"]):
        overrides.insert(0, f"method.batch_size={a['batch_size']}")
    cfg, _, _ = analysis.parse_args([f"method={a['method']}", *overrides], {})
    _, opts, _ = runspec.method_options(cfg["method"])
    spec = QuantSpec.parse(a["bits"])
    model = bench_model(a["shape"], a["seed"])
    device, dtype = model.device.type, model.dtype
    cfg = model.config
    g = torch.Generator().manual_seed(a["seed"])
    ids = torch.randint(0, min(cfg.vocab_size, cfg.mask_token_id), (a["n_samples"], a["seqlen"]), generator=g)
    calib = CalibSet(ids, torch.zeros_like(ids, dtype=torch.bool), torch.zeros(len(ids)))
    model_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    forward_pass(model, CalibSet(ids[:2, :64], calib.masked[:2, :64], calib.mask_ratio[:2]), 2)  # warm-up
    forward_s = forward_pass(model, calib, a["batch_size"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    info = method(model, spec, calib, opts)
    sync()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    gpu, _ = device_peak()
    return {
        "bench": "quantize", "args": a, "options": methods.as_dict(opts), "device": gpu, "dtype": str(dtype), "method_info": info,
        "model_gib": round(model_gib, 2),
        "quantize": {"seconds": round(seconds, 4), "minutes": round(seconds / 60, 2),
                     "peak_mem_gib": peak and round(peak, 2)},
        "baseline_forward_pass": {"seconds": round(forward_s, 4)},
        "quantize_over_forward_pass": round(seconds / forward_s, 1),
    }
