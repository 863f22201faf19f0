"""Where calibration text comes from: the only module that knows the sources (the offline data
folder, the zoo's mini_ppl file and corpus mix, local files, lm-eval task prompts)."""

from __future__ import annotations

import json
from pathlib import Path

from qdlm_bench.paths import TASKS_DIR
from qdlm_bench.zoo.corpus import calibration_text

from .config import CalibConfig

DATA_SOURCES = {"wikitext2": "wikitext2/raw/wiki.test.raw.reconstructed", "tinyshakespeare": "tinyshakespeare/input.txt"}
PROJECT_SOURCES = {"mini_ppl": TASKS_DIR / "mini" / "mini_ppl.jsonl"}
# text made by code: the tiny models' held-out pretraining mix
GENERATED_SOURCES = {"zoo_mix": lambda: calibration_text(PROJECT_SOURCES["mini_ppl"])}


def resolve_source(cfg: CalibConfig, data_dir=None) -> Path:
    """The file a source names; a clear FileNotFoundError when it is absent."""
    if cfg.source in DATA_SOURCES:
        if data_dir is None:
            from qdlm_bench.evaluation.tasks import default_data_dir
            data_dir = default_data_dir()
        path = Path(data_dir) / DATA_SOURCES[cfg.source]
        hint = "set eval.data_dir (or $QDLM_DATA_DIR) to the offline data folder, or calib.source to a local file"
    elif cfg.source in PROJECT_SOURCES:
        path, hint = PROJECT_SOURCES[cfg.source], "set calib.source to another source"
    else:
        path = Path(cfg.source).expanduser()
        names = sorted([*DATA_SOURCES, *PROJECT_SOURCES, *GENERATED_SOURCES])
        hint = f"calib.source is a name ({names}), prompts:<task>, or a .txt/.jsonl file"
    if not path.is_file():
        raise FileNotFoundError(f"calibration source {cfg.source!r}: file {path} not found; {hint}")
    return path


def check(cfg: CalibConfig, data_dir=None, include_path=None) -> None:
    """The configuration check of a source, before any model loads (no tokenizer, no torch): its file
    exists and holds text (a .jsonl: its first row has ``text_field``); a ``prompts:`` source names
    known tasks whose data is there. Raises FileNotFoundError or ValueError naming the fix."""
    tasks = cfg.prompt_tasks
    if tasks is not None:
        from qdlm_bench.evaluation.tasks import validate_tasks

        validate_tasks(tasks, data_dir, include_path)
        return
    if cfg.source in GENERATED_SOURCES:
        return
    path = resolve_source(cfg, data_dir)
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    if not head.strip():
        raise ValueError(f"calibration source {cfg.source!r}: file {path} is empty; calib.source takes a "
                         "file with text (a .txt, or a .jsonl with a calib.text_field field)")
    if path.suffix == ".jsonl":
        first = next(line for line in head.decode("utf-8", "replace").splitlines() if line.strip())
        try:
            row = json.loads(first)
        except json.JSONDecodeError as err:
            raise ValueError(f"calibration source {path}: its first line is not JSON ({err}); a .jsonl "
                             "source has one JSON object per line") from None
        if not isinstance(row, dict) or cfg.text_field not in row:
            fields = sorted(row) if isinstance(row, dict) else type(row).__name__
            raise ValueError(f"calibration source {path}: its first row has no field {cfg.text_field!r} "
                             f"(calib.text_field); fields: {fields}")


def read_text(path: Path, text_field: str = "text") -> str:
    """A .jsonl file's ``text_field`` values joined by blank lines; any other file as is."""
    if path.suffix != ".jsonl":
        return path.read_text(encoding="utf-8")
    texts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if text_field not in row:
                raise ValueError(f"{path}:{n} has no field {text_field!r} (calib.text_field); fields: {sorted(row)}")
            texts.append(row[text_field])
    return "\n\n".join(texts)


def task_prompts(tasks: list[str], data_dir=None) -> list[str]:
    """Zero-shot prompts (``doc_to_text``) of every document of ``tasks`` (groups expand to their
    tasks): a task's training split when it has one, else its evaluation documents."""
    from qdlm_bench.evaluation.tasks import build_tasks, leaf_tasks, resolve_tasks

    prompts = []
    for task in leaf_tasks(build_tasks(resolve_tasks(tasks, data_dir))):
        docs = task.training_docs() if task.has_training_docs() else task.eval_docs
        for doc in docs:
            text = task.doc_to_text(doc)
            if not isinstance(text, str):
                raise ValueError(f"task {task.config.task!r} has no text prompt (doc_to_text gave "
                                 f"{type(text).__name__}); use another task for calib.source prompts:...")
            prompts.append(text)
    return prompts


def source_texts(cfg: CalibConfig, data_dir=None) -> list[str]:
    """What a source holds: one string per prompt (``prompts:``), else the whole text as one string."""
    tasks = cfg.prompt_tasks
    if tasks is not None:
        return task_prompts(tasks, data_dir)
    if cfg.source in GENERATED_SOURCES:
        return [GENERATED_SOURCES[cfg.source]()]
    return [read_text(resolve_source(cfg, data_dir), cfg.text_field)]
