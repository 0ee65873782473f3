"""QuantizedLinear: an nn.Linear whose weight, input and output gradient live on 8-bit grids.

Forward::

    w_q = Q_w(W / s_w) * s_w          weight, in the weight format
    x_q = Q_a(x / s_a) * s_a          input activation, in the activation format
    y   = x_q @ w_q.T + b

autograd saves ``x_q`` and ``w_q``, so the backward uses exactly the quantized weight of the forward:
``dL/dx = g_q @ w_q`` with ``g_q = Q_g(dL/dy / s_g) * s_g`` the output gradient in the grad format.
Weight and activation quantization are straight-through (their gradients pass unchanged).

Scales (``scaling=``): ``"delayed"`` (default; per tensor, the max of an amax history of the last
``amax_history`` steps, as in Transformer Engine), ``"current"`` (per tensor, this call's amax),
``"per_channel"`` (weights per output row, activations and gradients per tensor, current amax),
``"rowwise"`` (every tensor one scale per row, i.e. over its last axis: weights per output row,
activations per token, gradients per token, current amax; torchao's rowwise recipe for the
forward GEMM, while its backward re-scales the weight per column and never reuses the forward's
quantized weight as altgrad does), ``"mx"`` (blocks of 32 along the last axis sharing an E8M0
scale, OCP MX; ``mx_scale_rounding`` floor, ceil = RCEIL, or even).
``amax_compute_algo`` (delayed scaling): ``"max"`` over the history, or its ``"most_recent"``
entry. ``power_of_two_scales`` rounds every non-MX scale up to a power of two.

Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's matmuls) is a Linear whose weight is
stored transposed, ``(in, out)``; ``QuantizedLinear`` wraps it too, keeping that Parameter as it is
and quantizing its ``(out, in)`` view, so per-channel and MX scales follow the output rows and the
reduction axis exactly as for an nn.Linear. ``weight_scale()`` is returned in the stored layout.

Each layer counts, per tensor kind, the elements that overflowed (|v / s| > max_finite), that
underflowed (non-zero but quantized to zero) and that were not finite (before or after quantization),
and sums the squared rounding error and the squared values of the finite elements, while
``collect_stats`` is on. ``rel_error = sqrt(sum_sq_error / sum_sq) = ||Q(x) - x|| / ||x||`` is the
relative RMS error of the tensor the layer used. The sums stay on the device as one tensor (rows
``TENSOR_KINDS``, columns ``STAT_FIELDS``); ``read_stats`` returns them.

Example::

    >>> layer = QuantizedLinear(nn.Linear(64, 32), LayerQuantSpec(weight=E4M3, activation=E4M3, grad=E5M2))
    >>> y = layer(torch.randn(8, 64)); y.sum().backward()
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from altgrad.quantization import fused
from altgrad.quantization.codes import quantize_keeping_codes
from altgrad.quantization.formats import FloatFormat, format_name
from altgrad.quantization.ops import quantize, straight_through
from altgrad.quantization.scaling import (
    AmaxHistory,
    compute_scale,
    mx_block_scale,
    mx_quantize,
    per_channel_scale,
)
from altgrad.quantization.types import FormatLike

from .quant_spec import TENSOR_KINDS, LayerQuantSpec, TensorQuantSpec

MX_BLOCK_SIZE = 32
STAT_FIELDS: tuple[str, ...] = ("overflow", "underflow", "nonfinite", "total", "sum_sq_error", "sum_sq")
"""Columns of ``quant_stats``: element counts, then the sums of (Q(x) - x)^2 and x^2 over finite elements."""


def hf_conv1d_type() -> type[nn.Module] | None:
    """``transformers.pytorch_utils.Conv1D`` if transformers is loaded (a model cannot hold one otherwise)."""
    return getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a transformers ``Conv1D`` (exact types, not subclasses)."""
    return type(module) is nn.Linear or (type(module) is hf_conv1d_type() is not None)


