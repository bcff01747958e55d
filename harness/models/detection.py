"""Faster R-CNN on a harness backbone: FPN (torchvision's) or C4 (detectron2's R50-C4, as MoCo).

Both take ``images: list[Tensor[3,H,W]]`` in [0, 1] RGB (the backbone normalizes inside, so the
R-CNN transform only resizes: mean 0, std 1) and ``targets: list[dict]`` in training, and return
torchvision's loss dict (train) or ``[{"boxes" xyxy, "labels", "scores"}]`` in input pixels (eval).

``num_classes`` counts object classes (labels 1..K); the models add the background class.
Heads read channel counts from ``backbone.feature_info``.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign, roi_align
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

from harness.models import GN_GROUPS
from harness.errors import HarnessError

FPN_LEVELS = ("c2", "c3", "c4", "c5")
DEFAULT_ANCHOR_SIZES = (32, 64, 128, 256, 512)
ASPECT_RATIOS = (0.5, 1.0, 2.0)
HEAD_NORMS = ("none", "gn")


# ----------------------------------------------------------------------------- backbone access
def feature_channels(backbone: nn.Module) -> dict[str, tuple[int, int]]:
    """``{name: (channels, stride)}`` from ``backbone.feature_info``."""
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise HarnessError(f"backbone {type(backbone).__name__} has no feature_info: cannot size the heads")
    out = {}
    for f in info:
        get = f.get if isinstance(f, dict) else lambda k, f=f: getattr(f, k)
        out[get("name")] = (int(get("channels")), int(get("stride")))
    return out


def find_stage(backbone: nn.Module, name: str) -> str | None:
    """Path of the unique submodule called ``name`` (e.g. ``layer4``), or None."""
    hits = [path for path, _ in backbone.named_modules() if path == name or path.endswith("." + name)]
    return hits[0] if len(hits) == 1 else None


def split_path(root: nn.Module, path: str) -> tuple[nn.Module, str]:
    """``(parent module, attribute)`` of the submodule at ``path``."""
    parent_path, _, attr = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), attr


@contextlib.contextmanager
def skip_stage(parent: nn.Module, attr: str):
    """Temporarily replace ``parent.attr`` by identity (run a trunk without its last stage)."""
    stage = parent._modules[attr]
    parent._modules[attr] = nn.Identity()
    try:
        yield
    finally:
        parent._modules[attr] = stage


# ----------------------------------------------------------------------------- shared pieces
def head_norm_layer(norm: str) -> Callable[[int], nn.Module] | None:
    """Normalisation of the new conv layers (FPN, keypoint head): ``"none"`` (detectron2's default)
    → None; ``"gn"`` → a ``GroupNorm(32, channels)`` factory
    (Wu & He 2018; detectron2's GN configs normalise the FPN this way)."""
    if norm not in HEAD_NORMS:
        raise HarnessError(f"head_norm must be one of {', '.join(HEAD_NORMS)}, got {norm!r}")
    if norm == "none":
        return None

    def group_norm(channels: int) -> nn.Module:
        if channels % GN_GROUPS:
            raise HarnessError(f"head_norm gn needs channel counts divisible by {GN_GROUPS}, got {channels}")
        return nn.GroupNorm(GN_GROUPS, channels)

    return group_norm


def pad_colour(backbone: nn.Module) -> tuple[float, float, float]:
    """The backbone's mean colour as RGB in [0, 1]: padding with it gives 0 after the backbone's
    normalization, as detectron2 pads its normalized images with 0."""
    norm = getattr(backbone, "normalization", None)
    if norm is None:
        return (0.0, 0.0, 0.0)
    mean = [float(v) / 255.0 for v in norm.mean]
    return tuple(mean[::-1] if norm.channel_order == "BGR" else mean)


class RCNNTransform(GeneralizedRCNNTransform):
    """Resize only (mean 0, std 1: the backbone normalizes). Training draws the short side from
    ``train_sizes`` (multi-scale); evaluation uses ``test_size``. Long side capped at ``max_size``.
    Batches are padded bottom/right to a multiple of ``size_divisible`` with ``pad_value`` (RGB)."""

    def __init__(self, train_sizes: Sequence[int], test_size: int, max_size: int, size_divisible: int = 32,
                 pad_value: Sequence[float] = (0.0, 0.0, 0.0)):
        super().__init__(min_size=test_size, max_size=max_size, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0],
                         size_divisible=size_divisible)
        self.train_sizes = tuple(int(s) for s in train_sizes)
        self.pad_value = tuple(float(v) for v in pad_value)

    def torch_choice(self, k):  # only called in training
        return super().torch_choice(list(self.train_sizes))

    def batch_images(self, images: list[Tensor], size_divisible: int = 32) -> Tensor:
        batched = super().batch_images(images, size_divisible)
        fill = torch.tensor(self.pad_value, dtype=batched.dtype, device=batched.device).view(3, 1, 1)
        for image, out in zip(images, batched):
            h, w = image.shape[-2:]
            out[:, h:, :] = fill
            out[:, :h, w:] = fill
        return batched


def make_transform(min_size: int | Sequence[int], max_size: int, test_min_size: int | None, size_divisible: int = 32,
                   pad_value: Sequence[float] = (0.0, 0.0, 0.0)) -> RCNNTransform:
    train_sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    if not train_sizes:
        raise HarnessError("min_size must name at least one image size")
    return RCNNTransform(train_sizes, test_min_size or max(train_sizes), max_size, size_divisible, pad_value)


# ----------------------------------------------------------------------------- detectron2's pieces
class RoIAlignV2(MultiScaleRoIAlign):
    """torchvision's MultiScaleRoIAlign (same level mapping) with RoIAlign's ``aligned`` exposed:
    detectron2's ROIAlignV2 is ``aligned=True`` (pixel centres at +0.5) with ``sampling_ratio=0``
    (adaptive sampling)."""

    def __init__(self, featmap_names: list[str], output_size: int, sampling_ratio: int = 0, aligned: bool = True):
        super().__init__(featmap_names, output_size, sampling_ratio)
        self.aligned = aligned

    def forward(self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]) -> Tensor:
        feats = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(feats, image_shapes, self.canonical_scale, self.canonical_level)
        rois = _convert_to_roi_format(boxes)
        pool = lambda feat, r, scale: roi_align(  # noqa: E731
            feat, r, self.output_size, spatial_scale=scale, sampling_ratio=self.sampling_ratio, aligned=self.aligned)
        if len(feats) == 1:
            return pool(feats[0], rois, self.scales[0])
        levels = self.map_levels(boxes)
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, self.scales)):
            idx = torch.where(levels == level)[0]
            out[idx] = pool(feat, rois[idx], scale).to(out.dtype)
        return out


