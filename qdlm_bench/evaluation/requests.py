"""The lm-eval tasks of a run and their requests, prepared as ``harness.run`` evaluates them:
shared by the evaluation and by the plan (``qdlm_bench.plan``), which builds the same requests
without a model to count what the evaluation will do.

    objs, settings = prepare_tasks(["mini_math", "mini_qa"], settings)   # few-shot counts set
    lm_eval.simple_evaluate(model=..., tasks=objs, limit=settings.limit, **evaluate_options(settings), ...)
    requests = build_requests(objs, settings, lm)     # {task: [Instance]}: what simple_evaluate sends

``build_requests`` repeats what lm-eval 0.4's ``simple_evaluate`` / ``evaluate`` do before they
call the model (few-shot count None -> 0, the few-shot seed on every task, ``get_sample_size``,
``Task.build_all_requests`` with the chat template of ``lm``), so the prompts are the ones the
model gets: same few-shot examples, same chat formatting.
"""

from __future__ import annotations

import random

from . import tasks as task_resolution
from .settings import EvalSettings


def prepare_tasks(tasks: list[str], settings: EvalSettings) -> tuple[list, EvalSettings]:
    """lm-eval Task/Group objects of ``tasks`` with the run's few-shot counts set, and ``settings``
    knowing the groups around each task (``EvalSettings.within``)."""
    objs = task_resolution.build_tasks(task_resolution.resolve_tasks(
        tasks, settings.data_dir, include_path=settings.include_path))
    settings = settings.within(task_resolution.group_chains(objs))
    for task in task_resolution.leaf_tasks(objs):
        shots = settings.fewshot_for(task.task_name)
        if shots is not None:
            task.set_config(key="num_fewshot", value=shots)
    return objs, settings


def evaluate_options(settings: EvalSettings) -> dict:
    """The keyword arguments of ``lm_eval.simple_evaluate`` that decide the prompts and seeds."""
    chat = bool(settings.apply_chat_template)
    seed = settings.seed
    return {"apply_chat_template": chat, "fewshot_as_multiturn": chat, "random_seed": seed,
            "numpy_random_seed": seed, "torch_random_seed": seed, "fewshot_random_seed": settings.fewshot_seed}


def build_requests(objs: list, settings: EvalSettings, lm, progress=None) -> dict[str, list]:
    """``{task name: its lm-eval Instances}`` for the leaf tasks of ``objs`` (``prepare_tasks``), as
    ``simple_evaluate(tasks=objs, limit=settings.limit, **evaluate_options(settings))`` builds them
    for ``lm`` (an lm-eval LM: its ``apply_chat_template`` and ``tokenizer_name`` are used when the
    chat template is on). ``progress(task_name)`` is called before each task is built."""
    import numpy as np
    from lm_eval.evaluator_utils import get_sample_size

    opts = evaluate_options(settings)
    random.seed(opts["random_seed"])  # as simple_evaluate, in case a task's loader draws from them
    np.random.seed(opts["numpy_random_seed"])
    chat = opts["apply_chat_template"]
    out = {}
    for task in task_resolution.leaf_tasks(objs):
        if task.get_config("num_fewshot") is None:
            task.set_config(key="num_fewshot", value=0)
        task.set_fewshot_seed(seed=opts["fewshot_random_seed"])
        if progress:
            progress(task.task_name)
        task.build_all_requests(
            limit=get_sample_size(task, settings.limit), rank=0, world_size=1,
            apply_chat_template=chat, fewshot_as_multiturn=opts["fewshot_as_multiturn"],
            chat_template=lm.apply_chat_template if chat else None,
            tokenizer_name=lm.tokenizer_name if chat else "")
        out[task.task_name] = list(task.instances)
    return out
