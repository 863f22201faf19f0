"""Evaluation with lm-eval: the diffusion-LM adapter, task resolution, per-task settings.

    settings = EvalSettings.from_dict(cfg["eval"], generation_defaults=preset["generation"])
    validate_tasks(["gsm8k_local", "mmlu_local"], settings.data_dir,   # before loading weights
                   code_sandbox=settings.code_sandbox)
    metrics = run(model, tokenizer, ["gsm8k_local", "mmlu_local"], settings)

Settings and task validation load neither torch nor lm-eval; the adapter and ``run`` (both
heavy) import on first use.
"""

from qdlm_bench.lazy import lazy_exports

from . import tasks as _tasks
from .code_tasks import check_sandbox
from .settings import STUDY_DEFAULTS, EvalSettings
from .tasks import default_data_dir, local_tasks, resolve_tasks


def validate_tasks(names: list[str], data_dir=None, include_path=None, code_sandbox: str | None = None) -> None:
    """Raise ValueError for unknown tasks or missing data (``tasks.validate_tasks``) and, given
    ``code_sandbox`` (``EvalSettings.code_sandbox``), for code tasks it cannot run
    (``code_tasks.check_sandbox``); loads neither torch nor lm-eval."""
    _tasks.validate_tasks(names, data_dir, include_path)
    if code_sandbox is not None:
        check_sandbox(names, code_sandbox, include_path)


__getattr__ = lazy_exports(__name__, {"DiffusionLMAdapter": ".adapter", "PRIMARY_METRICS": ".harness",
                                      "primary_metric": ".harness", "run": ".harness"})

__all__ = ["DiffusionLMAdapter", "EvalSettings", "PRIMARY_METRICS", "STUDY_DEFAULTS", "check_sandbox",
           "default_data_dir",
           "local_tasks", "primary_metric", "resolve_tasks", "run", "validate_tasks"]
