"""altgrad's diagnostics inside other training loops: Hugging Face ``Trainer`` and Lightning callbacks.

``altgrad.integrations.hf.AltGradCallback`` (needs transformers and accelerate: the ``hf`` extra) and
``altgrad.integrations.lightning.AltGradCallback`` (the ``lightning`` extra) are imported from their
modules, so this package loads without either. Both are built on ``TrainingDiagnostics``. (Model
surgery, ``QuantizedLinear`` and ``quantize_model``, lives in ``altgrad.integration``.)
"""

from .diagnostics import TrainingDiagnostics, amax_scale

__all__ = ["TrainingDiagnostics", "amax_scale"]
