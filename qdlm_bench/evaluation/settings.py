"""Evaluation settings: one flat dataclass, built from the ``eval`` config, plus per-task defaults.

A task's settings, from lowest to highest precedence:

1. built-ins: ``mc_num`` 128, ``max_length`` None (= the model's ``max_seq_len``), and the
   ``GenerationConfig`` defaults;
2. ``generation_defaults``: the model preset's sampler settings (e.g. Dream's ``alg``), and
   the task YAML's ``max_gen_toks`` as ``gen_length``;
3. ``STUDY_DEFAULTS`` below (the LLaDA paper's protocol): the entry of the task's exact name, else
   of its nearest group (a group's subtasks inherit it: mmlu_local's subjects, also when run
   alone; lm-eval's mmlu subjects when run as mmlu). Any other task gets none (``mmlu_pro``, or
   ``hendrycks_math_algebra`` run alone): its YAML decides;
4. diffusion keys in the task YAML's ``generation_kwargs`` (any ``GenerationConfig`` field);
5. ``mc_num`` of the settings when not None (all likelihood tasks);
6. the settings' ``generation`` entries, and ``num_fewshot`` entries for the few-shot count. These
   overrides are the user's: a key matches a task whose name it prefixes (``gsm8k`` matches
   ``gsm8k_local``; ``""`` every task) or that is in the group it names; merged least specific
   first (group keys, then prefixes by length).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from qdlm_bench import sandbox
from qdlm_bench.decoders.config import EXACT, DecodeConfig
from qdlm_bench.generation import GenerationConfig

from . import tasks as task_resolution

GENERATION_KEYS = frozenset(f.name for f in fields(GenerationConfig))
TASK_KEYS = GENERATION_KEYS | {"mc_num", "max_length"}
LM_EVAL_FEWSHOT_SEED = 1234  # lm-eval's default few-shot sampler seed (simple_evaluate)

_MATH = {"num_fewshot": 4, "gen_length": 256, "steps": 256, "block_length": 64}
_QA = {"num_fewshot": 0, "mc_num": 128}
_STUDY: list[tuple[str, dict]] = [  # (task and group names, their settings)
    ("gsm8k gsm8k_local", {"num_fewshot": 4, "gen_length": 256, "steps": 256, "block_length": 32}),
    ("minerva_math hendrycks_math minerva_math500 math500_local", _MATH),
    ("humaneval humaneval_local", {"num_fewshot": 0, "gen_length": 512, "steps": 512, "block_length": 32}),
    ("mbpp mbpp_local", {"num_fewshot": 3, "gen_length": 512, "steps": 512, "block_length": 32}),
    ("arc_easy arc_easy_local arc_challenge arc_challenge_local hellaswag hellaswag_local piqa piqa_local", _QA),
    ("winogrande winogrande_local", {"num_fewshot": 5, "mc_num": 128}),  # 5-shot as LLaDA's evaluation script
    ("mmlu mmlu_local", {"num_fewshot": 5, "mc_num": 1}),
    ("wikitext wikitext_local", {"mc_num": 32}),
    # our mini tasks (qdlm_bench/zoo), sized so a CPU evaluates all of them in minutes
    ("mini_qa", {"num_fewshot": 0, "mc_num": 4}),  # 4: the knee of MC noise vs cost (tasks/mini_qa.yaml)
    ("mini_ppl", {"mc_num": 8}),
]
STUDY_DEFAULTS: dict[str, dict] = {name: cfg for names, cfg in _STUDY for name in names.split()}


@dataclass
class EvalSettings:
    """How tasks are evaluated; ``from_dict`` builds it from the ``eval`` config.

    batch_size: rows per forward pass (generation prompts, likelihood Monte-Carlo samples).
    mc_num: Monte-Carlo samples of every likelihood task; None = the per-task default.
    limit: examples per task (lm-eval's ``limit``; < 1 = a fraction); None = all.
    num_fewshot: {task, group or prefix: shots}, over the study defaults and the YAMLs.
    generation: {task, group or prefix: {GenerationConfig field | mc_num | max_length: value}}.
    generation_defaults: the model preset's GenerationConfig fields, under everything else.
    apply_chat_template: wrap prompts in the tokenizer's chat template; None = False.
    seed: python/numpy/torch seeds and the likelihood / sampler seed.
    fewshot_seed: seed of lm-eval's few-shot sampler (which examples a random sampler draws).
    data_dir: folder of the offline data (layout of ../shared/data); None = default_data_dir().
    include_path: folder(s) of your own task YAMLs (lm-eval's include_path; see ``tasks``).
    log_samples: also return lm-eval's per-sample records under each task's "samples".
    progress: show progress bars of generation and likelihood.
    request_cache: persist finished batches under ``<store>/request_cache`` so that a killed run
        resumes inside a task (``request_cache``); changes no number, so not in the record key.
    code_sandbox: how code tasks run generated programs: auto | bwrap | unshare | none
        (``qdlm_bench.sandbox``); checked against the run's tasks by ``validate_tasks``.
    groups: {task: its groups, innermost first} of the tasks being run (``within``); the group that
        generates a task (mmlu_local's subjects) counts too, also when it runs alone.
    decode: the decoder of generation tasks (the run's ``decode``; ``decoders.config``), exact by default.
    compile: ``torch.compile`` the model's blocks before evaluating (``compile_blocks``: norms, RoPE,
        SwiGLU and quantizers fused around the matmuls); for GPU runs. Changes how, not what, is
        computed (bf16 rounding may differ, as with ``batch_size``), so not in the record key.
    """

    batch_size: int = 16
    mc_num: int | None = None
    limit: int | float | None = None
    num_fewshot: dict[str, int] = field(default_factory=dict)
    generation: dict[str, dict] = field(default_factory=dict)
    generation_defaults: dict = field(default_factory=dict)
    apply_chat_template: bool | None = None
    seed: int = 0
    fewshot_seed: int = LM_EVAL_FEWSHOT_SEED
    data_dir: str | None = None
    include_path: str | list[str] | None = None
    log_samples: bool = False
    progress: bool = False
    request_cache: bool = True
    code_sandbox: str = "auto"
    compile: bool = False
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict, init=False, repr=False)
    decode: DecodeConfig = field(default=EXACT, init=False, repr=False)

    @classmethod
    def from_dict(cls, cfg: Mapping | None = None, *, generation_defaults: Mapping | None = None) -> EvalSettings:
        """Settings from a plain mapping (e.g. the Hydra ``eval`` group); unknown keys are errors."""
        cfg = dict(cfg or {})
        valid = [f.name for f in fields(cls) if f.init]
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
        sandbox.check_mode(self.code_sandbox)
        for name in ("request_cache", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def within(self, groups: Mapping[str, tuple[str, ...]]) -> EvalSettings:
        """A copy that knows the groups around the tasks being run (``tasks.group_chains``)."""
        out = copy.copy(self)
        out.groups = dict(groups)
        return out

    def groups_of(self, task: str) -> tuple[str, ...]:
        """The groups around ``task``, innermost first, then the group that generates it."""
        chain = self.groups.get(task, ())
        group = getattr(task_resolution.task_index(self.include_path).get(task), "group", None)
        return chain + ((group,) if group and group not in chain else ())

    def study_defaults(self, task: str) -> dict:
        """The STUDY_DEFAULTS entry of ``task``, else of its nearest group with one, else {}."""
        return next((STUDY_DEFAULTS[n] for n in (task, *self.groups_of(task)) if n in STUDY_DEFAULTS), {})

    def _override_keys(self, table: Mapping, task: str) -> list[str]:
        """The keys of ``table`` that match ``task``, least specific first (see the module doc)."""
        groups = self.groups_of(task)
        keys = [k for k in table if task.startswith(k) or k in groups]
        return sorted(keys, key=lambda k: (task.startswith(k), len(k)))

    def fewshot_for(self, task: str) -> int | None:
        """Shots for ``task``: an override, else the study default, else None (the task's own)."""
        keys = self._override_keys(self.num_fewshot, task)
        return self.num_fewshot[keys[-1]] if keys else self.study_defaults(task).get("num_fewshot")

    def for_task(self, task: str, task_kwargs: Mapping | None = None) -> dict:
        """Merged ``mc_num``, ``max_length`` and GenerationConfig fields of ``task``."""
        task_kwargs = task_kwargs or {}
        out = {"mc_num": 128, "max_length": None, **self.generation_defaults}
        if "max_gen_toks" in task_kwargs:
            out["gen_length"] = int(task_kwargs["max_gen_toks"])
        out.update({k: v for k, v in self.study_defaults(task).items() if k != "num_fewshot"})
        out.update({k: v for k, v in task_kwargs.items() if k in GENERATION_KEYS})
        if self.mc_num is not None:
            out["mc_num"] = self.mc_num
        for key in self._override_keys(self.generation, task):
            out.update(self.generation[key])
        return out

    def generation_config(self, task: str, task_kwargs: Mapping | None = None) -> GenerationConfig:
        merged = self.for_task(task, task_kwargs)
        return GenerationConfig(**{k: v for k, v in merged.items() if k in GENERATION_KEYS})


def _check_keys(where: str, cfg: Mapping, valid: frozenset):
    unknown = sorted(set(cfg) - valid)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in eval {where}; valid: {sorted(valid)}")
