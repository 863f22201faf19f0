"""Round-to-nearest: per-channel or per-group weights of every target linear (``quant.exclude``,
``quant.lm_head``) on GPTQ's grid (IST-DASLab ``quant.py`` / AutoGPTQ ``quantizer.py``: the
grid the GPTQ study's RTN baseline uses); activations per-token dynamic when a < 16
(``install_quantizers``). No calibration."""

from __future__ import annotations

from qdlm_bench import quant

from . import options, register


@options
class RTNOptions:
    """``conf/method/rtn.yaml``: none."""


@register("rtn", RTNOptions)
def round_weights(state, opts: RTNOptions, grid: str = "gptq") -> dict:
    """RTN on ``grid`` (compositions pass their reference's, e.g. QuaRot's ``"absmax"``)."""
    return {"layers": quant.quantize_weights_rtn(state.model, state.spec, grid)}
