"""Masked-diffusion sampling (LLaDA blocks, Dream timesteps) and the Monte-Carlo ELBO likelihood.

Everything works on batches of prompts of different lengths. Generation left-pads, so the
generated region occupies the same columns in every row; the likelihood right-pads. Pads are
hidden through ``attention_mask``, so a row computes what it would alone.

The samplers follow LLaDA's ``generate.py`` and Dream's ``generation_utils._sample``; they
only read logits where a decision is made (LLaDA: the current block; Dream: masked tokens).
One detail differs: a predicted token is never the mask token (``argmax_except``); the
confidences that choose what to unmask are computed, as in the references, from the unmodified
distribution (the mask token's probability included).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from qdlm_bench.generation import GenerationConfig


# ---------------------------------------------------------------------------------- helpers


def pad_token_id(model) -> int:
    """The id that pads ``model``'s batches: its pad token, else its EOS token, else 0."""
    cfg = model.config
    return next((t for t in (cfg.pad_token_id, cfg.eos_token_id) if t is not None), 0)


def pad_rows(rows: list[torch.Tensor], value, left: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack 1-D tensors padded with ``value`` to one length (on the left if ``left``); also the
    attention mask (None if no padding)."""
    n = max(len(r) for r in rows)
    out = torch.full((len(rows), n), value, dtype=rows[0].dtype)
    attn = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(n - len(r), n) if left else slice(0, len(r))
        out[i, cols], attn[i, cols] = r, 1
    return out, (None if bool(attn.all()) else attn)


def top_k_mask(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the ``k[b]`` highest ``scores[b]`` per row (vectorized, k varies by row)."""
    rank = scores.argsort(dim=-1, descending=True).argsort(dim=-1)
    return rank < k[:, None]


def gumbel(shape, device, generator) -> torch.Tensor:
    u = torch.rand(shape, device=device, generator=generator, dtype=torch.float64)
    return -torch.log(-torch.log(u.clamp_min(1e-20)))


def argmax_except(scores: torch.Tensor, token: int) -> torch.Tensor:
    """``scores.argmax(-1)`` over every id but ``token``: the samplers never predict the mask token
    (a broken or random model may prefer it), yet its score stays in every confidence."""
    best = scores.argmax(-1)
    hit = best == token
    if hit.any():
        rest = scores[hit]  # a copy
        rest[:, token] = -torch.inf
        best[hit] = rest.argmax(-1)
    return best


def _no_step(step: int, x: torch.Tensor) -> None:
    """The default ``on_step`` of ``generate``."""


@dataclass(frozen=True)
class StopRule:
    """When a row's answer is complete however the rest of its generation turns out: its decided
    tokens hold one of ``token_ids`` (the answer is cut at the first special token), or their text
    (``decode``) holds one of ``strings`` (cut at the first stop string; the text of a token prefix
    is a prefix of the whole text up to that string). ``key`` names the rule in cached batches."""

    token_ids: frozenset[int]
    strings: tuple[str, ...]
    decode: Callable[[list[int]], str] = field(compare=False)

    def __call__(self, tokens: list[int]) -> bool:
        if not self.token_ids.isdisjoint(tokens):
            return True
        text = self.decode(tokens)
        return any(s and s in text for s in self.strings)

    @property
    def key(self) -> tuple:
        return tuple(sorted(self.token_ids)), self.strings


def finished_rows(x: torch.Tensor, gen_start: int, stop: int, finished: StopRule | None) -> list[bool]:
    """Per row of ``x``: is it ``finished`` by its tokens ``x[:, gen_start:stop]`` (all False without a rule)."""
    if finished is None:
        return [False] * len(x)
    return [finished(row) for row in x[:, gen_start:stop].tolist()]


class BatchCache(Protocol):
    """Where finished batches persist (``evaluation.request_cache.TaskCache``): a batch's output,
    stored under the key of its ``kind`` and input ``content``, is read back instead of computed."""

    def key(self, kind: str, content: tuple) -> str: ...

    def get(self, key: str): ...

    def put(self, key: str, value) -> None: ...


def cached_batch(cache: BatchCache | None, kind: str, content: tuple, compute: Callable[[], object]):
    """``(compute(), True)``, or ``(value, False)`` when ``cache`` holds this batch's value (stored
    there by the call that computed it). ``content`` is keyed before ``compute`` runs."""
    if cache is None:
        return compute(), True
    key = cache.key(kind, content)
    value = cache.get(key)
    if value is not None:
        return value, False
    value = compute()
    cache.put(key, value)
    return value, True


def chunks(seq: list, size: int):
    """Consecutive slices of ``seq`` of ``size`` items (the last may be shorter)."""
    return (seq[i : i + size] for i in range(0, len(seq), size))


# ------------------------------------------------------------------------------------ LLaDA


def num_transfer_tokens(n_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps] tokens to unmask per step: an even split, the remainder to the first steps."""
    base, rem = n_masked // steps, n_masked % steps
    extra = torch.arange(steps, device=n_masked.device) < rem[:, None]
    return base[:, None] + extra.long()


def _llada_logits(model, x, attn, prompt_cols, cfg_scale, cols: slice) -> torch.Tensor:
    """Logits of columns ``cols``, with LLaDA's unsupervised classifier-free guidance."""
    if cfg_scale <= 0:
        return model(x, attention_mask=attn, positions=cols)
    un_x = x.masked_fill(prompt_cols, model.config.mask_token_id)
    both = model(torch.cat([x, un_x]), attention_mask=None if attn is None else attn.repeat(2, 1),
                 positions=cols)
    cond, un = both.chunk(2)
    return un + (cfg_scale + 1) * (cond - un)


def llada_tokens(logits: torch.Tensor, mask_id: int, cfg: GenerationConfig, generator):
    """LLaDA's prediction on logits [..., V] -> (tokens, confidence), as ``generate.py`` computes it.

    The token is the argmax of the logits, Gumbel-perturbed in float64 when ``cfg.temperature > 0``
    (``add_gumbel_noise``), over every id but the mask token. Its confidence is its softmax
    probability under the unmodified logits (``low_confidence``) or a uniform draw (``random``).
    """
    scores = logits
    if cfg.temperature > 0:
        u = torch.rand(logits.shape, device=logits.device, generator=generator, dtype=torch.float64)
        scores = logits.double().exp() / (-torch.log(u)) ** cfg.temperature
    x0 = argmax_except(scores, mask_id)
    if cfg.remasking == "low_confidence":
        conf = torch.softmax(logits.double(), -1).gather(-1, x0[..., None]).squeeze(-1)
    else:
        conf = torch.rand(x0.shape, device=logits.device, generator=generator, dtype=torch.float64)
    return x0, conf


def _llada_generate(model, x, attn, gen_start, cfg: GenerationConfig, generator, bar, on_step, finished=None):
    """LLaDA semi-autoregressive sampler on ``x`` [B, L] (in place); gen = x[:, gen_start:].

    After each block the rows that are ``finished`` (``StopRule``) leave the batch, their later
    blocks left masked; the others go on as a smaller batch of the same width and mask, which
    computes what the whole batch computes for them (each row is computed alone)."""
    mask_id, n_blocks = model.config.mask_token_id, cfg.gen_length // cfg.block_length
    steps = cfg.steps // n_blocks
    prompt_cols = torch.zeros_like(x, dtype=torch.bool)
    prompt_cols[:, :gen_start] = True if attn is None else attn[:, :gen_start].bool()
    live, rows = torch.arange(len(x), device=x.device), x  # ``rows``: x's live rows (x itself until one leaves)
    for b in range(n_blocks):
        cols = slice(gen_start + b * cfg.block_length, gen_start + (b + 1) * cfg.block_length)
        schedule = num_transfer_tokens((rows[:, cols] == mask_id).sum(1), steps)
        for i in range(steps):
            bar.update()
            if not schedule[:, i].any():
                continue
            logits = _llada_logits(model, rows, attn, prompt_cols, cfg.cfg_scale, cols)
            x0, conf = llada_tokens(logits, mask_id, cfg, generator)
            block = rows[:, cols]
            conf = conf.masked_fill(block != mask_id, -torch.inf)
            transfer = top_k_mask(conf, schedule[:, i])
            rows[:, cols] = torch.where(transfer, x0, block)
            on_step(b * steps + i, rows)
        if b == n_blocks - 1:
            continue
        keep = ~torch.tensor(finished_rows(rows, gen_start, cols.stop, finished), device=x.device)
        if keep.all():
            continue
        if rows is not x:
            x[live] = rows
        if not keep.any():
            bar.update(steps * (n_blocks - 1 - b))
            return
        live, rows = live[keep], rows[keep]
        attn = None if attn is None else attn[keep]
        prompt_cols = prompt_cols[keep]
    if rows is not x:
        x[live] = rows


# ------------------------------------------------------------------------------------ Dream


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, idx = logits.sort(-1, descending=True)
    remove = sorted_logits.softmax(-1).cumsum(-1) > top_p
    remove[..., 1:] = remove[..., :-1].clone()
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, idx, remove), torch.finfo(logits.dtype).min)


