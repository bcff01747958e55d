"""`harness score`: predictions made anywhere, scored with exactly the harness's metrics."""

from __future__ import annotations

from pathlib import Path

from harness.cards import task_card
from harness.kinds import KINDS


def score_files(task: str, gt: str | Path, pred: str | Path, split: str | None = None, year: str | int | None = None) -> dict:
    """Metrics (percent) of a prediction file or folder against ground truth on disk, scored as the
    task card's kind scores (``--task voc_fpn`` scores as ``voc``)."""
    card = task_card(task)
    return KINDS[card.model.kind].score_files(card, gt, pred, split=split, year=year)


def format_metrics_table(task: str, metrics: dict) -> str:
    """A readable two-column table; per-class dictionaries follow the summary metrics."""
    lines = [f"{task} metrics (percent)"]
    width = max(len(k) for k in metrics) + 2
    nested = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            nested[key] = value
        else:
            lines.append(f"  {key:<{width}}{_fmt(value)}")
    for key, values in nested.items():
        lines.append(f"  {key}:")
        inner = max(len(k) for k in values) + 2
        lines.extend(f"    {name:<{inner}}{_fmt(v)}" for name, v in values.items())
    return "\n".join(lines)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:7.3f}"
