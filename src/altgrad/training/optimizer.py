"""Optimizers that know each weight's quantization grid: AdamW, SGD, ManifoldAdamW, GridOptim, Madam.

All five are ``torch.optim.Optimizer``s (param groups, ``state_dict``/``load_state_dict``, any device,
``step(closure)`` returns the loss) and run one vectorized update per parameter with no host
synchronisation. ``OPTIMIZERS`` registers them by config name (``optimizer.name``), each entry with
its class, the unit of its lr and that unit's default, and the options it takes; a new optimizer
(any ``torch.optim.Optimizer``) is a class plus one entry there, and the config, ``build_optimizer``
and the trainer take it from the registry.

**How an optimizer learns a weight's grid.** ``quant_info(param)`` returns ``(format, scale)`` -- the
layer's weight format and its *current* scale (a float, a 0-dim tensor or a per-channel tensor
broadcastable to the weight) -- or None for a parameter that is not quantized. The trainer builds it
from its ``QuantizedLinear`` layers (``quant_info_from_model`` does the same by duck typing). For
standalone use a param group may carry ``format=`` (a FloatFormat or a name) and ``scale=`` (default
1.0) instead; **a group's format wins over quant_info** for the parameters of that group, since it is
the more specific, deliberate setting.

**The grid spacing (stiffness).** For a weight w in a format with M mantissa bits at scale s::

    S(w) = s * 2^(max(floor(log2|w/s|), emin) - M)        (altgrad.quantization.grid.grid_spacing)

the distance between neighbouring representable values around w (one ULP): relative spacing 2^-M
in the normal range, the constant subnormal spacing ``s * 2^(emin - M)`` near zero, ``s / 2^7``
everywhere for E0M7, and ``s * 2^floor(log2|w/s|)`` (the power of two itself) for E7M0. At a power
of two S is the spacing *above* it; the spacing below is S/2.

**Units.** Two learning rates, both driven by the same schedule:

* ``lr``, the optimizer's own step unit: weight units for AdamW and SGD, ULPs for ManifoldAdamW
  (``ulp_step``), rungs (representable values) for GridOptim, natural-log units of |w| for Madam.
  The grid-aware rules all move a weight by ``lr |d|`` of their unit per step, with ``d`` Adam's
  normalised direction (``m_hat / (sqrt(v_hat) + eps)``; Madam: ``g / sqrt(v_hat)``): exactly
  ``lr`` units under a constant gradient (|d| = 1), less under a noisy one (|d| < 1). Measured on
  the tiny model (E4M3, fp32 master, 100 steps, ``bench/optimizer_units.py``): the mean |change of
  code ordinal| per weight per step is 0.23 for ManifoldAdamW at lr 1 and for GridOptim at lr 1,
  0.74 for Madam at lr ln2/8 (one E4M3 ULP per unit of d), 1.15 for AdamW at lr 1e-3.
* ``weight_lr``, in weight units (ManifoldAdamW, GridOptim, Madam; AdamW and SGD use ``lr``): the
  rate of the **decoupled weight decay, the same for every optimizer**, ``w <- w (1 - weight_lr wd)``
  per step (GridOptim: in expectation, as a stochastically rounded number of rungs), and the lr of
  parameters without a format, which get plain AdamW (a foreign model's biases, norms and
  embeddings). ``weight_lr`` defaults to 1e-3 and follows ``lr``'s schedule: the optimizer uses
  ``weight_lr * lr / initial_lr`` when the group has an ``initial_lr`` (set by torch's LR schedulers
  and by altgrad's trainer, which passes ``train.lr`` as weight_lr).

**The update rules** (``g`` gradient, ``m_hat``, ``v_hat`` Adam's bias-corrected moments, every
rule after the decay above):

* ``AdamW``: ``w <- w - lr m_hat / (sqrt(v_hat) + eps)`` -- identical to
  ``torch.optim.AdamW(foreach=False)``, bit for bit.
* ``SGD``: ``b <- mu b + g`` (``b = g`` at the first step); ``w <- w - lr b`` (``g + mu b`` with
  nesterov) -- identical to ``torch.optim.SGD`` without weight decay (torch's decay is coupled).
* ``ManifoldAdamW(mode="ulp_step")``: ``w <- w - lr * S(w) * m_hat / (sqrt(v_hat) + eps)``, S
  taken before the step. With fp32 master weights a step below one ULP moves the weight's code only
  when it crosses a rounding boundary; from a power of two toward zero one "ULP" S is two codes.
* ``ManifoldAdamW(mode="grad_scale")``: Adam on ``g' = S(w) g`` (the AltGrad notes' variant); lr is
  AdamW's (weight units). If ``S`` is constant over the moments' memory,
  ``m'/(sqrt(v') + eps) = m / (sqrt(v) + eps/S)`` exactly: the per-weight S cancels and the only
  effect is a per-weight epsilon ``eps / S`` (large for small-spacing weights, damping steps whose
  ``sqrt(v) < eps/S``); the step stays ~lr in weight units, *not* grid-relative. S matters
  otherwise only through its *changes*: ``m' = sum_k c_k S_k g_k``, ``v' = sum_k c'_k S_k^2 g_k^2``
  weight each past gradient by the spacing it had, so after a weight crosses a binade upward (S
  doubles) its new gradients count 2x in m and 4x in v against its history, and a change of the
  layer's scale (S is proportional to s) reweights the whole layer's new gradients the same way.
* ``GridOptim``: ``k = stochastic_round(clip(lr d + weight_lr wd w / S_0, +-rung_clip))`` rungs
  (``S_0`` the spacing toward zero);
  the weight moves ``k`` representable values down the sorted finite table of its format
  (``sort(format.values()) * s``), clamped at the table ends, and is set to that grid value.
* ``Madam``: ``w <- clip(w exp(-lr sign(w) g / sqrt(v_hat)), +-w_max)``: log|w| moves by lr per
  unit of normalised gradient, ``lr = ln 2`` is one binade (one E7M0 code).

**Low-precision weight storage** (every optimizer; GridOptim always stores on its grid), done by
the ``WeightStorage`` object an optimizer holds (GridOptim's is ``OnGridStorage``):
``weight_storage=`` a format (or name) keeps no fp32 master copy: after every step each weight is
rounded into that format (at scale 1), or with ``weight_storage="quantized"`` into its own
quant_info format at its current scale (parameters without a format stay fp32).
``storage_rounding`` is ``"nearest"`` or ``"stochastic"``; ``kahan=True`` adds Kahan-compensated
summation (Zamirai et al. 2020): with ``w`` the stored weight, ``u`` the fp32 update and ``c`` the
compensation (optimizer state ``"kahan_comp"``)::

    y = u + c;   w' = Q(w + y);   c = y - (w' - w)

Example (adding 1e-3 to 1.0 in bfloat16 -- nearest stalls, Kahan does not)::

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(1))
    >>> opt = SGD([w], lr=1e-3, weight_storage="bfloat16", kahan=True)
    >>> for _ in range(100):
    ...     w.grad = -torch.ones(1); opt.step()
    >>> round(w.item(), 3)
    1.102
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from altgrad.quantization.formats import FloatFormat, get_format
from altgrad.quantization.grid import grid_spacing
from altgrad.quantization.ops import check_scale, quantize

if TYPE_CHECKING:
    from altgrad.training.config import OptimizerConfig

QuantInfo = Callable[[nn.Parameter], "tuple[FloatFormat, torch.Tensor | float] | None"]
"""``quant_info(param) -> (format, current scale) | None`` (None: the parameter is not quantized)."""

MANIFOLD_MODES = ("ulp_step", "grad_scale")
STORAGE_ROUNDINGS = ("nearest", "stochastic")
QUANTIZED_STORAGE = "quantized"


def quant_info_from_model(model: nn.Module) -> QuantInfo:
    """A ``quant_info`` reading every module with ``.weight``, ``.weight_format`` and ``.weight_scale()``.

    The format and scale are read at call time, so format shifts and scale updates are seen.
    """
    layers = {
        id(m.weight): m
        for m in model.modules()
        if hasattr(m, "weight_format") and callable(getattr(m, "weight_scale", None))
        and isinstance(getattr(m, "weight", None), torch.Tensor)
    }

    def quant_info(param: nn.Parameter) -> tuple[FloatFormat, torch.Tensor | float] | None:
        layer = layers.get(id(param))
        if layer is None or layer.weight_format is None:
            return None
        return layer.weight_format, layer.weight_scale()

    return quant_info


def _format_key(fmt: FloatFormat | str) -> FloatFormat | str:
    """A format as stored in a param group: its name when ``get_format`` gives it back (state_dict-safe)."""
    fmt = get_format(fmt)
    try:
        return fmt.name if get_format(fmt.name) == fmt else fmt
    except ValueError:
        return fmt


_FINITE_TABLES: dict[tuple[FloatFormat, torch.device], torch.Tensor] = {}


def _finite_table(fmt: FloatFormat, device: torch.device) -> torch.Tensor:
    """The format's distinct finite values (+0 and -0 are one), sorted ascending, float32 on ``device``."""
    key = (fmt, torch.device(device))
    if key not in _FINITE_TABLES:
        values = fmt.values()
        finite = torch.unique(values[torch.isfinite(values)])  # sorted
        _FINITE_TABLES[key] = finite.to(device=device, dtype=torch.float32)
    return _FINITE_TABLES[key]


