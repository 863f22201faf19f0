"""Task names -> lm-eval task configs: the project's tasks/*.yaml, else lm-eval's own tasks.

Naming: ``<task>_local`` (``gsm8k_local``, ``mmlu_local``...) are offline variants of real
benchmarks that read ``data_dir`` (layout of ../shared/data); ``mini_*`` are the embedded tiny
models' tasks; any other name is an lm-eval task, group or tag (e.g. ``gsm8k``), whose data
lm-eval downloads, so it needs the network or a filled Hugging Face cache.

In a project YAML, ``{name}`` (single braces; Jinja's ``{{ }}`` is left alone) is a
placeholder: ``{data_dir}`` everywhere; a group YAML with ``subtasks: {key: [values]}`` and
``subtask: <template yaml>`` gets one task per value with ``{key}`` filled in (mmlu_local).
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

from lm_eval.api.group import Group
from lm_eval.config.group import GroupConfig
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

TASKS_DIR = Path(__file__).resolve().parents[2] / "tasks"
_PLACEHOLDER = re.compile(r"(?<!\{)\{(\w+)\}(?!\})")
_GROUP_KEYS = set(GroupConfig.__dataclass_fields__) - {"task"}


def default_data_dir() -> Path:
    """``$QDLM_DATA_DIR``, else ``shared/data`` beside the project root."""
    env = os.environ.get("QDLM_DATA_DIR")
    return Path(env) if env else TASKS_DIR.parents[1] / "shared" / "data"


@functools.cache
def local_tasks() -> dict[str, Path]:
    """Task or group name -> YAML file, for every ``tasks/*.yaml`` not starting with ``_``."""
    index = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        if not path.name.startswith("_"):
            cfg = load_yaml(path, resolve_func=False, recursive=False)
            name = cfg.get("task") or cfg.get("group")
            if not isinstance(name, str):
                raise ValueError(f"{path} names no task or group (a `task:` or `group:` key)")
            index[name] = path
    return index


@functools.cache
def lm_eval_tasks() -> TaskManager:
    """lm-eval's task index (built once per process; takes ~20 s)."""
    return TaskManager()


def _fill(obj, values: dict[str, str], data_paths: list[str]):
    """``obj`` with placeholders filled; strings that held ``{data_dir}`` go to ``data_paths``."""
    if isinstance(obj, str):
        filled = _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), obj)
        if filled != obj and "{data_dir}" in obj:
            data_paths.append(filled)
        return filled
    if isinstance(obj, dict):
        return {k: _fill(v, values, data_paths) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_fill(v, values, data_paths) for v in obj]
    return obj


def _resolve_local(path: Path, data_dir: Path) -> tuple[dict, list[str]]:
    cfg, data_paths = load_yaml(path), []
    values = {"data_dir": str(data_dir)}
    if "subtasks" in cfg:
        template = load_yaml(path.parent / cfg.pop("subtask"))
        ((key, names),) = cfg.pop("subtasks").items()
        cfg["task"] = [_fill(template, {**values, key: name}, data_paths) for name in names]
        return cfg, data_paths
    return _fill(cfg, values, data_paths), data_paths


def resolve_tasks(names: list[str], data_dir: str | Path | None = None) -> list[dict | str]:
    """Task configs for ``names``: a dict per project task, the name itself for lm-eval tasks.

    Raises ValueError, before any model work, for an unknown name (listing the project's
    tasks) or a project task whose data files are missing under ``data_dir``.
    """
    if not names:
        raise ValueError("no tasks given; name at least one, e.g. tasks=[arc_easy_local]")
    if len(set(names)) != len(names):
        raise ValueError(f"a task is listed twice in {list(names)}")
    data_dir = Path(data_dir or default_data_dir())
    specs = []
    for name in names:
        if name not in local_tasks():
            if name not in lm_eval_tasks().all_tasks:
                raise ValueError(
                    f"unknown task {name!r}. Project tasks (tasks/*.yaml, offline): "
                    f"{', '.join(sorted(local_tasks()))}. Any lm-eval task, group or tag name is also "
                    "accepted (lm-eval downloads its data: network or a filled HF cache needed).")
            specs.append(name)
            continue
        spec, data_paths = _resolve_local(local_tasks()[name], data_dir)
        missing = [p for p in data_paths if not Path(p).exists()]
        if missing:
            raise ValueError(
                f"task {name!r} needs {missing[0]}, which does not exist ({len(missing)} missing "
                f"file(s) under data_dir={data_dir}). Set eval.data_dir=<folder> (or $QDLM_DATA_DIR) "
                "to a copy of the offline data (layout of ../shared/data, see its README.md).")
        specs.append(spec)
    return specs


def validate_tasks(names: list[str], data_dir: str | Path | None = None) -> None:
    """Raise ValueError for unknown tasks or missing data (see ``resolve_tasks``)."""
    resolve_tasks(names, data_dir)


def build_tasks(specs: list[dict | str]) -> list:
    """lm-eval Task / Group objects of resolved specs, top-level objects only.

    A project group is assembled here (lm-eval 0.4.13 cannot load a group of inline task
    dicts); lm-eval names load through its index, which is built only when needed.
    """
    names = [s for s in specs if isinstance(s, str)]
    manager = lm_eval_tasks() if names else TaskManager(include_defaults=False)
    out = []
    for spec in specs:
        if isinstance(spec, dict) and "group" in spec:
            group = Group.from_config({k: v for k, v in spec.items() if k in _GROUP_KEYS})
            for task in manager.load(spec["task"])["tasks"].values():
                group.add(task)
            out.append(group)
        else:
            loaded = manager.load([spec])
            children = {c for cs in loaded.get("group_map", {}).values() for c in cs}
            out += [g for n, g in loaded.get("groups", {}).items() if n not in children]
            out += [t for n, t in loaded["tasks"].items() if n not in children]
    return out


def leaf_tasks(objs: list) -> list:
    """The Tasks in a list of Tasks and Groups."""
    return [t for o in objs for t in (o.get_all_tasks() if isinstance(o, Group) else [o])]
