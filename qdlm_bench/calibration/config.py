"""The ``calib`` config group's schema, ``CalibConfig``: torch-free, so the configuration check
validates it before torch loads."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

PROMPTS_PREFIX = "prompts:"
MASK_DISTS = {"uniform": {"low", "high"}, "fixed": {"value"}}


@dataclasses.dataclass(frozen=True)
class CalibConfig:
    """What defines a calibration set (the ``calib`` config group)."""

    source: str = "wikitext2"
    n_samples: int = 128
    seqlen: int = 2048
    masking: str = "none"                 # none | random
    mask_ratio: dict = dataclasses.field(default_factory=lambda: {"dist": "uniform", "low": 0.0, "high": 1.0})
    seed: int = 0
    text_field: str = "text"              # the text field of a .jsonl source
    chat_template: bool = False           # prompts: sources: wrap each prompt in the chat template (else ignored)

    @classmethod
    def from_dict(cls, d: Mapping) -> CalibConfig:
        """Build from a plain dict or an OmegaConf node; unknown keys raise ValueError."""
        if hasattr(d, "_metadata"):  # an OmegaConf node
            from omegaconf import OmegaConf
            d = OmegaConf.to_container(d, resolve=True)
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(valid))
        if unknown:
            raise ValueError(f"unknown calib keys {unknown}; valid keys: {valid}")
        return cls(**d)

    def __post_init__(self):
        if self.masking not in ("none", "random"):
            raise ValueError(f"calib.masking must be 'none' or 'random', got {self.masking!r}")
        if self.n_samples < 1 or self.seqlen < 1:
            raise ValueError(f"calib.n_samples and calib.seqlen must be >= 1, got {self.n_samples}, {self.seqlen}")
        if self.prompt_tasks is not None and not all(self.prompt_tasks):
            raise ValueError(f"calib.source {self.source!r}: expected prompts:<task>[+<task>...], "
                             "e.g. prompts:mini_math+mini_code")
        object.__setattr__(self, "mask_ratio", dict(self.mask_ratio))
        dist = self.mask_ratio.get("dist")
        if dist not in MASK_DISTS:
            raise ValueError(f"calib.mask_ratio.dist must be one of {sorted(MASK_DISTS)}, got {dist!r}")
        extra = set(self.mask_ratio) - {"dist", *set().union(*MASK_DISTS.values())}
        missing = MASK_DISTS[dist] - set(self.mask_ratio)
        if extra or missing:
            raise ValueError(f"calib.mask_ratio with dist {dist!r} takes keys {sorted(MASK_DISTS[dist])}; "
                             f"unknown {sorted(extra)}, missing {sorted(missing)}")
        # keys of the other distribution (left over from a Hydra merge) are dropped
        object.__setattr__(self, "mask_ratio", {"dist": dist, **{k: float(self.mask_ratio[k]) for k in sorted(MASK_DISTS[dist])}})
        keys = MASK_DISTS[dist]
        values = [float(self.mask_ratio[k]) for k in keys]
        if not all(0.0 <= v <= 1.0 for v in values) or self.mask_ratio.get("low", 0) > self.mask_ratio.get("high", 1):
            raise ValueError(f"calib.mask_ratio values must lie in [0, 1] (low <= high), got {self.mask_ratio}")

    @property
    def prompt_tasks(self) -> list[str] | None:
        """The task names of a ``prompts:`` source (None for a text source)."""
        return self.source[len(PROMPTS_PREFIX):].split("+") if self.source.startswith(PROMPTS_PREFIX) else None

    def defining(self) -> dict:
        """The fields that define the set (mask_ratio only when masking is on, chat_template only when on
        for a prompts: source)."""
        d = dataclasses.asdict(self)
        if self.masking == "none":
            d.pop("mask_ratio")
        if not (self.chat_template and self.prompt_tasks):
            d.pop("chat_template")
        return d
