"""Task configuration: eval.include_path tasks, task content in the record key, per-task settings
by exact name or group, the few-shot seed, single MMLU subjects."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from qdlm_bench import runspec  # noqa: E402
from qdlm_bench.evaluation import EvalSettings, tasks  # noqa: E402
from qdlm_bench.store import spec_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "local_task"
DATA_DIR = tasks.default_data_dir()
HEAVY = ("torch", "lm_eval", "transformers", "datasets", "pandas")


def config(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=tiny_random_llada", "method=fp", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def example_copy(folder: Path) -> Path:
    shutil.copytree(EXAMPLE, folder, ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def key(folder: Path, *overrides: str) -> str:
    cfg = config("tasks=[example_arith]", f"eval.include_path={folder}", *overrides)
    return spec_key(runspec.build(cfg).semantic())


# ------------------------------------------------------------------------------ include_path

def test_include_path_task_resolves_by_name_with_helpers_and_data_beside_its_yaml(tmp_path):
    folder = example_copy(tmp_path / "nested" / "mine")
    with pytest.raises(ValueError, match="unknown task 'example_arith'.*eval.include_path=<folder>"):
        tasks.validate_tasks(["example_arith"])  # not without the include path
    (spec,) = tasks.resolve_tasks(["example_arith"], include_path=str(tmp_path))  # found recursively
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(folder / "arith.jsonl")
    score = spec["process_results"]  # helpers.py of the copy, not of the checkout
    assert Path(score.__code__.co_filename) == folder / "helpers.py"
    assert score({"answer": 21}, ["9 + 12 = 21.\n#### 21"]) == {"exact_match": 1.0}
    (task,) = tasks.build_tasks([spec])
    assert len(task.eval_docs) == 8 and task.doc_to_text(task.eval_docs[0]).startswith("Question: Nina")


def test_include_path_errors_name_the_fix(tmp_path):
    folder = example_copy(tmp_path / "mine")
    (folder / "broken.yaml").write_text("task: [unclosed\n")
    with pytest.raises(ValueError, match=r"under eval.include_path: example_arith \(unreadable: .*broken.yaml"):
        tasks.validate_tasks(["nope"], include_path=str(folder))
    with pytest.raises(runspec.ConfigError, match="is not a folder"):
        runspec.build(config("tasks=[example_arith]", f"eval.include_path={tmp_path / 'absent'}"))
    (folder / "arith.jsonl").unlink()
    with pytest.raises(runspec.ConfigError, match=r"needs .*mine/arith.jsonl, which does not exist.*\{task_dir\}"):
        runspec.build(config("tasks=[example_arith]", f"eval.include_path={folder}"))


def test_task_checks_and_hashes_load_no_heavy_package(tmp_path):
    folder = example_copy(tmp_path / "mine")
    code = f"""
import sys
from qdlm_bench.evaluation import EvalSettings, tasks
tasks.validate_tasks(["example_arith", "mini_math"], include_path={str(folder)!r})
print(tasks.task_hashes(["example_arith", "mini_math", "gsm8k"], include_path={str(folder)!r}))
EvalSettings(include_path={str(folder)!r}).for_task("mmlu_local_anatomy")
print("loaded:", [m for m in {HEAVY!r} if m in sys.modules])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "loaded: []" in out.stdout and "'example_arith':" in out.stdout


# ------------------------------------------------------------------------- the record key

def test_record_key_follows_the_task_yaml_helpers_and_data(tmp_path):
    base = key(example_copy(tmp_path / "base"))
    assert key(example_copy(tmp_path / "moved")) == base  # a copy elsewhere: same definition
    assert key(tmp_path / "base", "eval.batch_size=3") == base

    def edited(name: str, file: str, edit) -> str:
        folder = example_copy(tmp_path / name)
        path = folder / file
        path.write_text(edit(path.read_text()))
        return key(folder)

    assert edited("comment", "example_arith.yaml", lambda t: "# a comment\n" + t) == base  # same YAML data
    touched = example_copy(tmp_path / "touched")
    os.utime(touched / "arith.jsonl", (1, 1))
    assert key(touched) == base
    assert edited("yaml", "example_arith.yaml", lambda t: t.replace("Answer:", "A:")) != base
    assert edited("helper", "helpers.py", lambda t: t.replace('"exact_match"', '"exact_match" ')) != base
    assert edited("data", "arith.jsonl", lambda t: t.replace('"answer": 21', '"answer": 22')) != base


