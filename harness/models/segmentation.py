"""DeepLabV3 as mmsegmentation builds it (``ASPPHead`` + ``FCNHead`` auxiliary) on a harness backbone.

Source: open-mmlab/mmsegmentation ``configs/_base_/models/deeplabv3_r50-d8.py``,
``mmseg/models/decode_heads/aspp_head.py``, ``fcn_head.py``, ``decode_head.py`` (see tasks/FIDELITY.md).

Output stride: for ResNets (``layer3``/``layer4`` stages) the already-built backbone is dilated in
place as torchvision's ``replace_stride_with_dilation`` and mmseg's ResNet (``contract_dilation``)
build it: a dilated stage's strided convolutions get stride 1 and the first k>1 conv of each block
dilation d (the stage's first block keeps the previous stage's dilation). OS 16 dilates ``layer4``
by 2; OS 8 (mmseg's ``-d8``) dilates ``layer3`` by 2 and ``layer4`` by 4. Same weights, so
checkpoints still load and a frozen backbone stays bit-identical. Backbones without such stages
(ViT pyramids, ConvNeXt, Swin) feed the head their stride-16 map ``c4`` at OS 16 and refuse OS 8.

Heads (mmseg's): ASPP = image pooling branch (global average pool, 1x1 conv-BN-ReLU, upsampled) +
one 1x1 and three dilated 3x3 conv-BN-ReLU branches, concatenated → 3x3 conv-BN-ReLU bottleneck →
Dropout2d → 1x1 classifier. The auxiliary FCN head (training only) reads ``c4`` (mmseg's
``in_index=2``): 3x3 conv-BN-ReLU → Dropout2d → 1x1 classifier; its loss is weighted by
``aux_loss_weight`` (0 builds no auxiliary head). Initialisation as mmcv's ``ConvModule``
(Kaiming normal, fan_out) and ``conv_seg`` (normal, std 0.01).

Interface: ``model(images, targets=None)``. ``images`` is a list of [3,H,W] tensors in [0, 1] (or a
batched tensor). Training returns ``{"loss_seg", "loss_aux"}``: cross-entropy with 255 ignored,
averaged over every pixel of the batch as mmseg's ``CrossEntropyLoss`` (``avg_non_ignore=False``).
Eval returns logits at each input's size (a list of [C,H,W], or a [B,C,H,W] tensor for tensor
input); with ``test_min_size`` each image is first resized as mmseg's test ``Resize(scale=(max_size,
test_min_size), keep_ratio=True)`` and the logits are resized back to the input size.
``num_classes`` counts every label value except 255 (VOC: 21). No normalization here: the backbone
does it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.transforms.v2.functional import adjust_hue

from harness.errors import HarnessError
from harness.models.detection import feature_channels, find_stage

IGNORE_INDEX = 255
ASPP_DILATIONS = {8: (1, 12, 24, 36), 16: (1, 6, 12, 18), 32: (1, 3, 6, 9)}  # mmseg's at OS 8, scaled
STAGE_DILATIONS = {8: {"layer3": 2, "layer4": 4}, 16: {"layer4": 2}, 32: {}}


def dilate_stage(stage: nn.Module, dilation: int, first_dilation: int = 1) -> None:
    """Turn a strided ResNet stage (a sequence of blocks) into a dilated one in place: every stride
    becomes 1 and the first k>1 conv of each block gets ``dilation`` (the first block
    ``first_dilation``), padding kept 'same' (torchvision's ``replace_stride_with_dilation``; for
    BasicBlocks mmseg's: conv1 dilated, conv2 not). Strided pools (ResNet-D shortcuts) become stride 1."""
    for i, block in enumerate(stage.children()):
        d = first_dilation if i == 0 else dilation
        first = True
        for module in block.modules():
            if isinstance(module, nn.Conv2d):
                module.stride = (1, 1)
                k = module.kernel_size[0]
                if k > 1 and first:
                    module.dilation = (d, d)
                    module.padding = (d * (k - 1) // 2,) * 2
                    first = False
            elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)) and module.stride not in (1, (1, 1)):
                module.stride = 1
                module.kernel_size = 1
                module.padding = 0


