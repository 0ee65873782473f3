"""Rank health of weight matrices: stable rank, effective rank, and a warning when a matrix collapses.

For a matrix W with singular values s_1 >= s_2 >= ... (conv weights reshaped to (out, -1)):

    stable rank     ||W||_F^2 / ||W||_2^2 = sum s_i^2 / s_1^2         (NaN for the zero matrix: 0/0)
    effective rank  exp(-sum p_i log p_i), p_i = s_i / sum_j s_j       (Roy & Vetterli 2007; NaN if W = 0)
    spectral norm   s_1

A zero or non-finite matrix has no rank: its stable and effective rank are NaN, never a high number.

One decomposition per matrix serves all three (``rank_metrics_from_singular_values``). Singular values
are float64 and taken in tall orientation (wide matrices transposed). Two ways to get them:

* ``method="svd"``: ``torch.linalg.svdvals`` in float64, the reference (used by ``compute_stable_rank``
  and ``compute_effective_rank``);
* ``method="gram"``: ``sqrt(eigvalsh(W^T W))`` of the float64 Gram matrix, batched over same-shape
  matrices (used by ``compute_rank_metrics`` and ``RankHealthMonitor``; about 2-3x faster on CPU).
  Eigenvalues below ``max(m, n) * eps_float64 * s_1^2`` (rounding noise of the Gram matrix) are set to
  zero, so singular values below ~3e-7 * s_1 read as 0. Stable rank and spectral norm agree with
  ``"svd"`` to ~1e-14; effective rank to ~1e-12 for full-rank matrices and ~1e-5 for rank-deficient
  float32 ones, whose "zero" singular values are float32 rounding noise (~1e-7 * s_1) either way.

Example::

    >>> import torch
    >>> compute_stable_rank(torch.eye(4)), compute_effective_rank(torch.eye(4))
    (4.0, 4.0)
    >>> round(compute_effective_rank(torch.outer(torch.ones(8), torch.arange(1.0, 9.0))), 6)
    1.0
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import nn

Method = Literal["svd", "gram"]
METHODS: tuple[str, ...] = ("svd", "gram")
RANK_METRICS: tuple[str, ...] = ("stable_rank", "effective_rank", "spectral_norm")
QUANTIZED_SUFFIX = "_quantized"
"""``stable_rank_quantized`` etc.: the same metrics of the weight the forward uses (quantized layers)."""

DEFAULT_MAX_MATRIX_ELEMENTS = 4_000_000
"""Matrices with more elements than this (e.g. a GPT-2 embedding, 50257 x 768) are row-sampled."""
_SAMPLE_SEED = 0


def _as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a 2-D matrix: conv and other N-D weights reshaped to (out, -1)."""
    if weight.ndim < 2:
        raise ValueError(f"weight: rank metrics need a 2+-dim tensor, got shape {tuple(weight.shape)}")
    return weight.detach().reshape(weight.shape[0], math.prod(weight.shape[1:]))


def _tall(matrix: torch.Tensor) -> torch.Tensor:
    return matrix if matrix.shape[-2] >= matrix.shape[-1] else matrix.mT


