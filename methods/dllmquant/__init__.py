"""DLLMQuant (arXiv 2508.14090): TMAS calibration, CGQ-weighted statistics and IA-AQ for V, on a base PTQ method.

On the FP model, in order:

1. ``tmas``: the calibration set's rows become prompts of the FP sampler; the calibration set
   becomes N snapshots of its trajectories (``qdlm_bench.tmas``; cached). Off: the set as is.
2. ``cgq``: the FP model's confidences give every token the weight ``g_t^2`` (``quant/cgq.py``),
   set as ``calib.token_weights``, which the base's block walk uses (GPTQ's Hessian, AWQ's losses).
3. the base method (``gptq`` | ``awq`` | ``quarot``, through the registry) quantizes the model.
4. ``iaaq``: on the quantized model, a static per-head alpha of V's quantization range per block
   (``quant/iaaq.py``). V is quantized only when ``bits`` names KV bits (e.g. ``w4a4kv4``);
   otherwise there is nothing to do and a note is logged.

See methods/README.md for which choices are the paper's and which are ours.
cfg keys: ``base`` (gptq), ``tmas`` / ``cgq`` / ``iaaq`` (true), ``batch_size`` (8, every forward
here and the base's walk), ``base_opts`` ({}: options of the base method), ``tmas_opts``
(``tmas.TMASConfig``), ``cgq_opts`` (``cgq.CGQConfig``), ``iaaq_opts`` (``iaaq.IAAQConfig``),
``exclude`` (passed to the base).
"""

from __future__ import annotations

import dataclasses
import logging

from . import cgq, iaaq, tmas
from qdlm_bench.calibration import CalibSet, confidences
from qdlm_bench.quant import QuantSpec

from .. import get, register

log = logging.getLogger(__name__)

BASES = ("gptq", "awq", "quarot")
SWITCHES = ("tmas", "cgq", "iaaq")
OPTIONS = {"tmas_opts": tmas.TMASConfig, "cgq_opts": cgq.CGQConfig, "iaaq_opts": iaaq.IAAQConfig}
KEYS = {"name", "base", "batch_size", "base_opts", "exclude", *SWITCHES, *OPTIONS}


def _options(cfg: dict) -> dict:
    """The validated options of ``cfg`` (ValueError naming the bad key)."""
    unknown = sorted(set(cfg) - KEYS)
    if unknown:
        raise ValueError(f"dllmquant: unknown method keys {unknown}; valid: {sorted(KEYS)}")
    if cfg.get("base", "gptq") not in BASES:
        raise ValueError(f"dllmquant: method.base must be one of {BASES}, got {cfg.get('base')!r}")
    for key in SWITCHES:
        if not isinstance(cfg.get(key, True), bool):
            raise ValueError(f"dllmquant: method.{key} must be true or false, got {cfg[key]!r}")
    opts = {}
    for key, cls in OPTIONS.items():
        try:
            opts[key] = cls(**(cfg.get(key) or {}))
        except TypeError as err:
            raise ValueError(f"dllmquant: method.{key}: {err}; valid keys: "
                             f"{[f.name for f in dataclasses.fields(cls)]}") from None
    return opts


@register("dllmquant", needs_calibration=True)
def quantize(model, spec: QuantSpec, calib: CalibSet, cfg: dict) -> dict:
    opts = _options(cfg)
    base, bs = cfg.get("base", "gptq"), cfg.get("batch_size", 8)
    on = {key: cfg.get(key, True) for key in SWITCHES}
    info = {}
    if on["tmas"]:
        calib = tmas.build(model, calib, opts["tmas_opts"], bs)
        info["tmas_samples"] = len(calib)
    if on["cgq"]:
        if calib.confidence is None:
            calib = dataclasses.replace(calib, confidence=confidences(model, calib, bs))
        calib = dataclasses.replace(calib, token_weights=cgq.token_weights(calib, opts["cgq_opts"]))
    base_cfg = {"batch_size": bs, **(cfg.get("base_opts") or {}), "exclude": cfg.get("exclude") or ()}
    info["base"] = get(base)(model, spec, calib, base_cfg)
    if on["iaaq"]:
        if spec.kv_bits < 16:
            found = iaaq.calibrate(model, calib, spec.kv_bits, opts["iaaq_opts"], bs)
            info["iaaq_mean_alpha"] = float(sum(a.mean() for a in found["alphas"]) / len(found["alphas"]))
        else:
            log.info("dllmquant: IA-AQ skipped: %s leaves V in 16 bits (quantize KV, e.g. w4a4kv4)", spec.name)
    return info