class FP32AnchorGenerator(AnchorGenerator):
    """Anchors in fp32 whatever the features' dtype: under bf16 autocast torchvision would make
    them in bf16, whose 8-bit mantissa puts corners near x = 1000 on a grid of 4 to 8 pixels."""

    def forward(self, image_list, feature_maps: list[Tensor]) -> list[Tensor]:
        shapes = [f.new_empty((0, 0, *f.shape[-2:]), dtype=torch.float32) for f in feature_maps]
        return super().forward(image_list, shapes)


class FP32BoxCoder(BoxCoder):
    """Box encoding and decoding in fp32 (torchvision decodes in the deltas' dtype)."""

    def encode(self, reference_boxes: list[Tensor], proposals: list[Tensor]) -> tuple[Tensor, ...]:
        return super().encode([b.float() for b in reference_boxes], [p.float() for p in proposals])

    def decode(self, rel_codes: Tensor, boxes: list[Tensor]) -> Tensor:
        return super().decode(rel_codes.float(), [b.float() for b in boxes])


class Detectron2RPN(RegionProposalNetwork):
    """torchvision's RPN with detectron2's losses (smooth-L1 with ``smooth_l1_beta``, 0 = L1; both
    losses summed and divided by images x ``batch_size_per_image``) and proposals made in fp32."""

    def __init__(self, *args, smooth_l1_beta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.box_coder = FP32BoxCoder(self.box_coder.weights, self.box_coder.bbox_xform_clip)

    def filter_proposals(self, proposals, objectness, image_shapes, num_anchors_per_level):
        return super().filter_proposals(proposals.float(), objectness.float(), image_shapes, num_anchors_per_level)

    def compute_loss(self, objectness, pred_bbox_deltas, labels, regression_targets):
        pos, neg = self.fg_bg_sampler(labels)
        pos_idx = torch.where(torch.cat(pos))[0]
        sampled = torch.cat([pos_idx, torch.where(torch.cat(neg))[0]])
        normalizer = self.fg_bg_sampler.batch_size_per_image * len(labels)
        box_loss = F.smooth_l1_loss(pred_bbox_deltas[pos_idx].float(), torch.cat(regression_targets)[pos_idx],
                                    beta=self.smooth_l1_beta, reduction="sum") / normalizer
        objectness_loss = F.binary_cross_entropy_with_logits(
            objectness.flatten()[sampled].float(), torch.cat(labels)[sampled], reduction="sum") / normalizer
        return objectness_loss, box_loss


class Detectron2RoIHeads(RoIHeads):
    """torchvision's RoIHeads with detectron2's box regression loss (smooth-L1 with
    ``smooth_l1_beta``, 0 = L1, over the sampled RoIs) and detections decoded in fp32.
    torchvision computes its loss with beta 1/9 inside ``forward``; this class keeps the sampled
    targets and the predicted deltas and replaces that term."""

    def __init__(self, *args, smooth_l1_beta: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.smooth_l1_beta = float(smooth_l1_beta)
        self.box_coder = FP32BoxCoder(self.box_coder.weights, self.box_coder.bbox_xform_clip)
        self._kept: dict = {}
        self.box_predictor.register_forward_hook(self._keep_deltas)

    def _keep_deltas(self, module, inputs, outputs) -> None:
        if self.training:
            self._kept["deltas"] = outputs[1]

    def select_training_samples(self, proposals, targets):
        proposals, matched_idxs, labels, regression_targets = super().select_training_samples(proposals, targets)
        self._kept.update(labels=labels, targets=regression_targets)
        return proposals, matched_idxs, labels, regression_targets

    def postprocess_detections(self, class_logits, box_regression, proposals, image_shapes):
        return super().postprocess_detections(class_logits.float(), box_regression.float(), proposals, image_shapes)

    def forward(self, features, proposals, image_shapes, targets=None):
        result, losses = super().forward(features, proposals, image_shapes, targets)
        if self.training:
            kept, self._kept = self._kept, {}
            losses["loss_box_reg"] = self.box_loss(kept["deltas"], kept["labels"], kept["targets"])
        return result, losses

    def box_loss(self, deltas: Tensor, labels: list[Tensor], targets: list[Tensor]) -> Tensor:
        labels, targets = torch.cat(labels), torch.cat(targets)
        pos = torch.where(labels > 0)[0]
        deltas = deltas.reshape(deltas.shape[0], -1, 4)[pos, labels[pos]]
        return F.smooth_l1_loss(deltas.float(), targets[pos], beta=self.smooth_l1_beta, reduction="sum") / labels.numel()


def detectron2_heads(model: nn.Module, *, rpn_pre_nms_topk: tuple[int, int], rpn_post_nms_topk: tuple[int, int],
                     rpn_smooth_l1_beta: float, box_smooth_l1_beta: float) -> None:
    """Replace a torchvision R-CNN's RPN and RoI heads (in place, same submodules and settings) by
    the detectron2-loss, fp32-proposal subclasses above. ``*_topk`` are (train, test) per image
    (pre-NMS: per FPN level)."""
    rpn, heads = model.rpn, model.roi_heads
    model.rpn = Detectron2RPN(
        FP32AnchorGenerator(rpn.anchor_generator.sizes, rpn.anchor_generator.aspect_ratios), rpn.head,
        rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold,
        rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction,
        dict(zip(("training", "testing"), rpn_pre_nms_topk)), dict(zip(("training", "testing"), rpn_post_nms_topk)),
        rpn.nms_thresh, rpn.score_thresh, smooth_l1_beta=rpn_smooth_l1_beta,
    )
    keypoint = {k: getattr(heads, k, None) for k in ("keypoint_roi_pool", "keypoint_head", "keypoint_predictor")}
    model.roi_heads = Detectron2RoIHeads(
        heads.box_roi_pool, heads.box_head, heads.box_predictor,
        heads.proposal_matcher.high_threshold, heads.proposal_matcher.low_threshold,
        heads.fg_bg_sampler.batch_size_per_image, heads.fg_bg_sampler.positive_fraction,
        heads.box_coder.weights, heads.score_thresh, heads.nms_thresh, heads.detections_per_img,
        smooth_l1_beta=box_smooth_l1_beta, **keypoint,
    )


class FPNNeck(nn.Module):
    """Backbone + torchvision FeaturePyramidNetwork: ``c2..c5`` → ``p2..p5`` + ``pool`` (stride 64).
    ``norm``: see :func:`head_norm_layer` (after each lateral and output conv)."""

    def __init__(self, backbone: nn.Module, out_channels: int = 256, levels: Sequence[str] = FPN_LEVELS,
                 norm: str = "none"):
        super().__init__()
        info = feature_channels(backbone)
        missing = [n for n in levels if n not in info]
        if missing:
            raise HarnessError(f"backbone gives no {missing} features; FPN needs {list(levels)}")
        self.body = backbone
        self.levels = tuple(levels)
        self.fpn = FeaturePyramidNetwork([info[n][0] for n in levels], out_channels, extra_blocks=LastLevelMaxPool(),
                                         norm_layer=head_norm_layer(norm))
        self.out_channels = out_channels

    @property
    def featmap_names(self) -> list[str]:
        return ["p" + n[1:] for n in self.levels]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict(("p" + n[1:], feats[n]) for n in self.levels))


class C4Trunk(nn.Module):
    """The backbone up to ``c4`` (stride 16). Its ``layer4`` is skipped here and run as the box head."""

    def __init__(self, backbone: nn.Module, res5_path: str):
        super().__init__()
        self.body = backbone
        self.res5_path = res5_path
        self.out_channels = feature_channels(backbone)["c4"][0]

    def forward(self, x: Tensor) -> "OrderedDict[str, Tensor]":
        with skip_stage(*split_path(self.body, self.res5_path)):
            feats = self.body(x)
        return OrderedDict(c4=feats["c4"])


class Res5BoxHead(nn.Module):
    """detectron2's Res5ROIHeads box head: res5 on 14x14 RoI features (stride 2 → 7x7), then mean
    pool. ``extra_norm`` adds MoCo's ``Res5ROIHeadsExtraNorm``: a new BatchNorm after res5 (part of
    the head: it trains under both protocols)."""

    def __init__(self, res5: nn.Module, channels: int, extra_norm: bool = False):
        super().__init__()
        self.res5 = res5
        self.norm = nn.BatchNorm2d(channels) if extra_norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.res5(x)).mean(dim=(2, 3))


