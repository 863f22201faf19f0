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
import importlib.util
import os
import re
from pathlib import Path

import yaml

from qdlm_bench.paths import PACKAGE_DIR, TASKS_DIR

_PLACEHOLDER = re.compile(r"(?<!\{)\{(\w+)\}(?!\})")
# a top-level task/group/tag key (quoted or not): its inline value, then its "- item" lines
_NAME_KEY = re.compile(rb"""^(['"]?)(?:task|group|tag)\1:([^\n#]*)((?:\n[ \t]*-[^\n#]*)*)""", re.M)
DATA_HELP = ("Set eval.data_dir=<folder> (or $QDLM_DATA_DIR) to a copy of the offline data "
             "(layout of ../shared/data, see its README.md).")


def default_data_dir() -> Path:
    """``$QDLM_DATA_DIR``; else, in a checkout, ``shared/data`` beside it (``../shared/data``);
    else (installed) ``./data``. A task whose data is missing there says how to set it."""
    env = os.environ.get("QDLM_DATA_DIR")
    if env:
        return Path(env)
    checkout = PACKAGE_DIR.parent
    return checkout.parent / "shared" / "data" if (checkout / "pyproject.toml").is_file() else Path("data").resolve()


class _PlainLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):
    """Reads task YAMLs without lm-eval: a tagged value (``!function mod.fn``) reads as its plain text."""


def _untagged(loader, suffix, node):
    if isinstance(node, yaml.ScalarNode):
        return loader.construct_scalar(node)
    return loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node)


_PlainLoader.add_multi_constructor("!", _untagged)


def read_yaml(path: Path, functions: bool = False) -> dict:
    """A task YAML with its ``include:`` files merged under it (as lm-eval merges them);
    ``functions`` imports ``!function`` values (lm-eval's loader), else they stay text."""
    if functions:
        from lm_eval.tasks._yaml_loader import load_yaml
        return load_yaml(path)
    cfg = yaml.load(path.read_text(), Loader=_PlainLoader)  # noqa: S506 (a safe loader)
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} holds no YAML mapping")
    includes = cfg.pop("include", [])
    merged: dict = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        merged |= {k: v for k, v in read_yaml(path.parent / inc).items() if k != "task_list"}
    return merged | cfg


@functools.cache
def local_tasks() -> dict[str, Path]:
    """Task or group name -> YAML file, for every ``tasks/*.yaml`` not starting with ``_``."""
    index = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        if not path.name.startswith("_"):
            cfg = read_yaml(path)
            name = cfg.get("task") or cfg.get("group")
            if not isinstance(name, str):
                raise ValueError(f"{path} names no task or group (a `task:` or `group:` key)")
            index[name] = path
    return index


@functools.cache
def lm_eval_names() -> frozenset[str]:
    """The names lm-eval's task index may hold (tasks, groups, tags), read without importing lm-eval
    in ~1 s (its index takes ~20 s): every ``task``/``group``/``tag`` value of its task files,
    included templates too. A superset of the index (checked on lm-eval 0.4.13): a name not here is
    no lm-eval task."""
    root = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0], "tasks")
    names = set()
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        for file in files:
            if not file.endswith((".py", ".md")):
                for _, inline, items in _NAME_KEY.findall((Path(folder) / file).read_bytes()):
                    values = inline.strip(b" \t[]").split(b",") + [i.strip()[1:] for i in items.strip().splitlines()]
                    names.update(v.strip(b" \t'\"").decode(errors="replace") for v in values if v.strip())
    return frozenset(names)


@functools.cache
def lm_eval_tasks():
    """lm-eval's task index, a TaskManager (built once per process; takes ~20 s)."""
    from lm_eval.tasks import TaskManager
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


def _resolve_local(path: Path, data_dir: Path, functions: bool) -> tuple[dict, list[str]]:
    cfg, data_paths = read_yaml(path, functions), []
    values = {"data_dir": str(data_dir)}
    if "subtasks" in cfg:
        template = read_yaml(path.parent / cfg.pop("subtask"), functions)
        ((key, names),) = cfg.pop("subtasks").items()
        cfg["task"] = [_fill(template, {**values, key: name}, data_paths) for name in names]
        return cfg, data_paths
    return _fill(cfg, values, data_paths), data_paths


def resolve_tasks(names: list[str], data_dir: str | Path | None = None, functions: bool = True) -> list[dict | str]:
    """Task configs for ``names``: a dict per project task, the name itself for lm-eval tasks.

    Raises ValueError, before any model work, for an unknown name (listing the project's
    tasks) or a project task whose data files are missing under ``data_dir``. ``functions=False``
    leaves ``!function`` values as text (no lm-eval import: the configuration check).
    """
    if not names:
        raise ValueError("no tasks given; name at least one, e.g. tasks=[arc_easy_local]")
    if len(set(names)) != len(names):
        raise ValueError(f"a task is listed twice in {list(names)}")
    data_dir = Path(data_dir or default_data_dir())
    specs = []
    for name in names:
        if name not in local_tasks():
            if name not in lm_eval_names():
                raise ValueError(
                    f"unknown task {name!r}. Project tasks (tasks/*.yaml, offline): "
                    f"{', '.join(sorted(local_tasks()))}. Any lm-eval task, group or tag name is also "
                    "accepted (lm-eval downloads its data: network or a filled HF cache needed).")
            specs.append(name)
            continue
        spec, data_paths = _resolve_local(local_tasks()[name], data_dir, functions)
        missing = [p for p in data_paths if not Path(p).exists()]
        if missing and not data_dir.is_dir():
            raise ValueError(f"task {name!r} reads its data from data_dir={data_dir}, which does not exist. {DATA_HELP}")
        if missing:
            raise ValueError(f"task {name!r} needs {missing[0]}, which does not exist ({len(missing)} missing "
                             f"file(s) under data_dir={data_dir}). {DATA_HELP}")
        specs.append(spec)
    return specs


def validate_tasks(names: list[str], data_dir: str | Path | None = None) -> None:
    """Raise ValueError for unknown tasks or missing data (see ``resolve_tasks``); loads lm-eval
    only for a name that is not a project task."""
    resolve_tasks(names, data_dir, functions=False)


def build_tasks(specs: list[dict | str]) -> list:
    """lm-eval Task / Group objects of resolved specs, top-level objects only.

    A project group is assembled here (lm-eval 0.4.13 cannot load a group of inline task
    dicts); lm-eval names load through its index, which is built only when needed.
    """
    from lm_eval.api.group import Group
    from lm_eval.config.group import GroupConfig
    from lm_eval.tasks import TaskManager

    group_keys = set(GroupConfig.__dataclass_fields__) - {"task"}
    names = [s for s in specs if isinstance(s, str)]
    manager = lm_eval_tasks() if names else TaskManager(include_defaults=False)
    out = []
    for spec in specs:
        if isinstance(spec, dict) and "group" in spec:
            group = Group.from_config({k: v for k, v in spec.items() if k in group_keys})
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
    from lm_eval.api.group import Group
    return [t for o in objs for t in (o.get_all_tasks() if isinstance(o, Group) else [o])]
