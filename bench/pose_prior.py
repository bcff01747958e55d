"""A yardstick for the pose task's keypoint AP: the mean pose, placed in every ground-truth person box.

    python bench/pose_prior.py --data runs/demo/synthetic-data     # a few seconds

The mean of the training set's labelled keypoints, each relative to its person's box, is drawn into
every non-crowd person box of the test split (score 1, the box itself as the detection), and scored
with the same pycocotools OKS evaluation as `harness eval`. A model whose keypoint AP is at this
level has learnt where keypoints are on average, not where they are in the image; it had perfect
boxes for free. Any COCO-layout root works (`--data` holds `coco/annotations` or `annotations`).

    python bench/pose_prior.py --data runs/demo/synthetic-data --run runs/demo/pose/frozen/seed0

With ``--run`` (a finished pose run: ``result.json`` and ``checkpoint.pt``; ``--data`` is then the
harness data root it was evaluated on) the run's model is rebuilt from its card and checkpoint and
scored three ways: as `harness eval` scores it, the mean pose drawn into its own boxes, and its
keypoint head run on the true boxes. Whether a low keypoint AP comes from the person detector or
from the keypoint head is then plain to see.
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
    """The mean pose in every non-crowd ground-truth box, score 1."""
    boxes = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
             for a in gt["annotations"] if not a.get("iscrowd", 0)]
    return _in_boxes(pose, boxes)


def _in_boxes(pose: np.ndarray, boxes: list[dict]) -> list[dict]:
    """The mean pose drawn into each box record (``bbox`` xywh), keeping its image, class and score."""
    out = []
    for b in boxes:
        x, y, w, h = b["bbox"]
        points = np.column_stack([x + pose[:, 0] * w, y + pose[:, 1] * h, np.ones(len(pose))])
        out.append({**b, "keypoints": points.ravel().tolist()})
    return out


def score_run(run: Path, data_root: Path, pose: np.ndarray, backbone: str | None = None) -> dict[str, dict]:
    """Keypoint metrics of a finished pose run: its own predictions, the mean pose in its own boxes,
    and its keypoint head on the ground-truth boxes. ``backbone``: the ``--backbone`` the run was
    given (needed for a checkpoint file, whose build options the result does not record)."""
    import torch
    from torchvision.models.detection.roi_heads import keypointrcnn_inference

    from harness.checkpoints import load_backbone
    from harness.cards import task_card
    from harness.engine import predict
    from harness.metrics.coco import coco_keypoint_metrics
    from harness.results import read_result
    from harness.kinds import keypoints
    from harness.runner import task_data

    result = read_result(run / "result.json")
    card = task_card(result.task)
    if card.model.kind != "keypoints":
        raise SystemExit(f"error: {run} is a {result.task} run, not a keypoint one")
    if card.card_hash != result.card_hash:
        raise SystemExit(f"error: {run} was made with another {result.task} card than tasks/{result.task}.yaml")
    if backbone is None and result.backbone.layout != "random":
        raise SystemExit(f"error: {run} used the checkpoint {result.backbone.name}: pass it as --backbone")
    base = load_backbone(backbone or result.backbone.name, arch=result.backbone.arch)
    if (base.arch, base.checkpoint["sha256"]) != (result.backbone.arch, result.backbone.sha256):
        raise SystemExit(f"error: --backbone is not the backbone of {run} ({result.backbone.arch}, {result.backbone.sha256})")
    test = task_data(card, data_root, result.profile).test
    model_kwargs, _ = keypoints.settings(card, result.profile)
    model = keypoints.build_model(base, **model_kwargs)
    model.load_state_dict(torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["model"])
    records = predict(model.eval(), test, postprocess=keypoints.postprocess(card, test), progress=False)
    own = [p for r in records for p in r["keypoints"]]
    boxes = [b for r in records for b in r["boxes"]]
    people: dict = {}
    for a in test.gt["annotations"]:
        if not a.get("iscrowd", 0):
            people.setdefault(a["image_id"], []).append(a)
    truth = []
    with torch.inference_mode():
        for i in range(len(test)):
            image, target = test[i]
            anns = people.get(target["image_id"], [])
            if not anns:
                continue
            xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)], dtype=torch.float32)
            batch, resized = model.transform([image], [{"boxes": xyxy, "labels": torch.ones(len(anns), dtype=torch.int64)}])
            features = model.backbone(batch.tensors)
            heads = model.roi_heads
            rois = [resized[0]["boxes"]]
            logits = heads.keypoint_predictor(heads.keypoint_head(heads.keypoint_roi_pool(features, rois, batch.image_sizes)))
            points, _ = keypointrcnn_inference(logits, rois)
            back = model.transform.postprocess([{"boxes": rois[0], "keypoints": points[0]}], batch.image_sizes,
                                               [tuple(image.shape[-2:])])[0]["keypoints"]
            for ann, kps in zip(anns, back):
                kps = kps.clone()
                kps[:, 2] = 1
                truth.append({"image_id": ann["image_id"], "category_id": ann["category_id"], "score": 1.0,
                              "keypoints": kps.ravel().tolist()})
    return {
        "its own boxes and keypoints (as harness eval)": coco_keypoint_metrics(test.gt, own, source=str(run)),
        "the mean pose in its own boxes": coco_keypoint_metrics(test.gt, _in_boxes(pose, boxes), source="mean pose"),
        "its keypoint head on the true boxes": coco_keypoint_metrics(test.gt, truth, source="true boxes"),
    }


def _line(metrics: dict) -> str:
    return "  ".join(f"{k} {metrics[k]:.2f}" for k in ("AP", "AP50", "AP75", "AR", "AR50"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="runs/demo/synthetic-data", help="a COCO 2017 root (or a harness data root)")
    ap.add_argument("--train", default="person_keypoints_train2017.json")
    ap.add_argument("--test", default="person_keypoints_val2017.json")
    ap.add_argument("--run", type=Path, help="a finished pose run folder (result.json, checkpoint.pt) to score too")
    ap.add_argument("--backbone", help="with --run: the checkpoint the run's --backbone named (random:<arch> runs need none)")
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
    print("  " + _line(metrics))
    if args.run:
        for name, run_metrics in score_run(args.run, root, mean_relative_pose(train), args.backbone).items():
            print(f"{args.run}, {name}:\n  {_line(run_metrics)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
