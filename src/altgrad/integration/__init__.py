"""Putting quantization into models: QuantizedLinear and rule-based module surgery."""

from .model_surgery import (
    QuantPlan,
    QuantRule,
    SurgeryReport,
    dequantize_model,
    quantize_model,
    quantized_layers,
    resolve_format,
)
from .quantized_linear import TENSOR_KINDS, LayerQuantSpec, QuantizedLinear

__all__ = [
    "LayerQuantSpec",
    "QuantPlan",
    "QuantRule",
    "QuantizedLinear",
    "SurgeryReport",
    "TENSOR_KINDS",
    "dequantize_model",
    "quantize_model",
    "quantized_layers",
    "resolve_format",
]
