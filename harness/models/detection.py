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
from torch import Tensor, nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.rpn import RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from harness.cards import GN_GROUPS
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


class RCNNTransform(GeneralizedRCNNTransform):
    """Resize only (mean 0, std 1: the backbone normalizes). Training draws the short side from
    ``train_sizes`` (multi-scale); evaluation uses ``test_size``. Long side capped at ``max_size``."""

    def __init__(self, train_sizes: Sequence[int], test_size: int, max_size: int):
        super().__init__(min_size=test_size, max_size=max_size, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
        self.train_sizes = tuple(int(s) for s in train_sizes)

    def torch_choice(self, k):  # only called in training
        return super().torch_choice(list(self.train_sizes))


def make_transform(min_size: int | Sequence[int], max_size: int, test_min_size: int | None) -> RCNNTransform:
    train_sizes = (min_size,) if isinstance(min_size, int) else tuple(min_size)
    if not train_sizes:
        raise HarnessError("min_size must name at least one image size")
    return RCNNTransform(train_sizes, test_min_size or max(train_sizes), max_size)


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
    """detectron2's Res5ROIHeads box head: res5 on 14x14 RoI features (stride 2 → 7x7), then mean pool."""

    def __init__(self, res5: nn.Module):
        super().__init__()
        self.res5 = res5

    def forward(self, x: Tensor) -> Tensor:
        return self.res5(x).mean(dim=(2, 3))


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
    fpn_channels: int | None = None,
    representation_size: int = 1024,
    anchor_sizes: Sequence[int] = DEFAULT_ANCHOR_SIZES,
    box_detections_per_img: int = 100,
    box_batch_size_per_image: int = 512,
    rpn_batch_size_per_image: int = 256,
    box_score_thresh: float = 0.05,
    proposals_test: int = 1000,
    c4_pool_size: int = 14,
    head_norm: str = "none",
) -> FasterRCNN:
    """Faster R-CNN for ``num_classes`` object classes (plus background).

    head="fpn": torchvision FPN (``fpn_channels``, default 256) on c2..c5 + max-pooled p6, RPN over
    five levels (one anchor size per level), 7x7 RoIAlign, two FC layers of ``representation_size``.
    head="c4": detectron2's R50-C4 (MoCo's VOC model): RPN on c4 with all anchor sizes, 14x14 RoIAlign
    on c4, the backbone's own ``layer4`` (res5, shared, pretrained) as box head, mean pool, predictor.
    ``min_size`` may be a list: training draws a short side from it; eval uses ``test_min_size``
    (default: its largest). ``proposals_test``: RPN proposals kept per image at test time
    (detectron2: 1000). ``c4_pool_size``: the C4 head's RoIAlign size (detectron2: 14; res5 halves it).
    ``head_norm``: ``"gn"`` puts GroupNorm in the FPN (FPN head only; see :func:`head_norm_layer`).
    """
    if num_classes < 1:
        raise HarnessError(f"num_classes must be >= 1, got {num_classes}")
    head_norm_layer(head_norm)  # a bad name fails before any model is built
    transform = make_transform(min_size, max_size, test_min_size)
    common = dict(
        box_detections_per_img=box_detections_per_img,
        box_batch_size_per_image=box_batch_size_per_image,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_score_thresh=box_score_thresh,
        rpn_post_nms_top_n_test=proposals_test,
    )
    if head == "fpn":
        neck = FPNNeck(backbone, fpn_channels or 256, norm=head_norm)
        anchors, rpn_head = fpn_rpn(anchor_sizes, neck.out_channels)
        model = FasterRCNN(
            neck,
            rpn_anchor_generator=anchors,
            rpn_head=rpn_head,
            box_roi_pool=MultiScaleRoIAlign(neck.featmap_names, output_size=7, sampling_ratio=2),
            box_head=TwoMLPHead(neck.out_channels * 7 * 7, representation_size),
            box_predictor=_init_predictor(FastRCNNPredictor(representation_size, num_classes + 1)),
            **common,
        )
    elif head == "c4":
        if head_norm != "none":
            raise HarnessError(f"head_norm {head_norm} applies to the FPN head; the C4 model has no FPN")
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
            # detectron2 C4 defaults: 12000/6000 pre-NMS proposals on the single level
            rpn_pre_nms_top_n_train=12000,
            rpn_pre_nms_top_n_test=6000,
            rpn_post_nms_top_n_train=2000,
            box_roi_pool=MultiScaleRoIAlign(["c4"], output_size=c4_pool_size, sampling_ratio=0),
            box_head=Res5BoxHead(backbone.get_submodule(res5_path)),
            box_predictor=_init_predictor(FastRCNNPredictor(info["c5"][0], num_classes + 1)),
            **common,
        )
    else:
        raise HarnessError(f"unknown detection head {head!r}: use fpn or c4")
    model.transform = transform
    model.head_type = head
    return model


# ----------------------------------------------------------------------------- augmentation
def clean_detection_target(target: dict) -> dict:
    """Training target without crowd regions and degenerate boxes (as detectron2's mapper)."""
    boxes = target["boxes"].reshape(-1, 4).float()
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if "iscrowd" in target:
        keep &= torch.as_tensor(target["iscrowd"]).reshape(-1) == 0
    out = dict(target)
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
        target = clean_detection_target(target)
        if torch.rand((), generator=generator).item() < flip_prob:
            image, target = hflip_detection(image, target)
        return image, target

    return augment
