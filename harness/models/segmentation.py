"""DeepLabV3 (ASPP, torchvision's modules) on a harness backbone, output stride 16 by default.

Output stride: for ResNets (a ``layer4`` stage) the already-built backbone is dilated in place as
torchvision's ``replace_stride_with_dilation`` / detectron2's ``RES5_DILATION`` would build it: the
stage's stride-2 convolutions get stride 1 and every k>1 convolution in it dilation 2 (OS 16;
OS 8 also dilates ``layer3`` by 2 and ``layer4`` by 4). Same weights, so checkpoints still load.
Backbones without such a stage (ViT pyramids, ConvNeXt, Swin) feed ASPP their stride-16 map
``c4`` instead. ASPP rates scale with the stride: 6/12/18 at OS 16, 12/24/36 at OS 8 (DeepLabV3).

Interface: ``model(images, targets=None)``. ``images`` is a list of [3,H,W] tensors in [0, 1] (or a
batched tensor); images of different sizes are zero-padded bottom/right and cropped back.
Training returns ``{"loss_seg": cross-entropy (255 ignored)}``; eval returns logits upsampled to
each input's size (a list of [C,H,W], or a [B,C,H,W] tensor for tensor input). ``num_classes``
counts every label value except 255 (VOC: 21, background included). No normalization here:
the backbone does it.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.segmentation.deeplabv3 import ASPP

from harness.errors import HarnessError
from harness.models.detection import feature_channels, find_stage

IGNORE_INDEX = 255
ASPP_RATES = {8: (12, 24, 36), 16: (6, 12, 18), 32: (3, 6, 9)}


def dilate_stage(stage: nn.Module, dilation: int) -> None:
    """Turn a strided stage into a dilated one in place: stride-2 convs → stride 1, k>1 convs →
    ``dilation`` (padding kept 'same'). Strided average pools (ResNet-D shortcuts) become stride 1."""
    for module in stage.modules():
        if isinstance(module, nn.Conv2d):
            if module.stride != (1, 1):
                module.stride = (1, 1)
            k = module.kernel_size[0]
            if k > 1:
                module.dilation = (dilation, dilation)
                module.padding = (dilation * (k - 1) // 2,) * 2
        elif isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)) and module.stride not in (1, (1, 1)):
            module.stride = 1
            module.kernel_size = 1
            module.padding = 0


def deeplab_head(in_channels: int, num_classes: int, channels: int, rates: Sequence[int]) -> nn.Sequential:
    """torchvision's DeepLabHead with a configurable width: ASPP → 3x3 conv-BN-ReLU → 1x1 classifier."""
    return nn.Sequential(
        ASPP(in_channels, list(rates), out_channels=channels),
        nn.Conv2d(channels, channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, num_classes, 1),
    )


