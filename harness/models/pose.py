"""Keypoint R-CNN + FPN (torchvision's) on a harness backbone: person boxes and 17 COCO keypoints.

Same interface as the detectors (``harness.models.detection``); training targets also carry
``keypoints`` float [N, K, 3] (x, y, visibility); eval predictions add ``keypoints`` [N, K, 3] and
``keypoints_scores``.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection import KeypointRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor

from harness.errors import HarnessError
from harness.models.detection import (
    DEFAULT_ANCHOR_SIZES,
    FPNNeck,
    RoIAlignV2,
    _init_predictor,
    clean_detection_target,
    detectron2_heads,
    fpn_rpn,
    head_norm_layer,
    hflip_detection,
    make_transform,
    pad_colour,
)

# COCO order: nose, eyes (l, r), ears (l, r), shoulders, elbows, wrists, hips, knees, ankles.
COCO_KEYPOINT_FLIP = (0, 2, 1, 4, 3, 6, 5, 8, 7, 10, 9, 12, 11, 14, 13, 16, 15)


class NormKeypointHead(nn.Sequential):
    """torchvision's KeypointRCNNHeads with a normalisation after each conv (which then has no bias)."""

    def __init__(self, in_channels: int, channels: int, layers: int, norm_layer: Callable[[int], nn.Module]):
        modules = []
        for i in range(layers):
            modules += [nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1, bias=False),
                        norm_layer(channels), nn.ReLU(inplace=True)]
        super().__init__(*modules)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


def build_keypoint_model(
    backbone: nn.Module,
    num_keypoints: int = 17,
    min_size: int | Sequence[int] = (640, 672, 704, 736, 768, 800),
    max_size: int = 1333,
    test_min_size: int | None = 800,
    neck_channels: int | None = None,
    representation_size: int = 1024,
    keypoint_head_channels: int = 512,
    keypoint_head_layers: int = 8,
    keypoint_pool_size: int = 14,
    anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES,
    box_detections_per_img: int = 100,
    roi_batch_per_image: int = 512,
    head_norm: str = "none",
    proposals_test: int = 1000,
    rpn_pre_nms_topk_train: int = 2000,
    rpn_pre_nms_topk_test: int = 1000,
    rpn_post_nms_topk_train: int = 1500,
    rpn_smooth_l1_beta: float = 0.0,
    box_smooth_l1_beta: float = 0.5,
    roi_align_aligned: bool = True,
    roi_align_sampling_ratio: int = 0,
) -> KeypointRCNN:
    """Keypoint R-CNN (one object class, person): FPN neck as ``build_detector(head="fpn")``,
    ``keypoint_pool_size`` RoIAlign (14), ``keypoint_head_layers`` 3x3 convs of
    ``keypoint_head_channels`` (Mask R-CNN paper: 8 x 512), deconv + 2x upsampling to heatmaps 4x
    the RoIAlign size (56x56). Defaults follow detectron2's keypoint_rcnn_R_50_FPN_1x (multi-scale
    640-800 training, 800 test). ``head_norm`` ``"gn"``: GroupNorm in the FPN and after each
    keypoint-head conv (detectron2's GN configs normalise the FPN, not the keypoint head;
    MoCo normalises all its new layers). detectron2's settings by default (tasks/FIDELITY.md):
    ROIAlignV2 (``aligned``, sampling ratio 0) for boxes and keypoints, 1500 RPN proposals kept
    per image in training, box regression smooth-L1 beta 0.5 (RPN: L1), fp32 proposals.
    Keypoints are continuous coordinates (COCO's pixel indices + 0.5, see ``keypoint_train_augment``)."""
    if num_keypoints < 1:
        raise HarnessError(f"num_keypoints must be >= 1, got {num_keypoints}")
    if keypoint_pool_size < 2:
        raise HarnessError(f"keypoint_pool_size must be >= 2, got {keypoint_pool_size}")
    norm_layer = head_norm_layer(head_norm)
    neck = FPNNeck(backbone, neck_channels or 256, norm=head_norm)
    if norm_layer is None:
        keypoint_head = KeypointRCNNHeads(neck.out_channels, (keypoint_head_channels,) * keypoint_head_layers)
    else:
        keypoint_head = NormKeypointHead(neck.out_channels, keypoint_head_channels, keypoint_head_layers, norm_layer)
    anchors, rpn_head = fpn_rpn(anchor_sizes, neck.out_channels)
    names = neck.featmap_names
    model = KeypointRCNN(
        neck,
        num_classes=None,
        rpn_anchor_generator=anchors,
        rpn_head=rpn_head,
        box_roi_pool=RoIAlignV2(names, 7, roi_align_sampling_ratio, roi_align_aligned),
        box_head=TwoMLPHead(neck.out_channels * 7 * 7, representation_size),
        box_predictor=_init_predictor(FastRCNNPredictor(representation_size, 2)),
        box_detections_per_img=box_detections_per_img,
        box_batch_size_per_image=roi_batch_per_image,
        keypoint_roi_pool=RoIAlignV2(names, keypoint_pool_size, roi_align_sampling_ratio, roi_align_aligned),
        keypoint_head=keypoint_head,
        keypoint_predictor=ContiguousKeypointPredictor(keypoint_head_channels, num_keypoints),
    )
    detectron2_heads(model, rpn_pre_nms_topk=(rpn_pre_nms_topk_train, rpn_pre_nms_topk_test),
                     rpn_post_nms_topk=(rpn_post_nms_topk_train, proposals_test),
                     rpn_smooth_l1_beta=rpn_smooth_l1_beta, box_smooth_l1_beta=box_smooth_l1_beta)
    model.transform = make_transform(min_size, max_size, test_min_size, pad_value=pad_colour(backbone))
    model.head_type = "keypoint_fpn"
    return model


