"""Counting a model's work: ``ForwardCounter`` (forward passes, rows, matmul FLOPs while active) and
``GenerationMeter`` (samples/s, forward passes per sample, TFLOP/s of generation)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass


def call_flops(cfg, queries: int, keys: int, logit_positions: int) -> float:
    """Matmul FLOPs of one row of a forward: linears on ``queries`` columns, attention of those
    against ``keys`` columns, the LM head on ``logit_positions`` columns."""
    d_attn, d_kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    per_token = 2 * (cfg.d_model * (2 * d_attn + 2 * d_kv) + 3 * cfg.d_model * cfg.d_ff) * cfg.n_layers
    attention = 4 * queries * keys * d_attn * cfg.n_layers
    return per_token * queries + attention + 2 * cfg.d_model * cfg.vocab_size * logit_positions


def _width(s, n: int, rows: int = 1) -> float:
    """Columns per row that ``s`` (None: all ``n``; a slice; a boolean [B, L] mask) selects."""
    if s is None:
        return n
    if isinstance(s, slice):
        return len(range(*s.indices(n)))
    return int(s.sum()) / rows


@dataclass
class ForwardCounter:
    """``with ForwardCounter(model) as c:`` counts every ``model(...)`` call made inside:
    ``calls``, ``rows`` (sequences: a call on a batch of B counts B), ``flops`` (``call_flops``;
    padding included). Observes only."""

    model: object
    calls: int = 0
    rows: int = 0
    flops: float = 0.0

    def _hook(self, module, args, kwargs) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        b, n = ids.shape
        queries = _width(kwargs.get("fresh"), n)
        logits = _width(kwargs.get("positions"), n, b)
        self.calls += 1
        self.rows += b
        self.flops += b * call_flops(self.model.config, queries, n, logits)

    def __enter__(self) -> ForwardCounter:
        self._handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()


class GenerationMeter:
    """Measures generation: ``with meter.measure(n_samples): generate(...)`` times the block (the
    GPU synchronized) and counts the model's forward passes; ``stats()`` sums every measured
    block: samples, seconds, samples/s, forward passes per sample (a pass on a batch of B counts
    for each of its B samples), TFLOP/s (``call_flops``). Samples that a resumed run reads back
    from its request cache (``read_back(n)``, e.g. as ``generate``'s ``on_read_back``) are not
    generated: they count as ``read_back``, not as samples."""

    def __init__(self, model):
        self.model = model
        self.samples, self.seconds, self.rows, self.flops, self.read_back_samples = 0, 0.0, 0, 0.0, 0

    def read_back(self, n: int) -> None:
        """``n`` of the samples being measured were read back, not generated."""
        self.read_back_samples += n

    @contextmanager
    def measure(self, samples: int):
        import torch

        cuda = self.model.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.model.device)
        start, before = time.perf_counter(), self.read_back_samples
        with ForwardCounter(self.model) as counter:
            yield self
        if cuda:
            torch.cuda.synchronize(self.model.device)
        self.seconds += time.perf_counter() - start
        self.samples += samples - (self.read_back_samples - before)
        self.rows += counter.rows
        self.flops += counter.flops

    def stats(self) -> dict:
        s = max(self.seconds, 1e-9)
        return {"samples": self.samples, "seconds": round(self.seconds, 3),
                "samples_per_s": round(self.samples / s, 4),
                "forward_passes_per_sample": round(self.rows / max(self.samples, 1), 2),
                "tflops": round(self.flops / s / 1e12, 4), "read_back": self.read_back_samples}


def merge_stats(stats: list[dict]) -> dict:
    """One ``GenerationMeter.stats()``-shaped dict (with ``decode``) of several tasks' (a group's)."""
    if len(stats) == 1:
        return dict(stats[0])
    samples, seconds = sum(s["samples"] for s in stats), sum(s["seconds"] for s in stats)
    per_s = max(seconds, 1e-9)
    return {"decode": stats[0]["decode"], "samples": samples, "seconds": round(seconds, 3),
            "read_back": sum(s.get("read_back", 0) for s in stats),
            "samples_per_s": round(samples / per_s, 4),
            "forward_passes_per_sample": round(sum(s["forward_passes_per_sample"] * s["samples"] for s in stats)
                                               / max(samples, 1), 2),
            "tflops": round(sum(s["tflops"] * s["seconds"] for s in stats) / per_s, 4)}
