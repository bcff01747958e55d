"""Backbones: build an architecture, expose its ``c2..c5`` feature maps and the input normalization.

Every backbone is a :class:`Backbone`: ``forward(images)`` takes RGB images in ``[0, 1]``
(float ``[B, 3, H, W]``), normalizes them itself (``self.normalization``, including the RGB->BGR
flip for caffe-style weights) and returns an ``OrderedDict`` ``c2, c3, c4, c5`` at strides
4, 8, 16, 32. Task models read channels from ``feature_info`` and never normalize again.

Families:
  * torchvision ResNets (``resnet18..152``, ResNeXt, wide ResNets): the module names are
    torchvision's (``conv1``, ``bn1``, ``layer1..4``), so ``c2..c5`` are ``layer1..layer4``.
  * timm ViTs (``vit_small_patch16_224`` ...): the trunk is ``vit.*`` (timm names after the
    prefix); a ViTDet-style simple feature pyramid (``pyramid.*``, new layers, randomly
    initialised) turns the last block's stride-16 map into the four maps.
  * any other timm model with ``forward_intermediates`` (ConvNeXt, Swin, RegNet, EfficientNet,
    ...): the trunk is ``model.*``; ``c2..c5`` are its last features at strides 4, 8, 16, 32.

This module knows no checkpoint file: :mod:`harness.checkpoints` reads files into these
architectures (``load_backbone``, ``random:<arch>``) and writes them (``save_backbone``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from harness.errors import HarnessError
from harness.normalization import IMAGENET, Normalization, resolve_normalization

FEATURE_NAMES = ("c2", "c3", "c4", "c5")
FEATURE_STRIDES = (4, 8, 16, 32)


@dataclass(frozen=True)
class FeatureInfo:
    """One output feature map: its name (``c2``..``c5``), channel count and stride."""

    name: str
    channels: int
    stride: int


class Backbone(nn.Module):
    """Base class: normalization inside ``forward``; subclasses implement ``forward_features``.

    Attributes: ``arch`` (canonical name), ``options`` (build options, e.g. ``stride_in_1x1``),
    ``feature_info`` (c2..c5), ``normalization``, ``checkpoint`` (provenance: path, sha256, layout),
    ``trunk_prefix`` (where checkpoint keys live in this module's state dict), ``new_prefixes``
    (layers that are new, randomly initialised, never expected from a checkpoint), and
    ``head_prefixes`` (the architecture's classifier/final norm, ignored when a checkpoint has them).
    """

    trunk_prefix = ""
    new_prefixes: tuple[str, ...] = ()

    def __init__(self, arch: str, normalization: Normalization | None, options: dict | None = None):
        super().__init__()
        self.arch = arch
        self.options = dict(options or {})
        self.feature_info: list[FeatureInfo] = []
        self.head_prefixes: tuple[str, ...] = ()
        self.checkpoint = {"path": None, "sha256": None, "layout": "random"}
        self.set_normalization(normalization or IMAGENET)

    def set_normalization(self, normalization: Normalization) -> None:
        """Replace the input normalization (non-persistent buffers: never in the state dict)."""
        normalization = resolve_normalization(normalization)
        old = self._buffers.get("pixel_mean")
        device = old.device if old is not None else None
        self.normalization = normalization
        mean = torch.tensor(normalization.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        std = torch.tensor(normalization.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """RGB ``[0, 1]`` images -> the tensor the trunk expects (channel flip for BGR)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images [B, 3, H, W], got {tuple(images.shape)}")
        if self.normalization.channel_order == "BGR":
            images = images.flip(1)
        return (images * 255.0 - self.pixel_mean) / self.pixel_std

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        return self.forward_features(self.normalize(images))

    def forward_features(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """Normalized input -> ``OrderedDict(c2=..., c3=..., c4=..., c5=...)``."""
        raise NotImplementedError

    # -- accounting helpers ------------------------------------------------------------------
    @property
    def num_parameters(self) -> int:
        """Number of parameters of the whole backbone (trunk and any new pyramid layers)."""
        return sum(p.numel() for p in self.parameters())

    def is_new(self, name: str) -> bool:
        """True for a parameter/buffer name of a new (randomly initialised) layer."""
        return any(name.startswith(p) for p in self.new_prefixes)

    def pretrained_parameter_names(self) -> list[str]:
        """Parameters that come from the checkpoint (the trunk)."""
        return [n for n, _ in self.named_parameters() if not self.is_new(n)]

    def new_parameter_names(self) -> list[str]:
        """Parameters of new layers (the ViT simple pyramid), randomly initialised at load."""
        return [n for n, _ in self.named_parameters() if self.is_new(n)]

    def checkpoint_shapes(self) -> "OrderedDict[str, tuple[int, ...]]":
        """Checkpoint key (architecture's own naming) -> shape, for every tensor a checkpoint must hold."""
        out = OrderedDict()
        n = len(self.trunk_prefix)
        for key, value in self.state_dict().items():
            if key.startswith(self.trunk_prefix) and not self.is_new(key):
                out[key[n:]] = tuple(value.shape)
        return out

    def resize_checkpoint_tensor(self, key: str, t: torch.Tensor) -> torch.Tensor | None:
        """``t`` (checkpoint key ``key``) resampled to this model's shape, where that is exact enough; else None."""
        return None

    def trunk_state_dict(self) -> "OrderedDict[str, torch.Tensor]":
        """The trunk's tensors under their checkpoint names (what ``export`` writes)."""
        n = len(self.trunk_prefix)
        return OrderedDict(
            (k[n:], v) for k, v in self.state_dict().items() if k.startswith(self.trunk_prefix) and not self.is_new(k)
        )

    def describe(self) -> dict:
        """JSON-able summary: arch, options, parameters, feature_info, normalization, checkpoint."""
        return {
            "arch": self.arch,
            "options": dict(self.options),
            "parameters": self.num_parameters,
            "new_parameters": sum(p.numel() for n, p in self.named_parameters() if self.is_new(n)),
            "feature_info": [vars(f).copy() for f in self.feature_info],
            "normalization": self.normalization.to_dict(),
            "checkpoint": dict(self.checkpoint),
        }


def backbone_parameter_names(model: nn.Module) -> set[str]:
    """Full names (as in ``model.named_parameters()``) of every parameter inside a Backbone of ``model``."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, Backbone):
            base = f"{prefix}." if prefix else ""
            names.update(base + n for n, _ in module.named_parameters())
    return names


def _head_prefixes(full_keys, trunk_keys) -> tuple[str, ...]:
    """Shortest module prefixes of keys the full model has and the trunk dropped (its head)."""
    trunk = list(trunk_keys)
    out = set()
    for key in full_keys:
        if key in trunk_keys:
            continue
        parts = key.split(".")
        for i in range(1, len(parts) + 1):
            pre = ".".join(parts[:i]) + ("." if i < len(parts) else "")
            if i == len(parts) or not any(t.startswith(pre) for t in trunk):
                out.add(pre)
                break
    return tuple(sorted(out))


# ----------------------------------------------------------------------------- torchvision ResNets
TORCHVISION_RESNETS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2",
)


class ResNetBackbone(Backbone):
    """torchvision ResNet without ``avgpool``/``fc``; ``c2..c5`` = ``layer1..layer4``.

    ``stride_in_1x1=True`` moves each stage's stride to the first 1x1 conv (MSRA/caffe2 weights,
    detectron2's ``STRIDE_IN_1X1``); the default is torchvision's stride in the 3x3 conv.
    """

    def __init__(self, arch: str, normalization: Normalization | None = None, stride_in_1x1: bool = False):
        import torchvision

        super().__init__(arch, normalization, {"stride_in_1x1": bool(stride_in_1x1)} if stride_in_1x1 else {})
        net = torchvision.models.get_model(arch, weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        if stride_in_1x1:
            for layer in (self.layer2, self.layer3, self.layer4):
                block = layer[0]
                if not hasattr(block, "conv3"):
                    raise HarnessError(f"{arch}: stride_in_1x1 applies to bottleneck ResNets only")
                block.conv1.stride, block.conv2.stride = block.conv2.stride, (1, 1)
        self.head_prefixes = ("fc.",)
        self.feature_info = [
            FeatureInfo(name, _block_channels(layer[-1]), stride)
            for name, layer, stride in zip(
                FEATURE_NAMES, (self.layer1, self.layer2, self.layer3, self.layer4), FEATURE_STRIDES
            )
        ]

    def forward_features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return OrderedDict(c2=c2, c3=c3, c4=c4, c5=c5)


def _block_channels(block: nn.Module) -> int:
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return int(last_bn.num_features)


# ----------------------------------------------------------------------------- ViT + simple pyramid
class _LayerNorm2d(nn.LayerNorm):
    """LayerNorm over channels of an NCHW map."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _pyramid_level(dim: int, patch: int, stride: int) -> tuple[nn.Module, int]:
    """ViTDet-style rescaling of the stride-``patch`` map to ``stride``: deconvs, identity or maxpool."""
    if stride == patch:
        return nn.Identity(), dim
    if stride > patch:
        ratio = stride // patch
        if ratio * patch != stride:
            raise HarnessError(f"ViT patch size {patch} cannot make a stride-{stride} map")
        return nn.MaxPool2d(kernel_size=ratio, stride=ratio), dim
    ratio = patch // stride
    steps = int(round(math.log2(ratio))) if ratio > 0 else 0
    if ratio * stride != patch or 2**steps != ratio:
        raise HarnessError(f"ViT patch size {patch} cannot make a stride-{stride} map (needs a power-of-two ratio)")
    layers, ch = [], dim
    for i in range(steps):
        if i:
            layers += [_LayerNorm2d(ch), nn.GELU()]
        layers.append(nn.ConvTranspose2d(ch, ch // 2, kernel_size=2, stride=2))
        ch //= 2
    return nn.Sequential(*layers), ch


class ViTBackbone(Backbone):
    """timm VisionTransformer (trunk ``vit.*``) + simple feature pyramid (``pyramid.*``, new layers).

    The trunk is the patch embedding, prefix tokens, position embedding and all blocks; the final
    norm and head are not used (ViTDet). Inputs of any size work: position embeddings are
    resampled to the input grid at forward (``dynamic_img_size``) and the image is padded to a
    multiple of the patch size. ``img_size`` sets the grid checkpoints are interpolated to at load;
    ``reg_tokens`` adds prefix tokens (DeiT's distillation token); ``num_heads`` overrides the head
    count (MoCo v3's ViT-S has 12 heads, timm's 6: same shapes, different network).
    """

    trunk_prefix = "vit."
    new_prefixes = ("pyramid.",)

    def __init__(self, arch: str, normalization: Normalization | None = None, img_size: int | None = None,
                 reg_tokens: int = 0, num_heads: int | None = None):
        options = {}
        if img_size:
            options["img_size"] = int(img_size)
        if reg_tokens:
            options["reg_tokens"] = int(reg_tokens)
        if num_heads:
            options["num_heads"] = int(num_heads)
        super().__init__(arch, normalization, options)
        kwargs = dict(pretrained=False, dynamic_img_size=True, dynamic_img_pad=True, **options)
        vit = _create_timm(arch, **kwargs)
        full_keys = set(vit.state_dict())
        self.last_block = len(vit.blocks) - 1
        vit.prune_intermediate_layers([self.last_block], prune_norm=True, prune_head=True)
        self.vit = vit
        self.head_prefixes = tuple(sorted(set(_head_prefixes(full_keys, set(vit.state_dict())))
                                          | {"norm.", "fc_norm.", "head.", "head_dist."}))
        patch = int(vit.patch_embed.patch_size[0])
        if vit.patch_embed.patch_size[0] != vit.patch_embed.patch_size[1]:
            raise HarnessError(f"{arch}: non-square patches are not supported")
        dim = int(vit.embed_dim)
        self.patch_size = patch
        self.pyramid = nn.ModuleDict()
        for name, stride in zip(FEATURE_NAMES, FEATURE_STRIDES):
            module, ch = _pyramid_level(dim, patch, stride)
            self.pyramid[name] = module
            self.feature_info.append(FeatureInfo(name, ch, stride))

    def resize_checkpoint_tensor(self, key: str, t: torch.Tensor) -> torch.Tensor | None:
        """A position embedding for another grid, resampled bicubically to the model's (prefix tokens kept)."""
        from timm.layers import resample_abs_pos_embed

        vit = self.vit
        if key != "pos_embed" or t.dim() != 3 or t.shape[0] != 1 or t.shape[2] != vit.pos_embed.shape[2]:
            return None
        npt = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
        n = t.shape[1] - npt
        g = int(round(math.sqrt(n)))
        if n <= 0 or g * g != n:
            return None
        grid = list(vit.patch_embed.grid_size)
        return resample_abs_pos_embed(t.float(), new_size=grid, old_size=[g, g], num_prefix_tokens=npt).to(t.dtype)

    def forward_features(self, x):
        (feat,) = self.vit.forward_intermediates(x, indices=[self.last_block], intermediates_only=True, norm=False)
        return OrderedDict((name, self.pyramid[name](feat)) for name in FEATURE_NAMES)


# ----------------------------------------------------------------------------- other timm models
class TimmBackbone(Backbone):
    """Any timm model with ``forward_intermediates`` (trunk ``model.*``), features at strides 4..32."""

    trunk_prefix = "model."

    def __init__(self, arch: str, normalization: Normalization | None = None, model: nn.Module | None = None):
        super().__init__(arch, normalization, {})
        if model is None:
            model = _create_timm_dynamic(arch)
        if not hasattr(model, "forward_intermediates") or not hasattr(model, "prune_intermediate_layers"):
            raise HarnessError(f"timm model {arch!r} has no forward_intermediates: it cannot give c2..c5")
        info = getattr(model, "feature_info", None) or []
        by_stride = {}
        for i, f in enumerate(info):
            by_stride[int(f["reduction"])] = (i, int(f["num_chs"]))  # last feature at each stride wins
        have = sorted(by_stride)
        if any(s not in by_stride for s in FEATURE_STRIDES):
            raise HarnessError(
                f"timm model {arch!r} gives features at strides {have}; the harness needs 4, 8, 16 and 32"
            )
        self.indices = [by_stride[s][0] for s in FEATURE_STRIDES]
        full_keys = set(model.state_dict())
        model.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        self.model = model
        self.head_prefixes = _head_prefixes(full_keys, set(model.state_dict()))
        self.feature_info = [
            FeatureInfo(name, by_stride[s][1], s) for name, s in zip(FEATURE_NAMES, FEATURE_STRIDES)
        ]

    def forward_features(self, x):
        feats = self.model.forward_intermediates(x, indices=self.indices, intermediates_only=True)
        return OrderedDict(zip(FEATURE_NAMES, feats))


def _create_timm(arch: str, **kwargs) -> nn.Module:
    import timm

    try:
        return timm.create_model(arch, **kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc) or "unknown model" in str(exc).lower():
            raise HarnessError(
                f"unknown architecture {arch!r}: not a torchvision ResNet ({', '.join(TORCHVISION_RESNETS[:5])}, ...) "
                "nor a timm model name"
            ) from exc
        raise


def _create_timm_dynamic(arch: str) -> nn.Module:
    """A timm model that accepts any input size where the model supports it."""
    try:
        return _create_timm(arch, pretrained=False, dynamic_img_size=True)
    except TypeError:
        return _create_timm(arch, pretrained=False)


# ----------------------------------------------------------------------------- names
VIT_ALIASES = {
    "vit_small": "vit_small_patch16_224", "vit_s16": "vit_small_patch16_224", "vit-s/16": "vit_small_patch16_224",
    "vit-s16": "vit_small_patch16_224", "vits16": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224", "vit_b16": "vit_base_patch16_224", "vit-b/16": "vit_base_patch16_224",
    "vit-b16": "vit_base_patch16_224", "vitb16": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224", "vit_l16": "vit_large_patch16_224", "vit-l/16": "vit_large_patch16_224",
    "vit-l16": "vit_large_patch16_224", "vitl16": "vit_large_patch16_224",
    "vit_tiny": "vit_tiny_patch16_224", "vit_small_patch16": "vit_small_patch16_224",
    "vit_base_patch16": "vit_base_patch16_224", "vit_large_patch16": "vit_large_patch16_224",
}


def canonical_arch(arch: str) -> str:
    """Normalize an architecture name: aliases (``vit_base``, ``ViT-B/16``, MAE's ``mae_vit_base_patch16``)
    to timm names; ``timm:NAME`` forces timm (e.g. ``timm:resnet50``); ResNets stay torchvision's."""
    if not isinstance(arch, str) or not arch.strip():
        raise HarnessError(f"bad architecture name {arch!r}")
    name = arch.strip()
    if name.lower().startswith(("timm:", "timm/")):
        return "timm:" + name[5:]
    low = name.lower()
    if low.startswith("mae_"):
        low = low[4:]
    if low in TORCHVISION_RESNETS:
        return low
    if low in VIT_ALIASES:
        return VIT_ALIASES[low]
    return name


def build_backbone(arch: str, normalization=None, **opts) -> Backbone:
    """A randomly initialised backbone of ``arch``.

    ``normalization``: a :class:`Normalization`, preset name or dict (default ImageNet RGB).
    Options: ``stride_in_1x1`` (ResNets), ``img_size``, ``reg_tokens``, ``num_heads`` (ViTs).
    """
    name = canonical_arch(arch)
    norm = resolve_normalization(normalization)
    if name in TORCHVISION_RESNETS:
        _reject_opts(name, opts, {"stride_in_1x1"})
        return ResNetBackbone(name, norm, stride_in_1x1=bool(opts.get("stride_in_1x1", False)))
    timm_name = name[5:] if name.startswith("timm:") else name
    family = arch_family(name)
    if family == "vit":
        _reject_opts(name, opts, {"img_size", "reg_tokens", "num_heads"})
        bb = ViTBackbone(timm_name, norm, img_size=opts.get("img_size"), reg_tokens=opts.get("reg_tokens", 0),
                         num_heads=opts.get("num_heads"))
    else:
        from timm.models.vision_transformer import VisionTransformer

        _reject_opts(name, opts, set())
        model = _create_timm_dynamic(timm_name)
        if isinstance(model, VisionTransformer):
            raise HarnessError(f"{arch}: a VisionTransformer variant the simple pyramid does not support")
        bb = TimmBackbone(timm_name, norm, model=model)
    bb.arch = name
    return bb


_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")


def arch_family(arch: str) -> str:
    """``resnet`` (torchvision), ``vit`` (timm VisionTransformer + simple pyramid) or ``timm``."""
    name = canonical_arch(arch)
    if name in TORCHVISION_RESNETS:
        return "resnet"
    import timm

    base = (name[5:] if name.startswith("timm:") else name).split(".")[0]
    if not timm.is_model(base):
        raise HarnessError(
            f"unknown architecture {arch!r}: not a torchvision ResNet ({', '.join(TORCHVISION_RESNETS)}) "
            "nor a timm model name"
        )
    module = getattr(timm.models.model_entrypoint(base), "__module__", "")
    return "vit" if module in _VIT_MODULES else "timm"


def _reject_opts(arch: str, opts: dict, allowed: set) -> None:
    extra = sorted(k for k, v in opts.items() if k not in allowed and v not in (None, False, 0))
    if extra:
        raise HarnessError(f"option(s) {', '.join(extra)} do not apply to {arch}")
