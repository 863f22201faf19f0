"""Full precision: the baseline; changes nothing."""

from qdlm_bench.quant import QuantSpec

from . import _add


def quantize(model, spec: QuantSpec, calib, cfg: dict) -> dict:
    if not spec.is_fp:
        raise ValueError(f"method 'fp' takes bits=fp, got {spec.name!r}")
    return {"layers": 0}


_add("fp", quantize, needs_calibration=False)
