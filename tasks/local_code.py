"""HumanEval / MBPP scoring by executing completions (qdlm_bench.code_exec).

lm-eval's own code tasks call ``evaluate.load("code_eval")``, which needs the network. Here each
doc's completions are turned into a test program and run in a subprocess; the metric is
pass@1 (the mean over completions of passing, i.e. unbiased pass@1 when a task repeats).
"""

from __future__ import annotations

from qdlm_bench.code_exec import pass_at_k, run_programs


def _score(programs: list[str]) -> dict:
    passed = sum(r.passed for r in run_programs(programs))
    return {"pass@1": pass_at_k(len(programs), passed, 1)}


def _completions(results) -> list[str]:
    return [results] if isinstance(results, str) else list(results)


def humaneval_results(doc: dict, results) -> dict:
    """The prompt (signature + docstring), the completion, the tests, then ``check(entry_point)``."""
    return _score([f"{doc['prompt']}{c}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"
                   for c in _completions(results[0])])


def mbpp_results(doc: dict, results) -> dict:
    """The completion (code up to ``[DONE]``), the setup code, then the doc's asserts."""
    tests = "\n".join([doc["test_setup_code"], *doc["test_list"]])
    return _score([f"{c}\n\n{tests}\n" for c in _completions(results[0])])