# ---- weight storage: what happens to a weight after its update -------------------------------------------


class WeightStorage:
    """Low-precision weight storage, held by an optimizer: each updated weight rounded into a format.

    The settings are param-group keys (the constructor's values are their defaults, so a group may
    override them and ``state_dict`` carries them): ``weight_storage`` None (fp32 master weights, the
    update kept whole), a format or name (rounded into it at scale 1) or ``"quantized"`` (into the
    weight's own quant_info format at its current scale; a parameter without one stays fp32);
    ``storage_rounding`` ``"nearest"`` or ``"stochastic"``; ``kahan`` the compensated sum of the
    module docstring, its remainder kept as optimizer state ``"kahan_comp"``.

    >>> storage = WeightStorage("bfloat16", kahan=True)
    >>> storage.group_defaults
    {'weight_storage': 'bfloat16', 'storage_rounding': 'nearest', 'kahan': True}
    """

    def __init__(
        self,
        weight_storage: FloatFormat | str | None = None,
        storage_rounding: str = "nearest",
        kahan: bool = False,
    ) -> None:
        self.group_defaults = {"weight_storage": weight_storage, "storage_rounding": storage_rounding,
                               "kahan": bool(kahan)}  # fmt: skip

    def check_group(self, group: dict[str, Any]) -> None:
        """Store the group's storage format by name (picklable with weights_only) and check its settings."""
        storage, rounding = group.get("weight_storage"), group.get("storage_rounding", "nearest")
        if storage is not None and storage != QUANTIZED_STORAGE:
            try:
                group["weight_storage"] = storage = _format_key(storage)
            except ValueError as error:
                raise ValueError(f"weight_storage: {error} (or {QUANTIZED_STORAGE!r})") from None
        if rounding not in STORAGE_ROUNDINGS:
            raise ValueError(f"storage_rounding: {rounding!r} is not one of {STORAGE_ROUNDINGS}")
        if storage is None and (group.get("kahan") or rounding != "nearest"):
            raise ValueError("kahan / storage_rounding: need weight_storage (a format name or 'quantized')")

    def needs_old(self, group: dict[str, Any]) -> bool:
        """Whether ``store`` needs the pre-step weight (it does whenever the group stores in a format)."""
        return group.get("weight_storage") is not None

    def store(
        self,
        p: torch.Tensor,
        old: torch.Tensor | None,
        group: dict[str, Any],
        state: dict[str, Any],
        info: tuple[FloatFormat, Any] | None,
        generator: Callable[[torch.device], torch.Generator | None],
    ) -> None:
        """Round the updated ``p`` into the group's storage format (Kahan-compensated if asked).

        ``old`` is the pre-step weight, ``info`` the parameter's ``(format, scale)`` or None, and
        ``generator(device)`` the optimizer's random source for stochastic rounding.
        """
        storage = group.get("weight_storage")
        if storage is None:
            return
        target = info if storage == QUANTIZED_STORAGE else (get_format(storage), 1.0)
        if target is None:  # "quantized" storage of a parameter that is not quantized: stays fp32
            return
        fmt, scale = target
        rounding = group["storage_rounding"]
        gen = generator(p.device) if rounding == "stochastic" else None
        w = p.detach()
        if group["kahan"]:
            comp = state.get("kahan_comp")
            if comp is None:
                comp = state["kahan_comp"] = torch.zeros_like(w, dtype=torch.float32)
            y = (w.float() - old.float()).add_(comp)
            new = quantize(old.float() + y, fmt, scale, rounding=rounding, generator=gen)
            comp.copy_(y.sub_(new - old.float()))
        else:
            new = quantize(w.float(), fmt, scale, rounding=rounding, generator=gen)
        w.copy_(new)


