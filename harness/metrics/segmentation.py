"""Semantic segmentation metrics from one confusion matrix (so ranks can all-reduce it).

mIoU is the mean IoU over the classes that occur in the ground truth or the prediction
(classes with an empty union have no IoU); mAcc is the mean per-class accuracy over the
classes present in the ground truth; aAcc is the pixel accuracy. Ground-truth pixels equal to
`ignore_index` (255 in VOC) are left out. All in percent.
"""

from __future__ import annotations

import numpy as np

from harness.errors import HarnessError


def confusion_matrix(gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """int64 [K, K] counts: rows are ground-truth classes, columns predicted classes."""
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if gt.shape != pred.shape:
        raise HarnessError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    valid = gt != ignore_index
    g = gt[valid].astype(np.int64)
    p = pred[valid].astype(np.int64)
    if g.size and (g.min() < 0 or g.max() >= num_classes):
        raise HarnessError(f"ground truth holds class {int(g.max())} outside 0..{num_classes - 1} (and not {ignore_index})")
    if p.size and (p.min() < 0 or p.max() >= num_classes):
        bad = int(p[(p < 0) | (p >= num_classes)][0])
        raise HarnessError(f"prediction holds class {bad} outside 0..{num_classes - 1} on a labelled pixel")
    return np.bincount(g * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_metrics(cm: np.ndarray, class_names=None) -> dict:
    """mIoU, aAcc, mAcc and per-class IoU (None where a class occurs in neither) from a confusion matrix."""
    cm = np.asarray(cm, dtype=np.float64)
    k = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    tp = np.diag(cm)
    gt_count = cm.sum(axis=1)
    pred_count = cm.sum(axis=0)
    union = gt_count + pred_count - tp
    total = cm.sum()
    if total == 0:
        raise HarnessError("no labelled pixel to score (every ground-truth pixel is ignored)")
    present = union > 0
    iou = np.where(present, tp / np.maximum(union, 1), np.nan)
    in_gt = gt_count > 0
    acc = np.where(in_gt, tp / np.maximum(gt_count, 1), np.nan)
    return {
        "mIoU": float(100.0 * np.nanmean(iou[present])),
        "aAcc": float(100.0 * tp.sum() / total),
        "mAcc": float(100.0 * np.mean(acc[in_gt])),
        "IoU_per_class": {n: (None if not present[i] else float(100.0 * iou[i])) for i, n in enumerate(names)},
    }
