"""Speed and memory benchmarks, each against a baseline measured in the same run.

    python -m qdlm_bench.bench sampler [shape=llada-8b] [batch=16] [prompt_len=500]
        [gen_length=256] [steps=256] [block_length=32] [baseline_prompts=2] [compile=0] [out=bench.json]

sampler: our batched LLaDA sampler over ``batch`` prompts of about ``prompt_len`` tokens
(lengths vary by ±5%, so padding is exercised) against the same sampler run one prompt at a
time (the reference implementations' loop); reports samples/s of both, the speed-up, and the
achieved TFLOP/s against the GPU's bf16 dense peak. ``compile=1`` compiles the blocks
(``compile_blocks``) for both.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from qdlm_bench.diffusion import GenerationConfig, generate
from qdlm_bench.models.presets import random_model
from qdlm_bench.models.transformer import compile_blocks

BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM spec sheets


def parse_args(argv: list[str], defaults: dict) -> dict:
    args = dict(defaults)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise SystemExit(f"bad argument {item!r}; expected key=value with key in {sorted(defaults)}")
        args[key] = type(defaults[key])(value) if defaults[key] is not None else value
    return args


def forward_flops(cfg, seq_len: int, logit_positions: int | None = None) -> float:
    """Matmul FLOPs of one forward over one sequence: linears, attention, and the LM head on
    ``logit_positions`` columns (all by default)."""
    kv = cfg.n_kv_heads * cfg.head_dim
    per_token = 2 * (cfg.d_model * (2 * cfg.d_model + 2 * kv) + 3 * cfg.d_model * cfg.d_ff) * cfg.n_layers
    head = 2 * cfg.d_model * cfg.vocab_size * (seq_len if logit_positions is None else logit_positions)
    return per_token * seq_len + head + 4 * seq_len * seq_len * cfg.d_model * cfg.n_layers


def device_peak() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def timed_generate(model, prompts, gen: GenerationConfig, batch_size: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    generate(model, prompts, gen, batch_size=batch_size)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_sampler(argv: list[str]) -> dict:
    a = parse_args(argv, dict(shape="llada-8b", batch=16, prompt_len=500, gen_length=256, steps=256,
                              block_length=32, baseline_prompts=2, compile=0, seed=0, out=""))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(a["shape"], dtype=dtype, device=device, seed=a["seed"]).eval()
    if a["compile"]:
        compile_blocks(model)
    cfg = model.config
    g = torch.Generator().manual_seed(a["seed"])
    spread = max(1, a["prompt_len"] // 20)
    lengths = torch.randint(a["prompt_len"] - spread, a["prompt_len"] + spread + 1, (a["batch"],), generator=g)
    high = min(cfg.vocab_size, cfg.mask_token_id)
    prompts = [torch.randint(0, high, (int(n),), generator=g).tolist() for n in lengths]
    gen = GenerationConfig(gen_length=a["gen_length"], steps=a["steps"], block_length=a["block_length"],
                           sampler="llada")
    warm = GenerationConfig(gen_length=a["block_length"], steps=2, block_length=a["block_length"], sampler="llada")
    for n in (2, 1):  # kernels, allocator (and compilation) for both batch shapes
        generate(model, prompts[:n], warm, batch_size=n)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    batched_s = timed_generate(model, prompts, gen, batch_size=a["batch"])
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    single = prompts[: a["baseline_prompts"]]
    single_s = timed_generate(model, single, gen, batch_size=1)
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
    return result


BENCHES = {"sampler": bench_sampler}


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in BENCHES:
        raise SystemExit(f"usage: python -m qdlm_bench.bench {{{'|'.join(BENCHES)}}} [key=value ...]")
    out = next((x.split("=", 1)[1] for x in argv if x.startswith("out=")), "")
    result = BENCHES[argv[0]](argv[1:])
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