def _top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    kth = logits.topk(min(top_k, logits.size(-1)), -1).values[..., -1:]
    return logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)


def dream_tokens(logits: torch.Tensor, mask_id: int, cfg: GenerationConfig, generator):
    """Dream's ``sample_tokens`` on [N, V] logits -> (tokens [N], confidence [N]).

    The distribution is the softmax of the logits over ``cfg.temperature``, then top-p, then top-k
    filtered. The token is drawn from it (its argmax at temperature 0) with the mask token left
    out; should nothing but the mask token survive the filters, the token is the best other
    logit. The confidence is the reference's statistic of the unmodified distribution: the drawn
    token's probability, else (temperature 0) the largest probability (``maskgit_plus``), the
    top-2 margin (``topk_margin``), the negative entropy (``entropy``).
    """
    logits = logits.float()
    x0 = argmax_except(logits, mask_id)
    if cfg.temperature > 0:
        logits = logits / cfg.temperature
    if cfg.top_p is not None and cfg.top_p < 1:
        logits = _top_p_filter(logits, cfg.top_p)
    if cfg.top_k is not None:
        logits = _top_k_filter(logits, cfg.top_k)
    probs = logits.softmax(-1)
    if cfg.temperature > 0:
        weights = probs.clone()
        weights[:, mask_id] = 0
        stuck = (weights.sum(-1) == 0).nonzero().squeeze(1)  # only the mask token survived
        weights[stuck, x0[stuck]] = 1
        x0 = torch.multinomial(weights, 1, generator=generator).squeeze(-1)
        conf = probs.gather(-1, x0[:, None]).squeeze(-1)
    else:
        conf = probs.amax(-1)
    if cfg.alg == "topk_margin":
        top2 = probs.topk(2, -1).values
        conf = top2[:, 0] - top2[:, 1]
    elif cfg.alg == "entropy":
        conf = (probs * torch.log(probs + 1e-10)).sum(-1)
    return x0, conf


