"""The two transfer protocols, defined exactly: which parameters train and how normalization behaves.

finetune (MoCo's detection protocol)
    Every backbone parameter trains, at the task's learning rate, as the neck and heads.
    BatchNorm families (ResNet, RegNet, EfficientNet, ...): BatchNorm trains (batch statistics,
    running statistics updated); with world size > 1 on CUDA every BatchNorm of the model (backbone
    and heads, e.g. DeepLab's ASPP) becomes SyncBatchNorm, so statistics are over the whole batch.
    On the CPU, PyTorch has no SyncBatchNorm: multi-process CPU runs keep per-process BatchNorm
    (recorded in the ProtocolInfo). LayerNorm families (ViT, Swin, ConvNeXt): LayerNorm has no
    running statistics; its affine parameters train like any other (the engine gives every norm
    parameter ``weight_decay_norm``). Fixed normalization layers shipped by the backbone
    (torchvision's FrozenBatchNorm2d) stay fixed and are counted in the ProtocolInfo.

frozen (the paper's frozen-features experiment)
    No pretrained backbone parameter or buffer changes: ``requires_grad`` is False on every
    backbone parameter that comes from the checkpoint (a ViT's newly initialised simple feature
    pyramid is neck and trains), and every backbone module runs in eval mode (BatchNorm uses its running statistics
    and does not update them; dropout/drop-path are off). A forward pre-hook on each backbone
    module enforces eval mode just before it runs, so ``model.train()`` calls cannot undo it, and a
    backbone stage reused as a head (the C4 model's res5) stays frozen too. Only the neck (FPN) and
    heads train; their BatchNorm (DeepLab) behaves as under finetune.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from harness.cards import PROTOCOLS, STAGES
from harness.errors import HarnessError


NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm, getattr(nn, "RMSNorm", nn.LayerNorm))
_HOOKS_ATTR = "_harness_frozen_hooks"


@dataclass
class ProtocolInfo:
    """What ``apply_protocol`` did; goes into the result record."""

    protocol: str
    backbone_parameters: int
    trainable_backbone_parameters: int
    trainable_parameters: int
    norm: str
    frozen_stages: list[str] = field(default_factory=list)  # frozen protocol: the stages kept fixed

    def as_dict(self) -> dict:
        return asdict(self)


def is_norm(module: nn.Module) -> bool:
    """A normalization layer (BatchNorm/SyncBatchNorm/GroupNorm/LayerNorm/..., timm's subclasses too)."""
    return isinstance(module, NORM_TYPES) or type(module).__name__ in ("FrozenBatchNorm2d", "LayerNorm2d")


def _eval_pre_hook(module: nn.Module, args) -> None:
    module.training = False


def _new_module_names(backbone: nn.Module) -> set[str]:
    """Modules holding the backbone's newly initialised parameters (a ViT's simple feature pyramid)."""
    names = backbone.new_parameter_names() if hasattr(backbone, "new_parameter_names") else []
    return {n.rsplit(".", 1)[0] for n in names}


def _under(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def freeze_backbone(backbone: nn.Module, keep_training: Sequence[str] = ()) -> None:
    """No gradient, eval mode now and before every forward of every pretrained backbone module
    (idempotent). Layers the backbone adds on top of its checkpoint (a ViT's feature pyramid) are
    neck, not pretrained weights: they keep training, as do the modules under ``keep_training``
    (module paths of stages the card leaves trainable)."""
    new_modules = _new_module_names(backbone)
    keep = set(keep_training)
    for name, p in backbone.named_parameters():
        p.requires_grad_(name.rsplit(".", 1)[0] in new_modules or _under(name, keep))
    if not hasattr(backbone, _HOOKS_ATTR):
        frozen = [m for n, m in backbone.named_modules() if n not in new_modules and not _under(n, keep)]

        def _all_eval(module, args):  # also reaches modules a family never calls directly (fused dropout)
            for m in frozen:
                m.training = False

        handles = [m.register_forward_pre_hook(_eval_pre_hook) for m in frozen[1:]]
        handles.append(backbone.register_forward_pre_hook(_all_eval))
        object.__setattr__(backbone, _HOOKS_ATTR, handles)
    backbone.eval()
    for name, m in backbone.named_modules():
        if name and _under(name, keep):
            m.train()


def stage_paths(backbone: nn.Module, stages: Sequence[str]) -> list[str]:
    """Module paths of backbone stages by name (``stem``, ``c2``..``c5``), for ResNet-style
    backbones (``conv1``/``bn1`` and ``layer1``..``layer4``); other families name no stages."""
    names = {"stem": ("conv1", "bn1"), "c2": ("layer1",), "c3": ("layer2",), "c4": ("layer3",), "c5": ("layer4",)}
    found = {n: [p for p, _ in backbone.named_modules() if p.rsplit(".", 1)[-1] == n] for ns in names.values() for n in ns}
    paths = []
    for stage in stages:
        for module in names[stage]:
            if len(found[module]) != 1:
                raise HarnessError(f"frozen_stages: cannot find stage {stage} ({module}) in "
                                   f"{getattr(backbone, 'arch', type(backbone).__name__)}; a card that leaves "
                                   "stages trainable under the frozen protocol needs a ResNet-style backbone")
            paths.append(found[module][0])
    return paths


def unfreeze_backbone(backbone: nn.Module) -> None:
    """Undo ``freeze_backbone``: every parameter trains, modes follow ``train()``/``eval()`` again."""
    for handle in getattr(backbone, _HOOKS_ATTR, []):
        handle.remove()
    if hasattr(backbone, _HOOKS_ATTR):
        object.__delattr__(backbone, _HOOKS_ATTR)
    for p in backbone.parameters():
        p.requires_grad_(True)


def convert_sync_batchnorm(model: nn.Module, skip: nn.Module | None = None) -> int:
    """Replace every BatchNorm of ``model`` (outside ``skip``) by SyncBatchNorm in place, keeping
    parameters and statistics; a module shared by two parents is converted once. Returns the count."""
    skipped = {id(m) for m in skip.modules()} if skip is not None else set()
    converted: dict[int, nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, _BatchNorm) or isinstance(child, nn.SyncBatchNorm) or id(child) in skipped:
                continue
            if id(child) not in converted:
                converted[id(child)] = nn.SyncBatchNorm.convert_sync_batchnorm(child)
            setattr(parent, name, converted[id(child)])
    return len(converted)


def _count(params) -> int:
    return sum(p.numel() for p in params)


def _describe_norms(backbone: nn.Module) -> str:
    kinds = sorted({type(m).__name__ for m in backbone.modules() if is_norm(m)})
    return ", ".join(kinds) if kinds else "no normalization layers"


def apply_protocol(
    model: nn.Module,
    backbone: nn.Module,
    protocol: str,
    world_size: int = 1,
    device: str | torch.device | None = None,
    frozen_stages: Sequence[str] = STAGES,
) -> ProtocolInfo:
    """Set up ``model`` (which contains ``backbone``) for ``protocol`` (module doc). Call it after
    building the model and before the optimizer/DDP. ``device`` decides SyncBatchNorm (CUDA only)."""
    if protocol not in PROTOCOLS:
        raise HarnessError(f"unknown protocol {protocol!r}: expected one of {', '.join(PROTOCOLS)}")
    if not any(m is backbone for m in model.modules()):
        raise ValueError("apply_protocol: the backbone is not a submodule of the model")
    on_cuda = device is not None and torch.device(device).type == "cuda"
    norms = _describe_norms(backbone)
    if protocol == "frozen":
        unknown = sorted(set(frozen_stages) - set(STAGES))
        if unknown or not frozen_stages:
            raise HarnessError(f"frozen_stages must name some of {', '.join(STAGES)}, got {list(frozen_stages)}")
        trainable = [s for s in STAGES if s not in frozen_stages]
        freeze_backbone(backbone, stage_paths(backbone, trainable) if trainable else ())
        synced = convert_sync_batchnorm(model, skip=backbone) if world_size > 1 and on_cuda else 0
        norm = f"backbone frozen in eval mode ({norms}: running statistics fixed)"
        if trainable:
            norm = f"backbone stages {', '.join(frozen_stages)} frozen in eval mode ({norms}: running statistics " \
                   f"fixed); {', '.join(trainable)} train as under finetune"
        if synced:
            norm += f"; {synced} head BatchNorm layers synchronized across {world_size} processes"
    else:
        unfreeze_backbone(backbone)
        parts = [f"backbone trains ({norms})"]
        if any(isinstance(m, _BatchNorm) for m in model.modules()):
            if world_size > 1 and on_cuda:
                synced = convert_sync_batchnorm(model)
                parts.append(f"{synced} BatchNorm layers -> SyncBatchNorm across {world_size} processes")
            elif world_size > 1:
                parts.append("BatchNorm statistics per process (no SyncBatchNorm on CPU)")
            else:
                parts.append("BatchNorm with single-process batch statistics")
        if any(isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for m in backbone.modules()):
            parts.append("LayerNorm/GroupNorm affine parameters train (no running statistics)")
        frozen_bn = sum(type(m).__name__ == "FrozenBatchNorm2d" for m in backbone.modules())
        if frozen_bn:
            parts.append(f"{frozen_bn} FrozenBatchNorm2d layers stay fixed")
        norm = "; ".join(parts)
    backbone_params = list(backbone.parameters())
    return ProtocolInfo(
        protocol=protocol,
        backbone_parameters=_count(backbone_params),
        trainable_backbone_parameters=_count(p for p in backbone_params if p.requires_grad),
        trainable_parameters=_count(p for p in model.parameters() if p.requires_grad),
        norm=norm,
        frozen_stages=list(frozen_stages) if protocol == "frozen" else [],
    )
