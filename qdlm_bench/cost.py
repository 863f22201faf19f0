"""What an evaluation will cost, counted from its requests without running the model: forward
passes, tokens and FLOPs, exactly as ``evaluation.adapter`` and ``diffusion`` do the work.

Counting rules (each mirrors the code it names):

- ``generate_until`` (``adapter.generate_until`` -> ``diffusion.generate``): per task, prompts (the
  tokens of the prompt, cut to their last ``max_length - gen_length`` tokens) are sorted by length
  and batched ``batch_size`` at a time, left-padded to the batch's longest prompt, plus
  ``gen_length`` masks. LLaDA: one pass per block step, a step runs only when its schedule
  unmasks a token (``min(steps / blocks, block_length)`` steps per block), logits on the block's
  columns; classifier-free guidance (``cfg_scale > 0``) doubles the rows of each pass. Dream: one
  pass per timestep while a token is masked (its float32 schedule replayed), logits on the
  generated columns. Dream's ``alg=origin`` draws which tokens move: counted as every step (an
  upper bound, flagged ``approx``).
- fast decoders (``decode``, ``qdlm_bench.decoders``): block by block; with a cache, each block's
  first pass is a full one and the others run only their fresh columns (``prefix``: the block to
  the end; ``dual``: the block; one column more for Dream) against all ``L`` keys: FLOPs of a row
  ``q * 2 * P_matmul + 4 * n_layers * q * L * d_model + c * 2 * d_model * vocab`` for ``q`` fresh
  columns. Parallel decoding's passes depend on the model's confidences: counted as their upper
  bound, one token per step (``block_length`` passes per block), flagged ``approx``; records hold
  the measured forward passes per sample.
- ``loglikelihood`` (``diffusion.loglikelihood``): per task, ``mc_num`` rows per request (prefix +
  target, the prefix cut so the pair fits ``max_length``), rows in order of length, ``batch_size``
  rows per pass, right-padded to the pass's longest row; logits on every column. Requests of
  ``output_type: loglikelihood`` tasks (a document with one request) also decode their target
  greedily (``adapter.is_greedy``): per target length n, prefixes batched by length, n passes per
  batch of LLaDA's sampler with ``gen_length = steps = block_length = n``.
- ``loglikelihood_rolling``: per document, its tokens cut into windows of ``max_length``, one
  ``loglikelihood`` call (rows = windows x ``mc_num``) per document.

Tokens are rows x sequence length summed over passes, padding included (the work the model
does). FLOPs are the dense matmul estimate of ``bench.common.forward_flops`` per row:

    FLOPs(row of L tokens, logits on c columns)
        = L * 2 * P_matmul  +  4 * n_layers * L^2 * d_model  +  c * 2 * d_model * vocab
    P_matmul = n_layers * (d_model * (2 * d_model + 2 * n_kv_heads * head_dim) + 3 * d_model * d_ff)

i.e. 2 x the non-embedding matmul parameters per token, the attention scores and weighted sum
(QK^T and AV, 2 * L * d_model each per token and layer, full bidirectional attention), and the LM
head on the columns whose logits are read. Norms, RoPE, softmax, sampling and quantization's
elementwise work are not counted (they are what makes the achieved TFLOP/s lower than peak).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field


@dataclass
class Cost:
    """Work of some passes: forward passes, tokens (rows x length), FLOPs, rows; ``probes``: per kind
    of work, one representative batch of it (``Probe``, of the largest part) for timing it."""

    passes: int = 0
    tokens: int = 0
    flops: float = 0.0
    rows: int = 0
    approx: bool = False  # an upper bound (Dream's alg=origin; parallel decoding's confidences)
    by_kind: dict = field(default_factory=dict)  # {"generate"|"loglikelihood"|"is_greedy"|"rolling": passes}
    flops_by_kind: dict = field(default_factory=dict)
    probes: dict = field(default_factory=dict, repr=False)  # {kind: (flops of the part, Probe)}

    def add(self, other: Cost, kind: str | None = None) -> Cost:
        """Add ``other`` (its work of ``kind`` when given) to this cost."""
        self.passes += other.passes
        self.tokens += other.tokens
        self.flops += other.flops
        self.rows += other.rows
        self.approx |= other.approx
        parts = {kind: other.passes} if kind else other.by_kind
        flops = {kind: other.flops} if kind else other.flops_by_kind
        for k in parts:
            if parts[k]:
                self.by_kind[k] = self.by_kind.get(k, 0) + parts[k]
                self.flops_by_kind[k] = self.flops_by_kind.get(k, 0.0) + flops[k]
        probes = other.probes
        if kind and probes:  # the part's largest probe stands for it, weighed by the whole part
            probes = {kind: (other.flops, max(probes.values(), key=lambda fp: fp[0])[1])}
        for k, (f, probe) in probes.items():
            if k not in self.probes or f > self.probes[k][0]:
                self.probes[k] = (f, probe)
        return self

    def as_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "probes"}


@dataclass
class Probe:
    """One batch of work as the code runs it, to time (``plan.measure_throughput``): ``generate``
    (prompt lengths, GenerationConfig) or ``loglikelihood`` ((prefix, target) lengths, one row each)."""

    kind: str
    lengths: list
    gen: object = None


def row_flops(cfg, seq_len: int, logit_cols: int) -> float:
    """FLOPs of one row of ``seq_len`` tokens with logits on ``logit_cols`` columns (module doc)."""
    from qdlm_bench.bench.common import forward_flops

    return forward_flops(cfg, seq_len, logit_cols)


def _pass(cfg, rows: int, seq_len: int, logit_cols: int, n: int = 1) -> Cost:
    """``n`` passes of ``rows`` x ``seq_len`` tokens, logits on ``logit_cols`` columns."""
    return Cost(passes=n, tokens=n * rows * seq_len, rows=n * rows,
                flops=n * rows * row_flops(cfg, seq_len, logit_cols))


def _chunks(seq: list, size: int):
    return (seq[i : i + size] for i in range(0, len(seq), size))


# ------------------------------------------------------------------------------- generation


def llada_steps(gen) -> int:
    """Passes of LLaDA's sampler over one batch: per block, the steps that unmask a token."""
    n_blocks = gen.gen_length // gen.block_length
    per_block = gen.steps // n_blocks
    return n_blocks * min(per_block, gen.block_length)


