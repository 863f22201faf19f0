"""GPTQ (Frantar et al., 2023): Hessian-aware weight quantization, block by block on calibration data.

Quantizes all seven linears of every block (q/k/v included), weights only; activations are
wrapped (per-token dynamic) when ``spec.a_bits < 16``, as RTN. Runs in the model's dtype with
Hessians in float32. Biases (Dream's q/k/v) are left untouched.

cfg keys: ``block_size`` (128), ``damp`` (0.01), ``act_order`` (False), ``static_groups`` (False),
``true_sequential`` (True), ``batch_size`` (8), ``exclude`` (fnmatch patterns of layer names).
"""

import torch

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
        shared: dict[int, list[str]] = {}  # the selected linears of each Hessian (one per subset)
        for name, hess in stats.items():
            if f"blocks.{i}.{name}" in selected:
                shared.setdefault(id(hess), []).append(name)
        for names in shared.values():
            # GPTQ treats rows independently given H: one solve over the stacked rows of the
            # linears that share H equals one solve per linear, at one column loop for all.
            layers = [getattr(block, n) for n in names]
            q, info = gptq_quantize(torch.cat([lin.weight for lin in layers]), stats[names[0]].H, spec.w_bits,
                                    spec.w_sym, spec.group_size, name=f"blocks.{i}.{'+'.join(names)}", **opts)
            for lin, part in zip(layers, q.split([lin.out_features for lin in layers])):
                lin.weight.copy_(part)
            done.extend(f"blocks.{i}.{n}" for n in names)
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
