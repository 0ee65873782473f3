"""Scales for fake quantization: delayed per-tensor (amax history), per-channel, and MX block scales.

A scale ``s`` is the divisor of ``quantize``: ``quantize(x, fmt, s) == Q(x / s) * s``. So a scale
that maps a tensor's largest magnitude ``amax`` onto the format's largest value is
``amax / max_finite``.

* ``AmaxHistory``: Transformer Engine's delayed scaling. Each step pushes the current amax (a 0-dim
  tensor, no host sync); the scale for the next step comes from the max over the last ``length``
  (TE's ``amax_compute_algo="max"``) or from the latest entry alone (``"most_recent"``):
  ``history.amax_by(algo)``.
* ``compute_scale(amax, fmt, margin)``: ``amax * 2^margin / max_finite``, so that amax lands on
  ``max_finite / 2^margin`` (``margin`` bits of headroom); 1 where amax is zero or not finite.
* ``per_channel_scale(x, fmt, axis)``: one ``compute_scale`` per slice along ``axis``, shaped to
  broadcast against x. ``power_of_two=True`` on either rounds each scale up to a power of two
  (torchao's ``round_scales_to_power_of_2``; the scaled amax then lands in (max/2, max]).
* ``mx_block_scale`` / ``mx_quantize``: OCP Microscaling (MX v1.0). Blocks of ``block_size``
  consecutive elements along the last axis share a power-of-two scale ``X`` (a float8_e8m0fnu
  value, 2^-127 .. 2^127). With ``emax`` the exponent of the element format's largest value:

  - ``"floor"`` (the OCP rule): ``X = 2^(floor(log2(amax)) - emax)``. The block's largest element
    lands in [2^emax, 2^(emax + 1)), so it can exceed max_finite and saturate (E4M3: 448..512).
  - ``"ceil"``: the smallest power of two with ``amax / X <= max_finite``: never saturates. This is
    NVIDIA's and torchao's RCEIL (``X = 2^ceil(log2(amax / max_finite))``).
  - ``"even"``: ``X = 2^round(log2(amax / max_finite))``, the nearest power of two.

  An all-zero block gets 2^-127; a block holding NaN or +-inf gets NaN (E8M0's NaN), and all its
  elements become NaN. A last axis that is not a multiple of ``block_size`` is padded with zeros
  (which never change a block's amax) and the padding is dropped from the results: the last block
  simply has fewer elements.

Example::

    >>> import torch
    >>> from altgrad.quantization import E4M3, AmaxHistory, compute_scale, mx_quantize
    >>> history = AmaxHistory(length=4)
    >>> history.update(torch.tensor(896.0))
    >>> compute_scale(history.amax, E4M3)
    tensor(2.)
    >>> values, saturated = mx_quantize(torch.tensor([[1000.0, 1.0, -2.0]]), E4M3)
    >>> values, saturated
    (tensor([[896.,   1.,  -2.]]), tensor([[1]]))
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .formats import FloatFormat, get_format
from .ops import ROUNDING_MODES, quantize

MXRounding = Literal["floor", "ceil", "even"]
MX_ROUNDINGS: tuple[str, ...] = ("floor", "ceil", "even")
AMAX_COMPUTE_ALGOS: tuple[str, ...] = ("max", "most_recent")
E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT = -127, 127
_FLOAT32 = torch.finfo(torch.float32)  # scales are float32 numbers


# ---- delayed per-tensor scaling ---------------------------------------------------------------------------


class AmaxHistory:
    """The last ``length`` amax values of a tensor, kept on its device (delayed scaling).

    ``update`` writes into a preallocated ring buffer (a device copy, no host sync); ``amax`` is the
    max over the buffer as a 0-dim tensor. Unfilled slots hold 0, which never raises the max. A NaN
    amax stays in the history (and makes ``compute_scale`` return 1) until it ages out.

    Example::

        history = AmaxHistory(16)
        for step in ...:
            scale = compute_scale(history.amax, E4M3)   # from previous steps
            y = quantize(x, E4M3, scale)
            history.update(x.detach().abs().amax())
    """

    def __init__(
        self, length: int = 16, device: torch.device | str | None = None, *, history_len: int | None = None
    ) -> None:
        if history_len is not None:  # the original AltGrad's name for the length
            length = history_len
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length: must be a positive int, got {length!r}")
        self.length = length
        self._history = torch.zeros(length, dtype=torch.float32, device=device)
        self._position = 0  # next slot to write
        self._count = 0  # updates so far (saturates at length)

    @property
    def history(self) -> torch.Tensor:
        """The stored amax values, oldest first (a copy)."""
        order = [(self._position + i) % self.length for i in range(self.length)][self.length - self._count :]
        return self._history[order].clone()

    @property
    def amax(self) -> torch.Tensor:
        """Max over the history: a 0-dim float32 tensor on the history's device (0 before any update)."""
        return self._history.amax()

    @property
    def most_recent(self) -> torch.Tensor:
        """The latest amax pushed: a 0-dim float32 tensor (0 before any update)."""
        return self._history[(self._position - 1) % self.length]

    def amax_by(self, algo: str) -> torch.Tensor:
        """``amax`` for ``"max"``, ``most_recent`` for ``"most_recent"`` (Transformer Engine's algos)."""
        if algo not in AMAX_COMPUTE_ALGOS:
            raise ValueError(f"amax_compute_algo: {algo!r} is not one of {AMAX_COMPUTE_ALGOS}")
        return self.amax if algo == "max" else self.most_recent

    def __len__(self) -> int:
        return self._count

    def get_amax(self) -> float:
        """The original AltGrad's accessor: max of the history as a float (one host sync), 1.0 if empty."""
        return float(self.amax) if self._count else 1.0

    def update(self, amax: torch.Tensor | float) -> None:
        """Push the current amax (a 0-dim tensor or a number; a larger tensor is reduced by its amax)."""
        if isinstance(amax, torch.Tensor):
            value = amax.detach()
            if value.numel() != 1:
                value = value.abs().amax()
            value = value.reshape(())
            if value.device != self._history.device:
                if self._count == 0:  # follow the data to its device (a fresh buffer: no copy)
                    self._history = torch.zeros(self.length, dtype=torch.float32, device=value.device)
                else:
                    value = value.to(self._history.device)
            self._history[self._position].copy_(value)
        elif isinstance(amax, (int, float)) and not isinstance(amax, bool):
            self._history[self._position] = float(amax)
        else:
            raise ValueError(f"amax: expected a tensor or a number, got {type(amax).__name__}")
        self.advance()

    @property
    def buffer(self) -> torch.Tensor:
        """The ring buffer itself (not a copy), for a kernel that reads it and writes the next slot."""
        return self._history

    @property
    def position(self) -> int:
        """The slot the next ``update`` writes."""
        return self._position

    def advance(self) -> None:
        """Count a value written at ``position`` (by ``update``, or by a kernel writing ``buffer``)."""
        self._position = (self._position + 1) % self.length
        self._count = min(self._count + 1, self.length)

    def reset(self) -> None:
        self._history.zero_()
        self._position = self._count = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "length": self.length,
            "history": self._history.detach().cpu().clone(),
            "position": self._position,
            "count": self._count,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"length", "history", "position", "count"} - set(state)
        if missing:
            raise ValueError(f"state: missing keys {sorted(missing)}")
        if state["length"] != self.length or tuple(state["history"].shape) != (self.length,):
            raise ValueError(f"state: history of length {state['length']}, this one has length {self.length}")
        self._history = state["history"].to(device=self._history.device, dtype=torch.float32).clone()
        self._position = int(state["position"]) % self.length
        self._count = int(state["count"])

    def __repr__(self) -> str:
        return f"AmaxHistory(length={self.length}, filled={self._count})"