def _dream_generate(model, x, attn, gen_start, cfg: GenerationConfig, generator, bar, on_step, finished=None):
    """Dream's timestep sampler on ``x`` [B, L] (in place); gen = x[:, gen_start:]. It decodes the
    whole answer as one block, so ``finished`` never stops it early."""
    mask_id = model.config.mask_token_id
    timesteps = torch.linspace(1, cfg.eps, cfg.steps + 1, device=x.device)
    gen = x[:, gen_start:]  # a view: writing it writes x
    for i in range(cfg.steps):
        bar.update()
        masked = gen == mask_id
        if not masked.any():
            continue
        logits = model(x, attention_mask=attn, positions=slice(gen_start, None))
        last = i == cfg.steps - 1
        ratio = 1 - timesteps[i + 1] / timesteps[i]
        if cfg.alg == "origin":  # each masked token moves with probability 1 - s/t
            u = torch.rand(masked.shape, device=x.device, generator=generator)
            transfer = masked & (u < (1.0 if last else ratio))
            if transfer.any():
                gen[transfer] = dream_tokens(logits[transfer], mask_id, cfg, generator)[0]
            on_step(i, x)
            continue
        x0, conf = dream_tokens(logits[masked], mask_id, cfg, generator)
        full_conf = torch.full(masked.shape, -torch.inf, device=x.device, dtype=torch.float64)
        full_conf[masked] = conf.double()
        if cfg.alg_temp > 0:  # Gumbel-top-k == sampling positions from softmax(conf / alg_temp)
            full_conf = full_conf / cfg.alg_temp + gumbel(masked.shape, x.device, generator)
        n_masked = masked.sum(1)
        k = n_masked if last else (n_masked.float() * ratio).long()
        transfer = top_k_mask(full_conf, k)
        candidates = torch.full_like(gen, mask_id)
        candidates[masked] = x0
        gen[transfer] = candidates[transfer]
        on_step(i, x)


# ------------------------------------------------------------------------------- generation

_SAMPLERS = {"llada": _llada_generate, "dream": _dream_generate}


def check_generation(cfg: GenerationConfig, sampler: str, prompts: list[list[int]]):
    if sampler not in _SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {tuple(_SAMPLERS)}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. BOS)")
    if sampler == "llada":
        if cfg.gen_length % cfg.block_length:
            raise ValueError(
                f"gen_length {cfg.gen_length} is not a multiple of block_length {cfg.block_length}; "
                "choose a block_length that divides gen_length"
            )
        n_blocks = cfg.gen_length // cfg.block_length
        if cfg.steps % n_blocks:
            raise ValueError(
                f"steps {cfg.steps} is not a multiple of the number of blocks {n_blocks}; "
                f"use steps = a multiple of {n_blocks}"
            )


