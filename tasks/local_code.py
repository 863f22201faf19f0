"""HumanEval / MBPP scoring by executing programs (qdlm_bench.code_exec), with or without chat.

lm-eval's own code tasks call ``evaluate.load("code_eval")``, which needs the network and runs the
programs unsandboxed. Here each doc's answers become test programs run in the sandbox of
``eval.code_sandbox`` (``qdlm_bench.code_exec``; ``harness.run`` sets it, ``auto`` when called
directly); the metric is pass@1 (the mean over
answers of passing, i.e. unbiased pass@1 when a task repeats). An answer's code is:

- without the chat template: the answer as generated (a completion), as lm-eval's ``humaneval``
  and ``mbpp``;
- with it (``CodeTask``): the first fenced block of the reply (```python or a bare ```, up to its
  closing fence or the end of the reply), else the whole reply, as lm-eval's ``humaneval_instruct``
  and ``mbpp_instruct`` extract it. HumanEval runs the prompt then that code, as
  ``humaneval_instruct``: a whole function redefines the prompt's (whose docstring is a body).
"""

from __future__ import annotations

import re

from lm_eval.api.task import ConfigurableTask

from qdlm_bench.code_exec import pass_at_k, run_programs

_FENCE = re.compile(r"```[\w+.-]*[ \t]*\n(.*?)(?:```|\Z)", re.S)


class CodeTask(ConfigurableTask):
    """A code task that knows whether the chat template is on (lm-eval says so only when it builds
    the requests): then requests stop at the YAML's ``metadata.chat_until`` when set (HumanEval's
    stops would cut a reply at ``"```python\\ndef"``), and answers are scored as chat replies."""

    def __init__(self, config: dict):
        super().__init__(config={k: v for k, v in config.items() if k != "class"})
        self.chat = False

    def build_all_requests(self, *, apply_chat_template: bool = False, **kwargs) -> None:
        self.chat = bool(apply_chat_template)
        super().build_all_requests(apply_chat_template=apply_chat_template, **kwargs)

    def construct_requests(self, doc, ctx, **kwargs):
        request = super().construct_requests(doc, ctx, **kwargs)
        until = (self.config.metadata or {}).get("chat_until")
        if self.chat and until is not None:
            request.arguments = (request.arguments[0], {**request.arguments[1], "until": list(until)})
        return request

    def apply_filters(self):
        out = super().apply_filters()
        self.run_all_programs()
        return out

    def run_all_programs(self) -> None:
        """Run the programs of every doc's answers at once (``run_programs``: a worker per CPU, up to
        8), before lm-eval scores the docs one at a time: ``process_results`` then reads each
        result back (``_score``) instead of running its doc's programs alone."""
        build = getattr(self.config.process_results, "programs", None)
        if build is None:
            return
        programs = list(dict.fromkeys(p for inst in self.instances for answers in inst.filtered_resps.values()
                                      for p in build(inst.doc, [answers], chat=self.chat)))
        _RAN.clear()
        _RAN.update(zip(programs, (r.passed for r in run_programs(programs))))

    def process_results(self, doc, results):
        return self.config.process_results(doc, results, chat=self.chat)


def extract_code(reply: str) -> str:
    """The first fenced code block of a chat reply (to its closing fence or the end), else the reply."""
    match = _FENCE.search(reply)
    return match.group(1) if match else reply


def _codes(results, chat: bool) -> list[str]:
    answers = [results] if isinstance(results, str) else list(results)
    return [extract_code(a) for a in answers] if chat else answers


_RAN: dict[str, bool] = {}  # program -> passed: run ahead by CodeTask.run_all_programs, which clears it


def _score(programs: list[str]) -> dict:
    todo = [p for p in programs if p not in _RAN]
    if todo:
        _RAN.update(zip(todo, (r.passed for r in run_programs(todo))))
    passed = sum(_RAN[p] for p in programs)
    return {"pass@1": pass_at_k(len(programs), passed, 1)}


def humaneval_programs(doc: dict, results, chat: bool = False) -> list[str]:
    """The prompt (signature + docstring), the code, the tests, then ``check(entry_point)``."""
    return [f"{doc['prompt']}{c}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n" for c in _codes(results[0], chat)]


def mbpp_programs(doc: dict, results, chat: bool = False) -> list[str]:
    """The code (a completion: up to ``[DONE]``), the setup code, then the doc's asserts."""
    tests = "\n".join([doc["test_setup_code"], *doc["test_list"]])
    return [f"{c}\n\n{tests}\n" for c in _codes(results[0], chat)]


def humaneval_results(doc: dict, results, chat: bool = False) -> dict:
    return _score(humaneval_programs(doc, results, chat))


def mbpp_results(doc: dict, results, chat: bool = False) -> dict:
    return _score(mbpp_programs(doc, results, chat))


humaneval_results.programs = humaneval_programs
mbpp_results.programs = mbpp_programs
