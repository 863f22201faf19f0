"""DLLMQuant (arXiv 2508.14090): TMAS calibration, CGQ-weighted statistics and IA-AQ for V, on a base PTQ method.

On the FP model, in order (the recipe is declared in ``methods/recipes.py``):

1. ``tmas`` (``tmas.py``): the calibration set's rows become prompts of the FP sampler; the
   calibration set becomes N snapshots of its trajectories (cached). Off: the set as is.
2. ``cgq`` (``cgq.py``): the FP model's confidences give every token the weight ``g_t^2``, set as
   ``calib.token_weights``, which the base's block walk uses (GPTQ's Hessian, AWQ's losses).
3. the base method (``gptq`` | ``awq`` | ``quarot``) quantizes the weights; the activation and K/V
   quantizers are installed.
4. ``iaaq`` (``iaaq.py``): on the quantized model, a static per-head alpha of V's quantization range
   per block, handed to the one quantizer installer. V is quantized only when ``bits`` names KV
   bits (e.g. ``w4a4kv4``); otherwise there is nothing to do and a note is logged.

See methods/README.md for which choices are the paper's and which are ours. The options live here
(torch-free, checked before any work); the submodules load on first use.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Annotated, Literal

from pydantic import Field, model_validator

from qdlm_bench.generation import GenerationConfig
from qdlm_bench.lazy import lazy_import

from .. import options

log = logging.getLogger(__name__)
torch = lazy_import("torch")
calibration = lazy_import("qdlm_bench.calibration")
tmas = lazy_import("qdlm_bench.methods.dllmquant.tmas")
cgq = lazy_import("qdlm_bench.methods.dllmquant.cgq")
iaaq = lazy_import("qdlm_bench.methods.dllmquant.iaaq")

NonNegative = Annotated[float, Field(ge=0, strict=True)]
SEGMENT_BY = ("mask_ratio", "block_step", "global_step")
SAMPLING = ("quota", "uniform", "text")


@options
class TMASOptions:
    """``method.tmas_opts``: what defines a TMAS set besides the prompts and the model."""

    n_samples: Annotated[int, Field(ge=1)] = 128
    proportions: Annotated[tuple[NonNegative, ...], Field(strict=False)] = (0.3, 0.2, 0.2, 0.3)  # a list or tuple
    segment_by: Literal[SEGMENT_BY] = "mask_ratio"
    sampling: Literal[SAMPLING] = "quota"
    generation: dict = Field(default_factory=lambda: {"gen_length": 128, "steps": 128, "block_length": 32})
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if not self.proportions or abs(sum(self.proportions) - 1) > 1e-6:
            raise ValueError(f"tmas proportions (one per segment) must be >= 0 and sum to 1, got {list(self.proportions)}")
        try:
            GenerationConfig(**self.generation)
        except TypeError as err:
            raise ValueError(f"tmas generation: {err}; valid keys: "
                             f"{[f.name for f in dataclasses.fields(GenerationConfig)]}") from None
        return self

    @property
    def gen_config(self) -> GenerationConfig:
        return GenerationConfig(**self.generation)


@options
class CGQOptions:
    """``method.cgq_opts``: ``g_t = ind_t + sqrt(conf_t)`` with ``ind_t`` = ``masked`` / ``unmasked``."""

    masked: NonNegative = 1.0
    unmasked: NonNegative = 0.7
    unmasked_conf: Literal["token", "zero"] = "token"


@options
class IAAQOptions:
    """``method.iaaq_opts``: the alpha grid ``alpha_min, alpha_min + step, ..., alpha_max``."""

    alpha_min: Annotated[float, Field(gt=0)] = 0.8
    alpha_max: float = 1.0
    alpha_step: Annotated[float, Field(gt=0)] = 0.01

    @model_validator(mode="after")
    def _check(self):
        if self.alpha_min > self.alpha_max:
            raise ValueError(f"iaaq needs 0 < alpha_min <= alpha_max, got alpha_min={self.alpha_min}, "
                             f"alpha_max={self.alpha_max}")
        return self

    def grid(self):
        """The alphas searched, float32."""
        n = math.floor((self.alpha_max - self.alpha_min) / self.alpha_step + 1e-6)
        return torch.cat([self.alpha_min + self.alpha_step * torch.arange(n, dtype=torch.float64),
                          torch.tensor([self.alpha_max], dtype=torch.float64)]).unique().float()


@options
class DLLMQuantOptions:
    """``conf/method/dllmquant.yaml``. ``base_opts``: options of the base method (checked against
    its options class by the recipe); ``batch_size`` is also the base's unless ``base_opts`` sets it."""

    base: Literal["gptq", "awq", "quarot"] = "gptq"
    tmas: bool = True
    cgq: bool = True
    iaaq: bool = True
    batch_size: Annotated[int, Field(ge=1)] = 8
    base_opts: dict | None = None
    tmas_opts: TMASOptions = Field(default_factory=TMASOptions)
    cgq_opts: CGQOptions = Field(default_factory=CGQOptions)
    iaaq_opts: IAAQOptions = Field(default_factory=IAAQOptions)


def trajectory_calibration(state, opts: DLLMQuantOptions) -> dict:
    """TMAS: the calibration set becomes snapshots of the FP sampler's trajectories on its rows."""
    state.calib = tmas.build(state.model, state.calib, opts.tmas_opts, opts.batch_size)
    return {"tmas_samples": len(state.calib)}


def certainty_weights(state, opts: DLLMQuantOptions) -> None:
    """CGQ: per-token weights ``g_t^2`` of the base's statistics (FP confidences computed if missing)."""
    calib = state.calib
    if calib.confidence is None:
        calib = dataclasses.replace(calib, confidence=calibration.confidences(state.model, calib, opts.batch_size))
    state.calib = dataclasses.replace(calib, token_weights=cgq.token_weights(calib, opts.cgq_opts))


def value_ranges(state, opts: DLLMQuantOptions) -> dict:
    """IA-AQ: per-block, per-head V ranges on the quantized model, installed through the one installer."""
    if state.spec.kv_bits == 16:
        log.info("dllmquant: IA-AQ skipped: %s leaves V in 16 bits (quantize KV, e.g. w4a4kv4)", state.spec.name)
        return {}
    found = iaaq.calibrate(state.model, state.calib, state.spec, opts.iaaq_opts, opts.batch_size)
    state.v_range = found["alphas"]
    return {"iaaq_mean_alpha": float(sum(a.mean() for a in found["alphas"]) / len(found["alphas"]))}
