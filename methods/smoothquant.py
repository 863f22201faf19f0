"""SmoothQuant (Xiao et al., 2023): per-channel smoothing folded into the preceding op, then RTN.

Per block, on the FP block's inputs (the outputs of the already-quantized previous blocks): the
per-channel max|x| of each subset's input gives ``s = max|x|^alpha / max|W|^(1-alpha)``
(``quant.smooth_block``), folded into attn_norm -> q/k/v, v_proj -> o_proj (not under GQA),
mlp_norm -> gate/up and up_proj -> down_proj, for the subsets whose input is named in
``quant.act_layers``. Weights are then round-to-nearest (per channel, or per the spec's group),
activations per-token dynamic when ``a < 16`` (``install_quantizers``). At weight-only bits (e.g.
``w4a16``) the smoothing still applies and activations stay in full precision: that measures what
moving outlier difficulty into the weights costs the weights alone.

Grid (``GRID``): the reference's (mit-han-lab/smoothquant ``smoothquant/fake_quant.py``,
``quantize_weight_per_channel_absmax`` / ``quantize_activation_per_token_absmax``): symmetric
``max|x| / (2^(b-1) - 1)``, no clipping, for weights and activations alike. The reference has no
asymmetric case; the spec's defaults (symmetric weights, asymmetric activations) and its
``_asym`` / ``quant.act_sym`` choices stand, asymmetric on the shared grid.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from qdlm_bench import quant

from . import options, register

GRID = "absmax"


@options
class SmoothQuantOptions:
    """``conf/method/smoothquant.yaml``."""

    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    batch_size: Annotated[int, Field(ge=1)] = 8


@register("smoothquant", SmoothQuantOptions, calibration=True)
def quantize_weights(state, opts: SmoothQuantOptions) -> dict:
    spec = state.spec
    selected, wanted = quant.act_selection(state.model, spec)
    done, smoothed = [], []

    def fn(i, block, stats):
        scales = quant.smooth_block(block, {n: st.max for n, st in stats.items()}, opts.alpha, lambda n: wanted(i, n))
        smoothed.extend(f"blocks.{i}.{n}" for n in scales)
        for name in stats:
            if selected(i, name):
                layer = getattr(block, name)
                layer.weight.copy_(quant.fake_quant(layer.weight, spec.w_bits, spec.w_sym, spec.group_size, grid=GRID))
                done.append(f"blocks.{i}.{name}")

    quant.walk_blocks(state.model, state.calib, fn, lambda layer: quant.ChannelMax(layer.in_features, layer.weight.device),
                      batch_size=opts.batch_size, true_sequential=False)
    return {"layers": len(done), "smoothed": len(smoothed)}
