"""A quick score of a model on the first items of the mini tasks (a proxy of the lm-eval scores).

Prompts as the task YAMLs (zero-shot, no chat template); math: exact match of ``#### N``;
code: pass rate of the completion against the tests; QA: accuracy of the most likely choice, on
the held-out facts (``qa_acc``, the mini task) and on the training split's (``qa_train_acc``:
facts whose questions the training text asks), which separates recall from knowledge extraction.

    python -m qdlm_bench.zoo.check qdlm_bench/zoo/models/tiny-llada-instruct [--n 64]
"""

from __future__ import annotations

import argparse
import json
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
    return {"math_em": math_em / len(math), "code_pass": code_pass / len(code),
            "qa_acc": _qa_accuracy(model, tokenizer, tasks.task_rows("qa")[:n], mc_num),
            "qa_train_acc": _qa_accuracy(model, tokenizer, tasks.task_rows("qa", "train")[:n], mc_num)}


def _qa_accuracy(model, tokenizer, rows: list[dict], mc_num: int) -> float:
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    reqs = [(enc(tasks.pair("qa", r)[0]), enc(" " + c)) for r in rows for c in r["choices"]["text"]]
    ll = loglikelihood(model, reqs, mc_num=mc_num)
    right = sum(max(range(4), key=lambda j: ll[4 * i + j]) == "ABCD".index(r["answerKey"]) for i, r in enumerate(rows))
    return right / len(rows)


def main(argv=None) -> None:
    from ..models.checkpoint import load_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", help="a model folder, e.g. qdlm_bench/zoo/models/tiny-llada-instruct")
    ap.add_argument("--n", type=int, default=64, help="items of each task")
    args = ap.parse_args(argv)
    model, tokenizer = load_model(args.model)
    print(json.dumps(check(model.float(), tokenizer, args.n)))


if __name__ == "__main__":
    main()