class _TensorQuantizer(nn.Module):
    """Scale bookkeeping and fake quantization for one tensor kind of one layer."""

    def __init__(self, spec: TensorQuantSpec, kind: str, stats: torch.Tensor, kind_index: int) -> None:
        super().__init__()
        self.spec, self.kind, self.stats, self.kind_index = spec, kind, stats, kind_index
        self.history = AmaxHistory(spec.amax_history)
        self.last_scale: torch.Tensor | None = None
        self.collect_stats = False
        self.generator: torch.Generator | None = None
        self.amax_group = None  # a torch.distributed group: training amax all_reduce(MAX) over it
        self.keep_codes = False  # keep the codes of the last forward for a flip tracker (weights)
        self.last_codes: tuple[torch.Tensor, int] | None = None  # (uint8 codes, x._version then)
        self.compiled = False  # quantize through inductor's fused kernel (the same bits; ops.quantize)

    @property
    def format(self) -> FloatFormat | None:
        return self.spec.format

    def scale_for(self, x: torch.Tensor, record: bool = False) -> torch.Tensor:
        """The scale ``x`` is quantized at, broadcastable to ``x``.

        Delayed scaling takes the amax history of earlier steps (this call's amax when there is none
        yet); with ``record`` (a training forward or backward) this call's amax then joins the history.
        With ``amax_group`` set (data-parallel training) a recorded per-tensor amax is first
        all_reduce(MAX)-ed over the group, so every rank uses and records the same amax.
        """
        fmt, spec = self.format, self.spec
        assert fmt is not None
        if spec.scaling == "mx":  # each element at its block's power-of-two scale
            block_scale = mx_block_scale(x.detach(), fmt, MX_BLOCK_SIZE, rounding=spec.mx_scale_rounding)
            return block_scale.repeat_interleave(MX_BLOCK_SIZE, dim=-1)[..., : x.shape[-1]]
        power_of_two = spec.power_of_two_scales
        if spec.scaling == "per_channel":
            return per_channel_scale(x.detach(), fmt, axis=0, margin=spec.margin, power_of_two=power_of_two)
        if spec.scaling == "rowwise":
            amax = x.detach().abs().amax(dim=-1, keepdim=True)
            return compute_scale(amax, fmt, margin=spec.margin, power_of_two=power_of_two)
        low, high = torch.aminmax(x.detach())  # one pass, no |x| temporary
        current_amax = torch.maximum(high, -low).float()
        if record and self.amax_group is not None:  # data parallel: every rank the same scale (TE)
            torch.distributed.all_reduce(current_amax, torch.distributed.ReduceOp.MAX, group=self.amax_group)
        amax = current_amax
        if spec.scaling == "delayed":
            if len(self.history) > 0:
                amax = self.history.amax_by(spec.amax_compute_algo)
            if record:
                self.history.update(current_amax)
        return compute_scale(amax, fmt, margin=spec.margin, power_of_two=power_of_two)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmt = self.format
        if fmt is None:
            return x
        if self.compiled and self._fusable(x):
            quantized = self._fused_forward(x, fmt)
            if quantized is not None:
                return quantized
        scale = None
        if self.spec.scaling == "mx" and self.kind != "weight":
            # activations and gradients: block scales broadcast inside mx_quantize, no full-size scale
            quantized, _ = mx_quantize(
                x, fmt, MX_BLOCK_SIZE, rounding=self.spec.mx_scale_rounding, elem_rounding=self.spec.rounding
            )
            quantized = x + (quantized - x).detach()  # straight-through
        else:
            scale = self.last_scale = self.scale_for(x, record=self.training)
            if self.keep_codes and self.training:  # one encode: the forward's values, the tracker's codes
                quantized, codes = quantize_keeping_codes(x, fmt, scale, self.spec.rounding, self.generator)
                self.last_codes = None if codes is None else (codes, x._version)
            else:
                rounding, generator, compiled = self.spec.rounding, self.generator, self.compiled
                quantized = quantize(x, fmt, scale, rounding=rounding, generator=generator, compiled=compiled)
        if self.collect_stats:
            self._count(x.detach(), quantized.detach(), scale)
        return quantized

    def _fusable(self, x: torch.Tensor) -> bool:
        """Whether the fused compiled kernel computes this call (``quantization/fused.py``): per-tensor
        delayed or current scaling on one process (no amax all_reduce), and what ``fused.supports``."""
        spec = self.spec
        return (
            spec.scaling in ("delayed", "current")
            and self.amax_group is None
            and self.history.buffer.device.type == "cpu"
            and fused.supports(x, self.format, spec.rounding, spec.power_of_two_scales)
        )

    def _fused_forward(self, x: torch.Tensor, fmt: FloatFormat) -> torch.Tensor | None:
        """``scale_for`` + quantize (+ the weight's codes) in one compiled kernel: the eager path's
        results bit for bit; None if compiling is unavailable."""
        spec = self.spec
        keep_codes = self.keep_codes and self.training and spec.rounding == "nearest" and fmt.total_bits <= 8
        result = fused.scale_and_quantize(
            x,
            fmt,
            spec.margin,
            spec.rounding,
            history=self.history if spec.scaling == "delayed" else None,
            algo=spec.amax_compute_algo,
            record=self.training and spec.scaling == "delayed",
            codes=keep_codes,
        )
        if result is None:
            return None
        self.last_scale = result.scale
        if self.keep_codes and self.training:
            self.last_codes = None if result.codes is None else (result.codes, x._version)
        quantized = straight_through(x, result.values)
        if self.collect_stats:
            self._count(x.detach(), result.values, result.scale)
        return quantized

    def _count(self, original: torch.Tensor, quantized: torch.Tensor, scale: torch.Tensor | None) -> None:
        fmt = self.format
        assert fmt is not None
        finite = torch.isfinite(original)
        both_finite = finite & torch.isfinite(quantized)
        magnitude = original.abs() if scale is None else original.abs() / scale
        overflow = (
            (finite & (magnitude > fmt.max_finite)).sum() if scale is not None else original.new_zeros(())
        )
        error = torch.where(both_finite, quantized.float() - original.float(), 0.0)
        value = torch.where(both_finite, original.float(), 0.0)
        dtype = self.stats.dtype
        counts = torch.stack(
            [
                overflow.to(dtype),
                ((quantized == 0) & (original != 0) & finite).sum().to(dtype),
                (~both_finite).sum().to(dtype),
                torch.tensor(float(original.numel()), dtype=dtype, device=original.device),
                error.square().sum().to(dtype),
                value.square().sum().to(dtype),
            ]
        )
        self.stats[self.kind_index].add_(counts.to(self.stats.device))


