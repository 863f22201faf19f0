"""``DecodeConfig``: which decoder generates (the ``decode`` config group), torch-free."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields

CACHES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class DecodeConfig:
    """How generation decodes; the default is the exact sampler.

    cache: ``none`` (every step recomputes the whole sequence), ``prefix`` (each step recomputes the
        current block and everything after it, against K/V of the prompt and finished blocks cached
        at the block's first step), ``dual`` (each step recomputes the current block only, against
        K/V of every other column cached at the block's first step).
    threshold: None (the sampler's schedule of tokens per step), or parallel decoding: every masked
        token of the block whose confidence (its probability) is >= ``threshold`` is unmasked, and
        at least the most confident one; ``steps`` is then ignored. Above 1: one token per step.
    refresh: None (the cache is refreshed at each new block only, as Fast-dLLM), or also every
        ``refresh`` model calls within a block (1: every step, which is exact decoding).
    """

    cache: str = "none"
    threshold: float | None = None
    refresh: int | None = None

    def __post_init__(self):
        if self.cache not in CACHES:
            raise ValueError(f"decode.cache={self.cache!r} is not one of {CACHES}")
        if self.threshold is not None and (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                                           or not self.threshold > 0):
            raise ValueError(f"decode.threshold={self.threshold!r} must be a number > 0 (e.g. 0.9) or null")
        if self.refresh is not None:
            if isinstance(self.refresh, bool) or not isinstance(self.refresh, int) or self.refresh < 1:
                raise ValueError(f"decode.refresh={self.refresh!r} must be an integer >= 1 or null")
            if self.cache == "none":
                raise ValueError("decode.refresh is set but decode.cache=none: there is no cache to refresh")

    @property
    def is_exact(self) -> bool:
        return self.cache == "none" and self.threshold is None

    @property
    def label(self) -> str:
        """``exact``, ``prefix_cache``, ``dual_cache+parallel0.9``, ``prefix_cache/refresh4``..."""
        parts = ([] if self.cache == "none" else [f"{self.cache}_cache"]) + (
            [] if self.threshold is None else [f"parallel{self.threshold:g}"])
        name = "+".join(parts) or "exact"
        return name if self.refresh is None else f"{name}/refresh{self.refresh}"

    def check(self, cfg, sampler: str) -> None:
        """Refuse sampler settings (a ``GenerationConfig``) this decoder does not implement; ValueError naming the fix."""
        if self.is_exact:
            return
        if cfg.cfg_scale > 0:
            raise ValueError(f"decode={self.label} does not implement classifier-free guidance (cfg_scale "
                             f"{cfg.cfg_scale}); use decode=exact or cfg_scale=0")
        if sampler == "dream" and cfg.alg == "origin":
            raise ValueError(f"decode={self.label} needs a confidence-ordered Dream alg, not 'origin'; "
                             "use alg=entropy (or maskgit_plus, topk_margin) or decode=exact")
        if self.threshold is not None and sampler == "llada" and cfg.remasking == "random":
            raise ValueError(f"decode={self.label} thresholds confidences, which remasking=random draws at "
                             "random; use remasking=low_confidence")
        if cfg.gen_length % cfg.block_length or cfg.steps % (cfg.gen_length // cfg.block_length):
            raise ValueError(f"decode={self.label} decodes block by block: block_length {cfg.block_length} "
                             f"must divide gen_length {cfg.gen_length} and the block count divide steps {cfg.steps}")

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, cfg: Mapping | None) -> DecodeConfig:
        """From the ``decode`` config section (None: exact); unknown keys and bad values raise ValueError."""
        cfg = dict(cfg or {})
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(valid))
        if unknown:
            raise ValueError(f"unknown decode setting(s) {unknown}; valid: {valid}")
        if isinstance(cfg.get("threshold"), str):  # decode.threshold=0.9 on a command line stays a number; a name does not
            raise ValueError(f"decode.threshold={cfg['threshold']!r} must be a number > 0 (e.g. 0.9) or null")
        return cls(**cfg)


EXACT = DecodeConfig()


def label_of(decode: Mapping | None) -> str:
    """The label of a record's ``spec.eval.decode`` (absent: exact)."""
    return DecodeConfig.from_dict(decode).label
