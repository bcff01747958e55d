"""COCO box and keypoint metrics, equal to pycocotools (computed with faster-coco-eval's C++ core).

Predictions use the COCO results format. They are validated before scoring: an unknown
image or category id, a NaN, or a negative-size box is an error naming the first offending
entry, never a silently dropped prediction.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from harness.errors import HarnessError

BOX_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
KEYPOINT_METRICS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def _entry(preds: Sequence[dict], i: int) -> str:
    text = repr(preds[i])
    return f"entry {i} {text[:160]}{'...' if len(text) > 160 else ''}"


def validate_predictions(gt: dict, preds, kind: str, source: str = "predictions") -> None:
    """Check a COCO results list against the ground truth; raise HarnessError on the first bad entry.

    kind: "bbox" or "keypoints".
    """
    if not isinstance(preds, list):
        raise HarnessError(f"{source}: expected a JSON list of COCO results, got {type(preds).__name__}")
    image_ids = {img["id"] for img in gt["images"]}
    field = "bbox" if kind == "bbox" else "keypoints"
    length = {cat["id"]: (4 if kind == "bbox" else 3 * len(cat.get("keypoints", ()))) for cat in gt["categories"]}
    for i, p in enumerate(preds):
        if not isinstance(p, dict):
            raise HarnessError(f"{source}: {_entry(preds, i)} is not an object")
        for key in ("image_id", "category_id", field, "score"):
            if key not in p:
                raise HarnessError(f"{source}: {_entry(preds, i)} has no '{key}'")
        if p["image_id"] not in image_ids:
            raise HarnessError(
                f"{source}: {_entry(preds, i)} names image_id {p['image_id']!r}, which is not in the ground truth"
            )
        if p["category_id"] not in length:
            raise HarnessError(
                f"{source}: {_entry(preds, i)} names category_id {p['category_id']!r}, "
                f"which is not in the ground truth (ids: {sorted(length)[:20]})"
            )
        if not isinstance(p[field], list) or len(p[field]) != length[p["category_id"]]:
            expected = "[x, y, w, h]" if kind == "bbox" else f"{length[p['category_id']]} numbers (x, y, v per keypoint)"
            raise HarnessError(f"{source}: {_entry(preds, i)} {field} is not {expected}")
    if not preds:
        return
    # Numeric checks, vectorised: COCO-sized files hold hundreds of thousands of entries.
    for key in (field, "score"):
        try:
            values = np.asarray([p[key] for p in preds], dtype=np.float64).reshape(len(preds), -1)
        except (TypeError, ValueError):
            _first_bad(preds, source, lambda p: not _numeric(p[key]), f"has a non-numeric '{key}'")
            raise
        _raise_first(preds, source, ~np.isfinite(values).all(axis=1), f"has a NaN or infinite '{key}'")
        if key == "bbox":
            _raise_first(preds, source, (values[:, 2] < 0) | (values[:, 3] < 0), "has a negative-size bbox")


def _numeric(value) -> bool:
    try:
        np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        return False
    return True


def _raise_first(preds, source: str, mask: np.ndarray, what: str) -> None:
    if mask.any():
        i = int(np.flatnonzero(mask)[0])
        raise HarnessError(f"{source}: {_entry(preds, i)} {what}")


def _first_bad(preds, source: str, is_bad, what: str) -> None:
    for i, p in enumerate(preds):
        if is_bad(p):
            raise HarnessError(f"{source}: {_entry(preds, i)} {what}")


def _evaluate(gt: dict, preds: list[dict], iou_type: str, names: Sequence[str]) -> dict[str, float | None]:
    """Run the COCO evaluation; metrics in percent, None where pycocotools reports -1 (no ground truth)."""
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(gt)
    if not preds:
        warnings.warn("empty prediction list: every metric is 0", stacklevel=3)
    # loadRes annotates entries (id, area, segmentation) in place: hand it copies.
    coco_dt = coco_gt.loadRes([dict(p) for p in preds])
    evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=lambda *a, **k: None)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    stats = list(evaluator.stats)[: len(names)]
    return {name: (None if s < 0 else 100.0 * float(s)) for name, s in zip(names, stats)}


def coco_box_metrics(gt: dict, preds: list[dict], source: str = "predictions") -> dict[str, float | None]:
    """Box AP/AR as in pycocotools' summarize() (percent): AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l."""
    validate_predictions(gt, preds, "bbox", source)
    return _evaluate(gt, preds, "bbox", BOX_METRICS)


def coco_keypoint_metrics(gt: dict, preds: list[dict], source: str = "predictions") -> dict[str, float | None]:
    """Keypoint OKS AP/AR as in pycocotools' summarize() (percent): AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl."""
    validate_predictions(gt, preds, "keypoints", source)
    if not any(cat.get("keypoints") for cat in gt["categories"]):
        raise HarnessError("ground truth has no category with keypoints: is this a person_keypoints file?")
    return _evaluate(gt, preds, "keypoints", KEYPOINT_METRICS)