class ConvBNReLU(nn.Sequential):
    """mmcv's ConvModule with BN: conv (no bias) → BatchNorm → ReLU, Kaiming-normal (fan_out) init."""

    def __init__(self, cin: int, cout: int, kernel: int, dilation: int = 1):
        conv = nn.Conv2d(cin, cout, kernel, padding=dilation * (kernel - 1) // 2, dilation=dilation, bias=False)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        super().__init__(conv, nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _classifier(channels: int, num_classes: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, num_classes, 1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(conv.bias)
    return conv


class ASPPHead(nn.Module):
    """mmseg's ASPPHead: [image pool, 1x1 / dilated 3x3 branches] → concat → 3x3 bottleneck → dropout → 1x1."""

    def __init__(self, in_channels: int, channels: int, dilations: Sequence[int], num_classes: int, dropout: float):
        super().__init__()
        self.dilations = tuple(int(d) for d in dilations)
        self.channels = channels
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(in_channels, channels, 1))
        self.aspp = nn.ModuleList(ConvBNReLU(in_channels, channels, 1 if d == 1 else 3, d) for d in self.dilations)
        self.bottleneck = ConvBNReLU((len(self.dilations) + 1) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        x = self.bottleneck(torch.cat([pooled] + [branch(x) for branch in self.aspp], 1))
        return self.conv_seg(self.dropout(x))


class FCNHead(nn.Module):
    """mmseg's FCNHead with ``num_convs=1, concat_input=False``: 3x3 conv-BN-ReLU → dropout → 1x1."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.convs = ConvBNReLU(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = _classifier(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))


def rescale_size(h: int, w: int, short: int, long: int) -> tuple[int, int]:
    """mmcv's ``imrescale`` size: the largest keep-ratio size with short side <= ``short`` and long
    side <= ``long`` (one of them reached), rounded as mmcv (``int(x * f + 0.5)``)."""
    factor = min(long / max(h, w), short / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class Segmenter(nn.Module):
    """Backbone → ASPP head on ``feature`` (+ FCN auxiliary head on ``aux_feature`` in training) →
    bilinear upsampling. Fidelity attributes: ``output_stride``, ``aspp_dilations``,
    ``neck_channels``, ``aux_head``, ``aux_loss_weight``, ``dropout``, ``test_min_size``, ``max_size``."""

    def __init__(self, backbone: nn.Module, head: ASPPHead, feature: str, num_classes: int, output_stride: int,
                 aux_head: FCNHead | None = None, aux_feature: str = "c4", aux_loss_weight: float = 0.0,
                 test_min_size: int | None = None, max_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.classifier = head
        self.aux_head = aux_head
        self.feature, self.aux_feature = feature, aux_feature
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.aux_loss_weight = aux_loss_weight if aux_head is not None else 0.0
        self.test_min_size, self.max_size = test_min_size, max_size
        self.head_type = "deeplabv3"

    @property
    def aspp_dilations(self) -> tuple[int, ...]:
        return self.classifier.dilations

    @property
    def neck_channels(self) -> int:
        return self.classifier.channels

    @property
    def dropout(self) -> float:
        return self.classifier.dropout.p

    def _logits(self, x: Tensor) -> Tensor:
        return _resize(self.classifier(self.backbone(x)[self.feature]), x.shape[-2:])

    def forward(self, images, targets=None):
        as_tensor = torch.is_tensor(images)
        if self.training:
            if targets is None:
                raise ValueError("Segmenter: targets are required in training mode")
            x = images if as_tensor else _pad_stack(list(images), 0.0)
            masks = targets if torch.is_tensor(targets) else _pad_stack([t.long() for t in targets], IGNORE_INDEX)
            masks = masks.long()
            feats = self.backbone(x)
            logits = _resize(self.classifier(feats[self.feature]), x.shape[-2:])
            losses = {"loss_seg": _ce(logits, masks)}
            if self.aux_head is not None:
                aux = _resize(self.aux_head(feats[self.aux_feature]), x.shape[-2:])
                losses["loss_aux"] = self.aux_loss_weight * _ce(aux, masks)
            return losses
        if self.test_min_size is None:
            sizes = [tuple(im.shape[-2:]) for im in images]
            logits = self._logits(images if as_tensor else _pad_stack(list(images), 0.0))
            return logits if as_tensor else [logits[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]
        outputs = []
        for image in images:
            h, w = image.shape[-2:]
            size = rescale_size(h, w, self.test_min_size, self.max_size or 10**9)
            outputs.append(_resize(self._logits(_resize(image[None], size)), (h, w))[0])
        return torch.stack(outputs) if as_tensor else outputs


def _ce(logits: Tensor, masks: Tensor) -> Tensor:
    """Cross-entropy, 255 ignored, mean over all pixels (mmseg's ``avg_non_ignore=False``)."""
    return F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX, reduction="none").mean()


def _pad_stack(tensors: list[Tensor], value: float) -> Tensor:
    h = max(t.shape[-2] for t in tensors)
    w = max(t.shape[-1] for t in tensors)
    return torch.stack([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=value) for t in tensors])


