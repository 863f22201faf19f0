"""The lm-eval model of an in-memory DiffusionLM (FP or quantized): likelihoods and generation.

- ``loglikelihood``: the Monte-Carlo ELBO of ``diffusion.loglikelihood`` with the task's
  ``mc_num``, and ``is_greedy`` as LLaDA's lm-eval wrapper decides it (``eval_llada.py``,
  ``suffix_greedy_prediction``): whether the target, masked after its prefix and decoded greedily
  one token per step, the most confident position first (the LLaDA sampler at temperature 0 with
  ``steps = gen_length = block_length =`` the target's length, whatever the model family),
  comes out unchanged. Only requests of ``output_type: loglikelihood`` tasks are decoded (lambada's
  ``acc`` reads is_greedy; a perplexity-only such task pays too, as requests do not name their
  metrics): their document sends one request, while a multiple-choice document sends one per
  choice (``idx`` 0, 1, ...) and gets False with no decoding (lm-eval reads it there only for an
  ``exact_match`` metric, which no multiple-choice task here uses).
- ``loglikelihood_rolling``: the ELBO bound of ``diffusion.rolling_loglikelihood`` over
  non-overlapping windows of ``max_length`` tokens (perplexities are upper bounds).
- ``generate_until``: ``diffusion.generate`` with the task's GenerationConfig; the output is cut
  at the first special token (EOS, end of turn...), decoded, then cut at the first ``until``
  string. lm-eval's ``max_gen_toks``, ``do_sample`` are ignored: ``gen_length`` rules. The
  settings' ``decode`` picks the decoder (``decoders.samplers.generate``: exact or a fast one);
  ``generation_stats[task]`` keeps its timings (``decoders.counting.GenerationMeter``: samples/s,
  forward passes per sample; after a resume, of the batches this process computed).

Progress: on a terminal (stderr a tty) or with ``eval.progress=true``, each task's generation shows a
bar over its requests (done/total, ETA; fed by the sampler's ``on_step``, which only observes),
rolling likelihoods one over their requests, and likelihoods the sampler's own bar over its batches;
each task's request count is logged. None of this changes a number.

Request cache (``request_cache``): given one, every batch of every task is read from it when
stored there and stored as it completes, so a killed run resumes inside a task with bit-equal
metrics; each task logs how many batches it served. ``is_greedy`` then decodes with a seeded
generator (its greedy settings draw no random number, so no token changes).

Requests are grouped by ``Instance.task_name`` so that each task gets its own settings
(``EvalSettings.for_task``). Prompts longer than ``max_length`` (default: the model's
``max_seq_len``) lose their oldest tokens, as lm-eval's HF model does.
"""

from __future__ import annotations

import logging
import sys
from collections import defaultdict
from contextlib import ExitStack

import torch
from tqdm.auto import tqdm
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from qdlm_bench import diffusion
from qdlm_bench.decoders import samplers as decoding
from qdlm_bench.decoders.counting import GenerationMeter

from .request_cache import RequestCache, task_cache
from .settings import EvalSettings

log = logging.getLogger(__name__)


