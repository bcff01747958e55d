"""Task models on a harness backbone, with one interface: ``model(images, targets)`` returns a
loss dict in training and predictions in eval (torchvision-style dicts for detection/pose,
logits at input size for segmentation). Plus the training-time augmentations of each task,
``fn(image, target, generator) -> (image, target)``, which the engine applies per sample."""

from __future__ import annotations

import inspect
from typing import Callable

from torch import nn

from harness.errors import HarnessError
from harness.models.detection import build_detector, detection_train_augment
from harness.models.pose import COCO_KEYPOINT_FLIP, build_keypoint_model, keypoint_train_augment
from harness.models.segmentation import build_segmenter, segmentation_postprocess, segmentation_train_augment

KINDS = ("detection", "segmentation", "keypoints")

__all__ = [
    "COCO_KEYPOINT_FLIP",
    "KINDS",
    "build_detector",
    "build_keypoint_model",
    "build_model",
    "build_segmenter",
    "detection_train_augment",
    "keypoint_train_augment",
    "segmentation_postprocess",
    "segmentation_train_augment",
    "train_augment",
]


def build_model(kind: str, backbone: nn.Module, **kwargs) -> nn.Module:
    """``detection`` → build_detector, ``segmentation`` → build_segmenter, ``keypoints`` →
    build_keypoint_model; ``kwargs`` go to the builder (a card's model section)."""
    builders = {"detection": build_detector, "segmentation": build_segmenter, "keypoints": build_keypoint_model}
    if kind not in builders:
        raise HarnessError(f"unknown task kind {kind!r}: expected one of {', '.join(KINDS)}")
    builder = builders[kind]
    try:
        inspect.signature(builder).bind(backbone, **kwargs)
    except TypeError as err:  # an unknown or missing key in a card's model section
        raise HarnessError(f"bad model settings for {kind}: {err}") from None
    return builder(backbone, **kwargs)


def train_augment(kind: str, **kwargs) -> Callable:
    """The training augmentation of a task kind (see each module's ``*_train_augment``)."""
    makers = {
        "detection": detection_train_augment,
        "segmentation": segmentation_train_augment,
        "keypoints": keypoint_train_augment,
    }
    if kind not in makers:
        raise HarnessError(f"unknown task kind {kind!r}: expected one of {', '.join(KINDS)}")
    return makers[kind](**kwargs)
