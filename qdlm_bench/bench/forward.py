"""The forward benchmark:

    python -m qdlm_bench.bench forward [shape=llada-8b] [batch=8] [seq_len=512] [bits=w4a4]
        [method=quarot] [logits=0] [threads=0] [warmup=3] [repeats=10] [compile=0] [seed=0] [out=bench.json]

forward: one forward of a random-weight model (bf16 on GPU, fp32 on CPU) over ``batch`` random
sequences of ``seq_len`` tokens, timed in FP and then fake-quantized by ``method`` at ``bits``:

* ``quarot`` (the default): QuaRot with RTN weights, transformed in place (rotations, online
  Hadamards on the down_proj and o_proj inputs, per-token activation quantizers; K/V quantizers
  and the Q/K rotation when ``bits`` has kv);
* ``rtn``: RTN weights and the per-token activation quantizers (``bits=w8a8``: what a W8A8 run
  of rtn, gptq or awq evaluates with).

Reports the median time of each, the ratio quantized / FP (target <= 1.5 for QuaRot W4A4 on the
GPU, <= 1.3 for W8A8), the peak memory of each, the time the quantization took, and the quantized
logits' relative error on the first 64 positions. ``compile=1`` compiles the blocks
(``compile_blocks``) for both.

``shape``: a preset of ``models.presets.SHAPES`` or an embedded model's name (``tiny-llada-instruct``:
its shape, random weights). ``logits=N``: the LM head on the last N positions only, as a generation
step computes its block (0: every position). ``threads``: torch's intra-op threads (0: torch's
default). On the CPU the FP model is kept beside the quantized copy and the two are timed in turns
(each repeat one FP then one quantized forward), so a load that changes during the run (a shared
CPU) weighs on both alike; ``cpu_ms`` is the median process CPU time of one forward.
"""

from __future__ import annotations

import copy
import statistics
import time

import torch

from qdlm_bench import methods
from qdlm_bench.models.layout import check as read_checkpoint_config
from qdlm_bench.models.presets import SHAPES, random_model
from qdlm_bench.models.transformer import compile_blocks
from qdlm_bench.paths import ZOO_DIR
from qdlm_bench.quant import QuantSpec

from .common import bench_model, device_peak, forward_flops, parse_args, sync

TARGET_RATIO = {"quarot": 1.5, "rtn": 1.3}
KEPT_POSITIONS = 64
METHODS = {"quarot": {"weights": "rtn"}, "rtn": {}}  # the calibration-free ones (options)


def _model(shape: str, seed: int, compile: bool):
    """``bench_model`` of a preset, or a random model of an embedded model's shape."""
    if shape in SHAPES:
        return bench_model(shape, seed, compile)
    folder = ZOO_DIR / shape
    if not folder.is_dir():
        zoo = sorted(p.name for p in ZOO_DIR.iterdir() if p.is_dir()) if ZOO_DIR.is_dir() else []
        raise SystemExit(f"shape={shape!r}: neither a preset ({', '.join(sorted(SHAPES))}) nor an embedded model "
                         f"({', '.join(zoo)})")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(read_checkpoint_config(folder), dtype=dtype, device=device, seed=seed).eval()
    return compile_blocks(model) if compile else model


def _call(model, ids: torch.Tensor, logits: int):
    n = ids.shape[1]
    return model(ids, positions=slice(n - logits, n) if logits else None)