@register_model("qdlm")
class DiffusionLMAdapter(LM):
    """An lm-eval ``LM`` around ``model`` (DiffusionLM) and its Hugging Face tokenizer; finished
    batches persist in ``request_cache`` when given."""

    def __init__(self, model, tokenizer, settings: EvalSettings | None = None,
                 request_cache: RequestCache | None = None):
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or EvalSettings()
        self.request_cache = request_cache
        self.generation_stats: dict[str, dict] = {}
        self._device = model.device
        self._stop_ids = set(tokenizer.all_special_ids) | {model.config.eos_token_id, model.config.mask_token_id}

    @property
    def progress(self) -> bool:
        """Progress bars: asked for (``eval.progress``), or stderr is a terminal (tqdm's ``disable=None``)."""
        return bool(self.settings.progress) or _terminal()

    # ------------------------------------------------------------------------- tokenization

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, with the tokenizer's BOS unless the text already starts with it."""
        bos = self.tokenizer.bos_token
        return self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's split: trailing spaces move to the continuation; tokens of the whole string."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole, prefix = self.encode(context + continuation), self.encode(context)
        return whole[: len(prefix)], whole[len(prefix) :]

    def decode(self, tokens: list[int]) -> str:
        """Text of generated tokens up to the first special token (EOS, end of turn, mask)."""
        end = next((i for i, t in enumerate(tokens) if t in self._stop_ids), len(tokens))
        return self.tokenizer.decode(tokens[:end], skip_special_tokens=True)

    def stop_rule(self, untils: list) -> diffusion.StopRule:
        """When a row's answer (``decode``, then ``cut_at_stops``) can no longer change: a special
        token decided, or a stop string that every request of the batch's task stops at."""
        common = set.intersection(*({u} if isinstance(u, str) else set(u or []) for u in untils))
        return diffusion.StopRule(frozenset(self._stop_ids), tuple(sorted(common)),
                                  lambda tokens: self.tokenizer.decode(tokens, skip_special_tokens=True))

    def _max_length(self, task: str) -> int:
        return self.settings.for_task(task)["max_length"] or self.model.config.max_seq_len

    # ---------------------------------------------------------------------- lm-eval methods

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = [None] * len(requests)
        reads_greedy = reads_is_greedy(requests)
        for task, idx in requests_by_task(requests).items():
            limit = self._max_length(task)
            pairs = [self.encode_pair(*requests[i].args) for i in idx]
            _warn_truncated(task, sum(len(p) + len(t) > limit for p, t in pairs), limit)
            pairs = [(p[max(0, len(p) + len(t) - limit) :], t) for p, t in pairs]
            mc_num = self.settings.for_task(task)["mc_num"]
            log.info("%s: %d loglikelihood requests x %d Monte-Carlo samples", task, len(idx), mc_num)
            with task_cache(self.request_cache, task) as cache:
                lls = diffusion.loglikelihood(
                    self.model, pairs, mc_num=mc_num, batch_size=self.settings.batch_size,
                    seed=self.settings.seed, progress=self.progress, cache=cache)
                check = [j for j, i in enumerate(idx) if reads_greedy[i]]
                greedy = dict(zip(check, self.is_greedy([pairs[j] for j in check], cache)))
            for j, (i, ll) in enumerate(zip(idx, lls)):
                out[i] = (ll, greedy.get(j, False))
        return out

    def is_greedy(self, pairs: list[tuple[list[int], list[int]]], cache=None) -> list[bool]:
        """For each (prefix, target): does greedy decoding of the masked target after the prefix,
        one token per step, the most confident position first, give back the target? ``cache``: a
        ``diffusion.BatchCache`` for the decoding batches."""
        out = [False] * len(pairs)
        by_length = defaultdict(list)
        for j, (_, target) in enumerate(pairs):
            by_length[len(target)].append(j)
        for n, js in by_length.items():
            cfg = diffusion.GenerationConfig(gen_length=n, steps=n, block_length=n, sampler="llada")
            generator = None if cache is None else torch.Generator(self.model.device).manual_seed(self.settings.seed)
            decoded = diffusion.generate(self.model, [pairs[j][0] for j in js], cfg, generator=generator,
                                         batch_size=self.settings.batch_size, progress=self.settings.progress,
                                         cache=cache)
            for j, tokens in zip(js, decoded):
                out[j] = tokens == list(pairs[j][1])
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out, caches = [], {}
        log.info("%d loglikelihood_rolling requests", len(requests))
        with ExitStack() as opened:
            for req in tqdm(requests, desc="loglikelihood_rolling", unit="req", disable=not self.progress,
                            file=sys.stderr):
                task = req.task_name or ""
                if task not in caches:
                    caches[task] = opened.enter_context(task_cache(self.request_cache, task))
                tokens = self.tokenizer(req.args[0], add_special_tokens=False)["input_ids"]
                out.append(diffusion.rolling_loglikelihood(
                    self.model, tokens, max_length=self._max_length(task), mc_num=self.settings.for_task(task)["mc_num"],
                    batch_size=self.settings.batch_size, seed=self.settings.seed, cache=caches[task]))
        return out

    def generate_until(self, requests) -> list[str]:
        out = [None] * len(requests)
        for task, idx in requests_by_task(requests).items():
            cfg = self.settings.generation_config(task, requests[idx[0]].args[1])
            keep = max(1, self._max_length(task) - cfg.gen_length)
            prompts = [self.encode(requests[i].args[0]) for i in idx]
            _warn_truncated(task, sum(len(p) > keep for p in prompts), keep)
            prompts = [p[-keep:] for p in prompts]
            generator = torch.Generator(self.model.device).manual_seed(self.settings.seed)
            log.info("%s: %d generate_until requests (gen_length %d, steps %d, batch %d)", task, len(idx),
                     cfg.gen_length, cfg.steps, self.settings.batch_size)
            meter = GenerationMeter(self.model)
            with (RequestBar(f"{task} generate_until", len(idx), cfg.steps, self.progress) as bar,
                  task_cache(self.request_cache, task) as cache, meter.measure(len(idx))):
                tokens = decoding.generate(self.model, prompts, cfg, self.settings.decode,
                                           batch_size=self.settings.batch_size, generator=generator,
                                           progress=self.settings.progress, on_step=bar.on_step, cache=cache,
                                           on_read_back=meter.read_back,
                                           finished=self.stop_rule([requests[i].args[1].get("until") for i in idx]))
            self.generation_stats[task] = {"decode": self.settings.decode.label, **meter.stats()}
            for i, toks in zip(idx, tokens):
                out[i] = cut_at_stops(self.decode(toks), requests[i].args[1].get("until"))
        return out

    # ------------------------------------------------------------------------ chat template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise ValueError("apply_chat_template is on, but the tokenizer has no chat template; "
                             "set eval.apply_chat_template=false or use an instruct model's tokenizer")
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template if chat_template else None