class OnGridStorage:
    """GridOptim's storage: its step leaves every quantized weight on its grid, so nothing is rounded.

    It accepts only the settings that describe that (``weight_storage`` None or ``"quantized"``,
    the latter with ``storage_rounding="stochastic"``, and no ``kahan``) and adds no group keys.
    """

    group_defaults: dict[str, Any] = {}

    def __init__(
        self,
        weight_storage: FloatFormat | str | None = None,
        storage_rounding: str | None = None,
        kahan: bool = False,
    ) -> None:
        if weight_storage is None:
            if kahan:
                raise ValueError("kahan: the grid optimizer has no remainder to compensate; set kahan: false")
            return
        if weight_storage != QUANTIZED_STORAGE:
            raise ValueError(
                f"weight_storage: the grid optimizer stores each weight in its own format already; "
                f"use none or {QUANTIZED_STORAGE!r} with grid, not {weight_storage!r}"
            )
        if kahan or storage_rounding != "stochastic":
            raise ValueError(
                "storage_rounding / kahan: the grid optimizer rounds its rungs stochastically and "
                "keeps no remainder; with grid, set storage_rounding: stochastic and kahan: false"
            )

    def check_group(self, group: dict[str, Any]) -> None:
        if group.get("weight_storage") is not None:
            raise ValueError("weight_storage: GridOptim keeps its weights on the grid already; "
                             "use it without weight_storage")
        if group.get("kahan") or group.get("storage_rounding", "nearest") != "nearest":
            raise ValueError("kahan / storage_rounding: need weight_storage (a format name or 'quantized')")

    def needs_old(self, group: dict[str, Any]) -> bool:
        return False

    def store(self, p, old, group, state, info, generator) -> None:
        """Nothing to do: GridOptim's update set each quantized weight to a grid value."""


