"""Calibration sets: ``build`` turns a source's text into a ``CalibSet`` (token windows or
left-padded prompts, optionally masked), cached on disk under ``cache_key``; ``confidences`` adds
the FP model's per-token confidence."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from qdlm_bench.diffusion import argmax_except, pad_rows

from .config import CalibConfig
from .sources import source_texts

log = logging.getLogger(__name__)

CACHE_VERSION = 2


@dataclasses.dataclass
class CalibSet:
    """``input_ids`` [N, L] (masked where ``masked`` [N, L] is True), ``mask_ratio`` [N] per sample.

    Optional, all [N, L]: ``attention_mask`` (1 = token, 0 = left padding; None = no padding),
    ``confidence`` (the FP model's, see ``confidences``), ``token_weights`` (weights of each
    token in the statistics of calibrated methods, e.g. DLLMQuant's CGQ; None = equal).
    """

    input_ids: torch.Tensor
    masked: torch.Tensor
    mask_ratio: torch.Tensor
    key: str = ""
    attention_mask: torch.Tensor | None = None
    confidence: torch.Tensor | None = None
    token_weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields that are set, by name."""
        return {f.name: v for f in dataclasses.fields(self) if isinstance(v := getattr(self, f.name), torch.Tensor)}

    def _map(self, fn) -> CalibSet:
        return dataclasses.replace(self, **{name: fn(t) for name, t in self.tensors().items()})

    def to(self, device) -> CalibSet:
        return self._map(lambda t: t.to(device))

    def batches(self, batch_size: int) -> Iterator[CalibSet]:
        """Consecutive slices of at most ``batch_size`` samples."""
        for i in range(0, len(self), batch_size):
            yield self._map(lambda t: t[i:i + batch_size])


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's full definition (fast tokenizers) or sorted vocabulary, with class and length."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}|{len(tokenizer)}|{spec}".encode()).hexdigest()


def cache_key(cfg: CalibConfig, tokenizer, mask_token_id: int, texts: list[str]) -> str:
    """Hash of the defining config, tokenizer fingerprint, source content (``source_texts``) and mask id."""
    parts = {"version": CACHE_VERSION, "cfg": cfg.defining(), "tokenizer": tokenizer_fingerprint(tokenizer),
             "source_sha256": hashlib.sha256(json.dumps(texts).encode()).hexdigest(),
             "mask_token_id": int(mask_token_id)}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"], dtype=torch.long)


def sample_windows(tokens: torch.Tensor, n: int, seqlen: int, gen: torch.Generator, source: str = "") -> torch.Tensor:
    """``n`` windows of ``seqlen`` tokens at random start positions -> [n, seqlen]."""
    if tokens.numel() < seqlen:
        raise ValueError(f"calibration source {source!r} has only {tokens.numel()} tokens, fewer than "
                         f"calib.seqlen={seqlen}; use calib.seqlen <= {tokens.numel()} or a longer text")
    starts = torch.randint(0, tokens.numel() - seqlen + 1, (n,), generator=gen)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def draw_ratios(spec: dict, n: int, gen: torch.Generator) -> torch.Tensor:
    if spec["dist"] == "fixed":
        return torch.full((n,), float(spec["value"]))
    low, high = float(spec["low"]), float(spec["high"])
    return low + (high - low) * torch.rand(n, generator=gen)


def encode_prompt(tokenizer, text: str, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt as the evaluation adapter encodes it: BOS unless the text starts with it;
    with ``chat_template``, the text is first wrapped as a user turn with the generation prompt."""
    if chat_template:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("calib.chat_template is on, but the tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    return tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]


def sample_prompts(prompts: list[list[int]], n: int, seqlen: int, pad_id: int, gen: torch.Generator,
                   source: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` distinct prompts at random, each cut to its last ``seqlen`` tokens and left-padded
    with ``pad_id`` -> (ids [n, L], attention mask [n, L] or None when all have one length)."""
    if n > len(prompts):
        raise ValueError(f"calibration source {source!r} has {len(prompts)} prompts, fewer than "
                         f"calib.n_samples={n}; use calib.n_samples <= {len(prompts)} or add tasks")
    chosen = torch.randperm(len(prompts), generator=gen)[:n].tolist()
    return pad_rows([torch.tensor(prompts[i][-seqlen:], dtype=torch.long) for i in chosen], pad_id, left=True)


def apply_masking(ids: torch.Tensor, ratios: torch.Tensor, mask_token_id: int, gen: torch.Generator,
                  attention_mask: torch.Tensor | None = None):
    """Mask round(t * n) uniformly chosen of the n real tokens of each row -> (masked ids, masked flags)."""
    n, length = ids.shape
    real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    counts = (ratios * real.sum(1)).round().long()
    scores = torch.rand(n, length, generator=gen).masked_fill(~real, 2.0)  # padding ranks last
    ranks = scores.argsort(dim=1).argsort(dim=1)  # a random permutation of the real tokens per row
    masked = ranks < counts[:, None]
    return ids.masked_fill(masked, mask_token_id), masked


def _file_name(source: str, key: str) -> str:
    stem = re.sub(r"[^\w.+-]", "_", Path(source).stem)
    return f"{stem}-{key[:16]}.pt"


def build(cfg: CalibConfig | Mapping, tokenizer, mask_token_id: int, data_dir=None,
          cache_dir: str | Path | None = ".cache/calib") -> CalibSet:
    """The calibration set ``cfg`` defines, loaded from ``cache_dir`` when built before (None: no cache)."""
    cfg = cfg if isinstance(cfg, CalibConfig) else CalibConfig.from_dict(cfg)
    texts = source_texts(cfg, data_dir)
    key = cache_key(cfg, tokenizer, mask_token_id, texts)
    file = Path(cache_dir) / _file_name(cfg.source, key) if cache_dir is not None else None
    if file is not None and file.is_file():
        log.info("calibration: loaded cached set %s", file)
        return load(file, key)
    gen = torch.Generator().manual_seed(cfg.seed)
    attn = None
    if cfg.prompt_tasks is not None:
        pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
        prompts = [encode_prompt(tokenizer, t, cfg.chat_template) for t in texts]
        ids, attn = sample_prompts(prompts, cfg.n_samples, cfg.seqlen, pad_id, gen, cfg.source)
    else:
        ids = sample_windows(_tokenize(tokenizer, texts[0]), cfg.n_samples, cfg.seqlen, gen, cfg.source)
    if cfg.masking == "random":
        ratios = draw_ratios(cfg.mask_ratio, cfg.n_samples, gen)
        ids, masked = apply_masking(ids, ratios, mask_token_id, gen, attn)
    else:
        ratios, masked = torch.zeros(cfg.n_samples), torch.zeros_like(ids, dtype=torch.bool)
    calib = CalibSet(ids, masked, ratios, key, attention_mask=attn)
    if file is not None:
        save(calib, file, cfg=cfg.defining())
        log.info("calibration: built %d x %d from %s, cached at %s", *ids.shape, cfg.source, file)
    return calib


def save(calib: CalibSet, file: Path, **extra) -> None:
    """Write ``calib``'s tensors (and ``extra`` entries, for inspection) to ``file`` atomically."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".tmp{os.getpid()}")
    torch.save({**calib.tensors(), **extra}, tmp)
    os.replace(tmp, file)


def load(file: Path, key: str) -> CalibSet:
    """The CalibSet ``save`` wrote to ``file``."""
    d = torch.load(file, weights_only=True)
    return CalibSet(**{f.name: d[f.name] for f in dataclasses.fields(CalibSet) if f.name in d}, key=key)


@torch.no_grad()
def confidences(model, calib: CalibSet, batch_size: int = 8) -> torch.Tensor:
    """The model's per-token confidence [N, L] on ``calib``, float32 on the CPU: at masked positions the
    probability of the greedy prediction (the most likely token but the mask token) under the
    unmodified softmax, the mask token's share kept, as the samplers read it (LLaDA's low-confidence
    remasking); elsewhere the probability of the token present."""
    out = []
    for b in calib.to(model.device).batches(batch_size):
        logits = model(b.input_ids, attention_mask=b.attention_mask).float()
        probs = logits.softmax(-1)
        ids = torch.where(b.masked, argmax_except(logits, model.config.mask_token_id), b.input_ids)
        out.append(probs.gather(-1, ids[..., None]).squeeze(-1).cpu())
    return torch.cat(out)
