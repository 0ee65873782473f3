"""Synthetic run folders with known numbers, written the way the trainer writes them.

The suite imports test modules in importlib mode, so the helpers reach the tests as one fixture:
``synth.write_run(...)``, ``synth.metric_records(...)``, ...
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import yaml

LAYERS = ("transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc")
QUANT_SUMMARY = {"weight": "E4M3", "activation": "E4M3", "grad": "E5M2", "scaling": "delayed", "rules": 0}
Signal = float | Callable[[int], float]


def _at(signal: Signal, step: int) -> float:
    return signal(step) if callable(signal) else signal


def metric_records(
    steps: int = 20,
    *,
    loss_start: float = 4.0,
    loss_slope: float = 0.05,
    eval_every: int = 5,
    stall: Signal = 0.5,
    grad_underflow: Signal = 0.0,
    activation_underflow: Signal = 0.0,
    weight_overflow: Signal = 0.0,
    weight_rel_error: Signal = 0.03,
    forward_cost: Signal = 0.0,
    first_layer_only: bool = False,
    flips: int = 10,
    rank: float = 8.0,
    quantized: bool = True,
) -> list[dict[str, Any]]:
    """Records for steps 1..steps: train_loss = loss_start - loss_slope * step, val_loss = train_loss + 0.1
    every ``eval_every`` steps, with ``val_loss_fp32_forward = val_loss - forward_cost`` when quantized;
    per-layer stall / flips / quant fractions / weight rel_error (only the first layer's carry the signal
    when ``first_layer_only``); stable/effective rank every 5 steps."""
    records = []
    for step in range(1, steps + 1):
        loss = loss_start - loss_slope * step
        record: dict[str, Any] = {
            "step": step,
            "train_loss": loss,
            "lr": 1e-3,
            "tokens": step * 512,
            "tokens_per_s": 1000.0,
            "elapsed_s": 0.1 * step,
        }
        if step % eval_every == 0:
            record["val_loss"] = loss + 0.1
            record["val_ppl"] = 2.718281828 ** (loss + 0.1)
            if quantized:
                record["val_loss_fp32_forward"] = loss + 0.1 - _at(forward_cost, step)
        if quantized:
            for i, layer in enumerate(LAYERS):
                signal = i == 0 or not first_layer_only
                record[f"flips/{layer}"] = flips
                record[f"updates/{layer}"] = 100
                record[f"stall_ratio/{layer}"] = _at(stall, step) if signal else 0.5
                record[f"flip_rate/{layer}"] = flips / 1000
                record[f"quant/underflow_frac/{layer}/grad"] = _at(grad_underflow, step) if signal else 0.0
                record[f"quant/underflow_frac/{layer}/activation"] = (
                    _at(activation_underflow, step) if signal else 0.0
                )
                record[f"quant/overflow_frac/{layer}/weight"] = _at(weight_overflow, step) if signal else 0.0
                record[f"quant/rel_error/{layer}/weight"] = _at(weight_rel_error, step) if signal else 0.03
            record["flips/total"] = flips * len(LAYERS)
            record["updates/total"] = 100 * len(LAYERS)
            record["stall_ratio/mean"] = sum(record[f"stall_ratio/{layer}"] for layer in LAYERS) / len(LAYERS)
            record["flip_rate/mean"] = flips / 1000
            for kind in ("weight", "activation", "grad"):
                per_layer = [record.get(f"quant/underflow_frac/{layer}/{kind}", 0.0) for layer in LAYERS]
                record[f"quant/underflow_frac/{kind}"] = sum(per_layer) / len(LAYERS)
                per_layer = [record.get(f"quant/overflow_frac/{layer}/{kind}", 0.0) for layer in LAYERS]
                record[f"quant/overflow_frac/{kind}"] = sum(per_layer) / len(LAYERS)
        if step % 5 == 0:
            for layer in LAYERS:
                record[f"stable_rank/{layer}.weight"] = rank - 0.1 * step
                record[f"effective_rank/{layer}.weight"] = 2 * rank - 0.1 * step
            record["stable_rank/min"] = rank - 0.1 * step
            record["effective_rank/min"] = 2 * rank - 0.1 * step
        records.append(record)
    return records


def summary_from(records: list[dict[str, Any]], name: str, status: str = "completed", **extra: Any) -> dict:
    """summary.json as the trainer writes it, computed from the records."""
    frame = pd.DataFrame(records)
    stall_columns = [f"stall_ratio/{layer}" for layer in LAYERS if f"stall_ratio/{layer}" in frame]
    summary = {
        "name": name,
        "status": status,
        "steps": int(frame["step"].max()),
        "precision": "fp32",
        "quant": QUANT_SUMMARY if "flips/total" in frame else None,
        "optimizer": "adamw",
        "final_train_loss": float(frame["train_loss"].iloc[-1]),
        "final_val_loss": float(frame["val_loss"].dropna().iloc[-1]),
        "best_val_loss": float(frame["val_loss"].min()),
        "final_val_ppl": float(frame["val_ppl"].dropna().iloc[-1]),
        "tokens_per_s": 1000.0,
        "total_flips": int(frame["flips/total"].sum()) if "flips/total" in frame else None,
        "mean_stall_ratio": float(frame[stall_columns].mean().mean()) if stall_columns else None,
        "min_stable_rank": float(frame["stable_rank/min"].min()),
        "min_effective_rank": float(frame["effective_rank/min"].min()),
        "first_rank_warning_step": None,
        "collapse_step": None,
        "collapse_reason": None,
        "format_shifts": [],
        "wall_time_s": 2.0,
    }
    summary.update(extra)
    return summary


def config_for(
    name: str,
    *,
    fmt: str | None = "E4M3",
    optimizer: str = "adamw",
    seed: int = 0,
    scaling: str = "delayed",
    rules: list[dict] | None = None,
    precision: str = "fp32",
    weight_storage: str | None = None,
) -> dict:
    """A resolved config.yaml like the trainer's (only the sections analysis reads, plus some others)."""
    return {
        "name": name,
        "seed": seed,
        "out_dir": "runs",
        "train": {"max_steps": 20, "precision": precision, "eval_interval": 5},
        "optimizer": {"name": optimizer, "betas": [0.9, 0.95], "weight_storage": weight_storage},
        "quant": {
            "enabled": fmt is not None,
            "weight": fmt,
            "activation": fmt,
            "grad": "E5M2",
            "scaling": scaling,
            "rules": rules or [],
        },
    }


