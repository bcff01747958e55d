"""PASCAL VOC detection AP with the semantics of detectron2's PascalVOCDetectionEvaluator.

Predictions come in the COCO results format (bbox [x, y, w, h], 0-based continuous pixels,
`image_id` the VOC id string, `category_id` 1..20 in VOC_CLASSES order). They are compared with
the devkit's 1-based inclusive ground-truth boxes as detectron2 does: (x + 1, y + 1, x + w, y + h).
For each class, detections in descending score order are matched greedily to the ground truth
box of highest IoU (devkit IoU with the +1 pixel convention, strictly above the threshold);
a match to a `difficult` box neither helps nor hurts; a second match to the same box is a false
positive. AP is the 11-point interpolation for VOC2007 and the area under the monotone
precision envelope for VOC2010+. `AP` is the mean over IoU 0.50:0.05:0.95.

A class with no non-difficult ground truth in the split has no defined AP (detectron2 yields
NaN and a NaN mean); here it is reported as None and left out of the means, with a warning.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import numpy as np

from harness.errors import HarnessError, HarnessWarning
from harness.metrics import json_numbers

IOU_THRESHOLDS = tuple(t / 100 for t in range(50, 100, 5))


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """The devkit's AP from a recall/precision curve."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            above = recall >= t
            ap += (np.max(precision[above]) if above.any() else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([0.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    change = np.flatnonzero(mrec[1:] != mrec[:-1])
    return float(np.sum((mrec[change + 1] - mrec[change]) * mpre[change + 1]))


def _iou_devkit(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """IoU matrix [D, G] with the devkit's inclusive-pixel (+1) widths."""
    ixmin = np.maximum(boxes[:, None, 0], gt[None, :, 0])
    iymin = np.maximum(boxes[:, None, 1], gt[None, :, 1])
    ixmax = np.minimum(boxes[:, None, 2], gt[None, :, 2])
    iymax = np.minimum(boxes[:, None, 3], gt[None, :, 3])
    inter = np.maximum(ixmax - ixmin + 1.0, 0.0) * np.maximum(iymax - iymin + 1.0, 0.0)
    area_d = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
    area_g = (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0)
    return inter / (area_d[:, None] + area_g[None, :] - inter)


def _class_ap(dets: list[tuple[str, float, np.ndarray]], gts: dict, npos: int, use_07_metric: bool) -> list[float]:
    """AP of one class at every IoU threshold.

    dets: (image_id, score, devkit box); gts: image_id -> (boxes [G,4], difficult [G]).
    The best-overlapping ground-truth box of a detection does not depend on the threshold or on
    earlier matches (the devkit takes the max over all boxes), so matching is vectorised per threshold.
    """
    if not dets:
        return [0.0] * len(IOU_THRESHOLDS)
    scores = np.array([d[1] for d in dets])
    order = np.argsort(-scores, kind="stable")
    ovmax = np.full(len(dets), -np.inf)
    gt_key = np.full(len(dets), -1, dtype=np.int64)  # a unique index for each (image, gt box)
    gt_difficult = np.zeros(len(dets), dtype=bool)
    by_image: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(dets):
        by_image[d[0]].append(i)
    offset = 0
    for image_id, idx in by_image.items():
        boxes, difficult = gts.get(image_id, (np.zeros((0, 4)), np.zeros(0, dtype=bool)))
        if len(boxes):
            iou = _iou_devkit(np.stack([dets[i][2] for i in idx]), boxes)
            j = iou.argmax(axis=1)
            ovmax[idx] = iou[np.arange(len(idx)), j]
            gt_key[idx] = offset + j
            gt_difficult[idx] = difficult[j]
        offset += len(boxes)
    ovmax, gt_key, gt_difficult = ovmax[order], gt_key[order], gt_difficult[order]
    aps = []
    for thr in IOU_THRESHOLDS:
        matched = ovmax > thr
        candidate = matched & ~gt_difficult
        tp = np.zeros(len(dets), dtype=bool)
        cand_idx = np.flatnonzero(candidate)
        _, first = np.unique(gt_key[cand_idx], return_index=True)
        tp[cand_idx[first]] = True
        fp = ~matched | (candidate & ~tp)  # matches to difficult boxes count as neither
        tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
        recall = tp_cum / float(npos)
        precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
        aps.append(voc_ap(recall, precision, use_07_metric))
    return aps


def voc_detection_metrics(
    annotations, preds: list[dict], use_07_metric: bool, class_names, source: str = "predictions"
) -> dict:
    """AP, AP50, AP75 (percent) and per-class AP50 from devkit annotations and COCO-format predictions.

    annotations: iterable of objects with `image_id` and `objects` (name, difficult, 1-based box),
    as `harness.datasets.voc.load_voc_detection` returns.
    """
    validate_voc_predictions(annotations, preds, len(class_names), source)
    gts: dict[str, dict] = {name: {} for name in class_names}
    npos = dict.fromkeys(class_names, 0)
    for ann in annotations:
        per_class: dict[str, list] = defaultdict(list)
        for obj in ann.objects:
            per_class[obj.name].append(obj)
        for name, objs in per_class.items():
            gts[name][ann.image_id] = (
                np.array([o.box for o in objs], dtype=np.float64),
                np.array([o.difficult for o in objs], dtype=bool),
            )
            npos[name] += sum(not o.difficult for o in objs)
    dets: dict[str, list] = {name: [] for name in class_names}
    for p in preds:
        x, y, w, h = (float(v) for v in p["bbox"])
        dets[class_names[p["category_id"] - 1]].append(
            (p["image_id"], float(p["score"]), np.array([x + 1.0, y + 1.0, x + w, y + h]))
        )
    if not preds:
        warnings.warn("empty prediction list: every AP is 0", HarnessWarning, stacklevel=2)
    per_class_aps: dict[str, list[float] | None] = {}
    for name in class_names:
        if npos[name] == 0:
            per_class_aps[name] = None
            continue
        per_class_aps[name] = _class_ap(dets[name], gts[name], npos[name], use_07_metric)
    missing = [n for n, v in per_class_aps.items() if v is None]
    if missing:
        warnings.warn(f"no non-difficult ground truth for {', '.join(missing)}: left out of the mean", HarnessWarning,
                      stacklevel=2)
    defined = np.array([v for v in per_class_aps.values() if v is not None])
    if not len(defined):
        raise HarnessError(f"{source}: the ground truth has no non-difficult object: nothing to score")
    mean_per_thr = defined.mean(axis=0) * 100.0
    return {
        "AP": float(mean_per_thr.mean()),
        "AP50": float(mean_per_thr[0]),
        "AP75": float(mean_per_thr[IOU_THRESHOLDS.index(0.75)]),
        "AP50_per_class": {n: (None if v is None else 100.0 * v[0]) for n, v in per_class_aps.items()},
    }


def validate_voc_predictions(annotations, preds, num_classes: int, source: str) -> None:
    """Every prediction names an image of the split and a class 1..num_classes, with a finite, non-negative box."""
    if not isinstance(preds, list):
        raise HarnessError(f"{source}: expected a JSON list of COCO-format results, got {type(preds).__name__}")
    image_ids = {ann.image_id for ann in annotations}
    for i, p in enumerate(preds):
        where = f"{source}: entry {i} {str(p)[:160]}"
        if not isinstance(p, dict) or any(k not in p for k in ("image_id", "category_id", "bbox", "score")):
            raise HarnessError(f"{where} lacks one of image_id, category_id, bbox, score")
        if not isinstance(p["image_id"], str) or p["image_id"] not in image_ids:
            raise HarnessError(f"{where} names image_id {p['image_id']!r}, which is not in the split")
        if type(p["category_id"]) is not int or not 1 <= p["category_id"] <= num_classes:
            raise HarnessError(f"{where} has category_id {p['category_id']!r}; VOC uses 1..{num_classes}")
        if not (json_numbers(p["bbox"], scalar=False) and json_numbers(p["score"], scalar=True)):
            raise HarnessError(f"{where} has a bbox that is not a list of numbers, or a score that is not a number")
        values = [float(v) for v in p["bbox"]] + [float(p["score"])]
        if len(values) != 5 or not np.isfinite(values).all():
            raise HarnessError(f"{where} has a bbox that is not 4 finite numbers, or a non-finite score")
        if values[2] < 0 or values[3] < 0:
            raise HarnessError(f"{where} has a negative-size bbox")
