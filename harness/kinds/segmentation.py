"""The segmentation kind: DeepLabV3 on PASCAL VOC 2012 (`voc_segmentation` layout), scored by mIoU.

A prediction's record is its confusion matrix, so rank 0 gathers one small array per image.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from harness.datasets import roots
from harness.errors import HarnessError
from harness.kinds.detection import voc_sets
from harness.metrics.segmentation import confusion_matrix, segmentation_metrics

if TYPE_CHECKING:
    from torch import nn

    from harness.cards import TaskCard

LAYOUTS = ("voc_segmentation",)
HEADS = ("aspp",)
MIN_IMAGES_PER_PROCESS = 2  # without SyncBatchNorm, per process and micro-batch
MIN_IMAGES_REASON = "the ASPP head's BatchNorm"
# profile fields only this kind reads; a card of another kind that sets one is refused
OWN_FIELDS = ("output_stride", "aspp_dilations", "aux_channels", "aux_loss_weight", "dropout", "cat_max_ratio",
              "photometric_distortion")


def check_card(card: TaskCard) -> None:
    """Segmentation card rules beyond the schema (a ValueError names the profile and field)."""
    for name, p in card.profiles.items():
        if p.head_norm != "none":  # an R-CNN setting (harness.kinds.detection.check_head_norm)
            raise ValueError(f"profile {name}: head_norm {p.head_norm} needs an FPN head, not {card.model.head}")
        if p.crop_size is None:
            raise ValueError(f"profile {name}: segmentation needs crop_size")
        if p.neck_channels is None:
            raise ValueError(f"profile {name}: neck_channels (the ASPP's width) is required")


def datasets(card: TaskCard, root: Path) -> tuple:
    """(train, test, train split name, test split name) of VOC2012 under a data root; ``train_aug``
    comes from its list file or, without one, from SBD."""
    from harness.datasets.voc import VOCSegmentation

    spec = card.dataset
    roots.require(root, "VOC2012")
    (voc12, train_split), (_, test_split) = voc_sets(root, spec.train.sets)[0], voc_sets(root, spec.test.sets)[0]
    sbd = None
    if train_split == "train_aug" and not (voc12 / "ImageSets/Segmentation/train_aug.txt").is_file():
        roots.require(root, "SBD (train_aug)")
        sbd = roots.sbd_dir(root)
    return (VOCSegmentation(voc12, train_split, sbd_dir=sbd), VOCSegmentation(voc12, test_split),
            spec.train.name, spec.test.name)


def train_groups(card: TaskCard, profile_name: str, train) -> None:
    """None: segmentation trains on square crops."""
    return None


def settings(card: TaskCard, profile_name: str) -> tuple[dict, dict]:
    """Keyword arguments of ``build_model`` and of ``train_augment``; a keyword set by a card field
    has that field's name."""
    p = card.profile(profile_name)
    model = {"num_classes": card.dataset.num_classes + 1, "neck_channels": p.neck_channels,
             "output_stride": p.output_stride, "aspp_dilations": p.aspp_dilations, "aux_channels": p.aux_channels,
             "aux_loss_weight": p.aux_loss_weight, "dropout": p.dropout, "test_min_size": p.test_min_size,
             "max_size": p.max_size}
    aug = {"crop_size": p.crop_size, "scale": (p.max_size, p.min_size[0]), "ratio_range": tuple(p.scale_range),
           "cat_max_ratio": p.cat_max_ratio, "photometric_distortion": p.photometric_distortion,
           "flip_prob": 0.5 if p.flip else 0.0}
    return model, aug


def build_model(backbone: nn.Module, **kwargs) -> nn.Module:
    """DeepLabV3 on ``backbone`` (``harness.models.segmentation.build_segmenter``)."""
    from harness.models.segmentation import build_segmenter

    return build_segmenter(backbone, **kwargs)


def train_augment(backbone: nn.Module, **kwargs) -> Callable:
    """mmseg's training pipeline (``harness.models.segmentation.segmentation_train_augment``),
    padding with ``backbone``'s mean colour (mmseg 0.x pads after Normalize: 0 there)."""
    from harness.models.detection import pad_colour
    from harness.models.segmentation import segmentation_train_augment

    return segmentation_train_augment(**kwargs, pad_value=pad_colour(backbone))


def postprocess(card: TaskCard, test) -> Callable:
    """``fn(logits, mask)``: one image's confusion matrix over the card's classes + background."""
    k = card.dataset.num_classes + 1

    def seg(output, target):
        labels = output.argmax(0).cpu().numpy()
        return confusion_matrix(target.cpu().numpy(), labels, k)

    return seg


def score_records(card: TaskCard, test, records: list) -> dict:
    """mIoU, aAcc, mAcc and per-class IoU (percent) of the summed confusion matrices."""
    from harness.datasets.voc import SEG_CLASSES

    return segmentation_metrics(sum(records), SEG_CLASSES)


def score_files(card: TaskCard, gt: str | Path, pred: str | Path, split: str | None = None,
                year: str | int | None = None) -> dict:
    """mIoU of a folder of ``<image id>.png`` class-index maps over a VOC segmentation split."""
    if split is None:
        raise HarnessError(f"--split is required for --task {card.name} (e.g. val)")
    if year is not None:
        raise HarnessError("--year picks VOC detection's AP definition; mIoU has one definition")
    if not Path(gt).is_dir():
        raise HarnessError(f"VOC folder not found: {gt} (expected VOCdevkit/VOC20xx)")
    return score_segmentation_folder(gt, split, pred)


def score_segmentation_folder(voc_dir: str | Path, split: str, pred_dir: str | Path) -> dict:
    """mIoU of `<pred_dir>/<image id>.png` class-index maps over a VOC segmentation split."""
    from harness.datasets.voc import SEG_CLASSES, read_image_set, read_label_png, segmentation_mask_path

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise HarnessError(f"prediction folder not found: {pred_dir}")
    num_classes = len(SEG_CLASSES)
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    ids = read_image_set(voc_dir, split, "Segmentation")
    known = set(ids)
    others = sorted(p.name for p in pred_dir.glob("*.png") if p.stem not in known)
    if others:  # as a detection for an unknown image: an error, not a prediction left out without a word
        raise HarnessError(f"{pred_dir}: {len(others)} prediction(s) for images not in the {split} split "
                           f"(e.g. {others[0]}); score a folder holding this split's predictions only")
    for image_id in ids:
        pred_path = pred_dir / f"{image_id}.png"
        if not pred_path.is_file():
            raise HarnessError(f"{pred_dir}: no prediction for image {image_id} (expected {pred_path.name})")
        gt_mask = read_label_png(segmentation_mask_path(voc_dir, image_id, split))
        try:
            cm += confusion_matrix(gt_mask, read_label_png(pred_path), num_classes)
        except HarnessError as exc:
            raise HarnessError(str(exc) if str(exc).startswith(str(pred_path)) else f"{pred_path}: {exc}") from None
    return segmentation_metrics(cm, SEG_CLASSES)