class _GridAwareOptimizer(torch.optim.Optimizer):
    """Shared plumbing: quant_info / group formats, generators, the step loop; the weight storage is
    the ``storage`` object it holds (``WeightStorage`` or ``OnGridStorage``).

    Subclasses implement ``_update(p, grad, group, state, info)`` (in place on ``p``; may return a
    per-parameter result) and call ``super().__init__`` with their defaults. ``step`` runs, per
    parameter with a gradient: ``_update``, then ``_after_update`` (the storage's rounding).
    """

    def __init__(
        self,
        params: Iterable,
        defaults: dict[str, Any],
        storage: WeightStorage | OnGridStorage,
        quant_info: QuantInfo | None,
        generator: torch.Generator | None,
        seed: int | None,
    ) -> None:
        if quant_info is not None and not callable(quant_info):
            raise ValueError(f"quant_info: must be callable or None, got {type(quant_info).__name__}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: must be a torch.Generator or None, got {type(generator).__name__}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError(f"seed: must be an int or None, got {seed!r}")
        self.quant_info = quant_info
        self.storage = storage
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}
        if generator is not None:
            self._generators[str(torch.device(generator.device))] = generator
        defaults = {"format": None, "scale": None, **defaults, **storage.group_defaults}
        super().__init__(params, defaults)

    # ---- groups ------------------------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            self._normalize_group(self.param_groups[-1])
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise

    @staticmethod
    def _normalize_group(group: dict[str, Any]) -> None:
        """The group's format stored by name where the name gives it back (picklable with weights_only)."""
        if group.get("format") is not None:
            try:
                group["format"] = _format_key(group["format"])
            except ValueError as error:
                raise ValueError(f"format: {error}") from None
        if group.get("scale") is not None:
            check_scale(group["scale"])

    def _check_group(self, group: dict[str, Any]) -> None:
        lr, wd = group["lr"], group.get("weight_decay", 0.0)
        if isinstance(lr, torch.Tensor) or not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr: must be a number >= 0, got {lr!r}")
        if not (isinstance(wd, (int, float)) and wd >= 0):
            raise ValueError(f"weight_decay: must be a number >= 0, got {wd!r}")
        self.storage.check_group(group)
        weight_lr = group.get("weight_lr", 0.0)
        if isinstance(weight_lr, bool) or not (isinstance(weight_lr, (int, float)) and weight_lr >= 0):
            raise ValueError(f"weight_lr: must be a number >= 0, got {weight_lr!r}")

    @staticmethod
    def _weight_lr(group: dict[str, Any]) -> float:
        """The group's learning rate in weight units now: ``lr`` where lr is in weight units (AdamW,
        SGD), else ``weight_lr`` times the schedule's factor ``lr / initial_lr`` (``initial_lr`` is set
        by torch's LR schedulers and altgrad's trainer; without it the factor is 1)."""
        if "weight_lr" not in group:
            return group["lr"]
        initial = group.get("initial_lr")
        return group["weight_lr"] * (group["lr"] / initial if initial else 1.0)

    def _decay(self, w: torch.Tensor, group: dict[str, Any]) -> None:
        """Decoupled weight decay in weight units, the same for every optimizer: ``w <- w (1 - lr_w wd)``."""
        if group["weight_decay"] != 0:
            w.mul_(1 - self._weight_lr(group) * group["weight_decay"])

    def _quant(self, group: dict[str, Any], p: torch.Tensor) -> tuple[FloatFormat, Any] | None:
        """(format, scale) of ``p``: the group's ``format``/``scale`` if set, else quant_info's, else None."""
        if group["format"] is not None:
            fmt, scale = get_format(group["format"]), group["scale"] if group["scale"] is not None else 1.0
        elif self.quant_info is not None:
            info = self.quant_info(p)
            if info is None:
                return None
            fmt, scale = get_format(info[0]), info[1]
        else:
            return None
        if isinstance(scale, torch.Tensor):
            scale = scale.detach().to(device=p.device, dtype=torch.float32, non_blocking=True)
        return fmt, scale

    def quantization_of(self, p: torch.Tensor) -> tuple[FloatFormat, Any] | None:
        """``(format, scale)`` this optimizer uses for ``p`` (group setting, else quant_info), or None."""
        for group in self.param_groups:
            if any(p is q for q in group["params"]):
                return self._quant(group, p)
        raise ValueError("p: not a parameter of this optimizer")

    # ---- random numbers ------------------------------------------------------------------------------------

    def _generator(self, device: torch.device) -> torch.Generator | None:
        """The generator for ``device``: the one given, else one seeded with ``seed``, else None (global)."""
        key = str(device)
        if key not in self._generators and self._seed is not None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._generators[key] = gen
        return self._generators.get(key)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generators"] = {key: gen.get_state() for key, gen in self._generators.items()}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        generators = state_dict.pop("generators", {})
        super().load_state_dict(state_dict)
        for key, gen_state in generators.items():
            if key not in self._generators:
                self._generators[key] = torch.Generator(device=key)
            self._generators[key].set_state(gen_state)

    # ---- the step ----------------------------------------------------------------------------------------

    def _needs_old(self, group: dict[str, Any]) -> bool:
        """Whether the update needs the pre-step weights (storage rounding, bit positions)."""
        return self.storage.needs_old(group)

    def _after_update(self, p, old, group, state, info, result) -> None:
        """Round the updated weights into the storage format (optionally Kahan-compensated)."""
        self.storage.store(p, old, group, state, info, self._generator)

    def _update(self, p, grad, group, state, info) -> Any:  # pragma: no cover - abstract
        """Update ``p`` in place; the return value goes to ``_after_update``."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """One update of every parameter with a gradient; returns the closure's loss (or None)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients")
                state = self.state[p]
                info = self._quant(group, p)
                old = p.detach().clone() if self._needs_old(group) else None
                result = self._update(p, p.grad, group, state, info)
                self._after_update(p, old, group, state, info, result)
        return loss


def _check_betas(betas: tuple[float, float], eps: float) -> None:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2 and all(0 <= b < 1 for b in betas)):
        raise ValueError(f"betas: must be two numbers in [0, 1), got {betas!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps: must be a number > 0, got {eps!r}")