def test_data_dir_task_hash_follows_its_files_not_their_folder(tmp_path):
    rows = '{"context_options": ["a", "b"], "continuation": "c", "gold": 0}\n'
    for name in ("d1", "d2", "d3"):
        (tmp_path / name / "winogrande").mkdir(parents=True)
        (tmp_path / name / "winogrande" / "winogrande.jsonl").write_text(rows if name != "d3" else rows * 2)
    h1, h2, h3 = (tasks.task_hash("winogrande_local", tmp_path / n) for n in ("d1", "d2", "d3"))
    assert h1 == h2 != h3


def test_lm_eval_task_hash_covers_its_files_a_groups_subtasks_and_tags():
    assert list(tasks.lm_eval_files("gsm8k")) == ["gsm8k/gsm8k.yaml"]
    math = tasks.lm_eval_files("hendrycks_math")
    assert "hendrycks_math/hendrycks_math.yaml" in math and len(math) == 8  # the group and its 7 subtasks
    assert {"arc/arc_easy.yaml", "arc/arc_challenge.yaml"} <= set(tasks.lm_eval_files("ai2_arc"))  # tag via include
    assert tasks.task_hash("gsm8k") == tasks.task_hash("gsm8k") != tasks.task_hash("gsm8k_cot")


# ------------------------------------------------------------------------ per-task settings

# EvalSettings().fewshot_for / for_task of every tasks/*.yaml task, as they were with prefix matching
BEFORE = {
    "arc_challenge_local": (0, {"mc_num": 128}), "arc_easy_local": (0, {"mc_num": 128}),
    "gsm8k_local": (4, {"mc_num": 128, "gen_length": 256, "steps": 256, "block_length": 32}),
    "hellaswag_local": (0, {"mc_num": 128}),
    "humaneval_local": (0, {"mc_num": 128, "gen_length": 512, "steps": 512, "block_length": 32}),
    "math500_local": (4, {"mc_num": 128, "gen_length": 256, "steps": 256, "block_length": 64}),
    "mbpp_local": (3, {"mc_num": 128, "gen_length": 512, "steps": 512, "block_length": 32}),
    "mini_code": (None, {"mc_num": 128}), "mini_math": (None, {"mc_num": 128}),
    "mini_ppl": (None, {"mc_num": 8}), "mini_qa": (0, {"mc_num": 4}), "mmlu_local": (5, {"mc_num": 1}),
    "piqa_local": (0, {"mc_num": 128}), "wikitext_local": (None, {"mc_num": 32}),
    "winogrande_local": (5, {"mc_num": 128}),
}


def test_project_task_settings_are_unchanged():
    plain = EvalSettings()
    assert set(BEFORE) == set(tasks.local_tasks())
    for name, (shots, merged) in BEFORE.items():
        assert (plain.fewshot_for(name), plain.for_task(name)) == (shots, {"max_length": None, **merged}), name
    subjects = [n for n, e in tasks.task_index().items() if e.group == "mmlu_local"]
    assert len(subjects) == 57  # each subject alone inherits its group's settings
    assert {(plain.fewshot_for(n), plain.for_task(n)["mc_num"]) for n in subjects} == {(5, 1)}


