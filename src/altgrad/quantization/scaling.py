"""Scales that map a tensor's range onto a format's: delayed amax history, per-channel, MX blocks.

Per-tensor scaling picks ``s`` so that the tensor's absolute maximum lands on the format's largest
value, with ``margin`` powers of two of headroom::

    s = amax / (max_finite * 2^-margin)        (s = 1 when amax is 0 or not finite)

and the tensor is quantized as ``Q(x / s) * s``. Delayed scaling (Transformer Engine) takes amax as
the maximum over the last ``length`` steps' amaxes, kept on the device with no host sync.

MX block scaling (OCP Microscaling v1.0): blocks of 32 consecutive elements along the last axis
share a power-of-two scale stored as ``float8_e8m0fnu``::

    floor: X = 2^(floor(log2 amax) - emax_elem)      the spec's rule; the block max may saturate
    ceil:  X = 2^(ceil(log2(amax / max_elem)))       never saturates
    even:  X = 2^(round(log2(amax / max_elem)))      nearest power of two

Example::

    >>> history = AmaxHistory(length=16)
    >>> history.update(x.abs().amax())
    >>> scale = compute_scale(history.amax, E4M3)
    >>> q, saturated = mx_quantize(torch.randn(4, 64), E4M3)
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from .formats import FloatFormat, get_format
from .ops import quantize

MX_SCALE_ROUNDINGS: tuple[str, ...] = ("floor", "ceil", "even")
_E8M0_MIN_EXPONENT, _E8M0_MAX_EXPONENT = -127, 127


class AmaxHistory:
    """The last ``length`` amax values of a tensor, as a device tensor (a ring buffer)."""

    def __init__(self, length: int = 16) -> None:
        if length < 1:
            raise ValueError(f"length: must be >= 1, got {length}")
        self.length = length
        self.values: torch.Tensor | None = None
        self.count = 0

    def __len__(self) -> int:
        return min(self.count, self.length)

    def update(self, amax: torch.Tensor | float) -> None:
        """Record one step's amax (a 0-dim tensor stays on its device; no host sync)."""
        amax = torch.as_tensor(amax, dtype=torch.float32).detach().reshape(())
        if self.values is None:
            self.values = torch.zeros(self.length, dtype=torch.float32, device=amax.device)
        self.values[self.count % self.length] = amax
        self.count += 1

    @property
    def amax(self) -> torch.Tensor:
        """The maximum over the recorded history (0 before any update)."""
        if self.values is None:
            return torch.zeros(())
        return self.values[: len(self)].max()

    def state_dict(self) -> dict:
        return {"length": self.length, "values": self.values, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.length, self.values, self.count = state["length"], state["values"], state["count"]


def compute_scale(
    amax: torch.Tensor | float, format: str | FloatFormat, margin: int = 0
) -> torch.Tensor | float:
    """``amax / (max_finite / 2^margin)``; 1 where amax is zero or not finite. Tensor in, tensor out."""
    fmt = get_format(format)
    target = fmt.max_finite * 2.0**-margin
    if isinstance(amax, torch.Tensor):
        amax = amax.float()
        usable = torch.isfinite(amax) & (amax > 0)
        return torch.where(usable, amax / target, torch.ones_like(amax))
    if not math.isfinite(amax) or amax <= 0:
        return 1.0
    return amax / target


def per_channel_scale(
    x: torch.Tensor, format: str | FloatFormat, axis: int = 0, margin: int = 0
) -> torch.Tensor:
    """One scale per index of ``axis`` (amax over the other axes), shaped to broadcast against x."""
    if x.dim() == 0:
        raise ValueError("x: per-channel scaling needs at least one dimension")
    axis = axis % x.dim()
    other_axes = [d for d in range(x.dim()) if d != axis]
    amax = x.detach().abs().amax(dim=other_axes, keepdim=True) if other_axes else x.detach().abs()
    return compute_scale(amax, format, margin)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    if x.dim() == 0 or x.shape[-1] % block_size:
        raise ValueError(
            f"x: the last dimension ({x.shape[-1] if x.dim() else 'scalar'}) must be a multiple of "
            f"block_size={block_size} for MX scaling"
        )
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)


def mx_block_scale(
    x: torch.Tensor,
    element_format: str | FloatFormat,
    block_size: int = 32,
    rounding: Literal["floor", "ceil", "even"] = "floor",
) -> torch.Tensor:
    """The shared power-of-two scale of each block, shape ``(*x.shape[:-1], n_blocks, 1)``.

    Values are float32 powers of two within float8_e8m0fnu's range (2^-127 .. 2^127); an all-zero
    block gets 2^-127, the smallest scale.
    """
    if rounding not in MX_SCALE_ROUNDINGS:
        raise ValueError(f"rounding: {rounding!r} is not one of {MX_SCALE_ROUNDINGS}")
    fmt = get_format(element_format)
    amax = _blocks(x.detach().float(), block_size).abs().amax(dim=-1, keepdim=True)
    tiny = torch.finfo(torch.float32).tiny
    if rounding == "floor":
        exponent = torch.floor(torch.log2(amax.clamp(min=tiny))) - fmt.emax
    else:
        ratio = torch.log2(amax.clamp(min=tiny) / fmt.max_finite)
        exponent = torch.ceil(ratio) if rounding == "ceil" else torch.round(ratio)
    exponent = exponent.masked_fill(amax == 0, _E8M0_MIN_EXPONENT)
    exponent = exponent.clamp(_E8M0_MIN_EXPONENT, _E8M0_MAX_EXPONENT)
    return torch.exp2(exponent)


def mx_quantize(
    x: torch.Tensor,
    element_format: str | FloatFormat,
    block_size: int = 32,
    rounding: Literal["floor", "ceil", "even"] = "floor",
    elem_rounding: str = "nearest",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MX fake quantization: ``(values, saturated_per_block)``.

    Each element is quantized in ``element_format`` at its block's scale (saturating), and the
    per-block count of elements whose magnitude exceeded ``max_finite * scale`` is returned with
    shape ``(*x.shape[:-1], n_blocks)``. The last dimension must be a multiple of ``block_size``.
    """
    fmt = get_format(element_format)
    scale = mx_block_scale(x, fmt, block_size, rounding)
    blocks = _blocks(x.float(), block_size)
    saturated = (blocks.detach().abs() > fmt.max_finite * scale).sum(dim=-1)
    values = quantize(blocks, fmt, scale, rounding=elem_rounding, generator=generator)
    return values.reshape(x.shape).to(x.dtype), saturated