class _QuantizeGradient(torch.autograd.Function):
    """Identity forward; the backward fake-quantizes the incoming gradient."""

    @staticmethod
    def forward(ctx, x, quantizer):  # type: ignore[override]
        ctx.quantizer = quantizer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        with torch.no_grad():
            return ctx.quantizer(grad_output), None


class QuantizedLinear(nn.Module):
    """A drop-in for ``nn.Linear`` (or transformers' ``Conv1D``) that shares the original's Parameters
    (tied weights stay tied)."""

    def __init__(self, linear: nn.Module, spec: LayerQuantSpec | FloatFormat) -> None:
        super().__init__()
        if isinstance(spec, FloatFormat):  # the original AltGrad's QuantizedLinear(linear, fmt): weights only
            spec = LayerQuantSpec(weight=spec)
        conv1d = hf_conv1d_type()
        if not isinstance(linear, nn.Linear) and not (conv1d is not None and isinstance(linear, conv1d)):
            raise ValueError(f"linear: expected nn.Linear or a transformers Conv1D, got {type(linear)}")
        self.transposed = not isinstance(linear, nn.Linear)  # Conv1D stores the weight as (in, out)
        out_in = linear.weight.shape[::-1] if self.transposed else linear.weight.shape
        self.out_features, self.in_features = out_in
        self.weight = linear.weight
        self.bias = linear.bias
        self.spec = spec
        self.register_buffer(
            "quant_stats", torch.zeros(len(TENSOR_KINDS), len(STAT_FIELDS), device=linear.weight.device)
        )
        self.full_precision = False  # True: a plain nn.Linear forward, quantizers bypassed (a control)
        self.quantizers = nn.ModuleDict(
            {
                kind: _TensorQuantizer(spec.tensor(kind), kind, self.quant_stats, i)
                for i, kind in enumerate(TENSOR_KINDS)
            }
        )

    def to_linear(self) -> nn.Module:
        """The plain module it replaced (nn.Linear, or Conv1D when transposed) holding the same Parameters."""
        if self.transposed:
            conv1d = hf_conv1d_type()
            assert conv1d is not None, "a transposed QuantizedLinear was built from transformers' Conv1D"
            with torch.device("meta"):
                linear = conv1d(self.out_features, self.in_features)
        else:
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    # ---- what the trainer, tracker and optimizers read -------------------------------------------------

    @property
    def weight_format(self) -> FloatFormat | None:
        return self.spec.weight

    def weight_out_in(self) -> torch.Tensor:
        """The weight as an ``(out, in)`` matrix: the Parameter itself, or a transposed view of a Conv1D's."""
        return self.weight.t() if self.transposed else self.weight

    def weight_scale(self) -> torch.Tensor:
        """The weight scale of the last forward (computed now if there was none), broadcastable to the
        weight Parameter as stored (``(in, out)`` for a Conv1D)."""
        quantizer = self.quantizers["weight"]
        scale = quantizer.last_scale
        if scale is None:
            if self.spec.weight is None:
                return torch.ones((), device=self.weight.device)
            scale = quantizer.scale_for(self.weight_out_in())
        return scale.t() if self.transposed and scale.dim() == 2 else scale

    def forward_weight(self) -> torch.Tensor | None:
        """The weight the forward multiplies by, ``Q_w(W / s_w) * s_w`` at ``weight_scale()``, detached;
        None when the weight is not quantized. Round-to-nearest (a stochastic-rounding layer's forward
        draws a different neighbour each step); no amax history update."""
        fmt = self.spec.weight
        if fmt is None:
            return None
        with torch.no_grad():
            return quantize(self.weight.detach(), fmt, self.weight_scale())

    @property
    def keep_weight_codes(self) -> bool:
        """Whether each forward keeps the weight's codes for ``take_weight_codes`` (a flip tracker's)."""
        return self.quantizers["weight"].keep_codes

    @keep_weight_codes.setter
    def keep_weight_codes(self, on: bool) -> None:
        self.quantizers["weight"].keep_codes = on
        self.quantizers["weight"].last_codes = None

    def take_weight_codes(self) -> torch.Tensor | None:
        """The uint8 codes of the weight the last forward used, at ``weight_scale()``, in the stored
        layout; handed over once (the layer drops them). None if the forward kept none (not
        ``keep_weight_codes``, stochastic rounding, a format torch has no float8 dtype for) or the
        weight was written since (its version counter moved).

        Example (what the trainer does)::

            >>> tracker.snapshot_pre_step(name, layer.weight, layer.weight_format, layer.weight_scale(),
            ...                           codes=layer.take_weight_codes())     # doctest: +SKIP
        """
        quantizer = self.quantizers["weight"]
        kept, quantizer.last_codes = quantizer.last_codes, None
        if kept is None or kept[1] != self.weight._version:
            return None
        return kept[0].t() if self.transposed else kept[0]

    def set_format(self, kind: str, fmt: FormatLike | None) -> None:
        """Switch one tensor kind to another format (an emergency format shift; a name or "none" is read
        by ``parse_format``); the amax history stays."""
        if kind not in TENSOR_KINDS:
            raise ValueError(f"kind: {kind!r} is not one of {TENSOR_KINDS}")
        self.spec = replace(self.spec, **{kind: fmt})
        self.quantizers[kind].spec = self.spec.tensor(kind)
        self.quantizers[kind].last_codes = None  # codes in the old format

    @property
    def collect_stats(self) -> bool:
        return self.quantizers["weight"].collect_stats

    @collect_stats.setter
    def collect_stats(self, on: bool) -> None:
        for quantizer in self.quantizers.values():
            quantizer.collect_stats = on

    @property
    def compiled_kernels(self) -> bool:
        """Whether the weight, activation and gradient go through compiled kernels, the same bits as the
        eager ones (the model around them stays eager, unlike ``train.compile``): per-tensor delayed
        or current scaling on the CPU computes amax, scale, rounding and the weight's codes in one
        compiled kernel (``quantization/fused.py``); other settings round with ``quantize(...,
        compiled=True)`` where that compiles. Needs a working inductor backend (a C++ compiler on the
        CPU): without one, a warning and the eager kernels. The first call per format compiles
        (seconds)."""
        return self.quantizers["weight"].compiled

    @compiled_kernels.setter
    def compiled_kernels(self, on: bool) -> None:
        for quantizer in self.quantizers.values():
            quantizer.compiled = on

    def read_stats(self, reset: bool = True) -> torch.Tensor:
        """Sums per kind (rows ``TENSOR_KINDS``, columns ``STAT_FIELDS``), on the layer's device."""
        stats = self.quant_stats.clone()
        if reset:
            self.quant_stats.zero_()
        return stats

    # ---- forward --------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.full_precision:
            return F.linear(x, self.weight_out_in(), self.bias)
        weight = self.quantizers["weight"](self.weight_out_in())
        activation = self.quantizers["activation"](x)
        out = F.linear(activation, weight, self.bias)
        if self.spec.grad is not None and out.requires_grad:
            out = _QuantizeGradient.apply(out, self.quantizers["grad"])
        return out

    def extra_repr(self) -> str:
        names = {kind: format_name(self.spec.format_of(kind)) for kind in TENSOR_KINDS}
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, "
            + ("transposed=True, " if self.transposed else "")
            + f"weight={names['weight']}, activation={names['activation']}, grad={names['grad']}, "
            f"scaling={self.spec.scaling}"
        )

    # ---- state for checkpoints ------------------------------------------------------------------------

    def quant_state(self) -> dict:
        return {
            kind: {"history": q.history.state_dict(), "last_scale": q.last_scale}
            for kind, q in self.quantizers.items()
        } | {
            "formats": {kind: (f.name if (f := self.spec.format_of(kind)) else None) for kind in TENSOR_KINDS}
        }

    def load_quant_state(self, state: dict) -> None:
        for kind, quantizer in self.quantizers.items():
            quantizer.history.load_state_dict(state[kind]["history"])
            quantizer.last_scale = state[kind]["last_scale"]


@contextlib.contextmanager
def full_precision_forward(model: nn.Module) -> Iterator[None]:
    """Within the block every QuantizedLinear of ``model`` computes ``x @ W.T + b`` unquantized (no scale
    updates, no statistics): the same weights with a full-precision forward, the control that
    separates the forward's rounding cost from what the weights learned.

    Example::

        >>> with full_precision_forward(model):        # doctest: +SKIP
        ...     _, fp32_forward_loss = model(x, y)
    """
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    previous = [layer.full_precision for layer in layers]
    for layer in layers:
        layer.full_precision = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.full_precision = was
