"""Quantization primitives shared by every method: spec, fake quantizers, QuantLinear, layer walk."""

from .apply import linear_layers, quantize_weights_rtn, quantized_layer_names, wrap_activations
from .linear import ActQuantizer, QuantLinear
from .quantizer import dequantize, fake_quant, int_codes, qrange, quant_params, quantize
from .spec import VALID_FORMS, QuantSpec, QuantSpecError

__all__ = [
    "ActQuantizer", "QuantLinear", "QuantSpec", "QuantSpecError", "VALID_FORMS", "dequantize", "fake_quant",
    "int_codes", "linear_layers", "qrange", "quant_params", "quantize", "quantize_weights_rtn",
    "quantized_layer_names", "wrap_activations",
]

from .hadamard import OnlineHadamard, hadamard_matrix, hadamard_transform, random_signs  # noqa: E402
from .rotation import (fuse_norms, hadamard_down_proj, quarot_rotate, rotate_heads, rotate_qk,  # noqa: E402
                       rotate_residual)

__all__ += [
    "OnlineHadamard", "fuse_norms", "hadamard_down_proj", "hadamard_matrix", "hadamard_transform",
    "quarot_rotate", "random_signs", "rotate_heads", "rotate_qk", "rotate_residual",
]

from .duquant import DuQuantTransform, OutlierStats, fit_transform  # noqa: E402
from .smooth import ChannelMax, act_selection, smooth_block, smooth_scales  # noqa: E402
from .spec import ACT_LAYER_NAMES  # noqa: E402

__all__ += ["ACT_LAYER_NAMES", "ChannelMax", "DuQuantTransform", "OutlierStats", "act_selection", "fit_transform",
            "smooth_block", "smooth_scales"]
