"""Account for every tensor: what loads, what is missing, unexpected, mismatched, or ignored and why.

Every tensor of the architecture (``Backbone.checkpoint_shapes()``) must come from the file, or
the load fails listing the missing/unexpected keys and shape mismatches. Tensors that are not
the backbone (projection heads, predictors, momentum encoders, queues, decoders, classifier
heads, optimizer state, ...) are ignored and listed with the reason. Documented exceptions:
``num_batches_tracked`` (a counter) may be absent, folded BatchNorm (caffe2) has no running
stats, new layers (the ViT pyramid) are never expected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from harness.checkpoints.read import StateDict, to_tensor
from harness.errors import HarnessError

# prefixes of encoders that are not the one to load (when several are complete)
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
_HEAD_REASON = "the architecture's classifier / final norm (c2..c5 do not use it)"


def reason(prefix: str) -> str:
    """Why tensors under ``prefix`` are not the backbone."""
    low = prefix.lower()
    return next((why for word, why in _REASONS if word in low), "not part of the backbone")


@dataclass(frozen=True)
class Target:
    """The architecture a checkpoint has to fill."""

    shapes: dict  # checkpoint key (the architecture's name) -> shape
    new_keys: frozenset = frozenset()  # state keys of new layers: loaded when the file has them, never expected
    head: tuple = ()  # prefixes of the architecture's classifier / final norm (ignored)
    folded_bn: bool = False  # BatchNorm folded into scale/shift: running stats may be absent
    resize: Callable = lambda key, t: None  # (key, tensor) -> the tensor resampled to the model, or None

    def optional(self, key: str) -> bool:
        return key.endswith("num_batches_tracked") or (self.folded_bn and key.endswith(("running_mean", "running_var")))

    def required(self) -> list[str]:
        return [k for k in self.shapes if not self.optional(k)]

    def key(self, name: str, rename: Callable[[str], str]) -> str:
        """The architecture's key for a file key (after the prefix); DeiT's dist token is a register token."""
        c = rename(name)
        return "reg_token" if c == "dist_token" and c not in self.shapes else c


@dataclass
class Accounting:
    """Where each tensor of the file went, and what the architecture still lacks."""

    load: dict = field(default_factory=dict)  # architecture key -> tensor
    load_new: dict = field(default_factory=dict)  # new-layer state key -> tensor (the harness's own files)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)  # file keys
    mismatched: list = field(default_factory=list)  # {"key", "checkpoint", "model"}
    non_finite: list = field(default_factory=list)
    ignored: list = field(default_factory=list)  # {"prefix", "tensors", "reason", "where"}
    interpolated: list = field(default_factory=list)  # {"key", "from", "to"}
    defaulted: list = field(default_factory=list)  # {"keys", "count", "value"}

    def ok(self, allow_missing: bool = False, allow_unexpected: bool = False) -> bool:
        return (not self.mismatched and not self.non_finite and (allow_missing or not self.missing)
                and (allow_unexpected or not self.unexpected))


def account(sd: StateDict, target: Target, prefix: str, rename: Callable[[str], str]) -> Accounting:
    """Sort every tensor of ``sd`` under the encoder ``prefix`` into the architecture, or say why not."""
    acc = Accounting()
    groups: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    mismatched: set[str] = set()
    for s, v in sd.tensors.items():
        if not s.startswith(prefix):
            groups.setdefault(_group_outside(s, prefix), []).append(s)
            continue
        rel = s[len(prefix):]
        c = target.key(rel, rename)
        if c in target.shapes:
            if c in seen:
                raise HarnessError(f"{sd.source}: keys {sd.original[seen[c]]!r} and {sd.original[s]!r} both map to {c}")
            seen[c] = s
            if not _take(acc, target, c, sd.original[s], to_tensor(v)):
                mismatched.add(c)
        elif c in target.new_keys:
            acc.load_new[c] = to_tensor(v)
        else:
            group = _ignored_group(rel, c, prefix, target.head)
            if group is None:
                acc.unexpected.append(sd.original[s])
            else:
                groups.setdefault(group, []).append(s)
    for name in sd.non_tensor:
        groups.setdefault(name, []).append(name)
    heads = {prefix + h for h in target.head}
    for g, keys in sorted(groups.items()):
        why = _HEAD_REASON if g in heads and reason(g) == reason("") else reason(g)
        acc.ignored.append({"prefix": g, "tensors": len(keys), "reason": why, "where": "state dict"})
    acc.missing = [k for k in target.shapes if k not in acc.load and k not in mismatched and not target.optional(k)]
    acc.defaulted = _defaulted(target, acc.load)
    return acc


def _take(acc: Accounting, target: Target, key: str, name: str, t: torch.Tensor) -> bool:
    """Load ``t`` (file key ``name``) as ``key`` unless its shape differs (resampled where the model allows)."""
    want = target.shapes[key]
    if tuple(t.shape) != want:
        resized = target.resize(key, t)
        if resized is not None:
            acc.interpolated.append({"key": name, "from": list(t.shape), "to": list(resized.shape)})
            t = resized
    if tuple(t.shape) != want:
        acc.mismatched.append({"key": name, "checkpoint": list(t.shape), "model": list(want)})
        return False
    if not _finite(t):
        acc.non_finite.append(name)
    acc.load[key] = t
    return True


def _ignored_group(rel: str, key: str, prefix: str, head: tuple) -> str | None:
    """The group an encoder key that is not the architecture's is ignored under; None: unexpected."""
    if key.startswith(head):
        return prefix + next(h for h in head if key.startswith(h))
    if rel.endswith("_momentum"):
        return prefix + "*_momentum"
    if key.startswith(PRETRAIN_ONLY):
        return prefix + key.split(".")[0] + ("." if "." in key else "")
    return None


