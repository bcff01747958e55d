"""COCO box and keypoint metrics, equal to pycocotools (computed with faster-coco-eval's C++ core).

Predictions use the COCO results format. They are validated before scoring: an unknown
image or category id, a NaN, or a negative-size box is an error naming the first offending
entry, never a silently dropped prediction.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from itertools import chain

import numpy as np

from harness.errors import HarnessError, HarnessWarning
from harness.gcpause import gc_paused
from harness.metrics import json_numbers, member, real_types

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
    columns = _well_formed_columns(preds, image_ids, length, field)
    if columns is None:  # something is wrong: find the first offending entry, checking entry by entry
        _first_malformed(preds, source, image_ids, length, field)
        columns = {key: [p[key] for p in preds] for key in (field, "score")}
    if not preds:
        return
    # Numeric checks, vectorised: COCO-sized files hold hundreds of thousands of entries.
    for key in (field, "score"):
        numbers = chain.from_iterable(columns[key]) if key == field else columns[key]
        if not real_types(set(map(type, numbers))):  # not "0.5", true or [0.5], which numpy would take
            what = "a number" if key == "score" else "a list of numbers"
            _first_bad(preds, source, lambda p: not json_numbers(p[key], key == "score"), f"'{key}' is not {what}")
        values = np.asarray(columns[key], dtype=np.float64).reshape(len(preds), -1)
        _raise_first(preds, source, ~np.isfinite(values).all(axis=1), f"has a NaN or infinite '{key}'")
        if key == "bbox":
            _raise_first(preds, source, (values[:, 2] < 0) | (values[:, 3] < 0), "has a negative-size bbox")


def _well_formed_columns(preds: list, image_ids: set, length: dict, field: str) -> dict | None:
    """The entries' fields as columns when every entry passes the structural checks of
    `_first_malformed`, else None. Whole-column set and length tests: a few C loops instead of a
    Python loop with eight tests per entry."""
    try:
        if not all(isinstance(p, dict) for p in preds):
            return None
        columns = {key: [p[key] for p in preds] for key in ("image_id", "category_id", field, "score")}
        if not (set(columns["image_id"]) <= image_ids and set(columns["category_id"]) <= length.keys()):
            return None
    except (KeyError, TypeError):  # a missing key; an unhashable id
        return None
    values = columns[field]
    if not all(isinstance(v, list) for v in values):
        return None
    if len(set(length.values())) == 1:
        expected = next(iter(length.values()), 0)
        if any(len(v) != expected for v in values):
            return None
    elif list(map(len, values)) != [length[c] for c in columns["category_id"]]:
        return None
    return columns


def _first_malformed(preds: list, source: str, image_ids: set, length: dict, field: str) -> None:
    """Raise HarnessError on the first entry that is not an object with known ids and a field of the right length."""
    for i, p in enumerate(preds):
        if not isinstance(p, dict):
            raise HarnessError(f"{source}: {_entry(preds, i)} is not an object")
        for key in ("image_id", "category_id", field, "score"):
            if key not in p:
                raise HarnessError(f"{source}: {_entry(preds, i)} has no '{key}'")
        if not member(p["image_id"], image_ids):
            raise HarnessError(
                f"{source}: {_entry(preds, i)} names image_id {p['image_id']!r}, which is not in the ground truth"
            )
        if not member(p["category_id"], length):
            raise HarnessError(
                f"{source}: {_entry(preds, i)} names category_id {p['category_id']!r}, "
                f"which is not in the ground truth (ids: {sorted(length)[:20]})"
            )
        if not isinstance(p[field], list) or len(p[field]) != length[p["category_id"]]:
            expected = "[x, y, w, h]" if field == "bbox" else f"{length[p['category_id']]} numbers (x, y, v per keypoint)"
            raise HarnessError(f"{source}: {_entry(preds, i)} {field} is not {expected}")


def _raise_first(preds, source: str, mask: np.ndarray, what: str) -> None:
    if mask.any():
        i = int(np.flatnonzero(mask)[0])
        raise HarnessError(f"{source}: {_entry(preds, i)} {what}")


def _first_bad(preds, source: str, is_bad, what: str) -> None:
    for i, p in enumerate(preds):
        if is_bad(p):
            raise HarnessError(f"{source}: {_entry(preds, i)} {what}")


def _evaluate(gt: dict, preds: list[dict], iou_type: str, names: Sequence[str], owned: bool) -> dict[str, float | None]:
    """Run the COCO evaluation; metrics in percent, None where pycocotools reports -1 (no ground truth)."""
    from faster_coco_eval import COCO, COCOeval_faster

    if not preds:
        warnings.warn("empty prediction list: every AP and AR is 0 (None where there is no ground truth)",
                      HarnessWarning, stacklevel=3)
    with gc_paused():
        coco_gt = COCO(gt)
        # loadRes annotates entries (id, area, segmentation) in place: hand it copies unless they are ours.
        coco_dt = coco_gt.loadRes(preds if owned else [dict(p) for p in preds])
        evaluator = COCOeval_faster(coco_gt, coco_dt, iou_type, print_function=lambda *a, **k: None)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = list(evaluator.stats)[: len(names)]
    return {name: (None if s < 0 else 100.0 * float(s)) for name, s in zip(names, stats)}


def coco_box_metrics(gt: dict, preds: list[dict], source: str = "predictions", owned: bool = False) -> dict[str, float | None]:
    """Box AP/AR as in pycocotools' summarize() (percent): AP, AP50, AP75, APs/m/l, AR1/10/100, ARs/m/l.

    owned=True hands the entries over (e.g. just read from a file): the evaluation may annotate
    them in place instead of copying them.
    """
    validate_predictions(gt, preds, "bbox", source)
    return _evaluate(gt, preds, "bbox", BOX_METRICS, owned)


def coco_keypoint_metrics(gt: dict, preds: list[dict], source: str = "predictions", owned: bool = False) -> dict[str, float | None]:
    """Keypoint OKS AP/AR as in pycocotools' summarize() (percent): AP, AP50, AP75, APm, APl, AR, AR50, AR75, ARm, ARl.

    owned: as for `coco_box_metrics`.
    """
    if not any(cat.get("keypoints") for cat in gt["categories"]):
        raise HarnessError("ground truth has no category with keypoints: is this a person_keypoints file?")
    validate_predictions(gt, preds, "keypoints", source)
    return _evaluate(gt, preds, "keypoints", KEYPOINT_METRICS, owned)

