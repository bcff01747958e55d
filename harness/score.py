"""`harness score`: predictions made anywhere, scored with exactly the harness's metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.datasets.coco import load_coco_gt, read_json
from harness.datasets.images import read_label_png
from harness.datasets.voc import (
    SEG_CLASSES,
    VOC_CLASSES,
    load_voc_detection,
    read_image_set,
    segmentation_mask_path,
    voc_year,
)
from harness.errors import HarnessError
from harness.metrics.coco import coco_box_metrics, coco_keypoint_metrics
from harness.metrics.segmentation import confusion_matrix, segmentation_metrics
from harness.metrics.voc import voc_detection_metrics


def score_files(task: str, gt: str | Path, pred: str | Path, split: str | None = None, year: str | int | None = None) -> dict:
    """Metrics (percent) of a prediction file or folder against ground truth on disk."""
    if task in ("coco", "pose"):
        gt_data = load_coco_gt(gt)
        preds = read_json(pred, "prediction file")
        if task == "coco":
            return coco_box_metrics(gt_data, preds, source=str(pred), owned=True)
        return coco_keypoint_metrics(gt_data, preds, source=str(pred), owned=True)
    if split is None:
        raise HarnessError(f"--split is required for --task {task} (e.g. {'test' if task == 'voc' else 'val'})")
    if not Path(gt).is_dir():
        raise HarnessError(f"VOC folder not found: {gt} (expected VOCdevkit/VOC20xx)")
    if task == "voc":
        use_07 = int(year if year is not None else voc_year(gt)) < 2010
        preds = read_json(pred, "prediction file")
        return voc_detection_metrics(load_voc_detection(gt, split), preds, use_07, VOC_CLASSES, source=str(pred))
    if task == "seg":
        return score_segmentation_folder(gt, split, pred)
    raise HarnessError(f"unknown task {task!r}")


def score_segmentation_folder(voc_dir: str | Path, split: str, pred_dir: str | Path) -> dict:
    """mIoU of `<pred_dir>/<image id>.png` class-index maps over a VOC segmentation split."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise HarnessError(f"prediction folder not found: {pred_dir}")
    num_classes = len(SEG_CLASSES)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    for image_id in read_image_set(voc_dir, split, "Segmentation"):
        pred_path = pred_dir / f"{image_id}.png"
        if not pred_path.is_file():
            raise HarnessError(f"{pred_dir}: no prediction for image {image_id} (expected {pred_path.name})")
        gt_mask = read_label_png(segmentation_mask_path(voc_dir, image_id, split))
        try:
            cm += confusion_matrix(gt_mask, read_label_png(pred_path), num_classes)
        except HarnessError as exc:
            raise HarnessError(f"{pred_path}: {exc}") from None
    return segmentation_metrics(cm, SEG_CLASSES)


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