@torch.inference_mode()
def generate(
    model,
    prompts: list[list[int]],
    cfg: GenerationConfig,
    *,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
    progress: bool = False,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    cache: BatchCache | None = None,
    decoder: Callable | None = None,
    on_read_back: Callable[[int], None] | None = None,
    finished: StopRule | None = None,
) -> list[list[int]]:
    """Generate ``cfg.gen_length`` tokens after each prompt; returns only those, in prompt order.

    Prompts are sorted by length, batched ``batch_size`` at a time with left padding, and
    sampled with LLaDA's or Dream's algorithm. ``generator`` (on ``model.device``) drives all
    randomness; None uses torch's global RNG. ``on_step(step, x)``, if given, is called after
    each step that ran the model, with the step's index (0 .. cfg.steps - 1) and the batch
    being sampled, ``x`` [B, L] (prompts in batch order, left-padded; the generated tokens are
    ``x[:, -cfg.gen_length:]``, masks where still undecided).

    ``cache``: a batch found there (same sampler, settings, padded input and ``generator`` state
    before it) is not sampled: its tokens and the generator state after it are restored, so the
    later batches draw what they would have (``on_step`` is not called for it). Needs ``generator``.
    ``on_read_back(n)``, if given, is called with the number of prompts of each such batch.

    ``decoder``: a fast decoder (``decoders.samplers.Decoder``, with the samplers' signature and a
    ``label`` that keys its cached batches) instead of the family's exact sampler.

    ``finished``: a ``StopRule``; a block-wise sampler (LLaDA's, the fast decoders) that has
    finished every row of a batch after a block leaves the later blocks undecoded (mask tokens),
    since they cannot change any row's answer. Only where the sampler draws no random numbers
    (``cfg.deterministic``): a skipped draw would change what the later batches draw.
    """
    sampler = cfg.sampler or model.config.family
    check_generation(cfg, sampler, prompts)
    if cache is not None and generator is None:
        raise ValueError("generate with a cache needs an explicit generator (its state is part of a batch's key)")
    device, mask_id, pad_id = model.device, model.config.mask_token_id, pad_token_id(model)
    finished = finished if cfg.deterministic(sampler) else None
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int] | None] = [None] * len(prompts)
    n_batches = -(-len(prompts) // batch_size)
    with tqdm(total=n_batches * cfg.steps, disable=not progress, desc="generate") as bar:
        for idx in chunks(order, batch_size):
            rows = [torch.tensor(prompts[i] + [mask_id] * cfg.gen_length) for i in idx]
            x, attn = pad_rows(rows, pad_id, left=True)
            x, attn = x.to(device), None if attn is None else attn.to(device)
            gen_start = x.shape[1] - cfg.gen_length

            def sample(x=x, attn=attn, gen_start=gen_start):
                (decoder or _SAMPLERS[sampler])(model, x, attn, gen_start, cfg, generator, bar, on_step or _no_step,
                                                 finished)
                return {"tokens": x[:, gen_start:].tolist(), "rng": None if cache is None else rng_state(generator)}

            content = (sampler if decoder is None else f"{sampler}/{decoder.label}", asdict(cfg), x, attn,
                       None if cache is None else rng_state(generator), None if finished is None else finished.key)
            value, computed = cached_batch(cache, "generate", content, sample)
            if not computed:
                generator.set_state(torch.frombuffer(bytearray.fromhex(value["rng"]), dtype=torch.uint8))
                bar.update(cfg.steps)
                if on_read_back is not None:
                    on_read_back(len(idx))
            for i, row in zip(idx, value["tokens"]):
                out[i] = row
    return out


def rng_state(generator: torch.Generator) -> str:
    """``generator``'s state as hex (``set_state(torch.frombuffer(bytearray.fromhex(h), dtype=torch.uint8))``
    restores it)."""
    return generator.get_state().numpy().tobytes().hex()


# ------------------------------------------------------------------------------- likelihood


def request_seed(seed: int, prefix: list[int], target: list[int]) -> int:
    """The seed of one request's masks: a hash of (seed, prefix, target), so batching is irrelevant."""
    digest = hashlib.sha256(repr((seed, list(prefix), list(target))).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def mc_masks(n_target: int, mc_num: int, generator: torch.Generator) -> torch.Tensor:
    """[mc_num, n_target] masks with stratified counts, as LLaDA's ``_forward_process``.

    Counts are ``k, k + T/mc, k + 2T/mc, ...`` (rounded, wrapped into [1, T]) from one
    ``k ~ U{1..T}``; each sample masks exactly its count of positions, chosen at random.
    """
    k = int(torch.randint(1, n_target + 1, (), generator=generator))
    counts = torch.linspace(k, k + (mc_num - 1) * n_target / mc_num, mc_num).round().long()
    counts = (counts - 1) % n_target + 1
    rank = torch.rand(mc_num, n_target, generator=generator).argsort(1).argsort(1)
    return rank < counts[:, None]


def mc_rows(requests, order, mc_num: int, seed: int):
    """Yield (request index, clean sequence, mask) for every Monte-Carlo sample, request by request."""
    for i in order:
        prefix, target = requests[i]
        g = torch.Generator().manual_seed(request_seed(seed, prefix, target))
        seq = torch.tensor(list(prefix) + list(target))
        masks = F.pad(mc_masks(len(target), mc_num, g), (len(prefix), 0), value=False)
        for m in masks:
            yield i, seq, m


def batched(it, n: int):
    """Lists of ``n`` consecutive items of ``it`` (the last may be shorter)."""
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def _elbo_losses(model, seqs: list[torch.Tensor], masks: list[torch.Tensor], n_targets) -> torch.Tensor:
    """Per row: sum of CE over masked positions / (masked fraction of the target)."""
    device = model.device
    ids, attn = pad_rows(seqs, pad_token_id(model), left=False)
    is_mask, _ = pad_rows(masks, False, left=False)
    ids, is_mask = ids.to(device), is_mask.to(device)
    noisy = ids.masked_fill(is_mask, model.config.mask_token_id)
    logits = model(noisy, attention_mask=None if attn is None else attn.to(device), positions=is_mask)
    ce = F.cross_entropy(logits.float(), ids[is_mask], reduction="none").double()
    rows = is_mask.nonzero()[:, 0]
    per_row = torch.zeros(len(seqs), dtype=torch.float64, device=device).index_add_(0, rows, ce)
    n_masked = is_mask.sum(1).double()
    return per_row * torch.tensor(n_targets, dtype=torch.float64, device=device) / n_masked


@torch.inference_mode()
def loglikelihood(
    model,
    requests: list[tuple[list[int], list[int]]],
    *,
    mc_num: int = 128,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    cache: BatchCache | None = None,
) -> list[float]:
    """Monte-Carlo ELBO estimate of log p(target | prefix) for each (prefix, target).

    Each request draws ``mc_num`` masks of its target (the prefix is never masked) from a
    generator seeded by ``request_seed(seed, prefix, target)``, so a request's estimate does
    not depend on the other requests, their order, or ``batch_size``. Samples of several
    requests share forward passes of ``batch_size`` rows (right-padded, pads hidden). A batch
    found in ``cache`` (same rows and masks) is not computed: its stored losses are read back.
    """
    if mc_num < 1 or batch_size < 1:
        raise ValueError(f"mc_num and batch_size must be >= 1, got {mc_num}, {batch_size}")
    for prefix, target in requests:
        if len(target) == 0:
            raise ValueError(f"empty target for prefix of {len(prefix)} tokens")
    order = sorted(range(len(requests)), key=lambda i: len(requests[i][0]) + len(requests[i][1]))
    totals = [0.0] * len(requests)
    n_batches = -(-len(requests) * mc_num // batch_size)
    rows = mc_rows(requests, order, mc_num, seed)
    for batch in tqdm(batched(rows, batch_size), total=n_batches, disable=not progress, desc="loglik"):
        idx, seqs, masks = zip(*batch)
        n_targets = [len(requests[i][1]) for i in idx]
        losses, _ = cached_batch(cache, "elbo", (seqs, masks, n_targets),
                                 lambda: _elbo_losses(model, seqs, masks, n_targets).tolist())
        for i, loss in zip(idx, losses):
            totals[i] += loss
    return [-t / mc_num for t in totals]


def rolling_loglikelihood(
    model, tokens: list[int], *, max_length: int, mc_num: int = 32, batch_size: int = 32, seed: int = 0,
    cache: BatchCache | None = None,
) -> float:
    """Lower bound of log p(tokens): sum of the ELBOs of non-overlapping windows of ``max_length``.

    Each window is scored alone (empty prefix), so the result bounds the log-likelihood from
    below (perplexity from above) and ignores context across window edges.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if not tokens:
        return 0.0
    windows = [([], tokens[i : i + max_length]) for i in range(0, len(tokens), max_length)]
    return sum(loglikelihood(model, windows, mc_num=mc_num, batch_size=batch_size, seed=seed, cache=cache))
