"""One compiled kernel for a per-tensor fake quantization: amax, scale, rounding, codes.

Eager, a delayed-scaling quantizer runs about twenty small ops per tensor (``aminmax``, the scale
rule's five, the rounding kernel's nine, the history's two ...); on a CPU inside a training step each
costs tens of microseconds before it touches a byte, and the nine rounding passes cost most of the
rest. ``scale_and_quantize`` is the same computation as one ``torch.compile`` graph, which inductor
turns into one C++ function of two loops over ``x`` (the amax, then the rest)::

    current = max(|x|)                                  this call's amax
    s       = compute_scale(history.amax_by(algo) or current, fmt, margin)
    history.update(current)                             when recording (a training call)
    y       = Q(x / s)                                  nearest (ties to even) or toward zero, saturating
    codes   = encode(y)                                 optional: uint8 codes of y
    values  = y * s

Every result is bit for bit what the eager path gives: ``_TensorQuantizer.scale_for`` +
``ops.quantize`` / ``codes.quantize_keeping_codes``, because the graph *is* the eager kernels
(``_engine``'s nearest and toward-zero kernels, its encoder, ``scaling.tensor_scale``) traced, and
inductor's CPU code keeps every division a correctly rounded division (``target`` is passed as a
tensor, so no division by a constant can become a multiplication by its reciprocal on any backend).
Only NaN payloads may differ (a NaN stays a NaN), and the sign of the amax of a tensor holding
zeros of both signs and nothing else (its scale is 1 either way). ``tests/quantization/test_fused.py``
compares the two on eight formats, with zeros, subnormals, ties, overflow, +-inf and NaN.

Where it applies (``supports``): a float32 CPU tensor of at least 2 elements, outside a caller's
``torch.compile`` trace, in a format whose arithmetic fits float32, rounded to nearest or toward
zero, with scales that are not rounded to powers of two. The length is a dynamic dimension, so one
graph serves every shape; each (format, margin, rounding, amax algo, codes) combination compiles once
per process (seconds; inductor's on-disk cache makes later processes faster). If the backend cannot
compile (no C++ compiler, say), ``scale_and_quantize`` warns once and returns None from then on, and
the caller runs the eager kernels: the same results, slower. Any other error propagates.

Example::

    >>> from altgrad.quantization import E4M3
    >>> history = AmaxHistory(16)
    >>> result = scale_and_quantize(torch.randn(4096), E4M3, history=history, record=True)  # doctest: +SKIP
    >>> result.values, result.scale, result.current_amax, result.codes    # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from . import _engine
from .formats import FloatFormat
from .scaling import AMAX_COMPUTE_ALGOS, AmaxHistory, tensor_scale

ROUNDINGS: tuple[str, ...] = ("nearest", "toward_zero")


@dataclass(frozen=True)
class FusedResult:
    """What one call returns: ``values`` (x's shape, float32), the 0-dim float32 ``scale`` used, this
    call's ``current_amax`` (0-dim float32, NaN if x held a NaN) and the uint8 ``codes`` of the
    rounded values (x's shape) when asked for, else None."""

    values: torch.Tensor
    scale: torch.Tensor
    current_amax: torch.Tensor
    codes: torch.Tensor | None


def supports(x: torch.Tensor, fmt: FloatFormat, rounding: str, power_of_two: bool = False) -> bool:
    """Whether ``scale_and_quantize`` can take ``x`` (see the module docstring)."""
    return (
        _enabled
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.numel() >= 2
        and rounding in ROUNDINGS
        and not power_of_two
        and _engine._working_float(fmt, x.dtype) is _engine._FLOAT32
        and not torch.compiler.is_compiling()
    )


def scale_and_quantize(
    x: torch.Tensor,
    fmt: FloatFormat,
    margin: int = 0,
    rounding: str = "nearest",
    history: AmaxHistory | None = None,
    algo: str = "max",
    record: bool = False,
    codes: bool = False,
) -> FusedResult | None:
    """Fake-quantize ``x`` in one compiled kernel at the per-tensor scale of ``history.amax_by(algo)``
    (delayed scaling; of this call's amax while the history is empty), or of this call's amax when
    ``history`` is None (current scaling). ``record`` pushes this call's amax into ``history`` (inside
    the kernel: ``history.update``'s effect). ``codes`` adds the uint8 codes (8-bit formats, nearest).
    No autograd: the caller attaches the straight-through gradient. None if compiling is unavailable
    (then the caller's eager path gives the same results). ``x`` must satisfy ``supports``."""
    if codes and (fmt.total_bits > 8 or rounding != "nearest"):
        raise ValueError(f"codes: only for 8-bit formats rounded to nearest, got {fmt.name} {rounding}")
    kernel = _kernel(fmt, margin, rounding, algo, codes)
    if kernel is None:
        return None
    flat = (x.detach() if x.requires_grad else x).reshape(-1)
    torch._dynamo.mark_dynamic(flat, 0)
    if history is None:
        buffer, read, write, use_history, record = _NO_HISTORY, 0, 0, False, False
    else:
        buffer, write, use_history = history.buffer, history.position, len(history) > 0
        read = (write - 1) % history.length  # the most recent entry
    inputs = (_constant((read,), torch.int64), _constant((write,), torch.int64))
    inputs += (
        _constant(use_history, torch.bool),
        _constant(record, torch.bool),
        _constant(_target(fmt, margin)),
    )
    try:
        values, scale, current, code_values = kernel(flat, buffer, *inputs)
    except torch._dynamo.exc.BackendCompilerFailed as error:  # inductor's errors included
        _disable(error)  # from now on the eager kernels
        return None
    if record:
        history.advance()
    return FusedResult(
        values.view(x.shape), scale, current, None if code_values is None else code_values.view(x.shape)
    )


# ---- the kernel ----------------------------------------------------------------------------------------


def _target(fmt: FloatFormat, margin: int) -> float:
    """``compute_scale``'s target: amax lands on max_finite / 2^margin."""
    return fmt.max_finite * 2.0**-margin


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def _constant(value: float | bool | tuple[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A cached CPU tensor of ``value`` (a number: 0-dim; a tuple: 1-dim), read-only by convention: a
    graph input, so that no value is baked into a kernel."""
    key = (value, dtype)
    if key not in _CONSTANTS:
        _CONSTANTS[key] = torch.tensor(value, dtype=dtype)
    return _CONSTANTS[key]


_NO_HISTORY = torch.zeros(1)  # the history input when there is none (its value unused, never changed)


def _fused_body(
    x: torch.Tensor,
    history: torch.Tensor,
    read: torch.Tensor,
    write: torch.Tensor,
    use_history: torch.Tensor,
    record: torch.Tensor,
    target: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The traced computation; ``JOB``, ``ALGO``, ``CODES`` and ``STAND_INS`` are bound per
    configuration (see ``_kernel``)."""
    job: _engine.Job = JOB  # noqa: F821 - bound in the copy's globals
    low, high = torch.aminmax(x)
    current = torch.maximum(-low, high)  # for equal zeros inductor keeps the second, eager the first
    stored = history.amax() if ALGO == "max" else history.index_select(0, read).reshape(())  # noqa: F821
    scale = tensor_scale(torch.where(use_history, stored, current), target)
    kept = history.index_select(0, write)  # after the read: this call's amax into the next slot
    history.index_copy_(0, write, torch.where(record, current, kept))
    job = replace(job, scale=scale, multiply_back=False)
    n, work = x.numel(), job.plan.work
    rounded = torch.empty(n, dtype=work.dtype, device=x.device)
    scratch = torch.empty(n, dtype=work.int_dtype, device=x.device)
    _engine._run_piece(job, x, rounded, scratch, None, 0)
    codes = None
    if CODES:  # noqa: F821 - bound in the copy's globals
        codes = torch.empty(n, dtype=torch.uint8, device=x.device)
        spare = torch.empty(n, dtype=work.int_dtype, device=x.device)
        _engine._encode_piece(rounded, codes, scratch, spare, job.fmt, job.plan, STAND_INS)  # noqa: F821
    return rounded * scale, scale, current, codes


_KERNELS: dict[tuple, object] = {}
_enabled = True


def _kernel(fmt: FloatFormat, margin: int, rounding: str, algo: str, codes: bool):
    """The compiled ``_fused_body`` for one configuration, or None once compiling has failed.

    Each configuration is its own copy of the function (``_engine.own_copy``: its own dynamo cache)
    with globals binding its static ``JOB``, ``ALGO`` (the history's amax_compute_algo), ``CODES``
    and ``STAND_INS`` (the encoder's inf/NaN stand-ins).
    """
    if not _enabled:
        return None
    if algo not in AMAX_COMPUTE_ALGOS:
        raise ValueError(f"algo: {algo!r} is not one of {AMAX_COMPUTE_ALGOS}")
    key = (fmt, margin, rounding, algo, codes)
    kernel = _KERNELS.get(key)
    if kernel is None:
        plan = _engine._plan(fmt, _engine._FLOAT32)
        job = _engine.Job(fmt, plan, rounding, "saturate", None, None, False, None)
        stand_ins = _engine._special_stand_ins(fmt)
        body = _engine.own_copy(
            _fused_body, len(_KERNELS), JOB=job, ALGO=algo, CODES=codes, STAND_INS=stand_ins
        )
        kernel = _KERNELS[key] = torch.compile(body, dynamic=False)
    return kernel


def _disable(error: torch._dynamo.exc.BackendCompilerFailed) -> None:
    global _enabled
    _enabled = False
    cause = error.inner_exception  # what the backend raised (e.g. InvalidCxxCompiler)
    first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:200]
    warnings.warn(
        f"altgrad: compiled quantize kernels are unavailable ({type(cause).__name__}: {first_line}); "
        "using the eager kernels (the same results, slower)",
        RuntimeWarning,
        stacklevel=3,
    )
