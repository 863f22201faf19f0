"""QuaRot (Ashkboos et al., 2024): Hadamard rotations remove outliers, then W/A/KV quantization.

The transforms of ``qdlm_bench/quant/rotation.py`` (each exact in FP): RMSNorm weights fused,
residual stream rotated by a random Hadamard matrix, a head-wise Hadamard between v_proj and
o_proj (+ an online cross-head Hadamard on o_proj's input), an online Hadamard on down_proj's
input, and Q/K rotated after RoPE when K is quantized. Then weights by GPTQ on the rotated model
(Hessians of the transformed inputs) or RTN, activations per-token, K/V when ``kv_bits < 16``.
Embeddings and the LM head stay in full precision.

cfg keys: ``weights`` (gptq | rtn), ``rotation_seed`` (0), ``online_heads`` (True), ``exclude``,
and GPTQ's (``block_size``, ``damp``, ``act_order``, ``static_groups``, ``true_sequential``,
``batch_size``); with ``weights=rtn`` the calibration set is not read.
"""

from qdlm_bench.quant import QuantSpec, linear_layers, quantize_weights_rtn, wrap_activations
from qdlm_bench.quant.rotation import quarot_rotate

from . import register
from .gptq import gptq_weights

WEIGHTS = ("gptq", "rtn")


@register("quarot", needs_calibration=True)
def quantize(model, spec: QuantSpec, calib, cfg: dict) -> dict:
    weights = cfg.get("weights", "gptq")
    if weights not in WEIGHTS:
        raise ValueError(f"quarot: weights must be one of {WEIGHTS}, got {weights!r}")
    exclude = cfg.get("exclude") or ()
    quarot_rotate(model, seed=cfg.get("rotation_seed", 0), online_heads=cfg.get("online_heads", True),
                  qk=spec.kv_bits < 16)
    if weights == "rtn":
        info = {"layers": quantize_weights_rtn(model, spec, exclude)}
    else:
        info = gptq_weights(model, spec, calib, cfg, set(linear_layers(model, exclude)))
    wrap_activations(model, spec, exclude=exclude)
    return info
