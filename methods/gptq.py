"""GPTQ (Frantar et al., 2023): Hessian-aware weight quantization, block by block on calibration data.

Quantizes all seven linears of every block (q/k/v included), weights only; activations are
wrapped (per-token dynamic) when ``spec.a_bits < 16``, as RTN. Runs in the model's dtype with
Hessians in float32. Biases (Dream's q/k/v) are left untouched.

cfg keys: ``block_size`` (128), ``damp`` (0.01), ``act_order`` (False), ``static_groups`` (False),
``true_sequential`` (True), ``batch_size`` (8), ``exclude`` (fnmatch patterns of layer names).
"""

from qdlm_bench.quant import QuantSpec, linear_layers, wrap_activations
from qdlm_bench.quant.gptq import Hessian, gptq_quantize
from qdlm_bench.quant.walk import walk_blocks

from . import register


class InputHessian(Hessian):
    """The Hessian of the input a layer's weight sees: after its ``input_transform`` (if any)."""

    def __init__(self, layer):
        super().__init__(layer.in_features, layer.weight.device)
        self.transform = getattr(layer, "input_transform", None)

    def add(self, x, weights=None):
        super().add(x if self.transform is None else self.transform(x), weights)


def gptq_weights(model, spec: QuantSpec, calib, cfg: dict, selected: set[str]) -> dict:
    """GPTQ the weights of the ``selected`` linears (full names such as ``blocks.0.q_proj``) in
    place, block by block; returns ``{"layers": count, "max_damp": largest damp used}``."""
    opts = {k: cfg.get(k, v) for k, v in
            dict(block_size=128, damp=0.01, act_order=False, static_groups=False).items()}
    done, damps = [], []

    def fn(i, block, stats):
        for name, hess in stats.items():
            full = f"blocks.{i}.{name}"
            if full not in selected:
                continue
            layer = getattr(block, name)
            q, info = gptq_quantize(layer.weight, hess.H, spec.w_bits, spec.w_sym, spec.group_size,
                                    name=full, **opts)
            layer.weight.copy_(q)
            done.append(full)
            damps.append(info["damp"])

    walk_blocks(model, calib, fn, InputHessian, batch_size=cfg.get("batch_size", 8),
                true_sequential=cfg.get("true_sequential", True), token_weights=getattr(calib, "token_weights", None))
    return {"layers": len(done), "max_damp": max(damps, default=None)}


@register("gptq", needs_calibration=True)
def quantize(model, spec: QuantSpec, calib, cfg: dict) -> dict:
    exclude = cfg.get("exclude") or ()
    info = gptq_weights(model, spec, calib, cfg, set(linear_layers(model, exclude)))
    wrap_activations(model, spec, exclude=exclude)
    return info
