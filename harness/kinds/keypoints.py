"""The keypoints kind: Keypoint R-CNN on COCO person keypoints (`coco_keypoints` layout).

Predictions are scored twice: keypoints by OKS, and the person boxes (as ``box_*`` metrics).
The R-CNN parts it shares with detection live in ``harness.kinds.detection``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from harness.errors import HarnessError
from harness.kinds.detection import aspect_groups, box_records, check_head_norm, check_neck, coco_datasets, rcnn_settings, \
    refuse_voc_options
from harness.metrics.coco import coco_box_metrics, coco_keypoint_metrics

if TYPE_CHECKING:
    from torch import nn

    from harness.cards import TaskCard

LAYOUTS = ("coco_keypoints",)
HEADS = ("fpn",)
MIN_IMAGES_PER_PROCESS = 1
MIN_IMAGES_REASON = ""
OWN_FIELDS = ("keypoint_head_layers", "keypoint_head_channels", "keypoint_pool_size")  # only this kind reads


def check_card(card: TaskCard) -> None:
    """Keypoint card rules beyond the schema (a ValueError names the profile and field)."""
    check_neck(card)
    check_head_norm(card, ("neck_channels", "keypoint_head_channels"))


def datasets(card: TaskCard, root: Path) -> tuple:
    """(train, test, train split name, test split name): COCO person keypoints under a data root,
    named as COCO's 17 in order (the flip swaps and the OKS sigmas are by position)."""
    from harness.datasets.shapes import COCO_KEYPOINTS

    train, test, *names = coco_datasets(card, root, keypoints=True)
    for ds in (train, test):
        if tuple(ds.keypoint_names) != COCO_KEYPOINTS:
            raise HarnessError(f"{ds.ann_file}: the keypoints are named {ds.keypoint_names}, not COCO's 17 in order "
                               f"({', '.join(COCO_KEYPOINTS)}), which the flip and the scoring follow")
    return train, test, *names


def train_groups(card: TaskCard, profile_name: str, train) -> list[int] | None:
    """Aspect-ratio groups of the training images when the profile asks for them."""
    return aspect_groups(train) if card.profile(profile_name).aspect_ratio_grouping else None


def settings(card: TaskCard, profile_name: str) -> tuple[dict, dict]:
    """Keyword arguments of ``build_model`` and of ``train_augment``; a keyword set by a card field
    has that field's name."""
    p = card.profile(profile_name)
    return {**rcnn_settings(card, profile_name), "keypoint_head_layers": p.keypoint_head_layers,
            "keypoint_head_channels": p.keypoint_head_channels, "keypoint_pool_size": p.keypoint_pool_size}, \
        {"flip_prob": 0.5 if p.flip else 0.0}


def build_model(backbone: nn.Module, **kwargs) -> nn.Module:
    """Keypoint R-CNN on ``backbone`` (``harness.models.pose.build_keypoint_model``)."""
    from harness.models.pose import build_keypoint_model

    return build_keypoint_model(backbone, **kwargs)


def train_augment(backbone: nn.Module, **kwargs) -> Callable:
    """Horizontal flip swapping left and right keypoints (``harness.models.pose.keypoint_train_augment``)."""
    from harness.models.pose import keypoint_train_augment

    return keypoint_train_augment(**kwargs)


def postprocess(card: TaskCard, test) -> Callable:
    """``fn(output, target)``: one image's person boxes and keypoints, as COCO results records
    (keypoints back to COCO's pixel indices)."""
    from harness.models.pose import keypoints_to_pixel_indices

    person = test.category_ids[0]

    def keypoints(output, target):
        boxes = box_records(output, target["image_id"], lambda _: person)
        kps = keypoints_to_pixel_indices(output["keypoints"]).tolist()
        return {"boxes": boxes, "keypoints": [
            {"image_id": target["image_id"], "category_id": person, "score": b["score"],
             "keypoints": [v for point in k for v in point]} for b, k in zip(boxes, kps)]}

    return keypoints


def score_records(card: TaskCard, test, records: list) -> dict:
    """Keypoint metrics (OKS) and the person boxes' metrics as ``box_*``, in percent."""
    metrics = coco_keypoint_metrics(test.gt, [p for r in records for p in r["keypoints"]])
    boxes = coco_box_metrics(test.gt, [p for r in records for p in r["boxes"]])
    return {**metrics, **{f"box_{k}": v for k, v in boxes.items()}}


def score_files(card: TaskCard, gt: str | Path, pred: str | Path, split: str | None = None,
                year: str | int | None = None) -> dict:
    """Keypoint metrics (OKS) of a COCO results file against a person_keypoints annotation file."""
    from harness.datasets.coco import load_coco_gt, read_json

    refuse_voc_options(split, year)
    return coco_keypoint_metrics(load_coco_gt(gt), read_json(pred, "prediction file"), source=str(pred), owned=True)