# ---- per-tensor and per-channel scales ------------------------------------------------------------------


def compute_scale(
    amax: torch.Tensor | float,
    format: str | FloatFormat,
    margin: float = 0,
    power_of_two: bool = False,
    scale_min: float = 0.0,
) -> torch.Tensor | float:
    """The scale that maps ``amax`` to ``max_finite / 2^margin``: ``amax * 2^margin / max_finite``.

    A zero or non-finite amax gives 1, and so does an amax so small that the scale would underflow.
    ``power_of_two=True`` rounds the scale up to a power of two (exact scaling; amax then lands at
    or below ``max_finite / 2^margin``). A tensor amax gives a float32 tensor of the same shape,
    computed on its device without host sync (negative entries give 1); a number gives a float
    (a negative one raises ``ValueError``). ``scale_min`` floors the result (the original AltGrad's
    guard against a tiny amax; its 1.01 headroom factor is not applied: use ``margin``).
    """
    if not 0 <= scale_min < math.inf:
        raise ValueError(f"scale_min: must be finite and >= 0, got {scale_min!r}")
    scale = _unfloored_scale(amax, format, margin, power_of_two)
    if scale_min == 0:
        return scale
    return scale.clamp_min(scale_min) if isinstance(scale, torch.Tensor) else max(scale, scale_min)


