"""Putting quantization into models: quantization specs, QuantizedLinear and rule-based module surgery."""

from .model_surgery import (
    SurgeryReport,
    dequantize_model,
    quantize_model,
    quantized_layers,
)
from .quant_spec import LayerQuantSpec, QuantPlan, QuantRule, QuantSettings, TensorQuantSpec
from .quantized_linear import (
    STAT_FIELDS,
    TENSOR_KINDS,
    QuantizedLinear,
    full_precision_forward,
)

__all__ = [
    "LayerQuantSpec",
    "QuantPlan",
    "QuantRule",
    "QuantSettings",
    "QuantizedLinear",
    "STAT_FIELDS",
    "SurgeryReport",
    "TENSOR_KINDS",
    "TensorQuantSpec",
    "dequantize_model",
    "full_precision_forward",
    "quantize_model",
    "quantized_layers",
]
