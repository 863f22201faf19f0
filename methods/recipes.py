"""Methods composed of other methods' steps, declared in one place (llm-compressor style: an
ordered list of steps per method). Each step is one method's own code; no method calls another.

    quarot     = [quarot.rotate, gptq.quantize_weights | rtn.round_weights, install_quantizers]
    dllmquant  = [tmas?, cgq?, <the base's weight steps>, install_quantizers, iaaq?]
"""

from __future__ import annotations

from functools import partial
from typing import Literal

from . import Method, add, awq, dllmquant, gptq, install_quantizers, make_options, options, quarot, rtn


@options
class QuaRotOptions(gptq.GPTQOptions, quarot.RotationOptions):
    """``conf/method/quarot.yaml``: the rotation's options, ``weights`` and GPTQ's (unused with rtn)."""

    weights: Literal["gptq", "rtn"] = "gptq"


def quarot_weights(opts: QuaRotOptions) -> list:
    """Rotate, then quantize the weights (GPTQ on the rotated model's inputs, or RTN) on QuaRot's grid."""
    weights = gptq.quantize_weights if opts.weights == "gptq" else rtn.round_weights
    return [partial(quarot.rotate, opts=opts), partial(weights, opts=opts, grid=quarot.GRID)]


# DLLMQuant's bases: their options class and weight steps
BASES = {
    "gptq": (gptq.GPTQOptions, lambda o: [partial(gptq.quantize_weights, opts=o)]),
    "awq": (awq.AWQOptions, lambda o: [partial(awq.quantize_weights, opts=o)]),
    "quarot": (QuaRotOptions, quarot_weights),
}


def dllmquant_steps(opts: dllmquant.DLLMQuantOptions) -> list:
    """TMAS and CGQ shape the calibration set, the base quantizes the weights, then the quantizers
    are installed and IA-AQ sets V's ranges. ``base_opts`` go over DLLMQuant's ``batch_size``."""
    cls, weight_steps = BASES[opts.base]
    base = make_options(cls, {"batch_size": opts.batch_size, **(opts.base_opts or {})}, "method.base_opts")
    on = [(opts.tmas, dllmquant.trajectory_calibration), (opts.cgq, dllmquant.certainty_weights)]
    return [*(partial(step, opts=opts) for enabled, step in on if enabled), *weight_steps(base), install_quantizers,
            *([partial(dllmquant.value_ranges, opts=opts)] if opts.iaaq else [])]


add(Method("quarot", QuaRotOptions, lambda o: [*quarot_weights(o), install_quantizers], calibration=True))
add(Method("dllmquant", dllmquant.DLLMQuantOptions, dllmquant_steps, calibration=True))
