"""Read any checkpoint safely, detect its layout, map its keys to the architecture, account for all.

Reading never executes code from the file:
  * PyTorch files (zip and legacy) go through ``torch.load(weights_only=True)`` with a short
    allow-list of harmless types (argparse.Namespace, pathlib paths, numpy arrays/scalars/dtypes);
  * ``.pkl`` files (detectron2, MSRA caffe2) go through a restricted unpickler that only
    rebuilds numpy arrays and builtin containers;
  * safetensors files hold tensors only.
Anything else is refused with one line naming the type. ``unsafe_load=True`` (CLI
``--unsafe-load``) is the documented-as-dangerous exception: a full pickle load that can run
arbitrary code from the file; never the default.

Accounting: every tensor of the architecture (``Backbone.checkpoint_shapes()``) is loaded from
the checkpoint, or the load fails listing missing/unexpected keys and shape mismatches. Tensors
that are not the backbone (projection heads, predictors, momentum encoders, queues, decoders,
classifier heads, optimizer state, ...) are ignored and listed. Documented exceptions:
``num_batches_tracked`` (a counter) may be absent, caffe2 weights have BatchNorm folded into
scale/shift (running stats set to mean 0, var 1-eps: an exact affine), new layers (the ViT
pyramid) are never expected, and ``allow_missing``/``allow_unexpected`` are explicit opt-ins.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import pathlib
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.errors import HarnessError

# ----------------------------------------------------------------------------- safe reading
try:  # numpy >= 2
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _np_multiarray
    from numpy.core import numeric as _np_numeric

_NP_DTYPE_CLASSES = [getattr(np.dtypes, n) for n in getattr(np.dtypes, "__all__", [])
                     if isinstance(getattr(np.dtypes, n), type)]
_NP_FUNCS = {
    "_reconstruct": _np_multiarray._reconstruct,
    "scalar": _np_multiarray.scalar,
    "_frombuffer": _np_numeric._frombuffer,
}

# (module, name) -> object for the restricted .pkl unpickler: numpy array reconstruction + containers.
_PKL_ALLOWED: dict[tuple[str, str], object] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): __import__("codecs").encode,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _PKL_ALLOWED[(_mod, "_reconstruct")] = _NP_FUNCS["_reconstruct"]
    _PKL_ALLOWED[(_mod, "scalar")] = _NP_FUNCS["scalar"]
for _mod in ("numpy.core.numeric", "numpy._core.numeric"):
    _PKL_ALLOWED[(_mod, "_frombuffer")] = _NP_FUNCS["_frombuffer"]
for _cls in _NP_DTYPE_CLASSES:
    _PKL_ALLOWED[("numpy.dtypes", _cls.__name__)] = _cls


def _torch_safe_globals() -> list:
    """Extra types ``torch.load(weights_only=True)`` may rebuild: ones real checkpoints hold."""
    safe: list = [argparse.Namespace, pathlib.PosixPath, pathlib.PurePosixPath,
                  pathlib.WindowsPath, pathlib.PureWindowsPath, np.ndarray, np.dtype, *_NP_DTYPE_CLASSES]
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        safe += [(_NP_FUNCS["_reconstruct"], f"{mod}._reconstruct"), (_NP_FUNCS["scalar"], f"{mod}.scalar")]
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        safe.append((_NP_FUNCS["_frombuffer"], f"{mod}._frombuffer"))
    return safe


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for ``.pkl`` weight files: numpy arrays and builtin containers, nothing else."""

    def find_class(self, module, name):
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        obj = _PKL_ALLOWED.get((module, name))
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj

    def persistent_load(self, pid):
        raise _Refused("persistent id (a torch.save file saved with plain pickle)")


class _Refused(pickle.UnpicklingError):
    def __init__(self, what: str):
        super().__init__(what)
        self.what = what


_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise HarnessError(f"{path}: empty file, not a checkpoint")
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < (100 << 20):
        return "safetensors"
    if head.startswith(_LEGACY_TORCH_MAGIC):
        return "torch-legacy"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "pickle"
    if head[:1] in (b"(", b"}", b"]"):
        return "pickle"
    raise HarnessError(
        f"{path}: not a checkpoint (unrecognised format: not a PyTorch file, pickle or safetensors; first bytes {head[:8]!r})"
    )


def read_checkpoint(path, unsafe_load: bool = False) -> tuple[object, str, dict]:
    """Load a checkpoint file without running code from it -> ``(object, container, metadata)``.

    ``container`` is ``torch-zip``, ``torch-legacy``, ``pickle`` or ``safetensors``; ``metadata``
    is the safetensors header metadata (empty otherwise). ``unsafe_load=True`` is DANGEROUS: it
    unpickles everything and can execute code hidden in the file.
    """
    path = Path(path)
    if not path.exists():
        raise HarnessError(f"{path}: no such checkpoint file")
    if not path.is_file():
        raise HarnessError(f"{path}: not a file")
    container = _sniff(path)
    if container == "safetensors":
        return _read_safetensors(path)
    if container == "pickle":
        return _read_pickle(path, unsafe_load), container, {}
    return _read_torch(path, container, unsafe_load), container, {}


def _read_safetensors(path: Path):
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            tensors = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    except Exception as exc:  # SafetensorError, OSError
        raise HarnessError(f"{path}: unreadable safetensors file (truncated or corrupt?): {_first_line(exc)}") from exc
    return tensors, "safetensors", meta


def _read_pickle(path: Path, unsafe_load: bool):
    try:
        with open(path, "rb") as f:
            if unsafe_load:
                return pickle.load(f, encoding="latin1")  # DANGEROUS by request: may run code
            return _RestrictedUnpickler(f, encoding="latin1").load()
    except _Refused as exc:
        raise HarnessError(
            f"{path}: refused: the pickle holds {exc.what!r}, which is not a numpy array or builtin container "
            "(loading it could run code from the file); if you trust the file, pass --unsafe-load"
        ) from None
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError,
            UnicodeDecodeError) as exc:
        raise HarnessError(f"{path}: unreadable pickle (truncated or corrupt?): {_first_line(exc)}") from None


_GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
_BUILD_RE = re.compile(r"but got <class '([\w.]+)'>")


def _read_torch(path: Path, container: str, unsafe_load: bool):
    try:
        if unsafe_load:
            return torch.load(path, map_location="cpu", weights_only=False)  # DANGEROUS by request
        with torch.serialization.safe_globals(_torch_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        m = _GLOBAL_RE.search(text) or _BUILD_RE.search(text)
        if m or "Weights only load failed" in text:
            what = m.group(1) if m else _weights_only_reason(text)
            raise HarnessError(
                f"{path}: refused: the checkpoint holds {what!r}, which is not on the allow-list of harmless types "
                "(loading it could run code from the file); if you trust the file, pass --unsafe-load"
            ) from None
        raise HarnessError(f"{path}: unreadable checkpoint (truncated or corrupt?): {_first_line(exc)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise HarnessError(f"{path}: unreadable checkpoint (truncated or corrupt?): {_first_line(exc)}") from None


def _weights_only_reason(text: str) -> str:
    for line in text.splitlines():
        if "WeightsUnpickler error" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip() or "an unsupported pickle instruction"
    return "an unsupported type"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


# ----------------------------------------------------------------------------- finding the state dict
def _is_array(v) -> bool:
    return isinstance(v, (torch.Tensor, np.ndarray))


def _count_tensors(obj, depth: int = 0) -> int:
    if _is_array(obj):
        return 1
    if depth > 6:
        return 0
    if isinstance(obj, dict):
        return sum(_count_tensors(v, depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_count_tensors(v, depth + 1) for v in obj)
    return 0


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and any(_is_array(v) for v in obj.values()) and all(isinstance(k, str) for k in obj)


# Preferred top-level entries holding the weights, in order (DINO teacher, timm EMA, ...).
WRAPPER_KEYS = ("teacher", "state_dict_ema", "state_dict", "model", "module", "backbone", "encoder",
                "student", "net", "network", "blobs", "params", "weights")


def _select_state_dict(obj, key: str | None):
    """-> (state dict, entry path, [(entry name, value)] of the entries not used).

    ``key`` (``a/b`` for nested) names the entry; otherwise known wrappers are unwrapped in the
    order of ``WRAPPER_KEYS`` (a nested dict holding tensors under such a key is a wrapper: a real
    state dict maps names to tensors, never to dicts).
    """
    path: list[str] = []
    others: list[tuple[str, object]] = []
    cur = obj
    if key is not None:
        for part in key.split("/"):
            if not isinstance(cur, dict) or part not in cur:
                entries = sorted(map(str, cur)) if isinstance(cur, dict) else type(cur).__name__
                raise HarnessError(f"checkpoint has no entry {key!r} (entries: {entries})")
            others += [("/".join(path + [str(k)]), v) for k, v in cur.items() if k != part]
            path.append(part)
            cur = cur[part]
    for _ in range(4):
        if not isinstance(cur, dict):
            break
        choice = next((k for k in WRAPPER_KEYS if isinstance(cur.get(k), dict) and _count_tensors(cur[k]) > 0), None)
        if choice is None:
            break
        others += [("/".join(path + [str(k)]), v) for k, v in cur.items() if k != choice]
        path.append(choice)
        cur = cur[choice]
    if _is_state_dict(cur):
        return cur, path, others
    if isinstance(obj, dict):
        entries = sorted(map(str, obj))[:12]
        raise HarnessError(f"no state dict found in the checkpoint (top-level entries: {entries}); pass --key ENTRY")
    raise HarnessError(f"no state dict found in the checkpoint (it holds a {type(obj).__name__})")


def _to_tensor(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    arr = np.asarray(v)
    if arr.dtype == object:
        raise HarnessError("checkpoint holds an object array where a weight was expected")
    if not (arr.flags.c_contiguous and arr.flags.writeable):
        arr = np.array(arr, order="C", copy=True)
    return torch.from_numpy(arr)


def _strip_wrappers(key: str) -> str:
    """Remove DDP's leading ``module.`` and torch.compile's ``_orig_mod.`` segments."""
    parts = [p for p in key.split(".") if p != "_orig_mod"]
    while parts and parts[0] == "module" and len(parts) > 1:
        parts = parts[1:]
    return ".".join(parts)


# ----------------------------------------------------------------------------- key naming schemes
_C2_BRANCH = {"1": None, "2a": "1", "2b": "2", "2c": "3"}
_C2_KIND = {"w": "weight", "b": "bias", "bn_s": "weight", "bn_b": "bias", "bn_rm": "running_mean", "bn_riv": "running_var"}


def _caffe2_to_tv(k: str) -> str:
    """MSRA caffe2 blob names (``res2_0_branch2a_w``) -> torchvision ResNet names."""
    stem = {"conv1_w": "conv1.weight", "conv1_b": "conv1.bias", "res_conv1_bn_s": "bn1.weight",
            "res_conv1_bn_b": "bn1.bias", "res_conv1_bn_rm": "bn1.running_mean", "res_conv1_bn_riv": "bn1.running_var",
            "fc1000_w": "fc.weight", "fc1000_b": "fc.bias", "pred_w": "fc.weight", "pred_b": "fc.bias"}
    if k in stem:
        return stem[k]
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


def _mmpretrain_vit_to_timm(k: str) -> str:
    """mmpretrain/mmselfsup VisionTransformer names -> timm names."""
    k = k.replace("patch_embed.projection.", "patch_embed.proj.")
    k = re.sub(r"^layers\.(\d+)\.", r"blocks.\1.", k)
    k = re.sub(r"^(blocks\.\d+\.)ln1\.", r"\1norm1.", k)
    k = re.sub(r"^(blocks\.\d+\.)ln2\.", r"\1norm2.", k)
    k = re.sub(r"^(blocks\.\d+\.)ffn\.layers\.0\.0\.", r"\1mlp.fc1.", k)
    k = re.sub(r"^(blocks\.\d+\.)ffn\.layers\.1\.", r"\1mlp.fc2.", k)
    k = re.sub(r"^ln1\.", "norm.", k)
    return re.sub(r"^pre_norm\.", "norm_pre.", k)


RENAMERS = {"native": lambda k: k, "detectron2": d2_to_tv, "caffe2": _caffe2_to_tv, "mmpretrain-vit": _mmpretrain_vit_to_timm}


def _detect_naming(keys, family: str) -> str:
    if family == "resnet":
        if any(re.search(r"(^|\.)res\d_\d+_branch2a_w$", k) or k.endswith("res_conv1_bn_s") for k in keys):
            return "caffe2"
        if any(k.endswith("stem.conv1.weight") or re.search(r"(^|\.)res[2-5]\.\d+\.conv1\.weight$", k) for k in keys):
            return "detectron2"
    if family == "vit" and any(k.endswith("patch_embed.projection.weight") or ".ffn.layers.0.0." in k for k in keys):
        return "mmpretrain-vit"
    return "native"


# ----------------------------------------------------------------------------- what is ignored, and why
SECONDARY_ROLES = {"encoder_k", "momentum_encoder", "momentum_backbone", "target_encoder", "target_network",
                   "target_backbone", "target_net", "key_encoder", "momentum_model", "ema_model", "student",
                   "model_ema"}

# (word in the prefix, why it is not the backbone), first match wins
_REASONS = (
    ("_momentum", "caffe2 optimizer momentum"),
    ("encoder_k", "MoCo momentum (key) encoder"),
    ("momentum", "momentum encoder"),
    ("target", "target (momentum) encoder"),
    ("queue", "MoCo negatives queue"),
    ("predictor", "predictor head"),
    ("projector", "projection head"),
    ("projection", "projection head"),
    ("decoder", "MAE decoder"),
    ("mask_token", "mask token (pretraining only)"),
    ("masked_embed", "mask token (pretraining only)"),
    ("optimizer", "optimizer state"),
    ("scaler", "AMP scaler state"),
    ("scheduler", "LR scheduler state"),
    ("student", "student network (the teacher is used)"),
    ("teacher", "teacher network (not selected)"),
    ("fpn", "detection neck"),
    ("rpn", "detection head"),
    ("roi_heads", "detection head"),
    ("proposal_generator", "detection head"),
    ("prototypes", "prototypes (SwAV-style head)"),
    ("classifier", "classifier"),
    ("loss", "loss state"),
    ("center", "DINO loss centre"),
    ("model_ema", "EMA weights (pass --key model_ema to use them)"),
    ("state_dict", "non-EMA weights (the EMA weights are used)"),
    ("head", "classification/projection head"),
    ("fc", "classification/projection head"),
    ("neck", "neck"),
    ("callbacks", "training callbacks"),
    ("loops", "training loop state"),
)
PRETRAIN_ONLY = ("mask_token", "masked_embed", "decoder", "projection_head", "prototypes")  # MAE; SwAV, DeepCluster-v2


def _reason(prefix: str) -> str:
    low = prefix.lower()
    for word, reason in _REASONS:
        if word in low:
            return reason
    return "not part of the backbone"


def _group_outside(key: str, chosen: str) -> str:
    """Group a key outside the chosen encoder prefix by its shortest prefix not shared with it."""
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        pre = ".".join(parts[:i]) + ("." if i < len(parts) else "")
        if not chosen.startswith(pre) or i == len(parts):
            return pre
    return key


# ----------------------------------------------------------------------------- architecture named by the file
def _arch_from_checkpoint(obj, st_meta: dict) -> tuple[str | None, str]:
    from harness.backbones import canonical_arch

    def norm_name(name: str, patch=None) -> str:
        low = name.strip().lower()
        if low.startswith("mae_"):
            low = low[4:]
        if patch and re.fullmatch(r"vit_(tiny|small|base|large|huge)", low):
            return f"{low}_patch{int(patch)}_224"
        if re.fullmatch(r"vit_(tiny|small|base|large|huge)_patch\d+", low):
            return low + "_224"
        return canonical_arch(name)

    if st_meta.get("arch"):
        return canonical_arch(st_meta["arch"]), "checkpoint metadata"
    if not isinstance(obj, dict):
        return None, ""
    for meta_key in ("harness",):
        meta = obj.get(meta_key)
        if isinstance(meta, dict) and isinstance(meta.get("arch"), str):
            return canonical_arch(meta["arch"]), f"checkpoint '{meta_key}' entry"
    meta = obj.get("meta")
    if isinstance(meta, dict) and isinstance(meta.get("harness"), dict) and meta["harness"].get("arch"):
        return canonical_arch(meta["harness"]["arch"]), "checkpoint 'meta' entry"
    if isinstance(obj.get("arch"), str):
        return norm_name(obj["arch"]), "checkpoint 'arch' entry"
    args = obj.get("args")
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    if isinstance(args, dict):
        if isinstance(args.get("arch"), str):
            return norm_name(args["arch"], args.get("patch_size")), "checkpoint args.arch"
        if isinstance(args.get("model"), str):
            return norm_name(args["model"]), "checkpoint args.model"
    hp = obj.get("hyper_parameters")
    if isinstance(hp, dict):
        for k in ("arch", "backbone", "model_name"):
            if isinstance(hp.get(k), str):
                return norm_name(hp[k]), f"checkpoint hyper_parameters.{k}"
    return None, ""


# ----------------------------------------------------------------------------- the match
@dataclass
class Match:
    """Everything known about one checkpoint against one architecture."""

    path: str
    sha256: str
    size_bytes: int
    container: str
    layout: str = ""
    layout_detail: str = ""
    entry: str = ""
    prefix: str = ""
    naming: str = "native"
    stripped_prefixes: list = field(default_factory=list)
    arch: str | None = None
    arch_source: str = ""
    arch_named_by_checkpoint: str | None = None
    options: dict = field(default_factory=dict)
    tensors_in_file: int = 0
    load: dict = field(default_factory=dict)  # checkpoint name (architecture's) -> tensor
    load_new: dict = field(default_factory=dict)  # new-layer state key -> tensor (harness files)
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)
    non_finite: list = field(default_factory=list)
    ignored: list = field(default_factory=list)
    defaulted: list = field(default_factory=list)
    interpolated: list = field(default_factory=list)
    metadata_keys: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    normalization: object = None
    normalization_source: str = ""
    allow_missing: bool = False
    allow_unexpected: bool = False
    backbone: object = None

    @property
    def ok(self) -> bool:
        return (not self.mismatched and not self.non_finite and (self.allow_missing or not self.missing)
                and (self.allow_unexpected or not self.unexpected))

    def summary(self) -> str:
        """One line: what matched, or why the load fails."""
        where = f"{self.path}: {self.layout or 'checkpoint'}"
        if self.ok:
            extra = []
            if self.missing:
                extra.append(f"{len(self.missing)} missing left random (--allow-missing)")
            if self.unexpected:
                extra.append(f"{len(self.unexpected)} unexpected not loaded (--allow-unexpected)")
            tail = f" ({'; '.join(extra)})" if extra else ""
            return f"{where} -> {self.arch}: all {len(self.loaded)} tensors loaded{tail}"
        bits = []
        if self.missing:
            bits.append(f"{len(self.missing)} missing ({_examples(self.missing)})")
        if self.unexpected:
            bits.append(f"{len(self.unexpected)} unexpected ({_examples(self.unexpected)})")
        if self.mismatched:
            m = self.mismatched[0]
            bits.append(f"{len(self.mismatched)} shape mismatches (e.g. {m['key']}: "
                        f"checkpoint {m['checkpoint']} vs model {m['model']})")
        if self.non_finite:
            bits.append(f"{len(self.non_finite)} tensors with NaN/Inf ({_examples(self.non_finite)})")
        named = ""
        if self.arch_named_by_checkpoint and self.arch_named_by_checkpoint != self.arch:
            named = f" (the checkpoint names {self.arch_named_by_checkpoint})"
        return (f"{where} does not match {self.arch}{named}: {len(self.loaded)} tensors matched; " + "; ".join(bits)
                + " - see `harness inspect --json` for the full lists")

    def report(self) -> dict:
        bb = self.backbone
        norm = self.normalization.to_dict() if self.normalization is not None else None
        if norm is not None:
            norm["source"] = self.normalization_source
        return {
            "path": self.path,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "container": self.container,
            "layout": self.layout,
            "layout_detail": self.layout_detail,
            "entry": self.entry,
            "prefix": self.prefix,
            "naming": self.naming,
            "stripped_prefixes": list(self.stripped_prefixes),
            "arch": self.arch,
            "arch_source": self.arch_source,
            "options": dict(self.options),
            "ok": self.ok,
            "summary": self.summary(),
            "tensors_in_file": self.tensors_in_file,
            "tensors_loaded": len(self.loaded),
            "missing": list(self.missing),
            "unexpected": list(self.unexpected),
            "shape_mismatches": list(self.mismatched),
            "non_finite": list(self.non_finite),
            "ignored_prefixes": list(self.ignored),
            "defaulted": list(self.defaulted),
            "interpolated": list(self.interpolated),
            "new_layers": None if bb is None else {
                "prefixes": list(bb.new_prefixes),
                "parameters": sum(p.numel() for n, p in bb.named_parameters() if bb.is_new(n)),
            },
            "parameters": bb.num_parameters if bb is not None else None,
            "feature_info": [vars(f).copy() for f in bb.feature_info] if bb is not None else None,
            "normalization": norm,
            "metadata_keys": list(self.metadata_keys),
            "notes": list(self.notes),
        }


def _examples(keys, n: int = 3) -> str:
    shown = ", ".join(keys[:n])
    return shown + (", ..." if len(keys) > n else "")


def match_checkpoint(path, arch: str | None = None, *, key: str | None = None, prefix: str | None = None,
                     normalization=None, allow_missing: bool = False, allow_unexpected: bool = False,
                     unsafe_load: bool = False, img_size: int | None = None, num_heads: int | None = None,
                     stride_in_1x1: bool | None = None) -> Match:
    """Read ``path``, detect its layout, build ``arch`` and account for every tensor.

    The architecture is built on the meta device (shapes only); ``load_checkpoint_into_backbone``
    materializes it.
    Raises :class:`HarnessError` for unreadable/unsafe files and unknown architectures; an
    incomplete match is returned with ``ok == False`` (``load_backbone`` raises it).
    """
    from harness.backbones import (CAFFE, IMAGENET, Normalization, ViTBackbone, arch_family, build_backbone,
                                   canonical_arch, resolve_normalization)

    path = Path(path)
    obj, container, st_meta = read_checkpoint(path, unsafe_load=unsafe_load)
    m = Match(path=str(path), sha256=sha256_file(path), size_bytes=path.stat().st_size, container=container,
              allow_missing=allow_missing, allow_unexpected=allow_unexpected)
    if isinstance(obj, torch.nn.Module):  # a whole pickled model (only reachable with --unsafe-load)
        obj = obj.state_dict()
    m.tensors_in_file = _count_tensors(obj)
    is_harness = st_meta.get("harness_format") is not None
    if is_harness and st_meta.get("harness_format") != "1":
        raise HarnessError(f"{path}: harness format {st_meta.get('harness_format')!r} is newer than this harness (1)")

    state, entry_path, others = _select_state_dict(obj, key)
    m.entry = "/".join(entry_path)
    top = obj if isinstance(obj, dict) else {}
    m.metadata_keys = sorted(str(k) for k, v in top.items() if _count_tensors(v) == 0 and k not in entry_path[:1])
    for name, value in others:
        n = _count_tensors(value)
        if n:
            m.ignored.append({"prefix": f"[{name}]", "tensors": n, "reason": _reason(name), "where": "checkpoint entry"})

    # arch: the user's, else the one the checkpoint names
    named, named_source = _arch_from_checkpoint(obj, st_meta)
    m.arch_named_by_checkpoint = named
    if arch:
        m.arch, m.arch_source = canonical_arch(arch), "user"
    elif named:
        m.arch, m.arch_source = named, named_source
    else:
        raise HarnessError(
            f"{path}: the checkpoint does not name its architecture ({m.tensors_in_file} tensors, entry "
            f"{m.entry or '(top level)'}); pass --arch, e.g. --arch resnet50"
        )
    family = arch_family(m.arch)

    # keys: strip DDP/compile wrappers, keep originals for the report
    original: dict[str, str] = {}
    tensors: dict[str, object] = {}
    non_tensor: list[str] = []
    stripped = set()
    for k, v in state.items():
        if not _is_array(v):
            non_tensor.append(k)
            continue
        s = _strip_wrappers(k)
        if s != k:
            if k.startswith("module."):
                stripped.add("module.")
            if "_orig_mod" in k.split("."):
                stripped.add("_orig_mod.")
        if s in tensors:
            raise HarnessError(f"{path}: keys {original[s]!r} and {k!r} collide after removing module./_orig_mod.")
        original[s] = k
        tensors[s] = v
    m.stripped_prefixes = sorted(stripped)
    naming = _detect_naming(tensors.keys(), family)
    author = str(top.get("__author__", "")) if isinstance(top, dict) else ""

    # build options the checkpoint decides (unless the user did)
    harness_meta = _harness_metadata(obj, st_meta)
    opts: dict = {}
    if harness_meta.get("options"):
        opts.update(harness_meta["options"])
    if family == "resnet":
        if stride_in_1x1 is not None:
            opts["stride_in_1x1"] = bool(stride_in_1x1)
        elif naming == "caffe2" or author in ("Caffe2", "Detectron2 Model Zoo"):
            opts["stride_in_1x1"] = True
            m.notes.append("caffe2/MSRA weights: stride in the 1x1 conv (detectron2 STRIDE_IN_1X1=True)")
        if not opts.get("stride_in_1x1"):
            opts.pop("stride_in_1x1", None)
    if family == "vit":
        if img_size:
            opts["img_size"] = int(img_size)
        if any(k.endswith("dist_token") for k in tensors) and "distilled" not in m.arch:
            opts["reg_tokens"] = 1
            m.notes.append("DeiT distillation token: built with one extra prefix token (timm reg_tokens=1)")
        if num_heads:
            opts["num_heads"] = int(num_heads)
        elif (m.arch == "vit_small_patch16_224" and "num_heads" not in opts
              and any(k.startswith("base_encoder.") for k in tensors)):
            opts["num_heads"] = 12
            m.notes.append("MoCo v3 ViT-S has 12 attention heads (timm's vit_small has 6): built with num_heads=12")
    m.options = opts

    with torch.device("meta"):
        bb = build_backbone(m.arch, **opts)
    m.backbone = bb
    shapes = bb.checkpoint_shapes()
    renamer = RENAMERS[naming]

    def canon(k: str) -> str:
        c = renamer(k)
        if c == "dist_token" and "dist_token" not in shapes:
            return "reg_token"
        return c

    required = [k for k in shapes if not _optional(k, naming)]

    # choose the encoder prefix: the one whose keys cover the architecture
    if prefix is not None:
        p = _strip_wrappers(prefix.rstrip(".")) + "." if prefix.strip(".") else ""
        if p and not any(k.startswith(p) for k in tensors):
            raise HarnessError(f"{path}: no key starts with prefix {prefix!r}")
        chosen = p
    else:
        chosen = _choose_prefix(tensors.keys(), required, canon, path, m.arch)
    m.prefix = chosen

    head = tuple(bb.head_prefixes)
    new_state = {k for k in bb.state_dict() if bb.is_new(k)}
    groups: dict[str, list[str]] = {}
    seen_canon: dict[str, str] = {}
    mismatched_canon: set[str] = set()
    head_groups: set[str] = set()
    for s, v in tensors.items():
        if not s.startswith(chosen):
            groups.setdefault(_group_outside(s, chosen), []).append(s)
            continue
        rel = s[len(chosen):]
        c = canon(rel)
        if c in shapes:
            if c in seen_canon:
                raise HarnessError(f"{path}: keys {original[seen_canon[c]]!r} and {original[s]!r} both map to {c}")
            seen_canon[c] = s
            t = _to_tensor(v)
            want = shapes[c]
            if tuple(t.shape) != want and c == "pos_embed" and isinstance(bb, ViTBackbone):
                t2 = _interpolate_pos_embed(t, bb)
                if t2 is not None:
                    m.interpolated.append({"key": original[s], "from": list(t.shape), "to": list(t2.shape)})
                    t = t2
            if tuple(t.shape) != want:
                m.mismatched.append({"key": original[s], "checkpoint": list(t.shape), "model": list(want)})
                mismatched_canon.add(c)
                continue
            if not _finite(t):
                m.non_finite.append(original[s])
            m.load[c] = t
            m.loaded.append(c)
        elif c in new_state:
            m.load_new[c] = _to_tensor(v)
        elif c.startswith(head):
            g = chosen + next(h for h in head if c.startswith(h))
            groups.setdefault(g, []).append(s)
            head_groups.add(g)
        elif rel.endswith("_momentum"):
            groups.setdefault(chosen + "*_momentum", []).append(s)
        elif c.startswith(PRETRAIN_ONLY):
            groups.setdefault(chosen + (c.split(".")[0] + ("." if "." in c else "")), []).append(s)
        else:
            m.unexpected.append(original[s])
    for name in non_tensor:
        groups.setdefault(name, []).append(name)
    for g, keys in sorted(groups.items()):
        reason = _reason(g)
        if g in head_groups and reason == _reason(""):
            reason = "the architecture's classifier / final norm (c2..c5 do not use it)"
        m.ignored.append({"prefix": g, "tensors": len(keys), "reason": reason, "where": "state dict"})

    loaded = set(m.loaded)
    for k in shapes:
        if k in loaded or k in mismatched_canon:
            continue
        if _optional(k, naming):
            continue
        m.missing.append(k)
    _note_defaults(m, shapes, loaded, naming)

    # naming, layout, normalization
    m.naming = {"native": "torchvision" if family == "resnet" else "timm"}.get(naming, naming)
    m.layout, m.layout_detail = _layout(m, top, tensors, naming, author, is_harness, family, harness_meta)
    user_norm = resolve_normalization(normalization)
    if user_norm is not None:
        m.normalization, m.normalization_source = user_norm, "user"
    elif harness_meta.get("normalization"):
        m.normalization = Normalization.from_dict(harness_meta["normalization"])
        m.normalization_source = "checkpoint metadata"
    elif naming == "caffe2":
        m.normalization, m.normalization_source = CAFFE, "MSRA caffe2 weights: BGR, mean-subtracted, std 1"
    elif naming == "detectron2" and author in ("Caffe2", "Detectron2 Model Zoo"):
        m.normalization, m.normalization_source = CAFFE, f"detectron2 file by {author!r}: caffe-style BGR"
    elif naming == "detectron2" and author == "MOCO":
        m.normalization, m.normalization_source = IMAGENET, "MoCo's detectron2 conversion keeps torchvision RGB mean/std"
    else:
        m.normalization = IMAGENET
        m.normalization_source = ("default: ImageNet RGB mean/std (torchvision/timm convention); "
                                  "override with --normalization")
    bb.set_normalization(m.normalization)
    return m


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf: a finite sum proves it (NaN/Inf propagate); otherwise check min/max exactly."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    lo, hi = torch.aminmax(t.float())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _optional(key: str, naming: str) -> bool:
    if key.endswith("num_batches_tracked"):
        return True
    return naming == "caffe2" and key.endswith(("running_mean", "running_var"))


def _note_defaults(m: Match, shapes, loaded, naming: str) -> None:
    nbt = [k for k in shapes if k.endswith("num_batches_tracked") and k not in loaded]
    if nbt:
        m.defaulted.append({"keys": "*.num_batches_tracked", "count": len(nbt),
                            "value": "kept at 0 (a step counter, not a weight)"})
    if naming == "caffe2":
        stats = [k for k in shapes if k.endswith(("running_mean", "running_var")) and k not in loaded]
        if stats:
            m.defaulted.append({"keys": "*.running_mean/running_var", "count": len(stats),
                                "value": "mean 0, var 1-eps: caffe2 BatchNorm is folded into scale/shift"})


def _choose_prefix(keys, required, canon, path, arch) -> str:
    """The prefix under which the architecture's keys are found; refuses to guess between equals."""
    keys = list(keys)
    req = set(required)
    candidates: dict[str, list[str]] = {"": keys}
    for k in keys:
        parts = k.split(".")
        for i in range(1, min(len(parts), 5)):
            candidates.setdefault(".".join(parts[:i]) + ".", []).append(k)
    scores = {}
    for p, ks in candidates.items():
        n = len(p)
        scores[p] = len({canon(k[n:]) for k in ks} & req)
    best = max(scores.values()) if scores else 0
    if best == 0:
        sample = ", ".join(keys[:4])
        raise HarnessError(
            f"{path}: no tensor of {arch} found in the checkpoint (its keys look like: {sample}); "
            "wrong --arch, or pass --prefix"
        )
    top = [p for p, s in scores.items() if s == best]
    if len(top) == 1:
        return top[0]
    primary = [p for p in top if not (set(p.rstrip(".").split(".")) & SECONDARY_ROLES)]
    if len(primary) == 1:
        return primary[0]
    pool = primary or top
    if best < len(req):  # incomplete everywhere: take the shortest, the accounting will fail loudly
        return min(pool, key=len)
    raise HarnessError(
        f"{path}: several complete {arch} encoders in the checkpoint ({', '.join(repr(p) for p in sorted(pool))}); "
        "refusing to guess: pass --prefix"
    )


def _interpolate_pos_embed(t: torch.Tensor, bb) -> torch.Tensor | None:
    """Resample a ViT position embedding to the model's grid (bicubic), keeping prefix tokens."""
    from timm.layers import resample_abs_pos_embed

    vit = bb.vit
    if t.dim() != 3 or t.shape[0] != 1 or t.shape[2] != vit.pos_embed.shape[2]:
        return None
    npt = 0 if getattr(vit, "no_embed_class", False) else int(vit.num_prefix_tokens)
    n = t.shape[1] - npt
    g = int(round(math.sqrt(n)))
    if n <= 0 or g * g != n:
        return None
    grid = list(vit.patch_embed.grid_size)
    return resample_abs_pos_embed(t.float(), new_size=grid, old_size=[g, g], num_prefix_tokens=npt).to(t.dtype)


def _harness_metadata(obj, st_meta: dict) -> dict:
    """arch/normalization/options written by the harness (its own files and its exports)."""
    out: dict = {}
    if st_meta.get("harness_format"):
        out["arch"] = st_meta.get("arch")
        if st_meta.get("normalization"):
            out["normalization"] = json.loads(st_meta["normalization"])
        if st_meta.get("options"):
            out["options"] = json.loads(st_meta["options"])
        return out
    if isinstance(obj, dict):
        meta = obj.get("harness")
        if not isinstance(meta, dict) and isinstance(obj.get("meta"), dict):
            meta = obj["meta"].get("harness")
        if isinstance(meta, dict):
            out = {k: meta[k] for k in ("arch", "normalization", "options") if k in meta}
    return out


def _layout(m: Match, top: dict, tensors: dict, naming: str, author: str, is_harness: bool, family: str,
            harness_meta: dict) -> tuple[str, str]:
    """Name the layout (what `inspect` reports) and describe it in one sentence."""
    p = m.prefix
    roles = set(p.rstrip(".").split(".")) if p else set()
    outside = [k for k in tensors if not k.startswith(p)]
    lightning = "pytorch-lightning_version" in top or (
        m.entry == "state_dict" and any(k in top for k in ("global_step", "optimizer_states", "loops")))
    if is_harness:
        name = "harness"
    elif naming == "caffe2":
        name = "detectron2-caffe2"
    elif naming == "detectron2":
        name = "detectron2-pkl" if m.container == "pickle" else "detectron2"
    elif p.endswith("backbone.body."):
        name = "torchvision-detection"
    elif m.entry.split("/")[0] in ("teacher", "student"):
        name = "dino"
    elif "encoder_q" in roles:
        name = "moco-v1/v2"
    elif "base_encoder" in roles:
        name = "moco-v3"
    elif lightning:
        name = "lightning"
    elif naming == "mmpretrain-vit" or (m.entry == "state_dict" and isinstance(top.get("meta"), dict) and p == "backbone."):
        name = "mmpretrain"
    elif harness_meta and isinstance(top.get("meta"), dict):
        name = "mmdet"
    elif family == "vit" and any(k.startswith(("decoder_", "mask_token")) for k in tensors):
        name = "mae"
    elif family == "vit" and any(k.endswith("dist_token") or k.startswith("head_dist") for k in tensors):
        name = "deit"
    elif p and any(re.search(r"project|predict", k) for k in outside):
        name = "byol/simclr"
    elif m.entry == "state_dict_ema":
        name = "timm-ema"
    elif m.entry == "model" and family == "vit":
        name = "mae/deit"
    elif m.entry:
        name = f"{m.entry.split('/')[0]}-wrapper"
    elif m.container == "safetensors":
        name = "safetensors"
    elif not p:
        name = "torchvision" if family == "resnet" else "timm"
    else:
        name = "prefixed"
    if m.stripped_prefixes and name in ("torchvision", "timm", "safetensors", "prefixed") or (
            m.stripped_prefixes and name.endswith("-wrapper")):
        name += "+" + "+".join(m.stripped_prefixes)
    detail = [f"{m.container} file"]
    if m.entry:
        detail.append(f"weights in entry {m.entry!r}")
    if m.stripped_prefixes:
        detail.append("removed " + ", ".join(repr(s) for s in m.stripped_prefixes))
    detail.append(f"encoder prefix {p!r}" if p else "no encoder prefix")
    detail.append(f"{m.naming} key names")
    if author:
        detail.append(f"__author__ {author!r}")
    return name, "; ".join(detail)


# ----------------------------------------------------------------------------- public API
def load_checkpoint_into_backbone(path, arch: str | None = None, **opts):
    """Build and load a :class:`~harness.backbones.Backbone`; raises unless every tensor is accounted for."""
    from harness.backbones import build_backbone

    m = match_checkpoint(path, arch, **opts)
    if not m.ok:
        raise HarnessError(m.summary())
    bb = m.backbone  # on the meta device
    state_keys = set(bb.state_dict())
    extra_buffers = {n for n, _ in bb.named_buffers() if n not in state_keys} - {"pixel_mean", "pixel_std"}
    if m.missing or extra_buffers:
        # something keeps its initial value: a real random initialisation
        bb = build_backbone(m.arch, normalization=m.normalization, **m.options)
    else:
        # every persistent tensor comes from the file: skip the random init, except for new layers
        bb.to_empty(device="cpu")
        for name, module in bb.named_modules():
            if name and bb.is_new(name + ".") and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        bb.set_normalization(m.normalization)
    state = bb.state_dict()
    prefix = bb.trunk_prefix
    for k, t in m.load.items():
        state[prefix + k] = t.to(dtype=state[prefix + k].dtype)
    for k, t in m.load_new.items():
        if tuple(t.shape) == tuple(state[k].shape):
            state[k] = t.to(dtype=state[k].dtype)
    for name, module in bb.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.track_running_stats:
            key = (name + "." if name else "")
            rel = key[len(prefix):]
            if rel + "num_batches_tracked" not in m.load:
                state[key + "num_batches_tracked"] = torch.zeros((), dtype=torch.long)
            if m.naming == "caffe2" and rel + "running_var" not in m.load:
                state[key + "running_mean"] = torch.zeros(module.num_features)
                state[key + "running_var"] = torch.full((module.num_features,), 1.0 - module.eps)
    if m.load_new:
        m.notes.append(f"new layers loaded from the file: {len(m.load_new)} tensors ({', '.join(bb.new_prefixes)})")
    bb.load_state_dict(state, strict=True)
    bb.checkpoint = {"path": m.path, "sha256": m.sha256, "layout": m.layout}
    m.backbone = bb
    bb.load_report = m.report()
    bb.eval()
    return bb


def inspect_checkpoint(path, arch: str | None = None, **opts) -> dict:
    """The JSON-able account of a checkpoint against ``arch`` (``ok`` False when incomplete)."""
    spec = str(path)
    if spec.startswith("random:"):
        from harness.backbones import load_backbone

        with torch.device("meta"):
            bb = load_backbone(spec, arch=arch, normalization=opts.get("normalization"))
        d = bb.describe()
        n = len(bb.checkpoint_shapes())
        return {"path": spec, "sha256": None, "size_bytes": None, "container": None, "layout": "random",
                "layout_detail": "randomly initialised, no file", "entry": "", "prefix": "", "naming": None,
                "stripped_prefixes": [], "arch": bb.arch, "arch_source": "spec", "options": d["options"], "ok": True,
                "summary": f"{spec}: random initialisation of {bb.arch} ({n} tensors)", "tensors_in_file": 0,
                "tensors_loaded": 0, "missing": [], "unexpected": [], "shape_mismatches": [], "non_finite": [],
                "ignored_prefixes": [], "defaulted": [], "interpolated": [],
                "new_layers": {"prefixes": list(bb.new_prefixes), "parameters": d["new_parameters"]},
                "parameters": d["parameters"], "feature_info": d["feature_info"],
                "normalization": dict(d["normalization"], source="user" if opts.get("normalization") else "default"),
                "metadata_keys": [], "notes": []}
    return match_checkpoint(path, arch, **opts).report()


def format_inspection(report: dict) -> str:
    """Human-readable text of an ``inspect_checkpoint`` report."""
    lines = [
        f"path:          {report['path']}",
        f"sha256:        {report['sha256']}",
        f"layout:        {report['layout']}  ({report['layout_detail']})",
        f"arch:          {report['arch']}  (from {report['arch_source']})"
        + (f"  options {report['options']}" if report.get("options") else ""),
        f"tensors:       {report['tensors_loaded']} loaded of {report['tensors_in_file']} in the file",
        f"parameters:    {report['parameters']:,}" if report.get("parameters") is not None else "parameters:    ?",
    ]
    new = report.get("new_layers") or {}
    if new.get("parameters"):
        lines.append(f"new layers:    {', '.join(new['prefixes'])} ({new['parameters']:,} parameters, "
                     "randomly initialised)")
    norm = report.get("normalization")
    if norm:
        lines.append(f"normalization: {norm['channel_order']} mean {norm['mean']} std {norm['std']}  "
                     f"({norm.get('source', '')})")
    if report.get("feature_info"):
        feats = ", ".join(f"{f['name']} {f['channels']}ch /{f['stride']}" for f in report["feature_info"])
        lines.append(f"features:      {feats}")
    for item in report.get("ignored_prefixes", []):
        lines.append(f"ignored:       {item['prefix']} ({item['tensors']} tensors: {item['reason']})")
    for item in report.get("defaulted", []):
        lines.append(f"defaulted:     {item['keys']} x{item['count']}: {item['value']}")
    for note in report.get("notes", []):
        lines.append(f"note:          {note}")
    for item in report.get("interpolated", []):
        lines.append(f"interpolated:  {item['key']} {item['from']} -> {item['to']}")
    for label, key in (("missing", "missing"), ("unexpected", "unexpected"), ("non-finite", "non_finite")):
        if report.get(key):
            lines.append(f"{label + ':':<15}{len(report[key])}: {_examples(report[key], 8)}")
    for item in report.get("shape_mismatches", [])[:8]:
        lines.append(f"shape:         {item['key']} checkpoint {item['checkpoint']} vs model {item['model']}")
    lines.append(("OK: " if report.get("ok") else "FAIL: ") + report.get("summary", ""))
    return "\n".join(lines)


EXPORT_TARGETS = ("detectron2", "torchvision", "mmdet")


def export_backbone(path, arch: str | None, to: str, out, **opts) -> Path:
    """Write the backbone of checkpoint ``path`` in another framework's layout.

    ``torchvision``: a plain state dict (torchvision/timm key names, ``torch.save``).
    ``detectron2``: a ``.pkl`` as MoCo's convert-pretrain-to-detectron2.py writes (numpy arrays,
    ``stem``/``res2..5``/``shortcut`` names, ``__author__``, ``matching_heuristics``) plus a
    ``harness`` entry with arch, normalization and the detectron2 config values to set.
    ``mmdet``: ``{"meta": {...}, "state_dict": ...}`` with mmdet ResNet names (torchvision's) and
    the ``data_preprocessor``/backbone settings in ``meta``. detectron2 and mmdet: ResNets only.
    """
    from harness.backbones import ResNetBackbone, load_backbone

    if to not in EXPORT_TARGETS:
        raise HarnessError(f"unknown export target {to!r}: use one of {', '.join(EXPORT_TARGETS)}")
    bb = load_backbone(path, arch=arch, **opts)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    trunk = OrderedDict((k, v.detach().cpu().clone()) for k, v in bb.trunk_state_dict().items())
    norm = bb.normalization
    harness_meta = {"arch": bb.arch, "normalization": norm.to_dict(), "options": dict(bb.options),
                    "source": dict(bb.checkpoint), "harness_export": to}
    if to == "torchvision":
        torch.save(trunk, out)
        return out
    if not isinstance(bb, ResNetBackbone):
        raise HarnessError(f"export to {to} supports ResNets; {bb.arch} can be exported with --to torchvision")
    groups = bb.layer1[0].conv2.groups
    width = bb.layer1[0].conv1.out_channels // groups
    depth = int(re.search(r"(\d+)", bb.arch.replace("resnext", "").replace("wide_resnet", "")).group(1))
    stride_in_1x1 = bool(bb.options.get("stride_in_1x1", False))
    weights = OrderedDict((k, v) for k, v in trunk.items() if not k.endswith("num_batches_tracked"))
    if to == "detectron2":
        harness_meta["detectron2_config"] = {
            "MODEL.RESNETS.DEPTH": depth, "MODEL.RESNETS.STRIDE_IN_1X1": stride_in_1x1,
            "MODEL.RESNETS.NUM_GROUPS": groups, "MODEL.RESNETS.WIDTH_PER_GROUP": width,
            "MODEL.RESNETS.RES2_OUT_CHANNELS": bb.feature_info[0].channels,
            "MODEL.PIXEL_MEAN": list(norm.mean), "MODEL.PIXEL_STD": list(norm.std), "INPUT.FORMAT": norm.channel_order,
        }
        model = OrderedDict((tv_to_d2(k), v.numpy()) for k, v in weights.items())
        payload = {"model": model, "__author__": "harness", "matching_heuristics": True, "harness": harness_meta}
        with open(out, "wb") as f:
            pickle.dump(payload, f, protocol=4)
        return out
    # mmdet
    backbone_cfg = {"type": "ResNeXt" if groups > 1 else "ResNet", "depth": depth,
                    "style": "caffe" if stride_in_1x1 else "pytorch"}
    if groups > 1:
        backbone_cfg.update(groups=groups, base_width=width)
    harness_meta["mmdet"] = {
        "backbone": backbone_cfg,
        "data_preprocessor": {"mean": list(norm.mean), "std": list(norm.std), "bgr_to_rgb": norm.channel_order == "RGB"},
        "note": "backbone init_cfg=dict(type='Pretrained', checkpoint=<this file>); mmcv images are BGR",
    }
    torch.save({"meta": {"harness": harness_meta}, "state_dict": weights}, out)
    return out