def _init_predictor(predictor: FastRCNNPredictor) -> FastRCNNPredictor:
    """detectron2's initialisation of the box predictor (cls std 0.01, box std 0.001, zero bias)."""
    nn.init.normal_(predictor.cls_score.weight, std=0.01)
    nn.init.normal_(predictor.bbox_pred.weight, std=0.001)
    for layer in (predictor.cls_score, predictor.bbox_pred):
        nn.init.zeros_(layer.bias)
    return predictor


def fpn_rpn(sizes: Sequence[int], channels: int, levels: int = 5) -> tuple[AnchorGenerator, RPNHead]:
    if len(sizes) != levels:
        raise HarnessError(f"an FPN needs one anchor size per level ({levels}: p2..p6), got {list(sizes)}")
    anchors = AnchorGenerator(tuple((int(s),) for s in sizes), (ASPECT_RATIOS,) * levels)
    return anchors, RPNHead(channels, anchors.num_anchors_per_location()[0])


# ----------------------------------------------------------------------------- builders
def build_detector(
    backbone: nn.Module,
    num_classes: int,
    head: str = "fpn",
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    test_min_size: int | None = None,
    neck_channels: int | None = None,
    representation_size: int | None = None,
    anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES,
    box_detections_per_img: int = 100,
    roi_batch_per_image: int = 512,
    rpn_batch_size_per_image: int = 256,
    box_score_thresh: float = 0.05,
    proposals_test: int = 1000,
    c4_pool_size: int = 14,
    head_norm: str = "none",
    rpn_pre_nms_topk_train: int | None = None,
    rpn_pre_nms_topk_test: int | None = None,
    rpn_post_nms_topk_train: int | None = None,
    rpn_smooth_l1_beta: float = 0.0,
    box_smooth_l1_beta: float = 0.0,
    roi_align_aligned: bool = True,
    roi_align_sampling_ratio: int = 0,
    c4_extra_norm: bool = False,
) -> FasterRCNN:
    """Faster R-CNN for ``num_classes`` object classes (plus background).

    head="fpn": torchvision FPN (``neck_channels``, default 256) on c2..c5 + max-pooled p6, RPN over
    five levels (one anchor size per level), 7x7 RoIAlign, two FC layers of ``representation_size``
    (default 1024).
    head="c4": detectron2's R50-C4 (MoCo's VOC model): RPN on c4 with all anchor sizes, 14x14 RoIAlign
    on c4, the backbone's own ``layer4`` (res5, shared, pretrained) as box head, mean pool, predictor.
    ``min_size`` may be a list: training draws a short side from it; eval uses ``test_min_size``
    (default: its largest). ``proposals_test``: RPN proposals kept per image at test time
    (detectron2: 1000). ``c4_pool_size``: the C4 head's RoIAlign size (detectron2: 14; res5 halves it).
    ``head_norm``: ``"gn"`` puts GroupNorm in the FPN (FPN head only; see :func:`head_norm_layer`).

    detectron2's settings by default (see tasks/FIDELITY.md): RoIAlign ``aligned`` with sampling
    ratio 0 (ROIAlignV2); L1 regression losses (``*_smooth_l1_beta`` 0); RPN proposals per image
    (pre-NMS per level, train/test) 2000/1000 and 1000 kept after NMS in training for the FPN,
    12000/6000 and 2000 for C4; fp32 anchors, box decoding and proposal selection under autocast;
    batches padded with the backbone's mean colour, to a multiple of 32 (FPN) or not at all (C4).
    ``c4_extra_norm``: MoCo's extra BatchNorm after res5 in the C4 box head.
    """
    if num_classes < 1:
        raise HarnessError(f"num_classes must be >= 1, got {num_classes}")
    head_norm_layer(head_norm)  # a bad name fails before any model is built
    if head not in ("fpn", "c4"):
        raise HarnessError(f"unknown detection head {head!r}: use fpn or c4")
    transform = make_transform(min_size, max_size, test_min_size, size_divisible=32 if head == "fpn" else 1,
                               pad_value=pad_colour(backbone))
    common = dict(
        box_detections_per_img=box_detections_per_img,
        box_batch_size_per_image=roi_batch_per_image,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_score_thresh=box_score_thresh,
    )
    pool = lambda names, size: RoIAlignV2(names, size, roi_align_sampling_ratio, roi_align_aligned)  # noqa: E731
    if head == "fpn":
        neck = FPNNeck(backbone, neck_channels or 256, norm=head_norm)
        anchors, rpn_head = fpn_rpn(anchor_sizes, neck.out_channels)
        model = FasterRCNN(
            neck,
            rpn_anchor_generator=anchors,
            rpn_head=rpn_head,
            box_roi_pool=pool(neck.featmap_names, 7),
            box_head=TwoMLPHead(neck.out_channels * 7 * 7, representation_size or 1024),
            box_predictor=_init_predictor(FastRCNNPredictor(representation_size or 1024, num_classes + 1)),
            **common,
        )
        topk = {"pre": (2000, 1000), "post_train": 1000}  # detectron2 Base-RCNN-FPN.yaml
    else:
        if head_norm != "none":
            raise HarnessError(f"head_norm {head_norm} applies to the FPN head; the C4 model has no FPN")
        if neck_channels is not None or representation_size is not None:
            raise HarnessError("neck_channels and representation_size size the FPN model's neck and box head; the C4 "
                               "model has neither (its RPN runs on c4, its box head is res5)")
        res5_path = find_stage(backbone, "layer4")
        info = feature_channels(backbone)
        if res5_path is None or "c4" not in info or "c5" not in info:
            raise HarnessError(
                f"the C4 head needs a ResNet-style backbone with a res5 stage ('layer4'); "
                f"{getattr(backbone, 'arch', type(backbone).__name__)} has none: use head fpn"
            )
        trunk = C4Trunk(backbone, res5_path)
        anchors = AnchorGenerator((tuple(int(s) for s in anchor_sizes),), (ASPECT_RATIOS,))
        model = FasterRCNN(
            trunk,
            rpn_anchor_generator=anchors,
            rpn_head=RPNHead(trunk.out_channels, anchors.num_anchors_per_location()[0]),
            box_roi_pool=pool(["c4"], c4_pool_size),
            box_head=Res5BoxHead(backbone.get_submodule(res5_path), info["c5"][0], extra_norm=c4_extra_norm),
            box_predictor=_init_predictor(FastRCNNPredictor(info["c5"][0], num_classes + 1)),
            **common,
        )
        topk = {"pre": (12000, 6000), "post_train": 2000}  # detectron2 defaults.py (C4: one level)
    detectron2_heads(
        model,
        rpn_pre_nms_topk=(rpn_pre_nms_topk_train or topk["pre"][0], rpn_pre_nms_topk_test or topk["pre"][1]),
        rpn_post_nms_topk=(rpn_post_nms_topk_train or topk["post_train"], proposals_test),
        rpn_smooth_l1_beta=rpn_smooth_l1_beta, box_smooth_l1_beta=box_smooth_l1_beta,
    )
    model.transform = transform
    model.head_type = head
    return model


