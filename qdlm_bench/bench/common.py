"""Helpers shared by the benchmarks: ``key=value`` arguments, FLOP counts, the GPU's peak."""

from __future__ import annotations

import torch

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
