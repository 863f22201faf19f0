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
