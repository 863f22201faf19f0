"""Evaluation settings: one flat dataclass, built from the ``eval`` config, plus per-task defaults.

Per-task settings are looked up by task-name prefix (``gsm8k`` matches ``gsm8k`` and
``gsm8k_local``; longer keys win), from lowest to highest precedence:

1. built-ins: ``mc_num`` 128, ``max_length`` None (= the model's ``max_seq_len``), and the
   ``GenerationConfig`` defaults;
2. ``generation_defaults``: the model preset's sampler settings (e.g. Dream's ``alg``), and
   the task YAML's ``max_gen_toks`` as ``gen_length``;
3. ``STUDY_DEFAULTS`` below (the LLaDA paper's protocol);
4. diffusion keys in the task YAML's ``generation_kwargs`` (any ``GenerationConfig`` field);
5. ``mc_num`` of the settings when not None (all likelihood tasks);
6. the settings' ``generation`` entries, and ``num_fewshot`` entries for the few-shot count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from qdlm_bench.generation import GenerationConfig

GENERATION_KEYS = frozenset(f.name for f in fields(GenerationConfig))
TASK_KEYS = GENERATION_KEYS | {"mc_num", "max_length"}

_MATH = {"num_fewshot": 4, "gen_length": 256, "steps": 256, "block_length": 64}
_QA = {"num_fewshot": 0, "mc_num": 128}
STUDY_DEFAULTS: dict[str, dict] = {
    "gsm8k": {"num_fewshot": 4, "gen_length": 256, "steps": 256, "block_length": 32},
    "minerva_math": _MATH,
    "hendrycks_math": _MATH,
    "math500": _MATH,
    "humaneval": {"num_fewshot": 0, "gen_length": 512, "steps": 512, "block_length": 32},
    "mbpp": {"num_fewshot": 3, "gen_length": 512, "steps": 512, "block_length": 32},
    "arc_easy": _QA,
    "arc_challenge": _QA,
    "hellaswag": _QA,
    "piqa": _QA,
    "winogrande": {"num_fewshot": 5, "mc_num": 128},  # 5-shot as LLaDA's evaluation script
    "mmlu": {"num_fewshot": 5, "mc_num": 1},
    "wikitext": {"mc_num": 32},
    # our mini tasks (qdlm_bench/zoo), sized so a CPU evaluates all of them in minutes
    "mini_qa": {"num_fewshot": 0, "mc_num": 8},
    "mini_ppl": {"mc_num": 8},
}


def longest_prefix(table: Mapping, task: str):
    """The value of the longest key of ``table`` that prefixes ``task`` (None if none does)."""
    keys = [k for k in table if task.startswith(k)]
    return table[max(keys, key=len)] if keys else None


def by_prefix(table: Mapping[str, Mapping], task: str) -> dict:
    """The entries of ``table`` whose key prefixes ``task``, merged shortest key first."""
    out: dict = {}
    for key in sorted((k for k in table if task.startswith(k)), key=len):
        out.update(table[key])
    return out


@dataclass
class EvalSettings:
    """How tasks are evaluated; ``from_dict`` builds it from the ``eval`` config.

    batch_size: rows per forward pass (generation prompts, likelihood Monte-Carlo samples).
    mc_num: Monte-Carlo samples of every likelihood task; None = the per-task default.
    limit: examples per task (lm-eval's ``limit``; < 1 = a fraction); None = all.
    num_fewshot: {task or prefix: shots}, over the study defaults and the YAMLs.
    generation: {task or prefix: {GenerationConfig field | mc_num | max_length: value}}.
    generation_defaults: the model preset's GenerationConfig fields, under everything else.
    apply_chat_template: wrap prompts in the tokenizer's chat template; None = False.
    seed: python/numpy/torch/few-shot seeds and the likelihood / sampler seed.
    data_dir: folder of the offline data (layout of ../shared/data); None = default_data_dir().
    log_samples: also return lm-eval's per-sample records under each task's "samples".
    progress: show progress bars of generation and likelihood.
    """

    batch_size: int = 16
    mc_num: int | None = None
    limit: int | float | None = None
    num_fewshot: dict[str, int] = field(default_factory=dict)
    generation: dict[str, dict] = field(default_factory=dict)
    generation_defaults: dict = field(default_factory=dict)
    apply_chat_template: bool | None = None
    seed: int = 0
    data_dir: str | None = None
    log_samples: bool = False
    progress: bool = False

    @classmethod
    def from_dict(cls, cfg: Mapping | None = None, *, generation_defaults: Mapping | None = None) -> EvalSettings:
        """Settings from a plain mapping (e.g. the Hydra ``eval`` group); unknown keys are errors."""
        cfg = dict(cfg or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise ValueError(f"unknown eval setting(s) {unknown}; valid settings: {valid}")
        if generation_defaults:
            cfg["generation_defaults"] = {**cfg.get("generation_defaults", {}), **generation_defaults}
        return cls(**cfg)

    def __post_init__(self):
        self.num_fewshot = {str(k): int(v) for k, v in (self.num_fewshot or {}).items()}
        self.generation = {str(k): dict(v) for k, v in (self.generation or {}).items()}
        self.generation_defaults = dict(self.generation_defaults or {})
        if self.batch_size < 1 or (self.mc_num is not None and self.mc_num < 1):
            raise ValueError(f"batch_size and mc_num must be >= 1, got {self.batch_size}, {self.mc_num}")
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"limit must be > 0 or None, got {self.limit}")
        if any(v < 0 for v in self.num_fewshot.values()):
            raise ValueError(f"num_fewshot values must be >= 0, got {self.num_fewshot}")
        for task, overrides in self.generation.items():
            _check_keys(f"generation[{task!r}]", overrides, TASK_KEYS)
        _check_keys("generation_defaults", self.generation_defaults, GENERATION_KEYS)

    def fewshot_for(self, task: str) -> int | None:
        """Shots for ``task``: an override, else the study default, else None (the task's own)."""
        shots = longest_prefix(self.num_fewshot, task)
        return by_prefix(STUDY_DEFAULTS, task).get("num_fewshot") if shots is None else shots

    def for_task(self, task: str, task_kwargs: Mapping | None = None) -> dict:
        """Merged ``mc_num``, ``max_length`` and GenerationConfig fields of ``task``."""
        task_kwargs = task_kwargs or {}
        out = {"mc_num": 128, "max_length": None, **self.generation_defaults}
        if "max_gen_toks" in task_kwargs:
            out["gen_length"] = int(task_kwargs["max_gen_toks"])
        out.update({k: v for k, v in by_prefix(STUDY_DEFAULTS, task).items() if k != "num_fewshot"})
        out.update({k: v for k, v in task_kwargs.items() if k in GENERATION_KEYS})
        if self.mc_num is not None:
            out["mc_num"] = self.mc_num
        out.update(by_prefix(self.generation, task))
        return out

    def generation_config(self, task: str, task_kwargs: Mapping | None = None) -> GenerationConfig:
        merged = self.for_task(task, task_kwargs)
        return GenerationConfig(**{k: v for k, v in merged.items() if k in GENERATION_KEYS})


def _check_keys(where: str, cfg: Mapping, valid: frozenset):
    unknown = sorted(set(cfg) - valid)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in eval {where}; valid: {sorted(valid)}")