def _unfloored_scale(
    amax: torch.Tensor | float, format: str | FloatFormat, margin: float, power_of_two: bool
) -> torch.Tensor | float:
    fmt = get_format(format)
    if not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin):
        raise ValueError(f"margin: expected a finite number, got {margin!r}")
    target = fmt.max_finite * 2.0**-margin  # amax lands here; one correctly rounded division below
    tiny, largest = _FLOAT32.tiny, _FLOAT32.max
    if isinstance(amax, torch.Tensor):
        return tensor_scale(amax.detach().to(torch.float32), target, power_of_two)
    if isinstance(amax, bool) or not isinstance(amax, (int, float)):
        raise ValueError(f"amax: expected a tensor or a number, got {type(amax).__name__}")
    if amax < 0:
        raise ValueError(f"amax: must be >= 0 (a largest magnitude), got {amax}")
    if not math.isfinite(amax) or amax == 0:
        return 1.0
    raw = amax / target
    if power_of_two and raw > 0:
        raw = 2.0 ** math.ceil(math.log2(raw))
    if not math.isfinite(raw) or not tiny <= raw <= largest:
        return 1.0
    return raw


def tensor_scale(
    amax: torch.Tensor, target: float | torch.Tensor, power_of_two: bool = False
) -> torch.Tensor:
    """``compute_scale``'s rule on a float32 ``amax`` tensor: ``amax / target`` (one float32 division;
    ``target = max_finite * 2^-margin``, a number or a 0-dim float32 tensor holding it), rounded up to
    a power of two if asked, and 1 wherever that is not a finite normal float32 number."""
    raw = amax / target
    if power_of_two:
        raw = torch.exp2(torch.ceil(torch.log2(raw)))
    # finite and normal; a zero, negative or non-finite amax gives a raw scale outside (or NaN)
    usable = (raw >= _FLOAT32.tiny) & (raw <= _FLOAT32.max)
    return torch.where(usable, raw, 1.0)


def per_channel_scale(
    x: torch.Tensor, format: str | FloatFormat, axis: int = 0, margin: float = 0, power_of_two: bool = False
) -> torch.Tensor:
    """One scale per slice of ``x`` along ``axis`` (amax over every other axis), broadcastable to x.

    E.g. for a (out, in) weight, ``axis=0`` gives an (out, 1) tensor: one scale per output channel.
    """
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0:
        raise ValueError("x: per-channel scales need at least one dimension")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis: {axis} is out of range for a tensor with {x.dim()} dimensions")
    axis %= x.dim()
    others = [d for d in range(x.dim()) if d != axis]
    amax = x.detach().abs().amax(dim=others, keepdim=True) if others else x.detach().abs()
    return compute_scale(amax, format, margin, power_of_two)


# ---- MX block scaling -----------------------------------------------------------------------------------


