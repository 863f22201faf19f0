"""HumanEval / MBPP answers in every shape, scored by the tasks' real scorer (tasks/local_code.py) on
the first real items of the offline data, with the chat template off (completions, as lm-eval's
humaneval / mbpp) and on (replies: their code block, as lm-eval's humaneval_instruct / mbpp_instruct)."""

import re

import lm_eval
import pytest
from lm_eval.api.model import LM
from lm_eval.tasks import TaskManager

from qdlm_bench.evaluation import tasks
from qdlm_bench.evaluation.adapter import cut_at_stops

DATA_DIR = tasks.default_data_dir()
FILES = {"humaneval_local": "humaneval/HumanEval.jsonl.gz", "mbpp_local": "mbpp/mbpp.jsonl"}
N_DOCS = 3
HUMANEVAL_STOPS = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]

FORMS = {  # how a chat reply may hold its code
    "python fence": lambda code: f"```python\n{code}\n```",
    "bare fence": lambda code: f"```\n{code}\n```",
    "unfenced": lambda code: code,
    "prose around": lambda code: f"Here is the solution:\n\n```python\n{code}\n```\n\nIt passes the tests.",
    "unclosed fence": lambda code: f"```python\n{code}",  # a reply cut at the generation length
}


def _task(name):
    path = DATA_DIR / FILES[name]
    if not path.is_file():
        pytest.skip(f"offline {name} data not found at {path} (set QDLM_DATA_DIR)")
    (task,) = tasks.build_tasks(tasks.resolve_tasks([name], DATA_DIR))
    task.set_fewshot_seed(0)
    return task


@pytest.fixture(scope="module", params=sorted(FILES))
def task(request):
    return _task(request.param)


def _chat_template(messages, add_generation_prompt=True):
    return "".join(f"<|{m['role']}|>{m['content']}<|end|>" for m in messages) + "<|assistant|>" * add_generation_prompt


def _set_mode(task, chat: bool) -> list:
    """Build the requests as lm-eval's evaluator does (the harness's arguments): this tells the task the mode."""
    task.build_all_requests(limit=N_DOCS, apply_chat_template=chat, fewshot_as_multiturn=chat,
                            chat_template=_chat_template if chat else None)
    return task.instances


def _answers(task, doc) -> tuple[str, str, str]:
    """(right completion, right code for a reply, wrong code for a reply) of a doc."""
    if "entry_point" in doc:  # HumanEval: a completion is the body; a reply holds the whole function
        return (doc["canonical_solution"], doc["prompt"] + doc["canonical_solution"],
                doc["prompt"] + "    return None\n")
    name = next(n for n in re.findall(r"def (\w+)\(", doc["code"]) if n in doc["test_list"][0])
    return doc["code"], doc["code"], f"def {name}(*args):\n    return None\n"


def _score(task, doc, answer) -> float:
    return task.process_results(doc, [answer])["pass@1"]


@pytest.mark.parametrize("form", FORMS)
def test_a_chat_reply_scores_by_its_code(task, form):
    _set_mode(task, chat=True)
    for doc in list(task.eval_docs)[:N_DOCS]:
        _, right, wrong = _answers(task, doc)
        assert _score(task, doc, FORMS[form](right)) == 1.0, (doc["task_id"], FORMS[form](right))
        assert _score(task, doc, FORMS[form](wrong)) == 0.0, (doc["task_id"], FORMS[form](wrong))


def test_a_humaneval_reply_may_hold_the_body_only():
    task = _task("humaneval_local")
    _set_mode(task, chat=True)
    for doc in list(task.eval_docs)[:N_DOCS]:
        assert _score(task, doc, FORMS["python fence"](doc["canonical_solution"])) == 1.0
        assert _score(task, doc, FORMS["python fence"]("    return None")) == 0.0


@pytest.mark.parametrize("form", FORMS)
def test_a_completion_is_run_as_generated(task, form):
    """Without the chat template nothing is extracted (lm-eval's humaneval / mbpp): a completion in
    a fence or after prose is not code."""
    _set_mode(task, chat=False)
    for doc in list(task.eval_docs)[:N_DOCS]:
        completion, _, wrong = _answers(task, doc)
        expected = 1.0 if form == "unfenced" else 0.0
        assert _score(task, doc, FORMS[form](completion)) == expected, (doc["task_id"], form)
        assert _score(task, doc, FORMS[form](wrong)) == 0.0


@pytest.mark.parametrize("chat", [False, True])
def test_stop_strings_follow_the_mode(task, chat):
    """HumanEval's completion stops would cut a reply at "```python\\ndef": with the chat template, a
    reply runs to the end of its turn. MBPP's "[DONE]" ends its few-shot answers in both modes."""
    stops = [req.arguments[1]["until"] for req in _set_mode(task, chat)]
    expected = ([] if chat else HUMANEVAL_STOPS) if task.task_name == "humaneval_local" else ["[DONE]"]
    assert stops == [expected] * N_DOCS


class _ReplyingLM(LM):
    """Answers each request with ``answer(doc)``, cut at the request's stops as the adapter cuts."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer

    def generate_until(self, requests):
        return [cut_at_stops(self.answer(r.doc), r.args[1]["until"]) for r in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return _chat_template(chat_history, add_generation_prompt)

    @property
    def tokenizer_name(self):
        return "fake"

    def chat_template(self, chat_template=False):
        return "fake" if chat_template else None


@pytest.mark.parametrize("chat", [False, True])
def test_evaluation_scores_the_canonical_solution(task, chat):
    """Through lm-eval's evaluator with the harness's arguments: a reply that writes the function
    after prose, in a fence, then explains it (chat), or the bare completion, scores 1."""

    def answer(doc):
        completion, right, _ = _answers(task, doc)
        return FORMS["prose around"](right) if chat else completion

    results = lm_eval.simple_evaluate(
        model=_ReplyingLM(answer), tasks=[task], limit=N_DOCS, apply_chat_template=chat,
        fewshot_as_multiturn=chat, confirm_run_unsafe_code=True, task_manager=TaskManager(include_defaults=False))
    assert results["results"][task.task_name]["pass@1,none"] == 1.0


def test_a_code_task_runs_all_its_programs_at_once_before_scoring(monkeypatch):
    """mini_code: every doc's program runs in one ``run_programs`` call (a worker per CPU) when the
    filters are applied; each doc's score reads its result back. Right answers for even docs."""
    (task,) = tasks.build_tasks(tasks.resolve_tasks(["mini_code"], DATA_DIR))
    scope = task.config.process_results.__globals__  # the module lm-eval loaded from tasks/local_code.py
    batches = []

    def recording(programs, **kw):
        batches.append(len(programs))
        return real(programs, **kw)

    real = scope["run_programs"]
    monkeypatch.setitem(scope, "run_programs", recording)
    docs = list(task.test_docs())[:6]
    answer = {d["prompt"]: (d["canonical_solution"] if i % 2 == 0 else "    return None\n") for i, d in enumerate(docs)}
    results = lm_eval.simple_evaluate(
        model=_ReplyingLM(lambda doc: answer[doc["prompt"]]), tasks=[task], limit=6, apply_chat_template=False,
        confirm_run_unsafe_code=True, task_manager=TaskManager(include_defaults=False))
    assert results["results"]["mini_code"]["pass@1,none"] == 0.5
    assert batches == [6]