def _group_outside(key: str, chosen: str) -> str:
    """Group a key outside the chosen encoder prefix by its shortest prefix not shared with it."""
    parts = key.split(".")
    for i in range(1, len(parts) + 1):
        pre = ".".join(parts[:i]) + ("." if i < len(parts) else "")
        if not chosen.startswith(pre) or i == len(parts):
            return pre
    return key


def _defaulted(target: Target, loaded) -> list[dict]:
    out = []
    nbt = [k for k in target.shapes if k.endswith("num_batches_tracked") and k not in loaded]
    if nbt:
        out.append({"keys": "*.num_batches_tracked", "count": len(nbt),
                    "value": "kept at 0 (a step counter, not a weight)"})
    stats = [k for k in target.shapes if k.endswith(("running_mean", "running_var")) and k not in loaded]
    if target.folded_bn and stats:
        out.append({"keys": "*.running_mean/running_var", "count": len(stats),
                    "value": "mean 0, var 1-eps: caffe2 BatchNorm is folded into scale/shift"})
    return out


def _finite(t: torch.Tensor) -> bool:
    """No NaN/Inf: a finite sum proves it (NaN/Inf propagate); otherwise check min/max exactly."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    lo, hi = torch.aminmax(t.float())
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def choose_prefix(keys, target: Target, rename, where: str, arch: str) -> str:
    """The prefix under which the architecture's keys are found; refuses to guess between equals."""
    keys = list(keys)
    req = set(target.required())
    candidates: dict[str, list[str]] = {"": keys}
    for k in keys:
        parts = k.split(".")
        for i in range(1, min(len(parts), 5)):
            candidates.setdefault(".".join(parts[:i]) + ".", []).append(k)
    scores = {p: len({target.key(k[len(p):], rename) for k in ks} & req) for p, ks in candidates.items()}
    best = max(scores.values()) if scores else 0
    if best == 0:
        raise HarnessError(f"{where}: no tensor of {arch} found in the checkpoint (its keys look like: "
                           f"{', '.join(keys[:4])}); wrong --arch, or pass --prefix")
    top = [p for p, s in scores.items() if s == best]
    primary = [p for p in top if not (set(p.rstrip(".").split(".")) & SECONDARY_ROLES)]
    if len(top) == 1 or len(primary) == 1:
        return top[0] if len(top) == 1 else primary[0]
    pool = primary or top
    if best < len(req):  # incomplete everywhere: take the shortest, the accounting will fail loudly
        return min(pool, key=len)
    raise HarnessError(f"{where}: several complete {arch} encoders in the checkpoint "
                       f"({', '.join(repr(p) for p in sorted(pool))}); refusing to guess: pass --prefix")
