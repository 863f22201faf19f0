"""The sampler benchmark:

    python -m qdlm_bench.bench sampler [shape=llada-8b] [batch=16] [prompt_len=500]
        [gen_length=256] [steps=256] [block_length=32] [baseline_prompts=2] [compile=0] [profile=0]
        [out=bench.json]

sampler: our batched LLaDA sampler over ``batch`` prompts of about ``prompt_len`` tokens
(lengths vary by ±5%, so padding is exercised) against the same sampler run one prompt at a
time (the reference implementations' loop); reports samples/s of both, the speed-up, and the
achieved TFLOP/s against the GPU's bf16 dense peak. ``compile=1`` compiles the blocks
(``compile_blocks``) for both. ``profile=1`` adds the profiler's top kernels of a batched run of one step per block.
"""

from __future__ import annotations

import torch

from qdlm_bench.diffusion import GenerationConfig, generate

from .common import (bench_model, device_peak, forward_flops, kernel_profile, parse_args, random_prompts, timed,
                     warmup_config)


def run(argv: list[str]) -> dict:
    a = parse_args(argv, dict(shape="llada-8b", batch=16, prompt_len=500, gen_length=256, steps=256,
                              block_length=32, baseline_prompts=2, compile=0, profile=0, seed=0, out=""))
    model = bench_model(a["shape"], a["seed"], a["compile"])
    device, dtype = model.device.type, model.dtype
    cfg = model.config
    prompts = random_prompts(cfg, a["batch"], a["prompt_len"], a["seed"])
    gen = GenerationConfig(gen_length=a["gen_length"], steps=a["steps"], block_length=a["block_length"],
                           sampler="llada")
    warm = warmup_config(gen)
    generate(model, prompts, warm, batch_size=a["batch"])  # the batched run's shapes
    generate(model, prompts[:2], warm, batch_size=1)  # two lengths: compilation goes dynamic
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batched_s = timed(lambda: generate(model, prompts, gen, batch_size=a["batch"]))
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    single = prompts[: a["baseline_prompts"]]
    single_s = timed(lambda: generate(model, single, gen, batch_size=1))
    # the sampler runs the LM head on the current block only; padding FLOPs are not counted
    flops = sum(forward_flops(cfg, len(p) + a["gen_length"], a["block_length"]) for p in prompts) * a["steps"]
    gpu, peak = device_peak()
    achieved = flops / batched_s / 1e12
    result = {
        "bench": "sampler", "args": a, "device": gpu, "dtype": str(dtype),
        "batched": {"prompts": len(prompts), "seconds": round(batched_s, 3),
                    "samples_per_s": round(len(prompts) / batched_s, 4), "peak_mem_gib": peak_gb and round(peak_gb, 2)},
        "one_at_a_time": {"prompts": len(single), "seconds": round(single_s, 3),
                          "samples_per_s": round(len(single) / single_s, 4)},
        "speedup": round((len(prompts) / batched_s) / (len(single) / single_s), 2),
        "achieved_tflops": round(achieved, 1),
        "peak_tflops_bf16": peak, "fraction_of_peak": peak and round(achieved / peak, 3),
    }
    if a["profile"]:
        result["profile_one_step_per_block"] = kernel_profile(lambda: generate(model, prompts, warm,
                                                                               batch_size=a["batch"]))
    return result
