"""Evaluation with lm-eval: the diffusion-LM adapter, task resolution, per-task settings.

    settings = EvalSettings.from_dict(cfg["eval"], generation_defaults=preset["generation"])
    validate_tasks(["gsm8k_local", "mmlu_local"], settings.data_dir)   # before loading weights
    metrics = run(model, tokenizer, ["gsm8k_local", "mmlu_local"], settings)

Settings and task validation load neither torch nor lm-eval; the adapter and ``run`` (both
heavy) import on first use.
"""

from qdlm_bench.lazy import lazy_exports

from .settings import STUDY_DEFAULTS, EvalSettings
from .tasks import default_data_dir, local_tasks, resolve_tasks, validate_tasks

__getattr__ = lazy_exports(__name__, {"DiffusionLMAdapter": ".adapter", "PRIMARY_METRICS": ".harness",
                                      "primary_metric": ".harness", "run": ".harness"})

__all__ = ["DiffusionLMAdapter", "EvalSettings", "PRIMARY_METRICS", "STUDY_DEFAULTS", "default_data_dir",
           "local_tasks", "primary_metric", "resolve_tasks", "run", "validate_tasks"]
