"""The sampler settings of masked-diffusion generation, torch-free so that the configuration check
can validate them before torch loads (``diffusion`` holds the samplers that read them)."""

from __future__ import annotations

from dataclasses import dataclass

LLADA_REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("entropy", "maskgit_plus", "topk_margin", "origin")


@dataclass
class GenerationConfig:
    """Sampler settings; ``sampler=None`` picks the model family's sampler."""

    gen_length: int = 256
    steps: int = 256
    block_length: int = 32
    temperature: float = 0.0
    remasking: str = "low_confidence"
    cfg_scale: float = 0.0
    alg: str = "entropy"
    alg_temp: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    eps: float = 1e-3
    sampler: str | None = None

    def __post_init__(self):
        for name in ("gen_length", "steps", "block_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0 or self.alg_temp < 0 or self.cfg_scale < 0:
            raise ValueError("temperature, alg_temp and cfg_scale must be >= 0")
        if self.remasking not in LLADA_REMASKING:
            raise ValueError(f"remasking {self.remasking!r} not in {LLADA_REMASKING}")
        if self.alg not in DREAM_ALGS:
            raise ValueError(f"alg {self.alg!r} not in {DREAM_ALGS}")
        if self.sampler not in (None, "llada", "dream"):
            raise ValueError(f"sampler {self.sampler!r} must be 'llada', 'dream' or None")

    def deterministic(self, sampler: str) -> bool:
        """Whether ``sampler`` ('llada' | 'dream') draws no random numbers under these settings."""
        if sampler == "llada":
            return self.temperature == 0 and self.remasking == "low_confidence"
        return self.temperature == 0 and self.alg_temp == 0 and self.alg != "origin"
