"""Helpers shared by the benchmarks: ``key=value`` arguments, FLOP counts, the GPU's peak."""

from __future__ import annotations

import torch

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


def sync() -> None:
    """Wait for the GPU's queued work (a no-op on CPU), so wall times are complete."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_model(shape: str, seed: int, compile: bool = False):
    """A random-weight model of ``shape`` in eval mode: bf16 on the GPU, fp32 on CPU;
    ``compile`` compiles its blocks (``compile_blocks``)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = random_model(shape, dtype=dtype, device=device, seed=seed).eval()
    if compile:
        compile_blocks(model)
    return model