def _measure_stride(backbone: nn.Module, feature: str, size: int = 64) -> int:
    """Stride of ``feature`` measured on a blank image (eval mode, no grad, modes restored)."""
    modes = {m: m.training for m in backbone.modules()}
    try:
        backbone.eval()
        param = next(backbone.parameters(), None)
        device = param.device if param is not None else "cpu"
        with torch.no_grad():
            out = backbone(torch.zeros(1, 3, size, size, device=device))[feature]
    finally:
        for m, mode in modes.items():
            m.training = mode
    return size // out.shape[-1]


def build_segmenter(
    backbone: nn.Module,
    num_classes: int,
    neck_channels: int = 256,
    output_stride: int = 16,
    aspp_dilations: Sequence[int] | None = None,
    aux_channels: int = 256,
    aux_loss_weight: float = 0.0,
    dropout: float = 0.1,
    test_min_size: int | None = None,
    max_size: int | None = None,
) -> Segmenter:
    """DeepLabV3 for ``num_classes`` labels (see the module doc). ``aspp_dilations`` default to
    mmseg's (1, 12, 24, 36) at OS 8, scaled with the stride otherwise."""
    if output_stride not in STAGE_DILATIONS:
        raise HarnessError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    if num_classes < 2:
        raise HarnessError(f"num_classes must be >= 2, got {num_classes}")
    info = feature_channels(backbone)
    stages = {name: find_stage(backbone, name) for name in ("layer3", "layer4")}
    if stages["layer4"] is not None and "c5" in info:
        feature = "c5"
        wanted = STAGE_DILATIONS[output_stride]
        if "layer3" in wanted and stages["layer3"] is None:
            raise HarnessError("output stride 8 needs a 'layer3' stage to dilate")
        previous = 1
        for name in ("layer3", "layer4"):
            if name in wanted:
                dilate_stage(backbone.get_submodule(stages[name]), wanted[name], first_dilation=previous)
                previous = wanted[name]
    else:
        if output_stride == 8:
            raise HarnessError(
                f"output stride 8 (mmseg's -d8 models) needs a ResNet with layer3/layer4 stages to dilate; "
                f"{getattr(backbone, 'arch', type(backbone).__name__)} supports 16 or 32: set output_stride "
                "in a copy of the task card (HARNESS_TASKS) to run it off-protocol"
            )
        feature = "c4" if output_stride == 16 else "c5"
        if feature not in info:
            raise HarnessError(f"backbone gives no {feature} feature map")
    dilated = feature == "c5" and output_stride < 32
    stride = _measure_stride(backbone, feature) if dilated else info[feature][1]
    if stride != output_stride:
        raise HarnessError(f"could not reach output stride {output_stride} on this backbone ({feature} has stride {stride})")
    dilations = tuple(aspp_dilations) if aspp_dilations else ASPP_DILATIONS[output_stride]
    head = ASPPHead(info[feature][0], neck_channels, dilations, num_classes, dropout)
    aux = None
    if aux_loss_weight > 0:
        if "c4" not in info:
            raise HarnessError("the auxiliary FCN head needs a c4 feature map")
        aux = FCNHead(info["c4"][0], aux_channels, num_classes, dropout)
    return Segmenter(backbone, head, feature, num_classes, output_stride, aux, "c4", aux_loss_weight,
                     test_min_size, max_size)


# ----------------------------------------------------------------------------- augmentation
def _uniform(generator: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=generator).item()


def _coin(generator: torch.Generator) -> bool:
    return torch.rand((), generator=generator).item() < 0.5


def scale_saturation(image: Tensor, alpha: float) -> Tensor:
    """HSV saturation times ``alpha``, clipped to 1, H and V kept (mmseg: ``bgr2hsv``, S x alpha,
    ``hsv2bgr``). With V = max(r, g, b) fixed, each channel's distance below V scales by S'/S."""
    v = image.amax(0, keepdim=True)
    s = torch.where(v > 0, (v - image.amin(0, keepdim=True)) / v.clamp_min(1e-12), torch.zeros_like(v))
    ratio = torch.where(s > 0, (s * alpha).clamp(0, 1) / s.clamp_min(1e-12), torch.ones_like(s))
    return (v - ratio * (v - image)).clamp(0, 1)


