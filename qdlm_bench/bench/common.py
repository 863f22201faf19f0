"""Helpers shared by the benchmarks: ``key=value`` arguments, FLOP counts, the GPU's peak."""

from __future__ import annotations

import time
from dataclasses import replace

import torch

from qdlm_bench.generation import GenerationConfig
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


def warmup_config(gen: GenerationConfig) -> GenerationConfig:
    """``gen`` with one step per block: a warm-up at the timed run's shapes (kernels, the allocator,
    and compilation, which a new sequence length would otherwise trigger inside the timed run)."""
    return replace(gen, steps=gen.gen_length // gen.block_length)


def device_peak() -> tuple[str, float | None]:
    if not torch.cuda.is_available():
        return "cpu", None
    name = torch.cuda.get_device_name()
    return name, next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)


def sync() -> None:
    """Wait for the GPU's queued work (a no-op on CPU), so wall times are complete."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    """Seconds one call of ``fn`` takes, queued GPU work included."""
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def random_tokens(cfg, n: int, g: torch.Generator) -> list[int]:
    """``n`` random token ids below the mask token (and the vocabulary's end)."""
    return torch.randint(0, min(cfg.vocab_size, cfg.mask_token_id), (n,), generator=g).tolist()


def random_prompts(cfg, n: int, length: int, seed: int) -> list[list[int]]:
    """``n`` random prompts of ``length`` tokens ±5%, so a batch of them is padded."""
    g = torch.Generator().manual_seed(seed)
    spread = max(1, length // 20)
    lengths = torch.randint(length - spread, length + spread + 1, (n,), generator=g)
    return [random_tokens(cfg, int(k), g) for k in lengths]


def bench_model(shape: str, seed: int, compile: bool = False):
    """A random-weight model of ``shape`` in eval mode: bf16 on the GPU, fp32 on CPU;
    ``compile`` compiles its blocks (``compile_blocks``)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(shape, dtype=dtype, device=device, seed=seed).eval()
    if compile:
        compile_blocks(model)
    return model


def kernel_profile(fn, top: int = 15) -> dict:
    """Where one call of ``fn`` spends its time: its wall time, the summed time of the device's
    kernels (on a CPU: of the operators), what is left (idle device, host work, syncs), and the
    ``top`` kernels with their share of the kernel time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sync()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        sync()
    wall = time.perf_counter() - start
    if cuda:
        events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
        us = [e.self_device_time_total for e in events]
    else:
        events = list(prof.key_averages())
        us = [e.self_cpu_time_total for e in events]
    total = sum(us) or 1.0
    ranked = sorted(zip(events, us), key=lambda p: p[1], reverse=True)[:top]
    return {"wall_ms": round(wall * 1e3, 1), "kernel_ms": round(total / 1e3, 1),
            "not_in_kernels_ms": round(wall * 1e3 - total / 1e3, 1),
            "top": [{"name": e.key[:90], "ms": round(t / 1e3, 3), "share": round(t / total, 4), "calls": e.count}
                    for e, t in ranked]}
