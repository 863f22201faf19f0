"""Round-to-nearest: per-channel or per-group weights, per-token dynamic activations. No calibration.

cfg keys: ``exclude`` (fnmatch patterns of layer names), ``include_lm_head`` (default False).
"""

from qdlm_bench.quant import QuantSpec, quantize_weights_rtn, wrap_activations

from . import register


@register("rtn")
def quantize(model, spec: QuantSpec, calib, cfg: dict) -> dict:
    select = dict(exclude=cfg.get("exclude", ()), include_lm_head=cfg.get("include_lm_head", False))
    n = quantize_weights_rtn(model, spec, **select)
    wrap_activations(model, spec, **select)
    return {"layers": n}
