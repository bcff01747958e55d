"""Write a backbone's weights: the harness's own format, and other frameworks' layouts (``harness export``)."""

from __future__ import annotations

import json
import pickle
import re
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from harness.backbones import Backbone, ResNetBackbone
from harness.checkpoints.formats import HARNESS_FORMAT, tv_to_d2
from harness.checkpoints.load import load_backbone
from harness.errors import HarnessError, HarnessWarning
from harness.files import atomic_write
from harness.normalization import IMAGENET, NORMALIZATIONS

EXPORT_TARGETS = ("detectron2", "torchvision", "mmdet")


def save_backbone(backbone: Backbone, path) -> Path:
    """Write ``backbone`` in the harness's own format: safetensors with metadata
    ``{"harness_format": "1", "arch", "normalization" (JSON), "options" (JSON)}``; keys are the
    trunk's checkpoint names (plus ``pyramid.*`` for ViTs, loaded back when present)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = len(backbone.trunk_prefix)
    tensors = {}
    for key, value in backbone.state_dict().items():
        if key.startswith(backbone.trunk_prefix) and not backbone.is_new(key):
            tensors[key[n:]] = value.detach().cpu().contiguous().clone()
        elif backbone.is_new(key):
            tensors[key] = value.detach().cpu().contiguous().clone()
    metadata = {
        "harness_format": HARNESS_FORMAT,
        "arch": backbone.arch,
        "normalization": json.dumps(backbone.normalization.to_dict()),
        "options": json.dumps(backbone.options),
    }
    save_file(tensors, str(path), metadata=metadata)
    _sort_metadata(path)
    return path


def _sort_metadata(path: Path) -> None:
    """safetensors writes its metadata in a Rust HashMap's order, which differs from one write to the
    next: the same tensors would get another sha256 (the id a result records). Rewrite the header in
    place with the metadata sorted; the header keeps its length, padded with spaces as safetensors pads."""
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # cannot happen for the same keys and values; the file stays valid as written
            return
        f.seek(8)
        f.write(text.ljust(size))


def export_backbone(path, arch: str | None, to: str, out, **opts) -> Path:
    """Write the backbone of checkpoint ``path`` in another framework's layout.

    ``torchvision``: a plain state dict (torchvision/timm key names, ``torch.save``).
    ``detectron2``: a ``.pkl`` as MoCo's convert-pretrain-to-detectron2.py writes (numpy arrays,
    ``stem``/``res2..5``/``shortcut`` names, ``__author__``, ``matching_heuristics``) plus a
    ``harness`` entry with arch, normalization and the detectron2 config values to set.
    ``mmdet``: ``{"meta": {...}, "state_dict": ...}`` with mmdet ResNet names (torchvision's) and
    the ``data_preprocessor``/backbone settings in ``meta``. detectron2 and mmdet: ResNets only.
    """
    if to not in EXPORT_TARGETS:
        raise HarnessError(f"unknown export target {to!r}: use one of {', '.join(EXPORT_TARGETS)}")
    out = Path(out)
    if out.is_dir():
        raise HarnessError(f"export: {out} is a folder; give the file to write")
    if out.exists() and out.resolve() == Path(path).resolve():
        raise HarnessError(f"export: {out} is the checkpoint being exported; write to another file")
    if out.suffix == ".safetensors":
        raise HarnessError(f"export: --to {to} writes a PyTorch file (.pth, .pkl), not {out.name}; "
                           "`harness pretrain` and the harness's own checkpoints are safetensors")
    if str(path).startswith("random:"):
        raise HarnessError(f"export: {path} is a random initialisation, not weights to export")
    bb = load_backbone(path, arch=arch, **opts)
    trunk = OrderedDict((k, v.detach().cpu().clone()) for k, v in bb.trunk_state_dict().items())
    missing = [k for k in bb.load_report["missing"] if k in trunk]
    if missing:  # an exported file cannot say which of its tensors are random: it would pass them off as loaded
        raise HarnessError(f"export: {len(missing)} tensors of {bb.arch} are not in {path} (e.g. {missing[0]}); "
                           "only a complete backbone is exported")
    if to == "torchvision":
        if bb.normalization != IMAGENET:
            name = next((k for k, v in NORMALIZATIONS.items() if v == bb.normalization), None)
            flag = f"--normalization {name}" if name else f"--normalization '{json.dumps(bb.normalization.to_dict())}'"
            warnings.warn(f"{out}: a torchvision state dict does not record the input normalization; "
                          f"load it with {flag}", HarnessWarning, stacklevel=2)
        atomic_write(out, lambda f: torch.save(trunk, f))
        return out
    if not isinstance(bb, ResNetBackbone):
        raise HarnessError(f"export to {to} supports ResNets; {bb.arch} can be exported with --to torchvision")
    meta = {"arch": bb.arch, "normalization": bb.normalization.to_dict(), "options": dict(bb.options),
            "source": dict(bb.checkpoint), "harness_export": to}
    weights = OrderedDict((k, v) for k, v in trunk.items() if not k.endswith("num_batches_tracked"))
    (_to_detectron2 if to == "detectron2" else _to_mmdet)(bb, weights, meta, out)
    return out


def _resnet_shape(bb: ResNetBackbone) -> tuple[int, int, int, bool]:
    """(depth, groups, width per group, stride in the 1x1 conv) of a torchvision ResNet."""
    groups = bb.layer1[0].conv2.groups
    width = bb.layer1[0].conv1.out_channels // groups
    depth = int(re.search(r"(\d+)", bb.arch.replace("resnext", "").replace("wide_resnet", "")).group(1))
    return depth, groups, width, bool(bb.options.get("stride_in_1x1", False))


def _to_detectron2(bb: ResNetBackbone, weights: dict, meta: dict, out: Path) -> None:
    depth, groups, width, stride_in_1x1 = _resnet_shape(bb)
    norm = bb.normalization
    meta["detectron2_config"] = {
        "MODEL.RESNETS.DEPTH": depth, "MODEL.RESNETS.STRIDE_IN_1X1": stride_in_1x1,
        "MODEL.RESNETS.NUM_GROUPS": groups, "MODEL.RESNETS.WIDTH_PER_GROUP": width,
        "MODEL.RESNETS.RES2_OUT_CHANNELS": bb.feature_info[0].channels,
        "MODEL.PIXEL_MEAN": list(norm.mean), "MODEL.PIXEL_STD": list(norm.std), "INPUT.FORMAT": norm.channel_order,
    }
    model = OrderedDict((tv_to_d2(k), v.numpy()) for k, v in weights.items())
    payload = {"model": model, "__author__": "harness", "matching_heuristics": True, "harness": meta}
    atomic_write(out, lambda f: pickle.dump(payload, f, protocol=4))


def _to_mmdet(bb: ResNetBackbone, weights: dict, meta: dict, out: Path) -> None:
    depth, groups, width, stride_in_1x1 = _resnet_shape(bb)
    norm = bb.normalization
    backbone_cfg = {"type": "ResNeXt" if groups > 1 else "ResNet", "depth": depth,
                    "style": "caffe" if stride_in_1x1 else "pytorch"}
    if groups > 1:
        backbone_cfg.update(groups=groups, base_width=width)
    meta["mmdet"] = {
        "backbone": backbone_cfg,
        "data_preprocessor": {"mean": list(norm.mean), "std": list(norm.std), "bgr_to_rgb": norm.channel_order == "RGB"},
        "note": "backbone init_cfg=dict(type='Pretrained', checkpoint=<this file>); mmcv images are BGR",
    }
    atomic_write(out, lambda f: torch.save({"meta": {"harness": meta}, "state_dict": weights}, f))
