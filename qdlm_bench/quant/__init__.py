"""The shared core every method uses: QuantSpec, quantizers, QuantLinear and the activation/KV
quantizers, the block walk and its statistics, Hadamard and rotation primitives, scale folding.

Names load on first use (``qdlm_bench.lazy``): ``from qdlm_bench.quant.spec import QuantSpec`` needs
no torch, so the configuration check stays fast.
"""

from qdlm_bench.lazy import lazy_exports

_EXPORTS = {
    ".spec": ["ACT_LAYER_NAMES", "VALID_FORMS", "QuantSpec", "QuantSpecError"],
    ".quantizer": ["dequantize", "fake_quant", "group", "int_codes", "qrange", "quant_params", "quantize", "ungroup"],
    ".linear": ["ActQuantizer", "QuantLinear"],
    ".apply": ["act_selection", "fold_input_transforms", "install_kv_quantizers", "install_quantizers", "linear_layers",
               "quantize_weights_rtn", "quantized_layer_names", "targets"],
    ".stats": ["ChannelMax", "TokenStats"],
    ".walk": ["FEEDERS", "SUBSETS", "Batches", "block_inputs", "collect", "run_block", "walk_blocks"],
    ".smooth": ["fold_scales", "smooth_block", "smooth_scales", "smoothable"],
    ".hadamard": ["OnlineHadamard", "hadamard_factors", "hadamard_matrix", "hadamard_transform", "random_signs"],
    ".rotation": ["BlockRotation", "apply_blocks", "fuse_norms", "hadamard_down_proj", "rotate_heads", "rotate_qk",
                  "rotate_residual"],
}
__getattr__ = lazy_exports(__name__, {name: module for module, names in _EXPORTS.items() for name in names})
__all__ = sorted(name for names in _EXPORTS.values() for name in names)
