"""``run``: evaluate an in-memory model on tasks with lm-eval; one primary metric per task.

Primary metrics (all of lm-eval's metrics are kept under "all"):

| task prefix                        | primary metric               | why                                    |
|------------------------------------|------------------------------|----------------------------------------|
| gsm8k                              | exact_match,flexible-extract | last number of the answer; robust to   |
|                                    |                              | formats ("strict-match" needs "#### N")|
| minerva_math, hendrycks_math,      | exact_match,none             | the "Final Answer: ..." sentence vs    |
| math500                            |                              | gold, as lm-eval's minerva_math500     |
|                                    |                              | (math500_local: math-verify equality;  |
|                                    |                              | its math_verify metric reads a box too)|
| humaneval, mbpp                    | pass@1,none                  | executed tests (pass@1 of lm-eval too) |
| arc_challenge, hellaswag           | acc_norm,none                | length-normalized, as commonly reported|
| arc_easy, piqa, winogrande, mmlu   | acc,none                     | plain accuracy                         |
| wikitext                           | word_perplexity,none         | lm-eval's headline (an upper bound: the|
|                                    |                              | ELBO bounds the likelihood from below) |

Other tasks (e.g. mini_*) take the first of ``FALLBACK_METRICS`` they report; a metric whose
filter differs (lm-eval's humaneval reports "pass@1,create_test") matches by its name.
hellaswag_local is a 1000-example subset of HellaSwag's validation set.
"""

from __future__ import annotations

import contextlib
import json
import math

import lm_eval
from lm_eval.tasks import TaskManager

from qdlm_bench import sandbox
from qdlm_bench.decoders.counting import merge_stats
from qdlm_bench.models.transformer import compile_blocks

from . import tasks as task_resolution
from .adapter import DiffusionLMAdapter
from .code_tasks import check_sandbox, code_tasks
from .request_cache import RequestCache
from .requests import evaluate_options, prepare_tasks
from .settings import EvalSettings

PRIMARY_METRICS = {
    "gsm8k": "exact_match,flexible-extract",
    "minerva_math": "exact_match,none",
    "hendrycks_math": "exact_match,none",
    "math500": "exact_match,none",
    "humaneval": "pass@1,none",
    "mbpp": "pass@1,none",
    "arc_easy": "acc,none",
    "arc_challenge": "acc_norm,none",
    "hellaswag": "acc_norm,none",
    "piqa": "acc,none",
    "winogrande": "acc,none",
    "mmlu": "acc,none",
    "wikitext": "word_perplexity,none",
}
FALLBACK_METRICS = ("pass@1,none", "exact_match,flexible-extract", "exact_match,strict-match",
                    "exact_match,none", "acc,none", "acc_norm,none", "word_perplexity,none")


def longest_prefix(table: dict, task: str):
    """The value of the longest key of ``table`` that prefixes ``task`` (None if none does)."""
    keys = [k for k in table if task.startswith(k)]
    return table[max(keys, key=len)] if keys else None


def primary_metric(task: str, metrics: dict) -> str:
    """The metric key reported for ``task`` among lm-eval's ``metrics`` of it."""
    candidates = [k for k in (longest_prefix(PRIMARY_METRICS, task), *FALLBACK_METRICS) if k]
    for key in candidates:
        if key in metrics:
            return key
    for key in candidates:
        same_name = [k for k in metrics if k.startswith(key.partition(",")[0] + ",")]
        if same_name:
            return same_name[0]
    numeric = [k for k, v in metrics.items() if "_stderr," not in k and isinstance(v, (int, float))]
    if not numeric:
        raise ValueError(f"task {task!r} reported no metric: {metrics}")
    return numeric[0]


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def summarize(task: str, metrics: dict) -> dict:
    """{"metric", "value", "stderr", "all"} of one task's lm-eval results."""
    key = primary_metric(task, metrics)
    name, _, filt = key.partition(",")
    numbers = {k: _number(v) for k, v in metrics.items() if "," in k}
    return {"metric": key, "value": numbers[key], "stderr": numbers.get(f"{name}_stderr,{filt}"),
            "all": {k: v for k, v in numbers.items() if v is not None}}


def run(model, tokenizer, tasks: list[str], settings: EvalSettings | None = None,
        request_cache: RequestCache | None = None) -> dict[str, dict]:
    """Evaluate ``model`` on ``tasks``: {task: {"metric", "value", "stderr", "all"}}.

    Task names resolve through ``tasks.resolve_tasks`` (project YAMLs with ``data_dir``, those
    under ``include_path``, else lm-eval names); few-shot counts and sampler settings are per task
    (``EvalSettings``, which learns here the groups around each task). Groups (e.g. mmlu_local)
    report their aggregate. ``log_samples`` adds lm-eval's per-document records (doc, prompt
    arguments, responses, filtered response, metrics) under "samples". Code tasks execute model
    output in ``settings.code_sandbox`` (``qdlm_bench.code_exec``; checked first,
    ``code_tasks.check_sandbox``) and their summary says which sandbox ran it ("code_sandbox").
    Finished batches persist in ``request_cache`` when given (``request_cache.for_run``): a killed
    run resumes inside a task. A generation task's summary has its decoder's timings ("generation":
    decode, samples, seconds, samples/s, forward passes per sample, TFLOP/s).
    """
    settings = settings or EvalSettings()
    code_mode = check_sandbox(tasks, settings.code_sandbox, settings.include_path)
    objs, settings = prepare_tasks(tasks, settings)
    if settings.compile:
        compile_blocks(model)
    lm = DiffusionLMAdapter(model, tokenizer, settings, request_cache)
    with sandbox.using(settings.code_sandbox) if code_mode else contextlib.nullcontext():
        results = lm_eval.simple_evaluate(
            model=lm, tasks=objs, limit=settings.limit,
            log_samples=settings.log_samples, **evaluate_options(settings),
            confirm_run_unsafe_code=code_mode is not None, task_manager=TaskManager(include_defaults=False),
        )
    executed = code_tasks(tasks, settings.include_path)
    out = {}
    for obj in objs:
        name = getattr(obj, "task_name", None) or obj.name
        out[name] = summarize(name, results["results"][name])
        if name in executed:
            out[name]["code_sandbox"] = code_mode
        if gen := [lm.generation_stats[t.task_name] for t in task_resolution.leaf_tasks([obj])
                   if t.task_name in lm.generation_stats]:
            out[name]["generation"] = merge_stats(gen)
        if settings.log_samples:
            samples = [s for t in task_resolution.leaf_tasks([obj]) for s in results["samples"].get(t.task_name, [])]
            out[name]["samples"] = json.loads(json.dumps(samples, default=str))
    return out
