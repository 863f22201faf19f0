"""QuaRot (Ashkboos et al., 2024): Hadamard rotations remove outliers, then W/A/KV quantization.

The rotation step applies the core's transforms in order (``qdlm_bench/quant/rotation.py``, each
exact in FP): RMSNorm weights fused, residual stream rotated by a random Hadamard matrix, a
head-wise Hadamard between v_proj and o_proj (+ an online cross-head Hadamard on o_proj's input),
an online Hadamard on down_proj's input, and Q/K rotated after RoPE when K is quantized. The method
``quarot`` (``recipes.py``) then quantizes the weights by GPTQ on the rotated model (Hessians of the
transformed inputs) or RTN, and installs the activation and K/V quantizers. Embeddings and the LM
head stay in full precision.

Grids follow the reference (spcl/QuaRot ``fake_quant/quant_utils.py``): weights by
``WeightQuantizer`` (the GPTQ and RTN paths alike), symmetric ``max|w| / (2^(b-1) - 1)``
(``GRID``), activations and K/V by ``ActQuantizer``, the same grid (``a_grid``'s default) in both
the symmetric and the asymmetric case. Clipping as the reference's defaults: no weight clipping
(its ``--w_clip`` MSE search over shrunk ranges is not implemented), activations by
``quant.act_clip_ratio`` (its ``--a_clip_ratio``), K/V unclipped (its ``--k_clip_ratio`` /
``--v_clip_ratio`` of 1).
"""

from __future__ import annotations

from qdlm_bench import quant

from . import options

GRID = "absmax"  # QuaRot's WeightQuantizer


@options
class RotationOptions:
    """QuaRot's own options (with the weight quantizer's, ``conf/method/quarot.yaml``)."""

    rotation_seed: int = 0
    online_heads: bool = True


def rotate(state, opts: RotationOptions) -> None:
    """Every QuaRot transform in order; Hadamard sizes are checked before anything changes."""
    model = state.model
    cfg = model.config
    for n in {cfg.d_model, cfg.d_ff, cfg.head_dim} | ({cfg.n_heads} if opts.online_heads else set()):
        quant.hadamard_factors(n)
    quant.fuse_norms(model)
    quant.rotate_residual(model, opts.rotation_seed)
    quant.rotate_heads(model, opts.online_heads)
    quant.hadamard_down_proj(model)
    if state.spec.kv_bits < 16:
        quant.rotate_qk(model)
