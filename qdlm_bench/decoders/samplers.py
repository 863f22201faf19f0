"""The fast decoders: Fast-dLLM's block-wise approximate KV caches and confidence-threshold
parallel decoding, on our models and our samplers' token rules (NVlabs/Fast-dLLM, arXiv 2505.22618).

Every decoder goes block by block (``block_length``; ``steps // n_blocks`` steps each). Within a
block, a step predicts the masked tokens of the block with the family's rule (LLaDA:
``diffusion.llada_tokens``; Dream: ``diffusion.dream_tokens``) and unmasks

- the sampler's scheduled count (LLaDA: an even split of the block's masks over its steps; Dream:
  its timestep schedule ``1 - s/t`` inside the block), most confident first; or, with
  ``threshold``, every masked token whose probability is >= threshold and at least the most
  confident one (per row: a row whose block is full waits for the others of its batch).

With a cache, the block's first model call is a plain forward that also stores every block's K/V
(``models.transformer.KVCache``: after RoPE and the K/V quantizers, so a quantized model's cache
holds its own quantized K/V); the other steps of the block run only ``fresh`` columns against it:
``prefix``: the block and everything after it; ``dual``: the block alone. ``refresh`` also refills
it every that many calls. With ``refresh=1`` a cached decoder is the exact sampler token for token
(LLaDA; Dream, whose exact sampler decodes the whole answer as one block, at ``block_length =
gen_length``); so is ``threshold > 1`` (one token per step) with LLaDA's ``steps = gen_length``.

Deliberate differences from Fast-dLLM: padded prompts are hidden from attention (its LLaDA model
passes no mask); a batch decides per row (its Dream threshold path reads row 0 only); for
Dream (shifted logits) the fresh columns start one column before the block, so the block's first
token is decided like the others (Fast-dLLM unmasks it at the block's first call whatever its
confidence); Dream's parallel confidence is the token's probability (as Fast-dLLM's
``confidence_threshold``), its scheduled one the sampler's ``alg``; classifier-free guidance and
Dream's ``origin`` algorithm are exact-only.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from qdlm_bench import diffusion
from qdlm_bench.generation import GenerationConfig
from qdlm_bench.models.transformer import KVCache

from .config import DecodeConfig


class Decoder:
    """The sampler of a fast decoder, with ``diffusion``'s sampler signature; ``label`` names it
    (``diffusion.generate`` keys cached batches by it)."""

    def __init__(self, decode: DecodeConfig):
        self.decode, self.label = decode, decode.label

    def __call__(self, model, x, attn, gen_start, cfg, generator, bar, on_step, finished=None) -> None:
        _blockwise(model, x, attn, gen_start, cfg, self.decode, generator, bar, on_step, finished)


def generate(model, prompts: list[list[int]], cfg: GenerationConfig, decode: DecodeConfig, **kwargs) -> list[list[int]]:
    """``diffusion.generate`` (same arguments and result) decoding with ``decode``: the exact sampler
    itself when ``decode`` is exact, else a ``Decoder``; bad settings fail before the model runs."""
    if decode.is_exact:
        return diffusion.generate(model, prompts, cfg, **kwargs)
    decode.check(cfg, cfg.sampler or model.config.family)
    return diffusion.generate(model, prompts, cfg, decoder=Decoder(decode), **kwargs)


def _llada_choice(logits, block, mask_id, cfg, generator, k, threshold):
    x0, conf = diffusion.llada_tokens(logits, mask_id, cfg, generator)
    conf = conf.masked_fill(block != mask_id, -torch.inf)
    return x0, conf, (k if threshold is None else _above(conf, threshold))


def _dream_choice(logits, block, mask_id, cfg, generator, k, threshold):
    masked = block == mask_id
    rule = cfg if threshold is None else replace(cfg, alg="maskgit_plus")
    x0, conf = diffusion.dream_tokens(logits[masked], mask_id, rule, generator)
    full = torch.full(masked.shape, -torch.inf, device=block.device, dtype=torch.float64)
    full[masked] = conf.double()
    if threshold is not None:
        k = _above(full, threshold)
    elif cfg.alg_temp > 0:  # as the exact Dream sampler: Gumbel-top-k over conf / alg_temp
        full = full / cfg.alg_temp + diffusion.gumbel(masked.shape, block.device, generator)
    tokens = torch.full_like(block, mask_id)
    tokens[masked] = x0
    return tokens, full, k


def _above(conf: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row: how many confidences are >= threshold, at least 1 where any token is masked."""
    masked = (conf > -torch.inf).sum(1)
    return (conf >= threshold).sum(1).clamp(min=1).minimum(masked)


def _schedule(sampler: str, n_masked: torch.Tensor, steps: int, cfg: GenerationConfig):
    """``k(i, masked_now)``: tokens to unmask at step ``i`` of a block (per row)."""
    if sampler == "llada":
        plan = diffusion.num_transfer_tokens(n_masked, steps)
        return lambda i, now: plan[:, i]
    timesteps = torch.linspace(1, cfg.eps, steps + 1, device=n_masked.device)

    def dream(i, now):
        if i == steps - 1:
            return now
        return (now.float() * (1 - timesteps[i + 1] / timesteps[i])).long()
    return dream


def _blockwise(model, x, attn, gen_start, cfg: GenerationConfig, decode: DecodeConfig, generator, bar, on_step,
               finished=None):
    """Decode ``x[:, gen_start:]`` [B, L] in place, block by block (see the module doc); stop after a
    block once every row is ``finished`` (``diffusion.StopRule``), the later blocks left masked."""
    sampler = cfg.sampler or model.config.family
    decode.check(cfg, sampler)
    choose = _llada_choice if sampler == "llada" else _dream_choice
    mask_id, width = model.config.mask_token_id, cfg.block_length
    n_blocks = cfg.gen_length // width
    steps = cfg.steps // n_blocks
    shift = int(model.config.shift_logits)
    cache = None if decode.cache == "none" else KVCache(len(model.blocks))
    done = 0
    for b in range(n_blocks):
        cols = slice(gen_start + b * width, gen_start + (b + 1) * width)
        fresh = slice(cols.start - shift, x.shape[1] if decode.cache == "prefix" else cols.stop)
        k_of = _schedule(sampler, (x[:, cols] == mask_id).sum(1), steps, cfg)
        since_fill, i = None, 0
        while (x[:, cols] == mask_id).any() and (decode.threshold is not None or i < steps):
            bar.update()
            block = x[:, cols]
            k = None if decode.threshold is not None else k_of(i, (block == mask_id).sum(1))
            i += 1
            if k is not None and not k.any():
                continue
            refill = cache is not None and (since_fill is None or since_fill == decode.refresh)
            since_fill = 1 if refill or since_fill is None else since_fill + 1
            use = None if cache is None or refill else fresh
            logits = model(x, attention_mask=attn, positions=cols, cache=cache, fresh=use)
            x0, conf, k = choose(logits, block, mask_id, cfg, generator, k, decode.threshold)
            x[:, cols] = torch.where(diffusion.top_k_mask(conf, k), x0, block)
            on_step(done, x)
            done += 1
        if b < n_blocks - 1 and all(diffusion.finished_rows(x, gen_start, cols.stop, finished)):
            bar.update(steps * (n_blocks - 1 - b))
            return
