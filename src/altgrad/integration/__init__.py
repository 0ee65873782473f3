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
from .quantized_linear import (
    STAT_FIELDS,
    TENSOR_KINDS,
    LayerQuantSpec,
    QuantizedLinear,
    full_precision_forward,
)

__all__ = [
    "LayerQuantSpec",
    "QuantPlan",
    "QuantRule",
    "QuantizedLinear",
    "STAT_FIELDS",
    "SurgeryReport",
    "TENSOR_KINDS",
    "dequantize_model",
    "full_precision_forward",
    "quantize_model",
    "quantized_layers",
    "resolve_format",
]
