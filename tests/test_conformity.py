"""The conformity table of tasks/README.md holds: each *_local task against the lm-eval task it mirrors.

A cell "same" asserts the field equal in the two YAMLs (includes followed, lm-eval's defaults for
absent keys); any other cell asserts it differs, so the table cannot go stale either way. Claims
of equivalence that can be checked offline are checked on the lm-eval side's own code.
"""

import ast
import dataclasses
import importlib.util
import inspect
import re
from pathlib import Path

import lm_eval
import pytest
from lm_eval.config.task import TaskConfig
from lm_eval.utils import apply_template

from qdlm_bench.evaluation import EvalSettings, tasks
from qdlm_bench.paths import TASKS_DIR

LM_EVAL = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0], "tasks")
LM_EVAL_YAML = {  # lm-eval task -> its YAML (mmlu: one subject; all share _default_template_yaml)
    "gsm8k": "gsm8k/gsm8k.yaml", "minerva_math500": "minerva_math/minerva_math500.yaml",
    "humaneval": "humaneval/humaneval.yaml", "humaneval_instruct": "humaneval/humaneval_instruct.yaml",
    "mbpp": "mbpp/mbpp.yaml", "mbpp_instruct": "mbpp/mbpp_instruct.yaml", "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml", "piqa": "piqa/piqa.yaml", "winogrande": "winogrande/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml", "mmlu": "mmlu/default/mmlu_abstract_algebra.yaml",
    "wikitext": "wikitext/wikitext.yaml",
}
LM_EVAL_GROUP = {"mmlu": "mmlu/default/_mmlu.yaml"}
DEFAULTS = {f.name: f.default for f in dataclasses.fields(TaskConfig)}
DATA_DIR = tasks.default_data_dir()
LM_EVAL_SEED = inspect.signature(lm_eval.simple_evaluate).parameters["fewshot_random_seed"].default
HARNESS_SEED = EvalSettings().fewshot_seed  # the harness's fewshot_random_seed


def _get(cfg: dict, key: str):
    return cfg.get(key, DEFAULTS.get(key))


def _sampler(cfg: dict) -> str:
    return (cfg.get("fewshot_config") or {}).get("sampler", "default")


def _fields(cfg: dict, group: dict, fewshot_seed: int, chat: bool) -> dict:
    """What each column of the table compares (tasks/README.md lists it)."""
    gen = _get(cfg, "generation_kwargs")
    chat_until = (cfg.get("metadata") or {}).get("chat_until")
    if chat and gen is not None and chat_until is not None:
        gen = {**gen, "until": chat_until}
    return {
        "docs": (_get(cfg, "process_docs"), _get(cfg, "test_split") or _get(cfg, "validation_split")),
        "prompt": tuple(_get(cfg, k) for k in ("description", "doc_to_text", "target_delimiter",
                                               "fewshot_delimiter", "gen_prefix")),
        "target": _get(cfg, "doc_to_target"),
        "choices": _get(cfg, "doc_to_choice"),
        "filters": _get(cfg, "filter_list"),
        "metrics": (_get(cfg, "metric_list"), _get(cfg, "process_results"), group.get("aggregate_metric_list")),
        "few-shot split": (_get(cfg, "fewshot_split") or (cfg.get("fewshot_config") or {}).get("samples")
                           or _get(cfg, "training_split") or _get(cfg, "validation_split") or _get(cfg, "test_split")),
        "sampler": _sampler(cfg),
        "num_fewshot": _get(cfg, "num_fewshot"),
        "few-shot seed": "first_n: no draw" if _sampler(cfg) == "first_n" else fewshot_seed,
        "generation": gen,
    }


SECTION = (TASKS_DIR / "README.md").read_text().split("## Conformity with lm-eval", 1)[1]
HEADER, _, *ROWS = [[c.strip() for c in line.strip("|").split("|")] for line in SECTION.splitlines()
                    if line.startswith("|")]


def _normalize(value):
    """Lists and tuples alike (YAML's ``true``/``True`` and ``0``/``0.0`` compare equal already)."""
    if isinstance(value, dict):
        return {k: _normalize(v) for k, v in value.items()}
    return tuple(_normalize(v) for v in value) if isinstance(value, (list, tuple)) else value


def _local(name: str) -> tuple[dict, dict]:
    """A local task's YAML and its group's (mmlu_local: the subject template, the group)."""
    path = tasks.local_tasks()[name]
    cfg = tasks.read_yaml(path)
    return (tasks.read_yaml(path.parent / cfg["subtask"]), cfg) if "subtask" in cfg else (cfg, {})