class ContiguousKeypointPredictor(KeypointRCNNPredictor):
    """torchvision's keypoint predictor with contiguous heatmaps: its keypoint loss ``view``s them,
    which fails on channels_last tensors (found by bench/gpu_check.py). Same parameters and values."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).contiguous()


PIXEL_CENTRE = 0.5  # COCO keypoints are pixel indices; the model works in continuous coordinates


def keypoints_to_continuous(target: dict) -> dict:
    """COCO keypoint pixel indices → continuous coordinates (+0.5 on labelled points), as
    detectron2's COCO loader; predictions go back with :func:`keypoints_to_pixel_indices`."""
    if "keypoints" not in target:
        return target
    kps = target["keypoints"].clone()
    labelled = kps[..., 2] > 0
    kps[..., :2] += labelled[..., None] * PIXEL_CENTRE
    return {**target, "keypoints": kps}


def keypoints_to_pixel_indices(keypoints: Tensor) -> Tensor:
    """Predicted continuous keypoints [N, K, 3] → COCO's pixel-index convention (-0.5 on x, y),
    as detectron2's COCOEvaluator."""
    out = keypoints.clone()
    out[..., :2] -= PIXEL_CENTRE
    return out


def hflip_keypoints(image: Tensor, target: dict, flip_index: Sequence[int] = COCO_KEYPOINT_FLIP) -> tuple[Tensor, dict]:
    """Mirror image, boxes and continuous keypoints (x → W - x); left/right keypoints swap through
    ``flip_index``."""
    width = image.shape[-1]
    flipped, target = hflip_detection(image, target)
    if "keypoints" in target:
        kps = target["keypoints"].clone()
        if kps.shape[-2] != len(flip_index):
            raise HarnessError(f"keypoints have {kps.shape[-2]} points but the flip map names {len(flip_index)}")
        kps[..., 0] = width - kps[..., 0]
        kps = kps[:, list(flip_index)]
        kps[kps[..., 2] == 0] = 0  # invisible points carry no position
        target["keypoints"] = kps
    return flipped, target


def keypoint_train_augment(flip_prob: float = 0.5, flip_index: Sequence[int] = COCO_KEYPOINT_FLIP) -> Callable:
    """``fn(image, target, generator)``: drop crowd/degenerate boxes, keypoints to continuous
    coordinates, random flip with keypoint swap."""

    def augment(image: Tensor, target: dict, generator: torch.Generator) -> tuple[Tensor, dict]:
        target = keypoints_to_continuous(clean_detection_target(target, *image.shape[-2:]))
        if torch.rand((), generator=generator).item() < flip_prob:
            image, target = hflip_keypoints(image, target, flip_index)
        return image, target

    return augment