# ----------------------------------------------------------------------------- augmentation
def clean_detection_target(target: dict, height: int, width: int) -> dict:
    """Training target as detectron2's mapper makes it: boxes clipped to the ``height`` x ``width``
    image, then crowd regions and boxes left empty dropped (a box wholly outside the image would
    otherwise match every anchor through the low-quality matches)."""
    boxes = target["boxes"].reshape(-1, 4).float().clone()
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if "iscrowd" in target:
        keep &= torch.as_tensor(target["iscrowd"]).reshape(-1) == 0
    out = dict(target, boxes=boxes)
    for key in ("boxes", "labels", "iscrowd", "keypoints", "area"):
        if key in out and torch.is_tensor(out[key]) and out[key].shape[:1] == keep.shape:
            out[key] = out[key][keep]
    out["boxes"] = out["boxes"].reshape(-1, 4).float()
    return out


def hflip_detection(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    """Mirror image and boxes (continuous coordinates: x → W - x)."""
    width = image.shape[-1]
    target = dict(target)
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    target["boxes"] = boxes
    return image.flip(-1), target


def detection_train_augment(flip_prob: float = 0.5) -> Callable:
    """``fn(image, target, generator) -> (image, target)``: drop crowd/degenerate boxes, random
    horizontal flip. Resizing (single or multi-scale) is the model transform's job."""

    def augment(image: Tensor, target: dict, generator: torch.Generator) -> tuple[Tensor, dict]:
        target = clean_detection_target(target, *image.shape[-2:])
        if torch.rand((), generator=generator).item() < flip_prob:
            image, target = hflip_detection(image, target)
        return image, target

    return augment
