"""Known checkpoint layouts, one record each, tried in order.

A :class:`Layout` says how to recognise a file (``detect``), how its key names map to the
architecture's (``rename``), which build options (``options``) and input normalization
(``normalization``) its weights need, and whether its BatchNorm is folded (``folded_bn``).
Detection tries :data:`LAYOUTS` in order and takes the first whose ``detect`` holds; the last
record matches anything. Precedence everywhere: the user's choice, then what the harness wrote
into the file (its own files and exports), then the layout's convention, then the default
(ImageNet RGB, the architecture's own options).

Adding a layout: one ``Layout(...)`` in :data:`LAYOUTS` (before any record that would claim the
file) and a test that writes such a file and checks the reported layout and the loaded features.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from typing import Callable

from harness.backbones import canonical_arch
from harness.normalization import CAFFE, IMAGENET, Normalization

HARNESS_FORMAT = "1"  # the harness's own safetensors files (``save_backbone``)


# ----------------------------------------------------------------------------- key renamers
_C2_BRANCH = {"1": None, "2a": "1", "2b": "2", "2c": "3"}
_C2_KIND = {"w": "weight", "b": "bias", "bn_s": "weight", "bn_b": "bias", "bn_rm": "running_mean", "bn_riv": "running_var"}
_C2_STEM = {"conv1_w": "conv1.weight", "conv1_b": "conv1.bias", "res_conv1_bn_s": "bn1.weight",
            "res_conv1_bn_b": "bn1.bias", "res_conv1_bn_rm": "bn1.running_mean", "res_conv1_bn_riv": "bn1.running_var",
            "fc1000_w": "fc.weight", "fc1000_b": "fc.bias", "pred_w": "fc.weight", "pred_b": "fc.bias"}


def caffe2_to_tv(k: str) -> str:
    """MSRA caffe2 blob names (``res2_0_branch2a_w``) -> torchvision ResNet names."""
    if k in _C2_STEM:
        return _C2_STEM[k]
    m = re.fullmatch(r"res(\d)_(\d+)_branch(1|2a|2b|2c)_(w|b|bn_s|bn_b|bn_rm|bn_riv)", k)
    if not m:
        return k
    layer, block, branch, kind = int(m[1]) - 1, m[2], m[3], m[4]
    base = f"layer{layer}.{block}."
    is_bn = kind.startswith("bn_")
    if branch == "1":
        return base + ("downsample.1." if is_bn else "downsample.0.") + _C2_KIND[kind]
    return base + (f"bn{_C2_BRANCH[branch]}." if is_bn else f"conv{_C2_BRANCH[branch]}.") + _C2_KIND[kind]


def d2_to_tv(k: str) -> str:
    """detectron2 ResNet names (``stem.conv1.norm.weight``, ``res2.0.shortcut.norm.bias``) -> torchvision."""
    if k.startswith("stem."):
        return k[5:].replace("conv1.norm.", "bn1.")
    m = re.match(r"res(\d)\.(.*)", k)
    if m:
        k = f"layer{int(m.group(1)) - 1}.{m.group(2)}"
    k = k.replace("shortcut.norm.", "downsample.1.")
    k = re.sub(r"shortcut\.(weight|bias)$", r"downsample.0.\1", k)
    return re.sub(r"conv(\d)\.norm\.", r"bn\1.", k)


def tv_to_d2(k: str) -> str:
    """torchvision ResNet names -> detectron2 (as MoCo's convert-pretrain-to-detectron2.py)."""
    m = re.match(r"layer(\d)\.(.*)", k)
    k = f"res{int(m.group(1)) + 1}.{m.group(2)}" if m else "stem." + k
    k = re.sub(r"bn(\d)\.", r"conv\1.norm.", k)
    return k.replace("downsample.0.", "shortcut.").replace("downsample.1.", "shortcut.norm.")


def mmpretrain_vit_to_timm(k: str) -> str:
    """mmpretrain/mmselfsup VisionTransformer names -> timm names (timm and torchvision names pass)."""
    k = k.replace("patch_embed.projection.", "patch_embed.proj.")
    k = re.sub(r"^layers\.(\d+)\.", r"blocks.\1.", k)
    k = re.sub(r"^(blocks\.\d+\.)ln1\.", r"\1norm1.", k)
    k = re.sub(r"^(blocks\.\d+\.)ln2\.", r"\1norm2.", k)
    k = re.sub(r"^(blocks\.\d+\.)ffn\.layers\.0\.0\.", r"\1mlp.fc1.", k)
    k = re.sub(r"^(blocks\.\d+\.)ffn\.layers\.1\.", r"\1mlp.fc2.", k)
    k = re.sub(r"^ln1\.", "norm.", k)
    return re.sub(r"^pre_norm\.", "norm_pre.", k)


def same(k: str) -> str:
    return k


# ----------------------------------------------------------------------------- what detection sees
@dataclass(frozen=True)
class Probe:
    """A checkpoint as layout detection sees it."""

    container: str  # torch-zip, torch-legacy, pickle or safetensors
    top: dict  # the file's top-level dict ({} when the file is not a dict)
    entry: str  # the entry holding the weights ("a/b" when nested); "" at the top level
    keys: tuple  # tensor names, DDP/compile wrappers removed
    stripped: tuple  # the wrappers removed ("module.", "_orig_mod.")
    arch: str
    family: str  # resnet, vit or timm (harness.backbones.arch_family)
    prefix: str | None  # where the architecture's own key names are; None: nowhere unambiguous
    harness: dict  # arch/normalization/options the harness wrote into the file
    harness_format: str | None  # the harness's own safetensors files: their format version

    @property
    def author(self) -> str:
        return str(self.top.get("__author__", ""))

    @property
    def roles(self) -> set:
        """The words of the encoder prefix (``encoder_q``, ``base_encoder``, ...)."""
        return set(self.prefix.rstrip(".").split(".")) if self.prefix else set()

    def has(self, pattern: str) -> bool:
        """Some key matches the regular expression ``pattern``."""
        return any(re.search(pattern, k) for k in self.keys)


Options = dict  # build option -> (value, note for the report)


@dataclass(frozen=True)
class Layout:
    """One known checkpoint layout."""

    name: str  # what `inspect` reports and backbone cards name; "{entry}" is the weights' entry
    detect: Callable[[Probe], bool]
    rename: Callable[[str], str] = same  # key after the encoder prefix -> the architecture's key
    naming: str | None = None  # the key-name scheme reported when ``rename`` changes names
    options: Callable[[Probe], Options] = lambda p: {}  # build options the weights need
    normalization: Callable[[Probe], tuple[Normalization, str] | None] = lambda p: None  # (value, why)
    folded_bn: bool = False  # BatchNorm folded into scale/shift: no running stats (mean 0, var 1-eps)
    tags_wrappers: bool = False  # name + "+module." etc. when DDP/compile wrappers were removed

    def label(self, probe: Probe) -> str:
        name = self.name.format(entry=probe.entry.split("/")[0])
        if self.tags_wrappers and probe.stripped:
            name += "+" + "+".join(probe.stripped)
        return name


# ----------------------------------------------------------------------------- the records' rules
_CAFFE_AUTHORS = ("Caffe2", "Detectron2 Model Zoo")
_STRIDE_NOTE = "caffe2/MSRA weights: stride in the 1x1 conv (detectron2 STRIDE_IN_1X1=True)"


def _caffe2_names(p: Probe) -> bool:
    return p.family == "resnet" and p.has(r"((^|\.)res\d_\d+_branch2a_w$)|(res_conv1_bn_s$)")


def _d2_names(p: Probe) -> bool:
    return p.family == "resnet" and p.has(r"(stem\.conv1\.weight$)|((^|\.)res[2-5]\.\d+\.conv1\.weight$)")


def _d2_options(p: Probe) -> Options:
    return {"stride_in_1x1": (True, _STRIDE_NOTE)} if p.author in _CAFFE_AUTHORS else {}


def _d2_normalization(p: Probe):
    if p.author in _CAFFE_AUTHORS:
        return CAFFE, f"detectron2 file by {p.author!r}: caffe-style BGR"
    if p.author == "MOCO":
        return IMAGENET, "MoCo's detectron2 conversion keeps torchvision RGB mean/std"
    return None


def _mmpretrain(p: Probe) -> bool:
    vit_names = p.family == "vit" and p.has(r"(patch_embed\.projection\.weight$)|(\.ffn\.layers\.0\.0\.)")
    return vit_names or (p.entry == "state_dict" and isinstance(p.top.get("meta"), dict) and p.prefix == "backbone.")


def _lightning(p: Probe) -> bool:
    return "pytorch-lightning_version" in p.top or (
        p.entry == "state_dict" and any(k in p.top for k in ("global_step", "optimizer_states", "loops")))


def _moco_v3_options(p: Probe) -> Options:
    if p.arch == "vit_small_patch16_224":
        return {"num_heads": (12, "MoCo v3 ViT-S has 12 attention heads (timm's vit_small has 6): "
                                  "built with num_heads=12")}
    return {}


def _projection_outside(p: Probe) -> bool:
    return bool(p.prefix) and any(re.search(r"project|predict", k) for k in p.keys if not k.startswith(p.prefix))


LAYOUTS: tuple[Layout, ...] = (
    Layout("harness", lambda p: p.harness_format is not None),
    # records that rename keys: recognised by their key names
    Layout("detectron2-caffe2", _caffe2_names, caffe2_to_tv, "caffe2", folded_bn=True,
           options=lambda p: {"stride_in_1x1": (True, _STRIDE_NOTE)},
           normalization=lambda p: (CAFFE, "MSRA caffe2 weights: BGR, mean-subtracted, std 1")),
    Layout("detectron2-pkl", lambda p: _d2_names(p) and p.container == "pickle", d2_to_tv, "detectron2",
           options=_d2_options, normalization=_d2_normalization),
    Layout("detectron2", _d2_names, d2_to_tv, "detectron2", options=_d2_options, normalization=_d2_normalization),
    Layout("mmpretrain", _mmpretrain, mmpretrain_vit_to_timm, "mmpretrain-vit"),
    # records with the architecture's own names: recognised by where the weights are, and what else is there
    Layout("torchvision-detection", lambda p: (p.prefix or "").endswith("backbone.body.")),
    Layout("dino", lambda p: p.entry.split("/")[0] in ("teacher", "student")),
    Layout("moco-v1/v2", lambda p: "encoder_q" in p.roles),
    Layout("moco-v3", lambda p: "base_encoder" in p.roles, options=_moco_v3_options),
    Layout("lightning", _lightning),
    Layout("mmdet", lambda p: bool(p.harness) and isinstance(p.top.get("meta"), dict)),
    Layout("mae", lambda p: p.family == "vit" and p.has(r"^(decoder_|mask_token)")),
    Layout("deit", lambda p: p.family == "vit" and p.has(r"(dist_token$)|(^head_dist)")),
    Layout("byol/simclr", _projection_outside),
    Layout("timm-ema", lambda p: p.entry == "state_dict_ema"),
    Layout("mae/deit", lambda p: p.entry == "model" and p.family == "vit"),
    # generic descriptions of the structure
    Layout("{entry}-wrapper", lambda p: bool(p.entry), tags_wrappers=True),
    Layout("safetensors", lambda p: p.container == "safetensors", tags_wrappers=True),
    Layout("torchvision", lambda p: p.family == "resnet" and p.prefix == "", tags_wrappers=True),
    Layout("timm", lambda p: p.prefix == "", tags_wrappers=True),
    Layout("prefixed", lambda p: True, tags_wrappers=True),
)


def detect(probe: Probe) -> Layout:
    """The first record of :data:`LAYOUTS` that recognises the file."""
    return next(layout for layout in LAYOUTS if layout.detect(probe))


def tensor_options(p: Probe) -> Options:
    """Build options any layout's tensors decide: a DeiT distillation token is one more prefix token."""
    if p.family == "vit" and p.has(r"dist_token$") and "distilled" not in p.arch:
        return {"reg_tokens": (1, "DeiT distillation token: built with one extra prefix token (timm reg_tokens=1)")}
    return {}


# ----------------------------------------------------------------------------- what the file says about itself
def harness_metadata(obj, st_meta: dict) -> dict:
    """arch/normalization/options written by the harness (its own files and its exports)."""
    if st_meta.get("harness_format"):
        out = {"arch": st_meta.get("arch")}
        for k in ("normalization", "options"):
            if st_meta.get(k):
                out[k] = json.loads(st_meta[k])
        return out
    if not isinstance(obj, dict):
        return {}
    meta = obj.get("harness")
    if not isinstance(meta, dict) and isinstance(obj.get("meta"), dict):
        meta = obj["meta"].get("harness")
    return {k: meta[k] for k in ("arch", "normalization", "options") if k in meta} if isinstance(meta, dict) else {}


def _arch_name(name: str, patch=None) -> str:
    """A training script's arch name -> the harness's (``vit_small`` + patch 16, ``mae_vit_base_patch16``)."""
    low = name.strip().lower()
    if low.startswith("mae_"):
        low = low[4:]
    if patch and re.fullmatch(r"vit_(tiny|small|base|large|huge)", low):
        return f"{low}_patch{int(patch)}_224"
    if re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch\d+", low):
        return low + "_224"
    return canonical_arch(name)


def _at(obj, *path):
    """``obj[path[0]][path[1]]...`` through dicts and argparse namespaces; None where absent."""
    for part in path:
        obj = vars(obj) if isinstance(obj, argparse.Namespace) else obj
        obj = obj.get(part) if isinstance(obj, dict) else None
    return obj


# where files name their architecture, first hit wins: the harness's metadata, then what training scripts save
_ARCH_SOURCES = (
    ("checkpoint 'harness' entry", ("harness", "arch")),
    ("checkpoint 'meta' entry", ("meta", "harness", "arch")),  # the harness's mmdet export
    ("checkpoint 'arch' entry", ("arch",)),  # MoCo, timm
    ("checkpoint args.arch", ("args", "arch")),  # DINO (with args.patch_size)
    ("checkpoint args.model", ("args", "model")),  # MAE, DeiT
    ("checkpoint hyper_parameters.arch", ("hyper_parameters", "arch")),  # Lightning
    ("checkpoint hyper_parameters.backbone", ("hyper_parameters", "backbone")),
    ("checkpoint hyper_parameters.model_name", ("hyper_parameters", "model_name")),
)


def arch_named_by(obj, st_meta: dict) -> tuple[str | None, str]:
    """The architecture the file names, and where -> ``(arch, source)``; ``(None, "")`` if it names none."""
    if st_meta.get("arch"):
        return canonical_arch(st_meta["arch"]), "checkpoint metadata"
    if not isinstance(obj, dict):
        return None, ""
    for source, path in _ARCH_SOURCES:
        name = _at(obj, *path)
        if isinstance(name, str):
            if path[0] in ("harness", "meta"):  # written by the harness: already its name
                return canonical_arch(name), source
            return _arch_name(name, _at(obj, "args", "patch_size") if path == ("args", "arch") else None), source
    return None, ""
