"""SmoothQuant (Xiao et al., 2023): per-channel smoothing folded into the preceding op, then RTN.

Per block, on the FP block's inputs (the outputs of the already-quantized previous blocks): the
per-channel max|x| of each subset's input gives ``s = max|x|^alpha / max|W|^(1-alpha)``
(``quant/smooth.py``), folded into attn_norm -> q/k/v, v_proj -> o_proj (not under GQA),
mlp_norm -> gate/up and up_proj -> down_proj, for the subsets whose input is quantized
(``a < 16`` and named in ``quant.act_layers``). Weights are then round-to-nearest (per channel,
or per the spec's group), activations per-token dynamic.

cfg keys: ``alpha`` (0.5), ``batch_size`` (8), ``exclude`` (fnmatch patterns of layer names).
"""

from qdlm_bench.quant import QuantSpec, fake_quant, wrap_activations
from qdlm_bench.quant.smooth import ChannelMax, act_selection, smooth_block
from qdlm_bench.quant.walk import walk_blocks

from . import register


@register("smoothquant", needs_calibration=True)
def quantize(model, spec: QuantSpec, calib, cfg: dict) -> dict:
    exclude = cfg.get("exclude") or ()
    alpha = float(cfg.get("alpha", 0.5))
    selected, wanted = act_selection(model, spec, exclude, "smoothquant")
    done, smoothed = [], []

    def fn(i, block, stats):
        scales = smooth_block(block, {n: st.max for n, st in stats.items()}, alpha, lambda n: wanted(i, n))
        smoothed.extend(f"blocks.{i}.{n}" for n in scales)
        for name in stats:
            if selected(i, name):
                layer = getattr(block, name)
                layer.weight.copy_(fake_quant(layer.weight, spec.w_bits, spec.w_sym, spec.group_size))
                done.append(f"blocks.{i}.{name}")

    walk_blocks(model, calib, fn, lambda layer: ChannelMax(layer.in_features, layer.weight.device),
                batch_size=cfg.get("batch_size", 8), true_sequential=False)
    wrap_activations(model, spec, exclude=exclude)
    return {"layers": len(done), "smoothed": len(smoothed)}