def _sampled_rows(
    rows: int, columns: int, max_elements: int | None, device: torch.device
) -> tuple[torch.Tensor | None, float]:
    """A fixed subset of row indices (the same at every call) and the factor rescaling s^2 to all rows."""
    if max_elements is None or rows * columns <= max_elements:
        return None, 1.0
    max_rows = max(columns, max_elements // columns)
    if rows <= max_rows:
        return None, 1.0
    generator = torch.Generator().manual_seed(_SAMPLE_SEED)
    index = torch.randperm(rows, generator=generator)[:max_rows].sort().values
    return index.to(device), rows / max_rows


def singular_values(matrices: torch.Tensor, method: Method = "svd") -> torch.Tensor:
    """Float64 singular values, descending, of a matrix or a batch (..., m, n) in tall orientation."""
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {METHODS}")
    tall = _tall(matrices)
    if method == "svd":
        return torch.linalg.svdvals(tall.to(torch.float64))
    return _singular_values_from_gram(_gram(tall), tall.shape[-2])


def _gram(tall: torch.Tensor) -> torch.Tensor:
    """``W^T W`` in float64 (the conversion keeps W's strides, so a transposed view costs no copy)."""
    w = tall.to(torch.float64)
    return w.mT @ w


def _singular_values_from_gram(gram: torch.Tensor, rows: int) -> torch.Tensor:
    """``sqrt`` of the Gram matrix's eigenvalues, descending; those below its rounding noise read as 0."""
    eigenvalues = torch.linalg.eigvalsh(gram).flip(-1)
    noise = rows * torch.finfo(torch.float64).eps * eigenvalues[..., :1].clamp_min(0)
    return torch.where(eigenvalues > noise, eigenvalues, 0).sqrt()


def rank_metrics_from_singular_values(
    singular_values: torch.Tensor, eps: float = 1e-10
) -> dict[str, torch.Tensor]:
    """Stable rank, effective rank and spectral norm from singular values (..., k), batched, no sync.

    All-zero singular values (the zero matrix) give NaN stable and effective rank and spectral norm 0;
    non-finite singular values give NaN metrics. Effective rank is clamped to [1, k] against rounding.
    """
    s = singular_values.to(torch.float64)
    if s.shape[-1] == 0:  # an empty matrix has no singular values: treat it as the zero matrix
        s = torch.zeros(*s.shape[:-1], 1, dtype=torch.float64, device=s.device)
    top = s[..., 0]
    squares = (s * s).sum(-1)
    nan = torch.full_like(top, math.nan)
    stable_rank = torch.where(top > 0, squares / torch.where(top > 0, top * top, 1.0), nan)
    total = s.sum(-1, keepdim=True)
    p = s / torch.where(total > 0, total, 1.0)
    entropy = -(p * p.clamp_min(eps).log()).sum(-1)
    effective_rank = torch.where(total[..., 0] > 0, entropy.exp().clamp(1.0, s.shape[-1]), nan)
    finite = torch.isfinite(s).all(-1)
    return {
        "stable_rank": torch.where(finite, stable_rank, nan),
        "effective_rank": torch.where(finite, effective_rank, nan),
        "spectral_norm": torch.where(finite, top, nan),
    }


def _metrics_of(weight: torch.Tensor, eps: float = 1e-10) -> dict[str, torch.Tensor]:
    matrix = _as_matrix(weight)
    finite = bool(torch.isfinite(matrix).all())
    s = singular_values(matrix if finite else torch.zeros_like(matrix), "svd")
    metrics = rank_metrics_from_singular_values(s, eps)
    return metrics if finite else {key: torch.full_like(value, math.nan) for key, value in metrics.items()}


def compute_stable_rank(weight: torch.Tensor) -> float:
    """``||W||_F^2 / ||W||_2^2`` (float64 svdvals); NaN for W = 0 and for a W with NaN or inf."""
    return float(_metrics_of(weight)["stable_rank"])


def compute_effective_rank(weight: torch.Tensor, eps: float = 1e-10) -> float:
    """``exp(-sum p_i log p_i)``, ``p_i = s_i / sum s_j``; in [1, min(m, n)], NaN for W = 0 or non-finite."""
    return float(_metrics_of(weight, eps)["effective_rank"])


def compute_rank_metrics(
    matrices: Mapping[str, torch.Tensor],
    method: Method = "gram",
    max_matrix_elements: int | None = DEFAULT_MAX_MATRIX_ELEMENTS,
    eps: float = 1e-10,
    max_batch_bytes: int = 1 << 28,
) -> dict[str, dict[str, float]]:
    """``{name: {"stable_rank", "effective_rank", "spectral_norm"}}`` for many matrices, one host sync.

    Matrices of the same (tall) shape and device are decomposed in one batched call (in chunks of at
    most ``max_batch_bytes`` of float64: Gram matrices for "gram", the matrices for "svd").

    A tall (m, n) matrix of more than ``max_matrix_elements`` elements is estimated from a fixed random
    subset of k = max(n, max_matrix_elements // n) rows, its squared singular values rescaled by m / k
    (``(m / k) W_k^T W_k`` is an unbiased estimate of ``W^T W``); ``None`` never samples. A matrix
    containing NaN or inf gets NaN metrics; the zero matrix NaN ranks and spectral norm 0.
    """
    groups: dict[tuple[torch.Size, torch.device], list[tuple[str, torch.Tensor, float]]] = {}
    for name, weight in matrices.items():
        matrix = _tall(_as_matrix(weight))
        rows, factor = _sampled_rows(matrix.shape[0], matrix.shape[1], max_matrix_elements, matrix.device)
        if rows is not None:
            matrix = matrix.index_select(0, rows)
        groups.setdefault((matrix.shape, matrix.device), []).append((name, matrix, factor))

    names: dict[torch.device, list[str]] = {}
    results: dict[torch.device, list[torch.Tensor]] = {}
    for (shape, device), members in groups.items():
        rows, columns = shape
        per_chunk = max(1, max_batch_bytes // (8 * columns * (columns if method == "gram" else rows)))
        for start in range(0, len(members), per_chunk):
            chunk = members[start : start + per_chunk]
            factors = torch.tensor([factor for *_, factor in chunk], dtype=torch.float64, device=device)
            if method == "gram":  # one Gram matrix per weight, then one batched eigvalsh
                batch = torch.stack([_gram(matrix) for _, matrix, _ in chunk]) * factors[:, None, None]
            else:
                batch = torch.empty((len(chunk), rows, columns), dtype=torch.float64, device=device)
                for i, (_, matrix, _) in enumerate(chunk):
                    batch[i].copy_(matrix)
            finite = torch.isfinite(batch).all(-1).all(-1)  # a non-finite W gives a non-finite Gram matrix
            batch = torch.where(finite[:, None, None], batch, 0.0)
            if method == "gram":
                s = _singular_values_from_gram(batch, rows)
            else:
                s = torch.linalg.svdvals(batch) * factors.sqrt()[:, None]
            metrics = rank_metrics_from_singular_values(s, eps)
            stacked = torch.stack([metrics[key] for key in RANK_METRICS], dim=1)
            results.setdefault(device, []).append(torch.where(finite[:, None], stacked, math.nan))
            names.setdefault(device, []).extend(name for name, *_ in chunk)

    values: dict[str, dict[str, float]] = {}
    for device, rows in results.items():
        for name, row in zip(names[device], torch.cat(rows).tolist(), strict=True):
            values[name] = dict(zip(RANK_METRICS, row, strict=True))
    return {name: values[name] for name in matrices}


def rank_tracked_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every 2+-dim parameter of ``model`` by name (not biases or norm gains; tied parameters once)."""
    return {name: p for name, p in model.named_parameters() if p.ndim >= 2}


# ---- trends -----------------------------------------------------------------------------------------


class RankTrendDetector:
    """Warns when the EMA of a metric falls more than ``threshold_pct`` below its reference.

    ``ema <- value`` on the first update, then ``ema <- alpha * value + (1 - alpha) * ema``. The first
    ``window`` updates are silent warmup; the reference is the EMA at the end of the warmup, raised to
    every higher EMA seen after it (so a drop is measured from the best level reached). ``update``
    returns ``"WARN ..."`` naming the current EMA, the reference and the drop in percent on every update
    where ``ema < (1 - threshold_pct) * reference``, else None. A non-finite value is not averaged in and
    returns a warning.

    Example::

        detector = RankTrendDetector(alpha=0.5, threshold_pct=0.2, window=3)
        for value in [10, 10, 10, 10, 7, 5]:
            message = detector.update(value)       # None, ..., then "WARN: EMA 6.75 is 32.5% below ..."
    """

    def __init__(
        self, alpha: float = 0.1, threshold_pct: float = 0.2, window: int = 100, name: str = ""
    ) -> None:
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha: must be in (0, 1], got {alpha}")
        if not 0 < threshold_pct < 1:
            raise ValueError(f"threshold_pct: a fraction in (0, 1), got {threshold_pct}")
        if window < 0:
            raise ValueError(f"window: must be >= 0, got {window}")
        self.alpha, self.threshold_pct, self.window, self.name = alpha, threshold_pct, window, name
        self.reset()

    def reset(self) -> None:
        """Back to the state before the first update."""
        self.ema: float | None = None
        self.reference: float | None = None
        self.step_count = 0

    def update(self, value: float) -> str | None:
        """Feed one value; a warning string (starting with "WARN") or None."""
        label = f"WARN {self.name}:" if self.name else "WARN:"
        value = float(value)
        if not math.isfinite(value):
            return f"{label} non-finite value {value} (not averaged into the EMA)"
        self.ema = value if self.ema is None else self.alpha * value + (1 - self.alpha) * self.ema
        self.step_count += 1
        if self.step_count < self.window:
            return None
        if self.reference is None or self.ema > self.reference:
            self.reference = self.ema
        if self.step_count == self.window or self.reference <= 0:
            return None
        drop = (self.reference - self.ema) / self.reference
        if drop <= self.threshold_pct:
            return None
        return (
            f"{label} EMA {self.ema:.4g} is {100 * drop:.1f}% below its reference {self.reference:.4g} "
            f"(threshold {100 * self.threshold_pct:.1f}%)"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "reference": self.reference, "step_count": self.step_count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.ema, self.reference, self.step_count = state["ema"], state["reference"], int(state["step_count"])


# ---- the monitor ----------------------------------------------------------------------------------


def forward_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{parameter name: the weight the forward multiplies by}`` for every module of ``model`` with a
    ``forward_weight()`` method that returns a tensor (``QuantizedLinear``: ``Q_w(W / s_w) * s_w`` at its
    current scale); layers that do not quantize their weight are left out."""
    names = {id(p): name for name, p in model.named_parameters()}
    weights: dict[str, torch.Tensor] = {}
    for module in model.modules():
        forward_weight = getattr(module, "forward_weight", None)
        weight = forward_weight() if callable(forward_weight) else None
        if weight is not None and id(module.weight) in names:
            weights.setdefault(names[id(module.weight)], weight)
    return weights


class RankHealthMonitor:
    """Rank metrics of every weight matrix of a model, and a warning when one collapses.

    ``compute_layer_ranks(model)`` every ``log_interval`` steps (``should_check(step)``), then
    ``check_warnings(ranks)``.

    What the warning detects: a weight matrix losing its spectrum, the directions other than a few
    vanishing, as when strong weight decay or a degenerate gradient drives a layer toward rank 1. It
    reads the effective rank r_e of the master weight (the trained parameter; quantization noise adds a
    floor of small singular values that would hide a collapse of the quantized copy). A (m, n) layer
    warns when both hold:

    * r_e < ``collapse_floor * min(m, n)`` (default 0.25): few directions left, whatever the layer's size;
    * r_e has fallen: the EMA of r_e (``ema_alpha``) is more than ``warn_threshold`` below the highest
      EMA since the layer's first check (``RankTrendDetector``), so a layer built low-rank is not flagged.
      Critical layers (names containing any of ``critical_layers``, default lm_head and c_proj; tied
      parameters match under any of their names) count a drop of ``warn_threshold *
      critical_threshold_multiplier``.

    Healthy training lowers stable rank (from ~25 at init to ~1.5 for an embedding) but keeps r_e above
    half of min(m, n) (see docs/run_folder.md for measured runs). A zero matrix or one with NaN or inf
    warns at once, for the master weight and for the weight the forward uses (a quantized weight whose
    elements all flushed to zero); its ranks are NaN, never a high number. Each condition warns once when
    it starts and again only after it has cleared. The first ``warmup_checks`` checks of a layer do not
    warn about collapse (they still set its reference).

    Matrices of more than ``max_matrix_elements`` elements (e.g. a GPT-2 embedding) are estimated from
    a fixed sample of rows (see ``compute_rank_metrics``); ``method`` picks the decomposition ("gram"
    or "svd").

    Example::

        monitor = RankHealthMonitor(log_interval=100)
        if monitor.should_check(step):
            ranks = monitor.compute_layer_ranks(model)   # {'h.0.attn.c_attn.weight': {'stable_rank': ..}}
            for message in monitor.check_warnings(ranks):
                print(message)           # "WARN h.0.mlp.c_fc.weight effective_rank: 14.1 < 0.25 x 64 ..."
    """

    def __init__(
        self,
        log_interval: int = 100,
        warn_threshold: float = 0.3,
        critical_layers: Iterable[str] | None = None,
        critical_threshold_multiplier: float = 0.5,
        warmup_checks: int = 5,
        *,
        ema_alpha: float = 0.3,
        collapse_floor: float = 0.25,
        max_matrix_elements: int | None = DEFAULT_MAX_MATRIX_ELEMENTS,
        method: Method = "gram",
    ) -> None:
        if log_interval < 1:
            raise ValueError(f"log_interval: must be >= 1, got {log_interval}")
        if not 0 < warn_threshold < 1:
            raise ValueError(f"warn_threshold: a fraction in (0, 1), got {warn_threshold}")
        if not 0 < critical_threshold_multiplier <= 1:
            raise ValueError(
                f"critical_threshold_multiplier: must be in (0, 1], got {critical_threshold_multiplier}"
            )
        if not 0 < collapse_floor < 1:
            raise ValueError(f"collapse_floor: a fraction of min(m, n) in (0, 1), got {collapse_floor}")
        if method not in METHODS:
            raise ValueError(f"method: {method!r} is not one of {METHODS}")
        self.log_interval = log_interval
        self.warn_threshold = warn_threshold
        self.critical_layers = list(critical_layers) if critical_layers is not None else ["lm_head", "c_proj"]
        self.critical_threshold_multiplier = critical_threshold_multiplier
        self.warmup_checks = warmup_checks
        self.ema_alpha = ema_alpha
        self.collapse_floor = collapse_floor
        self.max_matrix_elements = max_matrix_elements
        self.method = method
        self.checks = 0
        self.detectors: dict[tuple[str, str], RankTrendDetector] = {}
        self.active: set[tuple[str, str]] = set()  # (layer, condition) warned about and not yet cleared
        self.last_warnings: list[dict[str, str]] = []  # {"layer", "metric", "message"} of the last check
        self.max_ranks: dict[str, int] = {}  # min(m, n) of each layer measured by compute_layer_ranks
        self._aliases: dict[str, list[str]] = {}

    def should_check(self, step: int) -> bool:
        return step % self.log_interval == 0

    def is_critical(self, name: str) -> bool:
        names = self._aliases.get(name, [name])
        return any(pattern in alias for pattern in self.critical_layers for alias in names)

    def threshold_for(self, name: str) -> float:
        critical = self.is_critical(name)
        return self.warn_threshold * (self.critical_threshold_multiplier if critical else 1.0)

    def compute_layer_ranks(self, model: nn.Module) -> dict[str, dict[str, float]]:
        """``{parameter name: {"stable_rank", "effective_rank", "spectral_norm"}}``, one host sync.

        A parameter whose layer quantizes its weight (``forward_weights``) also gets
        ``stable_rank_quantized``, ``effective_rank_quantized`` and ``spectral_norm_quantized``: the same
        metrics of the weight the forward uses, at the layer's current scale.
        """
        aliases: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            aliases.setdefault(id(p), []).append(name)
        parameters = rank_tracked_parameters(model)
        self._aliases = {name: aliases[id(p)] for name, p in parameters.items()}
        self.max_ranks |= {name: min(_as_matrix(p).shape) for name, p in parameters.items()}
        quantized = {name: w for name, w in forward_weights(model).items() if name in parameters}
        matrices = parameters | {f"{name}{QUANTIZED_SUFFIX}": w for name, w in quantized.items()}
        metrics = compute_rank_metrics(
            matrices, method=self.method, max_matrix_elements=self.max_matrix_elements
        )
        ranks = {name: metrics[name] for name in parameters}
        for name in quantized:
            ranks[name] |= {
                f"{key}{QUANTIZED_SUFFIX}": v for key, v in metrics[name + QUANTIZED_SUFFIX].items()
            }
        return ranks

    def check_warnings(
        self, ranks: Mapping[str, Mapping[str, float]], *, max_ranks: Mapping[str, int] | None = None
    ) -> list[str]:
        """Warnings (strings naming their layer) for collapsed, zero and non-finite matrices.

        ``max_ranks`` gives min(m, n) of layers not measured by ``compute_layer_ranks`` (remembered).
        """
        sizes = self.max_ranks | dict(max_ranks or {})
        unknown = [
            layer for layer, metrics in ranks.items() if "effective_rank" in metrics and layer not in sizes
        ]
        if unknown:
            raise ValueError(f"max_ranks: min(m, n) of {unknown[0]!r} is unknown (pass it or measure it)")
        self.max_ranks = sizes
        self.checks += 1
        self.last_warnings = []
        for layer, metrics in ranks.items():
            for suffix in ("", QUANTIZED_SUFFIX):
                if f"effective_rank{suffix}" in metrics:
                    self._check_degenerate(layer, metrics, suffix)
            if "effective_rank" in metrics:
                self._check_collapse(layer, float(metrics["effective_rank"]), self.max_ranks[layer])
        return [warning["message"] for warning in self.last_warnings]

    def _warn_once(self, layer: str, condition: str, metric: str, firing: bool, message: str) -> None:
        """Record ``message`` when ``condition`` starts firing for ``layer``; forget it once it clears."""
        key = (layer, condition)
        if not firing:
            self.active.discard(key)
        elif key not in self.active:
            self.active.add(key)
            self.last_warnings.append({"layer": layer, "metric": metric, "message": message})

    def _check_degenerate(self, layer: str, metrics: Mapping[str, float], suffix: str) -> None:
        weight = "weight the forward uses" if suffix else "master weight"
        zero = float(metrics.get(f"spectral_norm{suffix}", math.nan)) == 0
        nonfinite = math.isnan(float(metrics[f"effective_rank{suffix}"])) and not zero
        self._warn_once(
            layer, f"nonfinite{suffix}", f"effective_rank{suffix}", nonfinite,
            f"WARN {layer}: the {weight} has NaN or inf entries (rank metrics NaN)",
        )  # fmt: skip
        self._warn_once(
            layer, f"zero{suffix}", f"effective_rank{suffix}", zero,
            f"WARN {layer}: the {weight} is the zero matrix (no rank; rank metrics NaN)",
        )  # fmt: skip

    def _check_collapse(self, layer: str, effective_rank: float, max_rank: int) -> None:
        """Trend of the effective rank, not the stable rank: healthy learning drives the stable rank to
        ~1.5 (one direction dominates the energy while the rest of the spectrum stays), so it cannot tell
        learning from collapse; effective rank counts the directions that carry mass."""
        if not math.isfinite(effective_rank):
            return  # a zero or non-finite matrix: warned about by _check_degenerate, not averaged in
        detector = self.detectors.get((layer, "effective_rank"))
        if detector is None:
            detector = self.detectors[(layer, "effective_rank")] = RankTrendDetector(
                alpha=self.ema_alpha,
                threshold_pct=self.threshold_for(layer),
                window=1,  # the reference starts at the first check: a collapse may begin at once
                name=f"{layer} effective_rank" + (" (critical)" if self.is_critical(layer) else ""),
            )
        fallen = detector.update(effective_rank) is not None
        floor = self.collapse_floor * max_rank
        if detector.step_count <= self.warmup_checks:
            return
        assert detector.reference is not None and detector.ema is not None
        self._warn_once(
            layer, "collapse", "effective_rank", fallen and effective_rank < floor,
            f"WARN {detector.name}: {effective_rank:.4g} < {self.collapse_floor:g} x min(m, n) = {floor:.4g};"
            f" EMA {detector.ema:.4g} is {100 * (1 - detector.ema / detector.reference):.1f}% below its best "
            f"{detector.reference:.4g} (rank collapse)",
        )  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        return {
            "checks": self.checks,
            "active": sorted(self.active),
            "max_ranks": dict(self.max_ranks),
            "detectors": [
                {"layer": layer, "metric": metric, "threshold_pct": d.threshold_pct, "name": d.name}
                | d.state_dict()
                for (layer, metric), d in self.detectors.items()
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.checks = int(state["checks"])
        self.active = {(layer, condition) for layer, condition in state["active"]}
        self.max_ranks = {name: int(k) for name, k in state["max_ranks"].items()}
        self.detectors = {}
        for saved in state["detectors"]:
            detector = RankTrendDetector(self.ema_alpha, saved["threshold_pct"], 1, saved["name"])
            detector.load_state_dict(saved)
            self.detectors[(saved["layer"], saved["metric"])] = detector