class AdamW(_GridAwareOptimizer):
    """AdamW (``torch.optim.AdamW(foreach=False)`` bit for bit) with optional low-precision storage.

    Args:
        params: parameters or param groups (groups may set any option below, and ``format``/``scale``).
        lr, betas, eps, weight_decay: as in torch (decoupled decay ``w <- w (1 - lr wd)``).
        quant_info: ``param -> (format, scale) | None``; used by ``weight_storage="quantized"``.
        weight_storage: None (fp32 master weights), a format or name (weights rounded into it at
            scale 1 after every step), or ``"quantized"`` (into each weight's own format and scale).
        storage_rounding: ``"nearest"`` or ``"stochastic"``.
        kahan: Kahan-compensated summation of the update into the stored weights.
        generator, seed: the random source for stochastic rounding (default: torch's global RNG).
        extra_defaults: further per-group options of a subclass (ManifoldAdamW's ``mode``, ...).

    The storage settings go to the optimizer's ``storage`` object (a ``storage_type``:
    ``WeightStorage``, or GridOptim's ``OnGridStorage``).

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(3))
    >>> opt = AdamW([w], lr=0.1, weight_decay=0.0)
    >>> w.grad = torch.tensor([1.0, -1.0, 0.0]); _ = opt.step()
    >>> w.detach()
    tensor([0.9000, 1.1000, 1.0000])
    """

    storage_type: type[WeightStorage] | type[OnGridStorage] = WeightStorage

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        quant_info: QuantInfo | None = None,
        weight_storage: FloatFormat | str | None = None,
        storage_rounding: str = "nearest",
        kahan: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        extra_defaults: dict[str, Any] | None = None,
    ) -> None:
        _check_betas(betas, eps)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        defaults |= extra_defaults or {}
        storage = self.storage_type(weight_storage, storage_rounding, kahan)
        super().__init__(params, defaults, storage, quant_info, generator, seed)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        _check_betas(group["betas"], group["eps"])

    def _adam_state(self, p: torch.Tensor, state: dict) -> None:
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, p, grad, group, state, info) -> None:
        """Plain AdamW at the weight-unit lr (``lr`` here; ``weight_lr`` in the grid-unit subclasses)."""
        self._adam_state(p, state)
        w = p.detach()
        self._decay(w, group)
        self._adam_step(w, grad, group, state, self._weight_lr(group), spacing=None)

    @staticmethod
    def _adam_moments(grad, group, state) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Advance the moments; return ``(m, sqrt(v_hat) + eps, 1 - beta1^t)``, torch's operation order."""
        beta1, beta2 = group["betas"]
        state["step"] += 1
        step = state["step"]
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (exp_avg_sq.sqrt() / (1 - beta2**step) ** 0.5).add_(group["eps"])
        return exp_avg, denom, 1 - beta1**step

    def _adam_step(self, w, grad, group, state, lr: float, spacing) -> None:
        """``w -= lr m_hat / (sqrt(v_hat) + eps)`` (times ``spacing`` if given)."""
        exp_avg, denom, bias_correction1 = self._adam_moments(grad, group, state)
        w.addcdiv_(exp_avg if spacing is None else exp_avg * spacing, denom, value=-lr / bias_correction1)

    def _adam_direction(self, grad, group, state) -> torch.Tensor:
        """Adam's normalised direction ``d = m_hat / (sqrt(v_hat) + eps)``: +-1 under a constant gradient."""
        exp_avg, denom, bias_correction1 = self._adam_moments(grad, group, state)
        return exp_avg.div(denom).div_(bias_correction1)


class ManifoldAdamW(AdamW):
    """AdamW whose step is measured in grid steps (ULPs) of each weight's own quantization format.

    ``mode="ulp_step"`` (default): ``w <- w - lr S(w) d`` with ``d = m_hat/(sqrt(v_hat)+eps)``, so a
    weight moves ``lr |d|`` ULPs per step: lr ULPs under a constant gradient (|d| = 1), less under a
    noisy one. ``mode="grad_scale"``: AdamW on ``S(w) g`` (lr in weight units). Weight decay is
    decoupled and in weight units in both: ``w <- w (1 - weight_lr wd)``. See the module docstring
    for both modes. S comes from ``quant_info`` (or the group's ``format``/``scale``) at every step;
    parameters without a format get plain AdamW at ``weight_lr``.

    ``track_bit_position=True`` keeps ``state["bit_position"]`` per weight: the cumulative signed
    number of grid positions moved, ``sum_t (w_t+1 - w_t) / S(w_t)`` (the whole step, decay and
    storage rounding included, in ULPs at the pre-step weight). It is continuous -- exact code
    changes are the flip tracker's job -- and counts upward moves as positive.

    >>> import torch
    >>> from altgrad.quantization import E4M3
    >>> w = torch.nn.Parameter(torch.tensor([1.0, 3.0]))
    >>> opt = ManifoldAdamW([{"params": [w], "format": E4M3}], lr=1.0, weight_decay=0.0)
    >>> w.grad = torch.tensor([1.0, 1.0]); _ = opt.step()      # S = 2^-3 at 1.0, 2^-2 at 3.0
    >>> w.detach()
    tensor([0.8750, 2.7500])
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        weight_lr: float = 1e-3,
        mode: str = "ulp_step",
        track_bit_position: bool = False,
        quant_info: QuantInfo | None = None,
        weight_storage: FloatFormat | str | None = None,
        storage_rounding: str = "nearest",
        kahan: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        storage = dict(weight_storage=weight_storage, storage_rounding=storage_rounding, kahan=kahan)
        super().__init__(params, lr, betas, eps, weight_decay, quant_info=quant_info, generator=generator,
                         seed=seed, **storage,
                         extra_defaults=dict(weight_lr=weight_lr, mode=mode,
                                             track_bit_position=bool(track_bit_position)))

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if group["mode"] not in MANIFOLD_MODES:
            raise ValueError(f"mode: {group['mode']!r} is not one of {MANIFOLD_MODES}")

    def _needs_old(self, group: dict[str, Any]) -> bool:
        return super()._needs_old(group) or group["track_bit_position"]

    def _update(self, p, grad, group, state, info) -> torch.Tensor | None:
        """The ManifoldAdamW step; returns the pre-step spacing S (for the bit position) or None."""
        if info is None:
            return super()._update(p, grad, group, state, info)
        self._adam_state(p, state)
        w = p.detach()
        spacing = grid_spacing(w, *info).to(w.dtype)
        self._decay(w, group)
        if group["mode"] == "grad_scale":
            self._adam_step(w, grad * spacing, group, state, group["lr"], spacing=None)
        else:
            self._adam_step(w, grad, group, state, group["lr"], spacing=spacing)
        return spacing

    def _after_update(self, p, old, group, state, info, result) -> None:
        super()._after_update(p, old, group, state, info, result)
        if group["track_bit_position"] and result is not None:
            if "bit_position" not in state:
                state["bit_position"] = torch.zeros_like(p, dtype=torch.float32)
            state["bit_position"].add_((p.detach().float() - old.float()) / result.float())


class SGD(_GridAwareOptimizer):
    """SGD with momentum (no dampening), decoupled weight decay and optional low-precision storage.

    ``w <- w (1 - lr wd)``; ``b <- momentum b + g`` (``b = g`` at the first step); ``w <- w - lr b``
    (or ``w - lr (g + momentum b)`` with ``nesterov``). With ``weight_decay=0`` this is
    ``torch.optim.SGD`` bit for bit; torch couples the decay into the gradient (``g + wd w``, which
    momentum then amplifies up to ``1/(1 - momentum)``), altgrad decays every optimizer the same way,
    AdamW's. Storage options as in ``AdamW``.

    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(1))
    >>> opt = SGD([w], lr=0.5)
    >>> w.grad = torch.ones(1); _ = opt.step()
    >>> w.detach()
    tensor([0.5000])
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        quant_info: QuantInfo | None = None,
        weight_storage: FloatFormat | str | None = None,
        storage_rounding: str = "nearest",
        kahan: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=bool(nesterov))
        storage = WeightStorage(weight_storage, storage_rounding, kahan)
        super().__init__(params, defaults, storage, quant_info, generator, seed)

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        if not (isinstance(group["momentum"], (int, float)) and 0 <= group["momentum"] < 1):
            raise ValueError(f"momentum: must be in [0, 1), got {group['momentum']!r}")
        if group["nesterov"] and group["momentum"] == 0:
            raise ValueError("nesterov: needs momentum > 0")

    def _update(self, p, grad, group, state, info) -> None:
        w = p.detach()
        self._decay(w, group)
        d, momentum = grad, group["momentum"]
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = torch.clone(d).detach()
            else:
                buf.mul_(momentum).add_(d)
            d = d.add(buf, alpha=momentum) if group["nesterov"] else buf
        w.add_(d, alpha=-group["lr"])


