"""Named model shapes (real and tiny) and deterministic random models built from them."""

from __future__ import annotations

from dataclasses import replace

import torch

from .checkpoint import empty_model
from .config import DLLMConfig
from .transformer import DiffusionLM

SHAPES: dict[str, DLLMConfig] = {
    "llada-8b": DLLMConfig(
        family="llada", vocab_size=126464, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
        d_ff=12288, rope_theta=500000.0, norm_eps=1e-5, max_seq_len=4096,
        mask_token_id=126336, eos_token_id=126081, pad_token_id=126081),
    "dream-7b": DLLMConfig(
        family="dream", vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
        d_ff=18944, rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, shift_logits=True,
        max_seq_len=131072, mask_token_id=151666, eos_token_id=151643, pad_token_id=151643),
    "tiny-llada": DLLMConfig(
        family="llada", vocab_size=128, d_model=128, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=256,
        rope_theta=500000.0, norm_eps=1e-5, max_seq_len=2048,
        mask_token_id=127, eos_token_id=126, pad_token_id=126),
    "tiny-dream": DLLMConfig(
        family="dream", vocab_size=128, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256,
        rope_theta=1000000.0, norm_eps=1e-6, qkv_bias=True, shift_logits=True, max_seq_len=2048,
        mask_token_id=127, eos_token_id=126, pad_token_id=126),
}


def get_shape(shape: str | DLLMConfig) -> DLLMConfig:
    """A copy of the named preset (or of the given config)."""
    if isinstance(shape, DLLMConfig):
        return replace(shape, extra=dict(shape.extra))
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; valid shapes: {sorted(SHAPES)}")
    return replace(SHAPES[shape], extra={})


def random_model(shape: str | DLLMConfig, dtype: torch.dtype = torch.float32, device="cpu",
                 seed: int = 0, std: float | None = None) -> DiffusionLM:
    """A DiffusionLM with deterministic random weights, allocated directly on ``device``.

    Linears, biases and embeddings ~ N(0, std), norms = 1. ``std`` defaults to
    ``max(0.02, d_model ** -0.5)``: 0.02 at real sizes, larger for tiny models so their
    attention is far from uniform and logits differ across positions. Values are drawn in
    fp32 (a bf16 model is the rounded fp32 one) from a generator on ``device``.
    """
    cfg = get_shape(shape)
    std = max(0.02, cfg.d_model ** -0.5) if std is None else std
    model = empty_model(cfg, dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, device=p.device).normal_(0.0, std, generator=gen))
    return model
