"""A yardstick for the pose task's keypoint AP: the mean pose, placed in every ground-truth person box.

    python bench/pose_prior.py --data runs/demo/synthetic-data     # a few seconds

The mean of the training set's labelled keypoints, each relative to its person's box, is drawn into
every non-crowd person box of the test split (score 1, the box itself as the detection), and scored
with the same pycocotools OKS evaluation as `harness eval`. A model whose keypoint AP is at this
level has learnt where keypoints are on average, not where they are in the image; it had perfect
boxes for free. Any COCO-layout root works (`--data` holds `coco/annotations` or `annotations`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def mean_relative_pose(gt: dict) -> np.ndarray:
    """(K, 2) mean of labelled keypoints as fractions of their box's width and height."""
    rows = []
    for ann in gt["annotations"]:
        if ann.get("num_keypoints", 0) == 0 or ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        kps = np.asarray(ann["keypoints"], float).reshape(-1, 3)
        rel = np.full((len(kps), 2), np.nan)
        seen = kps[:, 2] > 0
        rel[seen] = (kps[seen, :2] - (x, y)) / (w, h)
        rows.append(rel)
    if not rows:
        raise SystemExit("error: the training split has no labelled keypoints")
    return np.nanmean(np.stack(rows), axis=0)


def prior_predictions(gt: dict, pose: np.ndarray) -> list[dict]:
    preds = []
    for ann in gt["annotations"]:
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = ann["bbox"]
        points = np.column_stack([x + pose[:, 0] * w, y + pose[:, 1] * h, np.ones(len(pose))])
        preds.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "bbox": [x, y, w, h],
                      "keypoints": points.ravel().tolist(), "score": 1.0})
    return preds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo/synthetic-data", help="a COCO 2017 root (or a harness data root)")
    ap.add_argument("--train", default="person_keypoints_train2017.json")
    ap.add_argument("--test", default="person_keypoints_val2017.json")
    args = ap.parse_args(argv)
    from harness.metrics.coco import coco_keypoint_metrics

    root = Path(args.data)
    ann_dir = next((d for d in (root / "coco" / "annotations", root / "annotations") if d.is_dir()), None)
    if ann_dir is None:
        print(f"error: no annotations folder under {root} (looked for coco/annotations and annotations)", file=sys.stderr)
        return 2
    train, test = (json.loads((ann_dir / name).read_text()) for name in (args.train, args.test))
    metrics = coco_keypoint_metrics(test, prior_predictions(test, mean_relative_pose(train)), source="mean pose")
    scored = sum(1 for a in test["annotations"] if a.get("num_keypoints", 0) > 0 and not a.get("iscrowd", 0)
                 and a["area"] >= 32 ** 2)
    print(f"mean pose in ground-truth boxes, {ann_dir / args.test}: {scored} people scored (area >= 32^2)")
    print("  " + "  ".join(f"{k} {metrics[k]:.2f}" for k in ("AP", "AP50", "AP75", "AR", "AR50")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