def write_run(
    path: Path,
    config: dict | None,
    records: list[dict[str, Any]],
    events: list[dict[str, Any]] = (),
    summary: dict | None = None,
    tail: str = "",
) -> Path:
    """Write a run folder; ``tail`` is appended to metrics.jsonl verbatim (e.g. a cut-short line)."""
    path.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    lines = [json.dumps({k: (str(v) if v != v else v) for k, v in record.items()}) for record in records]
    (path / "metrics.jsonl").write_text("".join(line + "\n" for line in lines) + tail)
    (path / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def markdown_table(text: str, first_header: str) -> pd.DataFrame:
    """The first Markdown table of ``text`` whose first header is ``first_header`` (cells as text)."""
    lines = text.splitlines()
    for start, line in enumerate(lines[:-1]):
        cells = _cells(line)
        if cells and cells[0] == first_header and lines[start + 1].startswith("|-"):
            rows = []
            for row in lines[start + 2 :]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            return pd.DataFrame(rows, columns=cells)
    raise AssertionError(f"no table starting with column {first_header!r}")


def _cells(line: str) -> list[str]:
    if not line.startswith("|"):
        return []
    marker = "\x00"
    return [
        cell.strip().replace(marker, "|") for cell in line.replace("\\|", marker).strip()[1:-1].split("|")
    ]


@pytest.fixture(scope="session")
def synth() -> SimpleNamespace:
    """The helpers above, for tests."""
    return SimpleNamespace(
        LAYERS=LAYERS,
        metric_records=metric_records,
        summary_from=summary_from,
        config_for=config_for,
        write_run=write_run,
        markdown_table=markdown_table,
    )