def _terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class RequestBar:
    """A bar over a task's generation requests (done/total, ETA), advanced by ``diffusion.generate``'s
    ``on_step(step, x)``: a batch of ``x.shape[0]`` requests (at its first step) is ``(step + 1) /
    steps`` done; a step index that does not grow starts the next batch. Observes only."""

    def __init__(self, desc: str, total: int, steps: int, enabled: bool):
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, unit="req",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} requests [{elapsed}<{remaining}]")
        self.steps, self.done, self.rows, self.last = max(1, steps), 0, 0, -1

    def on_step(self, step: int, x) -> None:
        if step <= self.last:
            self.done += self.rows
        if step <= self.last or self.last < 0:  # a batch's first step: its rows (finished rows leave it later)
            self.rows = int(x.shape[0])
        self.last = step
        self._set(self.done + self.rows * min(1.0, (step + 1) / self.steps))

    def _set(self, n: float) -> None:
        self.bar.update(min(n, self.bar.total) - self.bar.n)

    def __enter__(self) -> RequestBar:
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._set(self.bar.total)
        self.bar.close()


def _warn_truncated(task: str, n: int, kept: int):
    if n:
        log.warning("%s: %d prompt(s) longer than the model window; kept their last %d tokens "
                    "(raise max_length or the model's max_seq_len to avoid this)", task, n, kept)


def reads_is_greedy(requests) -> list[bool]:
    """Which requests belong to ``output_type: loglikelihood`` tasks, whose ``acc`` reads is_greedy:
    their document sends this one request (a multiple-choice document sends one per choice)."""
    choices = defaultdict(set)
    for req in requests:
        choices[req.task_name, req.doc_id].add(req.idx)
    return [choices[req.task_name, req.doc_id] == {0} for req in requests]


def requests_by_task(requests) -> dict[str, list[int]]:
    groups = defaultdict(list)
    for i, req in enumerate(requests):
        groups[req.task_name or ""].append(i)
    return groups


def cut_at_stops(text: str, until: str | list[str] | None) -> str:
    """``text`` up to the earliest occurrence of any stop string."""
    stops = [until] if isinstance(until, str) else list(until or [])
    return text[: min([text.find(s) for s in stops if s and s in text], default=len(text))]
