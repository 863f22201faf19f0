"""The decoding benchmark:

    python -m qdlm_bench.bench decode [shape=llada-8b] [batches=1,16] [prompt_len=500]
        [gen_length=256] [steps=256] [block_length=32] [threshold=0.9]
        [decoders=exact,prefix_cache,dual_cache,parallel,prefix_cache_parallel,dual_cache_parallel]
        [batch1_prompts=2] [compile=0] [profile=0] [zoo=] [seed=0] [out=bench.json]

decode: every decoder of the ``decode`` axis (``qdlm_bench.decoders``; the names of conf/decode/,
parallel ones at ``threshold``) generates for the same prompts of about ``prompt_len`` random tokens
(lengths vary by ±5%) on a random-weight model of ``shape`` (LLaDA-8B's by default, the model of
``model=llada_8b_random``; bf16 on GPU, fp32 on CPU), at each batch size of ``batches`` (``batch``
prompts; ``batch1_prompts`` prompts one at a time at batch 1). Per batch size and decoder:
samples/s, forward passes per sample, TFLOP/s (counted matmul FLOPs, padding included, per second),
the speed-up over ``exact`` and the fraction of generated tokens equal to exact decoding's; for
``exact``, also the fraction of the GPU's bf16 dense peak it reaches with padding FLOPs not counted
(as ``bench sampler``). ``profile=1`` adds, per batch size, the profiler's view of exact decoding
with one step per block (``kernel_profile``: wall vs kernel time, top kernels).

Random weights give near-uniform predictions: no confidence reaches a threshold like 0.9, so the
parallel decoders unmask one token per step there (``forward_passes_per_sample`` shows it).
``zoo=<name>`` (e.g. ``zoo=tiny-llada-instruct``) runs a trained model of the zoo instead, on its
mini_math questions in the task's prompt format (``prompt_len`` unused): parallel decoding then
unmasks what the model is confident of, so its speed-up is measured, at the zoo model's size.
"""

from __future__ import annotations

import torch

from qdlm_bench.decoders.config import DecodeConfig
from qdlm_bench.decoders.counting import GenerationMeter
from qdlm_bench.decoders.samplers import generate
from qdlm_bench.generation import GenerationConfig
from qdlm_bench.models.transformer import compile_blocks

from .common import (bench_model, device_peak, forward_flops, kernel_profile, parse_args, random_prompts,
                     warmup_config)

DECODERS = {"exact": {}, "prefix_cache": {"cache": "prefix"}, "dual_cache": {"cache": "dual"},
            "parallel": {"parallel": True}, "prefix_cache_parallel": {"cache": "prefix", "parallel": True},
            "dual_cache_parallel": {"cache": "dual", "parallel": True}}


def decoder(name: str, threshold: float) -> DecodeConfig:
    if name not in DECODERS:
        raise SystemExit(f"unknown decoder {name!r}; valid: {', '.join(DECODERS)}")
    spec = dict(DECODERS[name])
    return DecodeConfig(cache=spec.get("cache", "none"), threshold=threshold if spec.get("parallel") else None)


def zoo_model_and_prompts(name: str, n: int, device: str):
    """A trained zoo model (bf16 on GPU, fp32 on CPU) and ``n`` mini_math questions as its task prompts."""
    import json

    from qdlm_bench.models.checkpoint import load_model
    from qdlm_bench.paths import TASKS_DIR, ZOO_DIR

    if not (ZOO_DIR / name).is_dir():
        raise SystemExit(f"no zoo model {name!r}; shipped: {sorted(p.name for p in ZOO_DIR.iterdir())}")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = load_model(ZOO_DIR / name, dtype=dtype, device=device)
    lines = (TASKS_DIR / "mini" / "mini_math.jsonl").read_text().splitlines()[:n]
    texts = [f"Question: {json.loads(line)['question']}\nAnswer:" for line in lines]
    return model.eval(), [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def run(argv: list[str]) -> dict:
    a = parse_args(argv, dict(shape="llada-8b", batches="1,16", prompt_len=500, gen_length=256, steps=256,
                              block_length=32, threshold=0.9, decoders=",".join(DECODERS), batch1_prompts=2,
                              compile=0, profile=0, zoo="", seed=0, out=""))
    decoders = {name: decoder(name, a["threshold"]) for name in a["decoders"].split(",")}
    batches = [int(b) for b in a["batches"].split(",")]
    if a["zoo"]:
        model, prompts = zoo_model_and_prompts(a["zoo"], max(batches), "cuda" if torch.cuda.is_available() else "cpu")
        if a["compile"]:
            compile_blocks(model)
    else:
        model = bench_model(a["shape"], a["seed"], a["compile"])
        prompts = random_prompts(model.config, max(batches), a["prompt_len"], a["seed"])
    gen = GenerationConfig(gen_length=a["gen_length"], steps=a["steps"], block_length=a["block_length"],
                           sampler="llada")
    warm = warmup_config(gen)
    gpu, peak = device_peak()
    result = {"bench": "decode", "args": a, "device": gpu, "dtype": str(model.dtype), "peak_tflops_bf16": peak}
    for batch in batches:
        some = prompts[: a["batch1_prompts"] if batch == 1 else batch]
        for d in decoders.values():  # kernels, allocator (and compilation) for every decoder's shapes
            generate(model, some, warm, d, batch_size=batch)
        rows, exact_tokens = {}, None
        for name, d in decoders.items():
            meter = GenerationMeter(model)
            with meter.measure(len(some)):
                tokens = generate(model, some, gen, d, batch_size=batch)
            stats = meter.stats()
            if name == "exact":
                exact_tokens = tokens
                useful = sum(forward_flops(model.config, len(p) + gen.gen_length, gen.block_length)
                             for p in some) * gen.steps
                stats["fraction_of_peak_no_padding"] = peak and round(useful / stats["seconds"] / 1e12 / peak, 3)
            if exact_tokens is not None:
                same = sum(t == e for row, ref in zip(tokens, exact_tokens) for t, e in zip(row, ref))
                stats["same_tokens_as_exact"] = round(same / sum(map(len, exact_tokens)), 4)
            rows[name] = {"decode": d.label, **stats}
        if "exact" in rows:
            for stats in rows.values():
                stats["speedup"] = round(stats["samples_per_s"] / rows["exact"]["samples_per_s"], 2)
        if a["profile"]:
            rows["exact_profile"] = kernel_profile(lambda: generate(model, some, warm, DecodeConfig(),
                                                                    batch_size=batch))
        result[f"batch{batch}"] = rows
    return result
