"""Model presets (conf/model/*.yaml) → (model, tokenizer), with an in-process FP cache.

A sweep quantizes one FP model many times: the FP weights are read once per process and
every run gets a fresh copy, so no run sees another's quantization.
"""

from __future__ import annotations

import dataclasses
import json
import logging

import torch

from .checkpoint import empty_model, load_model
from .presets import SHAPES, random_model
from .tokenizer import byte_tokenizer
from .transformer import DiffusionLM

log = logging.getLogger("qdlm_bench")
_CACHE: dict[str, tuple] = {}


def _fit_vocab(shape: str, tokenizer):
    """A shape preset whose vocabulary and special ids follow ``tokenizer`` (random weights)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model.shape {shape!r}; valid: {', '.join(SHAPES)}")
    if tokenizer is None:
        return SHAPES[shape]
    return dataclasses.replace(
        SHAPES[shape], vocab_size=max(SHAPES[shape].vocab_size, len(tokenizer)),
        mask_token_id=tokenizer.convert_tokens_to_ids("<|mask|>"),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def _load(preset: dict, dtype: torch.dtype, seed: int):
    tokenizer = byte_tokenizer() if preset.get("tokenizer") == "byte" else None
    if preset.get("path") or not preset.get("shape"):
        model, loaded_tok = load_model(preset.get("path") or preset["hub_id"], family=preset["family"],
                                       dtype=dtype, device="cpu")
        tokenizer = tokenizer or loaded_tok
    else:
        model = random_model(_fit_vocab(preset["shape"], tokenizer), dtype=dtype, device="cpu", seed=seed)
    if preset.get("mask_token_id") is not None:
        model.config.mask_token_id = int(preset["mask_token_id"])
    if tokenizer is None:
        raise ValueError(f"model {preset['name']!r} has no tokenizer files; add them to its folder "
                         "or set model.tokenizer=byte")
    return model.config, {k: v.clone() for k, v in model.state_dict().items()}, tokenizer


def load_fp_model(preset: dict, dtype: str, device: str, seed: int = 0) -> tuple[DiffusionLM, object]:
    """A fresh FP model on ``device`` (weights cached on CPU across calls) and its tokenizer."""
    key = json.dumps([preset, dtype, seed], sort_keys=True, default=str)
    if key not in _CACHE:
        log.info("loading model %s (%s)", preset.get("name"), preset.get("path") or preset.get("hub_id") or preset.get("shape"))
        _CACHE.clear()  # one FP model at a time
        _CACHE[key] = _load(preset, getattr(torch, dtype), seed)
    config, state, tokenizer = _CACHE[key]
    model = empty_model(config, getattr(torch, dtype), device)
    model.load_state_dict(state)
    return model, tokenizer