def test_study_settings_match_exact_names_or_the_groups_being_run():
    plain = EvalSettings()
    for name in ("mmlu_pro", "hendrycks_math_algebra", "gsm8k_cot", "mmlu_anatomy", "arc_easy_extra"):
        assert plain.fewshot_for(name) is None and plain.for_task(name) == {"mc_num": 128, "max_length": None}
    assert plain.fewshot_for("gsm8k") == 4 and plain.for_task("minerva_math500")["block_length"] == 64
    from lm_eval.api.group import Group

    stem = Group("mmlu_stem")
    stem.add(SimpleNamespace(task_name="mmlu_anatomy"))
    mmlu = Group("mmlu")
    mmlu.add(stem)
    math = Group("hendrycks_math")
    math.add(SimpleNamespace(task_name="hendrycks_math_algebra"))
    chains = tasks.group_chains([mmlu, math])
    assert chains == {"mmlu_anatomy": ("mmlu_stem", "mmlu"), "hendrycks_math_algebra": ("hendrycks_math",)}
    run = plain.within(chains)
    assert run.fewshot_for("mmlu_anatomy") == 5 and run.for_task("mmlu_anatomy")["mc_num"] == 1
    assert run.fewshot_for("hendrycks_math_algebra") == 4 and run.for_task("hendrycks_math_algebra")["steps"] == 256


def test_user_overrides_match_prefixes_and_groups():
    s = EvalSettings(num_fewshot={"mmlu_local": 0, "": 2}, generation={"": {"steps": 8}, "mmlu_stem": {"mc_num": 3}})
    assert s.fewshot_for("mmlu_local_anatomy") == 0 and s.fewshot_for("anything") == 2
    assert s.for_task("gsm8k_local")["steps"] == 8
    assert s.within({"mmlu_anatomy": ("mmlu_stem", "mmlu")}).for_task("mmlu_anatomy")["mc_num"] == 3


# ------------------------------------------------------------------------------ small items

class FakeAdapter:
    """Stands in for the lm-eval model: keeps the settings it was given, generates nothing."""

    def __init__(self, model, tokenizer, settings, request_cache=None):
        self.settings, self.generation_stats = settings, {}


def test_fewshot_seed_is_lm_evals_unless_set(tmp_path, monkeypatch):
    from qdlm_bench.evaluation import harness

    assert runspec.build(config()).settings.fewshot_seed == 1234
    assert runspec.build(config("seed=7")).settings.fewshot_seed == 1234
    assert runspec.build(config("eval.fewshot_seed=7")).settings.fewshot_seed == 7
    seen = {}

    def fake_evaluate(**kwargs):
        seen.update(kwargs)
        return {"results": {"example_arith": {"exact_match,none": 0.5}}}

    monkeypatch.setattr(harness.lm_eval, "simple_evaluate", fake_evaluate)
    monkeypatch.setattr(harness, "DiffusionLMAdapter", FakeAdapter)
    folder = example_copy(tmp_path / "mine")
    out = harness.run(None, None, ["example_arith"], EvalSettings(seed=3, include_path=str(folder)))
    assert out["example_arith"]["value"] == 0.5
    assert (seen["fewshot_random_seed"], seen["random_seed"]) == (1234, 3)


@pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"offline data not found at {DATA_DIR}")
def test_one_mmlu_subject_runs_alone_with_mmlus_settings(monkeypatch):
    from qdlm_bench.evaluation import harness

    name = "mmlu_local_abstract_algebra"
    runspec.build(config(f"tasks=[{name}]"))
    (spec,) = tasks.resolve_tasks([name], DATA_DIR)
    assert spec["task"] == name
    assert spec["dataset_kwargs"]["test"] == str(DATA_DIR / "mmlu/test/abstract_algebra_test.csv")
    assert tasks.task_hash(name) != tasks.task_hash("mmlu_local_anatomy")
    seen = {}

    def fake_evaluate(model, tasks, **kwargs):
        seen.update(settings=model.settings, tasks=tasks)
        return {"results": {name: {"acc,none": 0.25}}}

    monkeypatch.setattr(harness.lm_eval, "simple_evaluate", fake_evaluate)
    monkeypatch.setattr(harness, "DiffusionLMAdapter", FakeAdapter)
    assert harness.run(None, None, [name], EvalSettings(data_dir=str(DATA_DIR)))[name]["value"] == 0.25
    (task,) = seen["tasks"]
    assert len(task.eval_docs) == 100 and task.config.num_fewshot == 5
    assert seen["settings"].for_task(name)["mc_num"] == 1