class GridOptim(AdamW):
    """Adam's direction on the format's grid: each weight walks a whole number of representable values.

    Per quantized weight (``S_0`` the grid spacing toward zero at the pre-step weight, ``T`` the
    sorted distinct finite values of ``format.values()``, ``s`` the scale, ``d`` Adam's direction
    ``m_hat / (sqrt(v_hat) + eps)``)::

        r  = clamp(lr d + weight_lr wd w / S_0, -rung_clip, rung_clip)       (rungs, real)
        k  = floor(r) + [u < r - floor(r)],   u ~ U[0, 1) from the generator  (stochastic rounding)
        i  = searchsorted(T, Q_nearest(w / s))                                (current index)
        w <- T[clamp(i - k, 0, len(T) - 1)] * s                               (descent, projected)

    so a weight moves ``lr |d|`` rungs per step on average: ``lr`` rungs under a constant gradient
    (|d| = 1). The decay term is AdamW's decoupled shrink ``w weight_lr wd`` in rungs of ``S_0``
    (``S(w)``, or ``S(w)/2`` at a power of two), so a weight with zero gradient shrinks by
    ``(1 - weight_lr wd)`` per step in expectation (while the shrink is under one rung). A NaN
    weight stays NaN. Parameters without a format get plain AdamW at ``weight_lr``.

    Its weights stay on the grid by construction (``OnGridStorage``): ``weight_storage`` may only
    be None or ``"quantized"`` with ``storage_rounding="stochastic"`` (what it does anyway), and no
    ``kahan``. The codes each step changes are counted by ``WeightFlipTracker`` (or
    ``attach_flip_tracker``), as for every optimizer.

    >>> import torch
    >>> from altgrad.quantization import E0M7
    >>> w = torch.nn.Parameter(torch.tensor([0.5, 0.5]))
    >>> opt = GridOptim([{"params": [w], "format": E0M7}], lr=2.0)
    >>> w.grad = torch.tensor([1.0, -1.0]); _ = opt.step()   # d = +-1: 2 rungs of 1/128 each
    >>> (w.detach() * 128).tolist()
    [62.0, 66.0]
    """

    storage_type = OnGridStorage

    def __init__(
        self,
        params: Iterable,
        lr: float = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        rung_clip: float = 4.0,
        weight_decay: float = 0.0,
        *,
        weight_lr: float = 1e-3,
        quant_info: QuantInfo | None = None,
        weight_storage: str | None = None,
        storage_rounding: str | None = None,
        kahan: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        storage = dict(weight_storage=weight_storage, storage_rounding=storage_rounding, kahan=kahan)
        super().__init__(params, lr, betas, eps, weight_decay, quant_info=quant_info, generator=generator,
                         seed=seed, **storage,
                         extra_defaults=dict(rung_clip=rung_clip, weight_lr=weight_lr))  # fmt: skip

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        clip = group["rung_clip"]
        if not (isinstance(clip, (int, float)) and clip > 0):
            raise ValueError(f"rung_clip: must be a number > 0, got {clip!r}")

    def _update(self, p, grad, group, state, info) -> None:
        if info is None:
            return super()._update(p, grad, group, state, info)
        fmt, scale = info
        self._adam_state(p, state)
        w = p.detach()
        w32 = w.float()
        rungs = self._adam_direction(grad, group, state).float().mul_(group["lr"])
        if group["weight_decay"] != 0:  # in rungs toward zero: below a power of two they are S/2 wide
            below = grid_spacing(w32 * (1 - 2.0 ** -(fmt.mantissa_bits + 2)), fmt, scale)
            rungs.add_(w32 / below, alpha=self._weight_lr(group) * group["weight_decay"])
        rungs.clamp_(-group["rung_clip"], group["rung_clip"])
        floor = torch.floor(rungs)
        draw = torch.rand(rungs.shape, generator=self._generator(w.device), device=w.device)
        whole = (floor + (draw < rungs - floor)).to(torch.int64)
        table = _finite_table(fmt, w.device)
        unscaled = w32 / scale if not (isinstance(scale, float) and scale == 1.0) else w32
        index = torch.searchsorted(table, quantize(unscaled, fmt))
        new_index = (index - whole).clamp_(0, table.numel() - 1)
        w.copy_(torch.where(torch.isnan(w32), w32, table[new_index] * scale))
        return None


class Madam(AdamW):
    """Madam (Bernstein et al. 2020): a multiplicative update of ``log|w|``, the natural step on a
    logarithmic grid (LNS-Madam, Zhao et al. 2022, stores such weights in 8 bits with no master copy).

    Per weight with a format (``beta = betas[1]``, ``t`` the step)::

        v <- beta v + (1 - beta) g^2;   d = clamp(g / (sqrt(v / (1 - beta^t)) + eps), -grad_bound, grad_bound)
        w <- w (1 - weight_lr wd)                                     (decoupled decay, weight units)
        w <- clamp(w exp(-lr sign(w) d), -w_max, w_max),   w_max = max_scale * rms(w at its first step)

    as in the authors' reference implementation (jxbz/madam: beta 0.999, no first moment, gradient
    bound 10, w_max 3x the initial rms; the paper's Algorithm 1 with its clamp to a maximum weight).
    Units: ``lr`` is in natural-log units of |w|: a step changes |w| by the factor
    ``exp(+-lr |d|)``, about ``lr |d|`` as a fraction of |w|; under a constant gradient (|d| = 1)
    ``lr = k ln 2`` moves k binades, one code per binade on a power-of-two grid (E7M0), and
    ``lr = ln 2 / 2^M`` is about one ULP of a format with M mantissa bits. A weight never changes
    sign and a zero stays zero, so parameters without a format (zero-initialised biases among
    them) get plain AdamW at ``weight_lr`` instead. Storage options as in ``AdamW``.

    >>> import math, torch
    >>> from altgrad.quantization import E7M0
    >>> w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    >>> opt = Madam([{"params": [w], "format": E7M0}], lr=math.log(2), weight_storage="quantized")
    >>> w.grad = torch.tensor([1.0, 1.0]); _ = opt.step()   # d = 1: |1| halves, |-2| doubles (<= w_max)
    >>> w.detach()
    tensor([ 0.5000, -4.0000])
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.01,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        weight_lr: float = 1e-3,
        max_scale: float = 3.0,
        grad_bound: float = 10.0,
        quant_info: QuantInfo | None = None,
        weight_storage: FloatFormat | str | None = None,
        storage_rounding: str = "nearest",
        kahan: bool = False,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> None:
        storage = dict(weight_storage=weight_storage, storage_rounding=storage_rounding, kahan=kahan)
        super().__init__(params, lr, betas, eps, weight_decay, quant_info=quant_info, generator=generator,
                         seed=seed, **storage,
                         extra_defaults=dict(weight_lr=weight_lr, max_scale=max_scale, grad_bound=grad_bound))

    def _check_group(self, group: dict[str, Any]) -> None:
        super()._check_group(group)
        for key in ("max_scale", "grad_bound"):
            value = group[key]
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{key}: must be a number > 0, got {value!r}")

    def _update(self, p, grad, group, state, info) -> None:
        if info is None:
            return super()._update(p, grad, group, state, info)
        w = p.detach()
        if not state:
            state["step"] = 0
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["max"] = w.float().square().mean().sqrt() * group["max_scale"]  # 0-dim, no host sync
        beta = group["betas"][1]
        state["step"] += 1
        exp_avg_sq = state["exp_avg_sq"]
        exp_avg_sq.mul_(beta).addcmul_(grad, grad, value=1 - beta)
        denom = (exp_avg_sq / (1 - beta ** state["step"])).sqrt_().add_(group["eps"])
        direction = grad.div(denom).clamp_(-group["grad_bound"], group["grad_bound"])
        self._decay(w, group)
        w.mul_(torch.exp(direction.mul_(torch.sign(w)).mul_(-group["lr"])))
        limit = state["max"].to(w.dtype)
        w.copy_(torch.minimum(torch.maximum(w, -limit), limit))
        return None


# ---- the registry: name -> class, lr unit, options ------------------------------------------------------


@dataclass(frozen=True)
class OptimizerEntry:
    """One optimizer the config can name.

    ``cls`` is called as ``cls(params_or_groups, lr=lr, **kwargs)`` with the keyword ``options`` it
    takes (``build_optimizer`` passes only those). ``lr_unit`` names the unit of its ``lr``
    (``"weight"``, ``"ulp"``, ``"rung"``, ``"log|w|"``, ...) and ``lr_default`` the peak lr used
    when ``optimizer.lr`` is not set (None: ``train.lr``, the weight-unit lr); ``mode_units`` gives
    both per value of the ``mode`` option where they depend on it (ManifoldAdamW's grad_scale is
    in weight units). ``option_defaults``: ``build_optimizer``'s defaults where they differ from
    the class's.
    """

    cls: Callable[..., torch.optim.Optimizer]
    lr_unit: str
    lr_default: float | None
    options: tuple[str, ...]
    mode_units: Mapping[str, tuple[str, float | None]] = field(default_factory=dict)
    option_defaults: Mapping[str, Any] = field(default_factory=dict)

    def unit(self, mode: str | None = None) -> tuple[str, float | None]:
        """``(lr unit, lr default)`` under the option ``mode`` (ignored by optimizers without modes)."""
        return self.mode_units.get(mode, (self.lr_unit, self.lr_default))


_EVERY = ("weight_decay", "quant_info", "generator", "seed", "weight_storage", "storage_rounding", "kahan")
_ADAM = ("betas", "eps", *_EVERY)

OPTIMIZERS: dict[str, OptimizerEntry] = {
    "adamw": OptimizerEntry(AdamW, "weight", None, _ADAM),
    "manifold_adamw": OptimizerEntry(ManifoldAdamW, "ulp", 1.0,
                                     (*_ADAM, "weight_lr", "mode", "track_bit_position"),
                                     mode_units={"grad_scale": ("weight", None)}),
    "grid": OptimizerEntry(GridOptim, "rung", 1.0, (*_ADAM, "weight_lr", "rung_clip")),
    "sgd": OptimizerEntry(SGD, "weight", None, ("momentum", "nesterov", *_EVERY),
                          option_defaults={"momentum": 0.9}),
    "madam": OptimizerEntry(Madam, "log|w|", 0.01, (*_ADAM, "weight_lr")),
}  # fmt: skip
"""The optimizers by config name (``optimizer.name``); adding one is a class plus an entry here."""


def optimizer_entry(name: str) -> OptimizerEntry:
    """The registry entry of ``name`` (case-insensitive), or a ValueError listing the names."""
    entry = OPTIMIZERS.get(name.lower()) if isinstance(name, str) else None
    if entry is None:
        raise ValueError(f"optimizer name: {name!r} is not one of {', '.join(OPTIMIZERS)}")
    return entry


def build_optimizer(
    name: str,
    params_or_groups: Iterable,
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    quant_info: QuantInfo | None = None,
    **options: Any,
) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` (a key of ``OPTIMIZERS``) with the options its entry takes.

    ``options`` (any subset of the options of all registered optimizers): ``momentum`` (sgd;
    default 0.9), ``nesterov`` (sgd), ``mode`` and ``track_bit_position`` (manifold_adamw),
    ``rung_clip`` (grid), ``weight_lr`` (manifold_adamw, grid, madam: the weight-unit lr of decay
    and of parameters without a format; default 1e-3), ``weight_storage`` / ``storage_rounding`` /
    ``kahan``, ``generator`` and ``seed``. Options that do not apply to ``name`` are ignored, so a
    trainer can pass its whole optimizer config. ``grid`` keeps its weights on the grid and rounds
    its rung counts stochastically already: it takes ``weight_storage`` None or ``"quantized"`` (the
    same thing for it), with ``storage_rounding="stochastic"`` and no ``kahan``; anything else
    raises. An unknown name or option raises ``ValueError`` listing the allowed ones.

    >>> import torch
    >>> build_optimizer("manifold_adamw", [torch.nn.Parameter(torch.ones(2))], lr=0.5, mode="grad_scale")
    ManifoldAdamW (...
    """
    entry = optimizer_entry(name)
    allowed = {option for e in OPTIMIZERS.values() for option in e.options}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"optimizer options: unknown {unknown}; allowed: {', '.join(sorted(allowed))}")
    given = {"betas": betas, "eps": eps, "weight_decay": weight_decay, "quant_info": quant_info, **options}
    kwargs = {k: v for k, v in {**entry.option_defaults, **given}.items() if k in entry.options}
    return entry.cls(params_or_groups, lr=lr, **kwargs)