@torch.inference_mode()
def time_forward(models: list, ids: torch.Tensor, warmup: int, repeats: int, logits: int = 0) -> list[dict]:
    """For each model: the median wall time and process CPU time of a forward over ``ids`` after
    ``warmup`` calls (the models take turns in every repeat), the peak memory of the timed calls
    (CUDA; one model at a time only) and the logits of the first positions (CPU, float32)."""
    for _ in range(warmup):
        for model in models:
            _call(model, ids, logits)
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    wall, cpu, out = [[] for _ in models], [[] for _ in models], [None] * len(models)
    for _ in range(repeats):
        for i, model in enumerate(models):
            start, start_cpu = time.perf_counter(), time.process_time()
            out[i] = _call(model, ids, logits)
            sync()
            wall[i].append(time.perf_counter() - start)
            cpu[i].append(time.process_time() - start_cpu)
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    return [{"ms": statistics.median(w) * 1e3, "min_ms": min(w) * 1e3, "cpu_ms": statistics.median(c) * 1e3,
             "peak_mem_gib": peak and round(peak, 2), "logits": o[:, :KEPT_POSITIONS].float().cpu()}
            for w, c, o in zip(wall, cpu, out)]


def run(argv: list[str]) -> dict:
    a = parse_args(argv, dict(shape="llada-8b", batch=8, seq_len=512, bits="w4a4", method="quarot", logits=0,
                              threads=0, warmup=3, repeats=10, compile=0, seed=0, out=""))
    spec = QuantSpec.parse(a["bits"])
    if spec.is_fp:
        raise SystemExit(f"bits={a['bits']} is full precision; give a quantized spec such as w4a4")
    if a["method"] not in METHODS:
        raise SystemExit(f"method={a['method']!r}; the forward bench runs {', '.join(METHODS)} (no calibration)")
    if a["threads"] > 0:
        torch.set_num_threads(a["threads"])
    model = _model(a["shape"], a["seed"], a["compile"])
    device, dtype = model.device.type, model.dtype
    cfg = model.config
    g = torch.Generator().manual_seed(a["seed"])
    ids = torch.randint(0, min(cfg.vocab_size, cfg.mask_token_id), (a["batch"], a["seq_len"]), generator=g).to(device)
    logits = min(a["logits"], a["seq_len"])

    in_turns = device == "cpu"  # the tiny CPU models fit twice; an 8B one on the GPU is transformed in place
    fp = None if in_turns else time_forward([model], ids, a["warmup"], a["repeats"], logits)[0]
    fp_model = model
    if in_turns:
        model = copy.deepcopy(fp_model)
    sync()
    start = time.perf_counter()
    state = methods.QuantState(model, spec)  # neither reads a calibration set (QuaRot with RTN weights)
    with torch.no_grad():
        for step in methods.get(a["method"]).recipe(methods.build_options(a["method"], METHODS[a["method"]])):
            step(state)  # in place
    sync()
    quantize_s = time.perf_counter() - start
    if in_turns:
        fp, q = time_forward([fp_model, model], ids, a["warmup"], a["repeats"], logits)
    else:
        q = time_forward([model], ids, a["warmup"], a["repeats"], logits)[0]

    ref, out = fp.pop("logits"), q.pop("logits")
    gpu, peak = device_peak()
    tflops = forward_flops(cfg, a["seq_len"], logits or None) * a["batch"] / (fp["ms"] / 1e3) / 1e12

    def r(d):
        return {k: round(v, 2) if isinstance(v, float) and k.endswith("ms") else v for k, v in d.items()}

    return {
        "bench": "forward", "args": a, "device": gpu, "dtype": str(dtype), "threads": torch.get_num_threads(),
        "timed_in_turns": in_turns,
        "fp": {**r(fp), "achieved_tflops": round(tflops, 3 if device == "cpu" else 1), "peak_tflops_bf16": peak},
        a["method"]: {**r(q), "bits": spec.name, **({"weights": "rtn"} if a["method"] == "quarot" else {}),
                      "quantize_s": round(quantize_s, 2)},
        "ratio": round(q["ms"] / fp["ms"], 3), "cpu_ratio": round(q["cpu_ms"] / fp["cpu_ms"], 3),
        "target_ratio": TARGET_RATIO["rtn" if spec.a_bits == 8 else a["method"]],
        "logits_rel_err": round(((out - ref).norm() / ref.norm()).item(), 4),
    }
