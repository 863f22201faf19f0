"""The run's tasks that execute generated code, and the sandbox that will run them.

A task executes code when its YAML says ``unsafe_code: true`` (lm-eval's marker; a group: any of
its subtasks). Project and included tasks run their programs through ``qdlm_bench.code_exec``, in
``eval.code_sandbox``; lm-eval's own code tasks (humaneval, mbpp, ...) run them through Hugging
Face evaluate's ``code_eval``, outside it, so they need the explicit ``eval.code_sandbox=none``.
"""

from __future__ import annotations

from qdlm_bench import sandbox

from . import tasks as task_resolution


def code_tasks(names: list[str], include_path=None) -> dict[str, bool]:
    """{task: whether it is lm-eval's own} of the tasks among ``names`` that execute code."""
    index, out = task_resolution.task_index(include_path), {}
    for name in names:
        if name in index:
            if task_resolution.read_yaml(index[name].path).get("unsafe_code"):
                out[name] = False
        elif any(cfg.get("unsafe_code") for cfg in task_resolution.lm_eval_files(name).values()):
            out[name] = True
    return out


def check_sandbox(names: list[str], mode: str, include_path=None) -> str | None:
    """The mode that scores the code tasks among ``names`` (None: there are none); raises
    ValueError, before any model work, when it cannot run here or a task would escape it."""
    found = code_tasks(names, include_path)
    if not found:
        return None
    theirs = sorted(n for n, lm_eval in found.items() if lm_eval)
    if theirs and mode != "none":
        raise ValueError(f"task(s) {', '.join(theirs)} are lm-eval's own code tasks: they execute generated code "
                         "through Hugging Face evaluate's code_eval, outside qdlm-bench's sandbox. Run "
                         "humaneval_local / mbpp_local (sandboxed) instead, or opt in with eval.code_sandbox=none "
                         "(and HF_ALLOW_CODE_EVAL=1)")
    resolved = sandbox.resolve(mode)
    if resolved == "none":
        sandbox.warn_unsandboxed()
    return resolved
