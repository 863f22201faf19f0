"""A quick score of a model on the first items of the mini tasks (a proxy of the lm-eval scores).

Prompts as the task YAMLs (zero-shot, no chat template); math: exact match of ``#### N``;
code: pass rate of the completion against the tests; QA: accuracy of the most likely choice.
"""

from __future__ import annotations

import re

from ..code_exec import run_programs
from ..diffusion import GenerationConfig, generate, loglikelihood
from . import tasks

STOP = {"math": ("Question:", "\n\n", "<|endoftext|>"),
        "code": ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "<|endoftext|>")}


def _cut(text: str, stops) -> str:
    return text[:min([text.index(s) for s in stops if s in text], default=len(text))]


def _generate(model, tokenizer, prompts: list[str], gen_length: int) -> list[str]:
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    cfg = GenerationConfig(gen_length=gen_length, steps=gen_length, block_length=32)
    return [tokenizer.decode(g) for g in generate(model, ids, cfg)]


def check(model, tokenizer, n: int = 64, mc_num: int = 16) -> dict[str, float]:
    """{"math_em", "code_pass", "qa_acc"} over the first ``n`` items of each mini task."""
    model.eval()
    math = tasks.task_rows("math")[:n]
    outs = _generate(model, tokenizer, [tasks.pair("math", r)[0] for r in math], 64)
    found = [re.search(r"#### (-?[0-9]+)", _cut(o, STOP["math"])) for o in outs]
    math_em = sum(bool(f) and f.group(1) == r["answer"].split("#### ")[-1] for f, r in zip(found, math))
    code = tasks.task_rows("code")[:n]
    outs = _generate(model, tokenizer, [r["prompt"] for r in code], 32)
    programs = [f"{r['prompt']}{_cut(o, STOP['code'])}\n\n{r['test']}\ncheck({r['entry_point']})\n"
                for o, r in zip(outs, code)]
    code_pass = sum(res.passed for res in run_programs(programs))
    qa = tasks.task_rows("qa")[:n]
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    reqs = [(enc(tasks.pair("qa", r)[0]), enc(" " + c)) for r in qa for c in r["choices"]["text"]]
    ll = loglikelihood(model, reqs, mc_num=mc_num)
    qa_acc = sum(max(range(4), key=lambda j: ll[4 * i + j]) == "ABCD".index(r["answerKey"])
                 for i, r in enumerate(qa))
    return {"math_em": math_em / len(math), "code_pass": code_pass / len(code), "qa_acc": qa_acc / len(qa)}