CONFIG_KEYWORDS = {"manifold_mode": "mode"}
"""``optimizer`` config keys whose constructor keyword has another name."""


def optimizer_from_config(
    options: OptimizerConfig,
    groups: Iterable,
    *,
    lr: float,
    weight_decay: float,
    quant_info: QuantInfo | None,
    weight_lr: float,
    seed: int | None,
) -> torch.optim.Optimizer:
    """``build_optimizer`` from the run config's ``optimizer`` section: every key but ``name`` and
    ``lr`` passed as the keyword it names (``weight_storage`` none as None), plus the trainer's
    ``lr``, ``weight_decay``, ``quant_info``, ``weight_lr`` and ``seed``.

    >>> import torch
    >>> from altgrad.training.config import OptimizerConfig
    >>> opt = optimizer_from_config(OptimizerConfig(name="sgd"), [torch.nn.Parameter(torch.ones(2))],
    ...                             lr=0.1, weight_decay=0.0, quant_info=None, weight_lr=0.1, seed=0)
    >>> type(opt).__name__, opt.param_groups[0]["momentum"]
    ('SGD', 0.9)
    """
    keywords = {CONFIG_KEYWORDS.get(key, key): value for key, value in options if key not in ("name", "lr")}
    if keywords.get("weight_storage") == "none":
        keywords["weight_storage"] = None
    return build_optimizer(options.name, groups, lr=lr, weight_decay=weight_decay, quant_info=quant_info,
                           weight_lr=weight_lr, seed=seed, **keywords)  # fmt: skip