def distort_photometric(
    image: Tensor,
    generator: torch.Generator,
    brightness_delta: float = 32 / 255,
    contrast_range: tuple[float, float] = (0.5, 1.5),
    saturation_range: tuple[float, float] = (0.5, 1.5),
    hue_delta: int = 18,
) -> Tensor:
    """mmseg's ``PhotoMetricDistortion`` on an RGB image in [0, 1], each step with probability 0.5:
    brightness (+U(-delta, delta), clipped), then contrast (x U(range), clipped) either now or last
    (a coin), saturation (HSV S x U(range), clipped), hue (H + k/180 of the circle, k an integer in
    [-hue_delta, hue_delta), as OpenCV's 0-180 hue scale). mmseg rounds to uint8 after each step;
    here values stay float."""
    image = image.float()
    if _coin(generator):
        image = (image + _uniform(generator, -brightness_delta, brightness_delta)).clamp(0, 1)
    contrast_first = _coin(generator)

    def contrast(img: Tensor) -> Tensor:
        if _coin(generator):
            img = (img * _uniform(generator, *contrast_range)).clamp(0, 1)
        return img

    if contrast_first:
        image = contrast(image)
    if _coin(generator):
        image = scale_saturation(image, _uniform(generator, *saturation_range))
    if _coin(generator):
        k = int(torch.randint(-hue_delta, hue_delta, (), generator=generator))
        image = adjust_hue(image, k / 180.0).clamp(0, 1)
    if not contrast_first:
        image = contrast(image)
    return image


def random_crop_box(mask: Tensor, crop_size: int, cat_max_ratio: float, generator: torch.Generator,
                    tries: int = 10) -> tuple[int, int]:
    """(top, left) of a ``crop_size`` crop as mmseg's ``RandomCrop``: offsets uniform over the
    margin (0 where the image is smaller); with ``cat_max_ratio < 1`` up to ``tries`` crops are
    checked and the first one holding at least two labels (255 not counted), none of them above
    ``cat_max_ratio`` of the labelled pixels, is taken; after ``tries`` failures mmseg takes one
    more random crop unchecked, and so does this."""
    h, w = mask.shape[-2:]

    def draw() -> tuple[int, int]:
        top = int(torch.randint(0, max(h - crop_size, 0) + 1, (), generator=generator))
        left = int(torch.randint(0, max(w - crop_size, 0) + 1, (), generator=generator))
        return top, left

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            top, left = box
            crop = mask[top : top + crop_size, left : left + crop_size]
            counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten().long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio:
                break
            box = draw()
    return box


def segmentation_train_augment(
    crop_size: int = 512,
    scale: tuple[int, int] = (2048, 512),
    ratio_range: tuple[float, float] = (0.5, 2.0),
    cat_max_ratio: float = 0.75,
    flip_prob: float = 0.5,
    photometric_distortion: bool = True,
    pad_value: Sequence[float] = (0.0, 0.0, 0.0),
) -> Callable:
    """``fn(image, mask, generator) -> (image, mask)``: mmseg's VOC training pipeline
    (``configs/_base_/datasets/pascal_voc12.py``): ``Resize(img_scale=scale, ratio_range)`` keeping
    the ratio (image bilinear, mask nearest), ``RandomCrop(crop_size, cat_max_ratio)``,
    ``RandomFlip(0.5)``, ``PhotoMetricDistortion``, ``Pad(crop_size)`` bottom/right with
    ``pad_value`` (RGB in [0, 1]; mmseg 0.x pads after normalization with 0, i.e. with the
    backbone's mean colour) and 255 in the mask."""
    if crop_size is None or crop_size < 1:
        raise HarnessError(f"segmentation needs a crop_size >= 1, got {crop_size}")
    long_side, short_side = max(scale), min(scale)
    fill = torch.tensor([float(v) for v in pad_value]).view(3, 1, 1)

    def augment(image: Tensor, mask: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        ratio = _uniform(generator, *ratio_range)
        h, w = image.shape[-2:]
        nh, nw = rescale_size(h, w, int(short_side * ratio), int(long_side * ratio))
        image = _resize(image[None].float(), (nh, nw))[0]
        mask = F.interpolate(mask[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        top, left = random_crop_box(mask, crop_size, cat_max_ratio, generator)
        image = image[:, top : top + crop_size, left : left + crop_size]
        mask = mask[top : top + crop_size, left : left + crop_size]
        if torch.rand((), generator=generator).item() < flip_prob:
            image, mask = image.flip(-1), mask.flip(-1)
        if photometric_distortion:
            image = distort_photometric(image, generator)
        ph, pw = crop_size - image.shape[-2], crop_size - image.shape[-1]
        if ph or pw:
            canvas = fill.to(image.dtype).expand(3, crop_size, crop_size).clone()
            canvas[:, : image.shape[-2], : image.shape[-1]] = image
            image = canvas
            mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
        return image.contiguous(), mask.contiguous()

    return augment



def segmentation_postprocess(logits: Tensor) -> Tensor:
    """Class-index mask ([H, W]; uint8 up to 256 classes) from one image's logits [C, H, W]."""
    labels = logits.argmax(0)
    return labels.to(torch.uint8 if logits.shape[0] <= 256 else torch.int32).cpu()