class Segmenter(nn.Module):
    """Backbone → one feature map (``feature``) → DeepLabV3 head → bilinear upsampling."""

    def __init__(self, backbone: nn.Module, head: nn.Module, feature: str, num_classes: int, output_stride: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = head
        self.feature = feature
        self.num_classes = num_classes
        self.output_stride = output_stride
        self.head_type = "deeplabv3"

    def forward(self, images, targets=None):
        as_tensor = torch.is_tensor(images)
        sizes = [tuple(im.shape[-2:]) for im in images]
        x = images if as_tensor else _pad_stack(list(images), 0.0)
        logits = self.classifier(self.backbone(x)[self.feature])
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.training:
            if targets is None:
                raise ValueError("Segmenter: targets are required in training mode")
            masks = targets if torch.is_tensor(targets) else _pad_stack([t.long() for t in targets], IGNORE_INDEX)
            return {"loss_seg": F.cross_entropy(logits, masks.long(), ignore_index=IGNORE_INDEX)}
        if as_tensor:
            return logits
        return [logits[i, :, :h, :w] for i, (h, w) in enumerate(sizes)]


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
    backbone: nn.Module, num_classes: int, aspp_channels: int = 256, output_stride: int = 16
) -> Segmenter:
    """DeepLabV3 for ``num_classes`` labels (see the module doc for how the stride is reached)."""
    if output_stride not in ASPP_RATES:
        raise HarnessError(f"output_stride must be 8, 16 or 32, got {output_stride}")
    if num_classes < 2:
        raise HarnessError(f"num_classes must be >= 2, got {num_classes}")
    info = feature_channels(backbone)
    layer3, layer4 = find_stage(backbone, "layer3"), find_stage(backbone, "layer4")
    if layer4 is not None and "c5" in info:
        feature = "c5"
        if output_stride <= 16:
            dilate_stage(backbone.get_submodule(layer4), 2 if output_stride == 16 else 4)
        if output_stride == 8:
            if layer3 is None:
                raise HarnessError("output stride 8 needs a 'layer3' stage to dilate")
            dilate_stage(backbone.get_submodule(layer3), 2)
    else:
        if output_stride == 8:
            raise HarnessError(
                f"output stride 8 needs a ResNet-style backbone; {getattr(backbone, 'arch', '?')} supports 16 or 32"
            )
        feature = "c4" if output_stride == 16 else "c5"
        if feature not in info:
            raise HarnessError(f"backbone gives no {feature} feature map")
    dilated = feature == "c5" and output_stride < 32
    stride = _measure_stride(backbone, feature) if dilated else info[feature][1]
    if stride != output_stride:
        raise HarnessError(f"could not reach output stride {output_stride} on this backbone ({feature} has stride {stride})")
    head = deeplab_head(info[feature][0], num_classes, aspp_channels, ASPP_RATES[output_stride])
    return Segmenter(backbone, head, feature, num_classes, output_stride)


# ----------------------------------------------------------------------------- augmentation
def segmentation_train_augment(
    crop_size: int = 512,
    scale_range: tuple[float, float] = (0.5, 2.0),
    base_size: int | None = None,
    flip_prob: float = 0.5,
) -> Callable:
    """``fn(image, mask, generator) -> (image, mask)`` as mmsegmentation's VOC pipeline: random
    rescale by a factor in ``scale_range`` (of ``base_size`` as short side, if given, else of the
    image), pad to ``crop_size`` (image 0, mask 255), random ``crop_size`` square crop, random flip."""

    def augment(image: Tensor, mask: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        lo, hi = scale_range
        factor = lo + (hi - lo) * torch.rand((), generator=generator).item()
        h, w = image.shape[-2:]
        if base_size is not None:
            factor *= base_size / min(h, w)
        nh, nw = max(1, round(h * factor)), max(1, round(w * factor))
        image = F.interpolate(image[None], size=(nh, nw), mode="bilinear", align_corners=False)[0]
        mask = F.interpolate(mask[None, None].float(), size=(nh, nw), mode="nearest")[0, 0].long()
        ph, pw = max(crop_size - nh, 0), max(crop_size - nw, 0)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            mask = F.pad(mask, (0, pw, 0, ph), value=IGNORE_INDEX)
        top = int(torch.randint(0, image.shape[-2] - crop_size + 1, (), generator=generator))
        left = int(torch.randint(0, image.shape[-1] - crop_size + 1, (), generator=generator))
        image = image[:, top : top + crop_size, left : left + crop_size]
        mask = mask[top : top + crop_size, left : left + crop_size]
        if torch.rand((), generator=generator).item() < flip_prob:
            image, mask = image.flip(-1), mask.flip(-1)
        return image.contiguous(), mask.contiguous()

    return augment


def segmentation_postprocess(logits: Tensor) -> Tensor:
    """Class-index mask ([H, W]; uint8 up to 256 classes) from one image's logits [C, H, W]."""
    labels = logits.argmax(0)
    return labels.to(torch.uint8 if logits.shape[0] <= 256 else torch.int32).cpu()