def dream_steps(gen) -> tuple[int, bool]:
    """Passes of Dream's sampler over one batch (every row masks ``gen_length`` tokens) and
    whether the count is an upper bound (``alg=origin``)."""
    if gen.alg == "origin":
        return gen.steps, True
    import torch

    timesteps = torch.linspace(1, gen.eps, gen.steps + 1)
    n, passes = torch.tensor([gen.gen_length]), 0
    for i in range(gen.steps):
        if not bool((n > 0).any()):
            continue
        passes += 1
        ratio = 1 - timesteps[i + 1] / timesteps[i]
        k = n if i == gen.steps - 1 else (n.float() * ratio).long()
        n = n - k
    return passes, False


def _fast_decoder_pass(cfg, rows: int, prompt_len: int, gen, decode) -> Cost:
    """All passes of a fast decoder (module doc) over ``rows`` prompts padded to ``prompt_len``."""
    from dataclasses import replace

    from qdlm_bench.decoders.counting import call_flops

    sampler = gen.sampler or cfg.family
    decode.check(gen, sampler)
    n_blocks, width = gen.gen_length // gen.block_length, gen.block_length
    block_gen = replace(gen, gen_length=width, steps=gen.steps // n_blocks, block_length=width)
    if decode.threshold is not None:
        steps, approx = width, True
    elif sampler == "llada":
        steps, approx = llada_steps(block_gen), False
    else:
        steps, approx = dream_steps(block_gen)
    seq, shift = prompt_len + gen.gen_length, int(cfg.shift_logits)
    out = Cost(approx=approx)
    for b in range(n_blocks):
        if decode.cache == "none":
            parts = [(seq, steps)]
        else:
            fresh = (seq - prompt_len - b * width if decode.cache == "prefix" else width) + shift
            fills = 1 if decode.refresh is None else -(-steps // decode.refresh)
            parts = [(seq, fills), (fresh, steps - fills)]
        for q, n in parts:
            if n > 0:
                out.add(Cost(passes=n, tokens=n * rows * q, rows=n * rows,
                             flops=n * rows * call_flops(cfg, q, seq, width)))
    return out


def generation_cost(cfg, prompt_lens: list[int], gen, batch_size: int, decode=None) -> Cost:
    """``diffusion.generate`` of prompts of these lengths (already cut to the window), with the
    exact sampler or the fast decoder ``decode`` (a ``DecodeConfig``; None: exact)."""
    from qdlm_bench.diffusion import check_generation

    sampler = gen.sampler or cfg.family
    check_generation(gen, sampler, [[0] * n for n in prompt_lens])
    if decode is not None and not decode.is_exact:
        out = Cost()
        batches = list(_chunks(sorted(prompt_lens), batch_size))
        for batch in batches:
            out.add(_fast_decoder_pass(cfg, len(batch), max(batch), gen, decode))
        if batches:
            out.probes["generate"] = (out.flops, Probe("generate", batches[len(batches) // 2], gen))
        return out
    if sampler == "llada":
        steps, approx, cols = llada_steps(gen), False, gen.block_length
        rows_per = 2 if gen.cfg_scale > 0 else 1
    else:
        (steps, approx), cols, rows_per = dream_steps(gen), gen.gen_length, 1
    out = Cost(approx=approx)
    batches = list(_chunks(sorted(prompt_lens), batch_size))
    for batch in batches:
        out.add(_pass(cfg, rows_per * len(batch), max(batch) + gen.gen_length, cols, n=steps))
    if batches:
        out.probes["generate"] = (out.flops, Probe("generate", batches[len(batches) // 2], gen))
    return out


# ------------------------------------------------------------------------------- likelihood


def loglikelihood_cost(cfg, pairs: list[tuple[int, int]], mc_num: int, batch_size: int) -> Cost:
    """``diffusion.loglikelihood`` of requests of these (prefix, target) lengths."""
    rows = [pair for pair in sorted(pairs, key=sum) for _ in range(mc_num)]
    batches = list(_chunks(rows, batch_size))
    out = Cost()
    for batch in batches:
        out.add(_pass(cfg, len(batch), sum(batch[-1]), sum(batch[-1])))
    if batches:
        out.probes["loglikelihood"] = (out.flops, Probe("loglikelihood", batches[len(batches) // 2]))
    return out


def greedy_cost(cfg, pairs: list[tuple[int, int]], batch_size: int) -> Cost:
    """``adapter.is_greedy`` of (prefix length, target length) pairs."""
    from qdlm_bench.generation import GenerationConfig

    by_length = defaultdict(list)
    for prefix, target in pairs:
        by_length[target].append(prefix)
    out = Cost()
    for n, prefixes in by_length.items():
        gen = GenerationConfig(gen_length=n, steps=n, block_length=n, sampler="llada")
        out.add(generation_cost(cfg, prefixes, gen, batch_size))
    return out


def rolling_cost(cfg, doc_lens: list[int], max_length: int, mc_num: int, batch_size: int) -> Cost:
    """``diffusion.rolling_loglikelihood`` of documents of these token counts, one call each."""
    out = Cost()
    for n in doc_lens:
        windows = [(0, min(max_length, n - i)) for i in range(0, n, max_length)]
        out.add(loglikelihood_cost(cfg, windows, mc_num, batch_size))
    return out


# ------------------------------------------------------------------------ an evaluation's requests


def requests_cost(lm, requests: list) -> dict[str, Cost]:
    """``{task: Cost}`` of lm-eval Instances (all tasks' requests, as ``evaluate`` sends them)
    through ``lm``, a ``DiffusionLMAdapter`` (its model needs only ``config`` and ``device``: the
    tokenizer and settings do the rest)."""
    from qdlm_bench.evaluation.adapter import requests_by_task, reads_is_greedy

    cfg, settings = lm.model.config, lm.settings
    bs = settings.batch_size
    by_type = defaultdict(list)
    for req in requests:
        by_type[req.request_type].extend([req] * (req.repeats or 1))
    out: dict[str, Cost] = defaultdict(Cost)
    for reqtype, reqs in by_type.items():
        reads_greedy = reads_is_greedy(reqs) if reqtype == "loglikelihood" else None
        for task, idx in requests_by_task(reqs).items():
            limit, mc_num = lm._max_length(task), settings.for_task(task)["mc_num"]
            if reqtype == "generate_until":
                gen = settings.generation_config(task, reqs[idx[0]].args[1])
                keep = max(1, limit - gen.gen_length)
                lens = [min(len(lm.encode(reqs[i].args[0])), keep) for i in idx]
                out[task].add(generation_cost(cfg, lens, gen, bs, settings.decode), "generate")
            elif reqtype == "loglikelihood":
                pairs = [lm.encode_pair(*reqs[i].args) for i in idx]
                pairs = [(max(0, min(len(p), limit - len(t))), len(t)) for p, t in pairs]
                out[task].add(loglikelihood_cost(cfg, pairs, mc_num, bs), "loglikelihood")
                check = [pairs[j] for j, i in enumerate(idx) if reads_greedy[i]]
                out[task].add(greedy_cost(cfg, check, bs), "is_greedy")
            elif reqtype == "loglikelihood_rolling":
                lens = [len(lm.tokenizer(reqs[i].args[0], add_special_tokens=False)["input_ids"]) for i in idx]
                out[task].add(rolling_cost(cfg, lens, limit, mc_num, bs), "rolling")
            else:
                raise ValueError(f"task {task}: request type {reqtype!r} is not evaluated by the adapter")
    return dict(out)