def _blocks(x: torch.Tensor, block_size: int) -> tuple[torch.Tensor, int]:
    """x (float32, or float64 for float64 inputs) as (..., blocks, block_size), zero-padded."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size: must be a positive int, got {block_size!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x: expected a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0:
        raise ValueError("x: MX scaling needs at least one dimension (blocks run along the last one)")
    work = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    n = x.shape[-1]
    padding = -n % block_size
    if padding:
        work = F.pad(work, (0, padding))
    return work.reshape(*x.shape[:-1], (n + padding) // block_size, block_size), n


def _mx_scale_of_blocks(blocks: torch.Tensor, fmt: FloatFormat, rounding: str) -> torch.Tensor:
    if rounding not in MX_ROUNDINGS:
        raise ValueError(f"rounding: {rounding!r} is not one of {MX_ROUNDINGS}")
    amax = blocks.abs().amax(dim=-1).to(torch.float64)  # NaN propagates
    if rounding == "floor":
        exponent = torch.frexp(amax).exponent.to(torch.float64) - 1 - fmt.emax  # exact floor(log2(amax))
    else:
        # floor(log2(amax)) - floor(log2(max_finite)) is the exponent or one less than it.
        candidate = torch.frexp(amax).exponent.to(torch.float64) - (math.frexp(fmt.max_finite)[1])
        if rounding == "ceil":
            exponent = candidate + (amax > torch.ldexp(torch.full_like(amax, fmt.max_finite), candidate))
        else:  # nearest power of two to amax / max_finite, in log2 (no exact ties between powers of two)
            exponent = torch.round(torch.log2(amax) - math.log2(fmt.max_finite))
    exponent = exponent.clamp(E8M0_MIN_EXPONENT, E8M0_MAX_EXPONENT)
    exponent = torch.where(amax == 0, float(E8M0_MIN_EXPONENT), exponent)
    scale = torch.exp2(exponent)
    return torch.where(torch.isfinite(amax), scale, math.nan).to(torch.float32)


def mx_block_scale(
    x: torch.Tensor, element_format: str | FloatFormat, block_size: int = 32, rounding: MXRounding = "floor"
) -> torch.Tensor:
    """The shared scale of each block of ``block_size`` elements along the last axis.

    float32 powers of two (float8_e8m0fnu values; NaN for blocks holding NaN or inf), shape
    ``x.shape[:-1] + (ceil(x.shape[-1] / block_size),)``. ``encode(scale, "float8_e8m0fnu")`` gives
    their codes. See the module docstring for the rounding rules and padding.
    """
    fmt = get_format(element_format)
    blocks, _ = _blocks(x.detach(), block_size)
    return _mx_scale_of_blocks(blocks, fmt, rounding)


def mx_quantize(
    x: torch.Tensor,
    element_format: str | FloatFormat,
    block_size: int = 32,
    rounding: MXRounding = "floor",
    elem_rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fake-quantize ``x`` to an MX format: ``(values, saturated)``.

    ``values``: x with each element rounded to ``element_format`` at its block's scale
    (``Q(x / X) * X``, saturating), in x's dtype and shape, with a straight-through gradient.
    ``saturated``: int64 counts, one per block, of elements with ``|x / X| > max_finite`` (0 for
    NaN blocks).
    """
    fmt = get_format(element_format)
    if elem_rounding not in ROUNDING_MODES:
        raise ValueError(f"elem_rounding: {elem_rounding!r} is not one of {ROUNDING_MODES}")
    blocks, n = _blocks(x, block_size)  # keeps the autograd graph: quantize's gradient is straight-through
    scale = _mx_scale_of_blocks(blocks.detach(), fmt, rounding).unsqueeze(-1).to(blocks.dtype)
    finite = torch.isfinite(scale)
    safe_scale = torch.where(finite, scale, torch.ones_like(scale))
    values = quantize(blocks, fmt, scale=safe_scale, rounding=elem_rounding, generator=generator)
    values = torch.where(finite, values, math.nan)
    saturated = ((blocks.detach().abs() / safe_scale) > fmt.max_finite).sum(dim=-1)
    saturated = torch.where(finite.squeeze(-1), saturated, 0)
    values = values.reshape(*x.shape[:-1], -1)[..., :n].to(x.dtype)
    return values, saturated


def __getattr__(name: str) -> object:
    """The original AltGrad's names at the import path it used, defined in ``compat``
    (docs/compat.md): ``ScalingConfig``."""
    if name in ("ScalingConfig",):
        from altgrad.quantization import compat

        return getattr(compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