def _sides(task_cell: str, lm_eval_task: str) -> tuple[dict, dict]:
    chat = "(chat)" in task_cell
    ref = tasks.read_yaml(LM_EVAL / LM_EVAL_YAML[lm_eval_task])
    ref_group = tasks.read_yaml(LM_EVAL / LM_EVAL_GROUP[lm_eval_task]) if lm_eval_task in LM_EVAL_GROUP else {}
    return (_fields(*_local(task_cell.split()[0]), HARNESS_SEED, chat),
            _fields(ref, ref_group, LM_EVAL_SEED, chat))


def test_the_table_covers_every_local_task_and_field():
    assert HEADER[:2] == ["task", "lm-eval task"] and HEADER[2:] == list(_fields({}, {}, 0, False))
    local = {n for n in tasks.local_tasks() if n.endswith("_local")}
    assert {row[0].split()[0] for row in ROWS} == local
    notes = set(re.findall(r"^(\d+)\. ", SECTION, re.M))
    for row in ROWS:
        assert len(row) == len(HEADER), row
        for cell in row[2:]:
            assert re.fullmatch(r"same( \(study: \d+\))?|(equivalent|different|to fix) \[\d+\]", cell), (row[0], cell)
            assert set(re.findall(r"\[(\d+)\]", cell)) <= notes, (row[0], cell)


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_same_fields_are_equal_and_others_differ(row):
    local, ref = _sides(row[0], row[1])
    for field, cell in zip(HEADER[2:], row[2:]):
        study = re.search(r"\(study: (\d+)\)", cell)
        if study:
            assert EvalSettings().fewshot_for(row[0].split()[0]) == int(study[1]), (row[0], cell)
        same = _normalize(local[field]) == _normalize(ref[field])
        assert same == cell.startswith("same"), (f"{row[0]} vs {row[1]}, {field}: the table says {cell!r} but\n"
                                                 f"  local:   {local[field]!r}\n  lm-eval: {ref[field]!r}")


# ------------------------------------------------------------------- equivalences, checked


def _lm_eval_function(path: str, name: str):
    """A function of an lm-eval task module, without importing the module (mbpp's loads the network
    metric code_eval at import, minerva_math's wants antlr4 4.11)."""
    source = (LM_EVAL / path).read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    namespace: dict = {}
    exec(compile(ast.Module([node], []), str(LM_EVAL / path), "exec"), namespace)  # noqa: S102
    return namespace[name]


def test_math500_prompt_and_fewshot_examples_are_minervas():
    cfg = tasks.read_yaml(tasks.local_tasks()["math500_local"], functions=True)
    doc_to_text = _lm_eval_function("minerva_math/utils.py", "doc_to_text")
    doc = {"problem": "What is $1+1$?"}
    assert apply_template(cfg["doc_to_text"], doc) == doc_to_text(doc)
    assert cfg["fewshot_config"]["samples"]() == _lm_eval_function("minerva_math/utils.py", "list_fewshot_samples")()


def test_mmlu_descriptions_render_as_lm_evals():
    group = tasks.read_yaml(tasks.local_tasks()["mmlu_local"])
    template = tasks.read_yaml(TASKS_DIR / group["subtask"])["description"]
    for subject in group["subtasks"]["subject"]:
        ref = tasks.read_yaml(LM_EVAL / f"mmlu/default/mmlu_{subject}.yaml")["description"]
        assert apply_template(template, {"subject": subject.replace("_", " ")}) == ref


needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"offline benchmark data not found at {DATA_DIR}")


@needs_data
def test_mbpp_fewshot_split_holds_lm_evals_fewshot_samples():
    (spec,) = tasks.resolve_tasks(["mbpp_local"], DATA_DIR)
    prompt = list(spec["custom_dataset"](**spec["dataset_kwargs"])["prompt"])
    keys = ("task_id", "text", "code", "test_list", "is_fewshot")
    ref = _lm_eval_function("mbpp/utils.py", "list_fewshot_samples")()
    assert [{k: d[k] for k in keys} for d in prompt] == ref


@needs_data
def test_hellaswag_and_wikitext_processing_is_lm_evals():
    (hs,) = tasks.resolve_tasks(["hellaswag_local"], DATA_DIR)
    raw = hs["custom_dataset"](**hs["dataset_kwargs"])["validation"]
    ref_docs = tasks.read_yaml(LM_EVAL / LM_EVAL_YAML["hellaswag"], functions=True)["process_docs"](raw)
    local_docs = hs["process_docs"](raw)
    assert [(d["query"], d["choices"], d["gold"]) for d in local_docs] == \
           [(d["query"], d["choices"], d["gold"]) for d in ref_docs]

    (wt,) = tasks.resolve_tasks(["wikitext_local"], DATA_DIR)
    ref = tasks.read_yaml(LM_EVAL / LM_EVAL_YAML["wikitext"], functions=True)
    for doc in wt["custom_dataset"](**wt["dataset_kwargs"])["test"]:
        assert wt["doc_to_target"](doc) == ref["doc_to_target"](doc)
        assert wt["process_results"](doc, [-1.5]) == ref["process_results"](doc, [-1.5])
