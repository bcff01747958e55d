"""Labelled pretraining images, whatever holds them (folders, manifests, shards): the key of an
image decides its subsets, label names become multi-hot targets, a hierarchy adds ancestors.

Subsets (``fraction``): an image is kept when ``u(key) < fraction``, with ``u`` the first 8 bytes
of ``sha1("<subset_seed>:<key>")`` read as a number in ``[0, 1)``. So the 10% subset lies inside
the 30% subset, the subset of an image does not depend on the order or the sharding of the data,
and its size is about ``fraction × images``.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import torch

from harness.datasets.images import JPEG_MAGIC, decode_image_file, decode_jpeg_bytes, decode_pil
from harness.errors import HarnessError


# ----------------------------------------------------------------------------- subsets
def subset_score(key: str, subset_seed: int = 0) -> float:
    """The number in ``[0, 1)`` that decides an image's subsets: kept at fraction f iff score < f."""
    digest = hashlib.sha1(f"{int(subset_seed)}:{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def in_subset(key: str, fraction: float, subset_seed: int = 0) -> bool:
    """True when the image of ``key`` belongs to the ``fraction`` subset (nested in every larger one)."""
    return fraction >= 1.0 or subset_score(key, subset_seed) < fraction


def check_fraction(fraction: float) -> float:
    fraction = float(fraction)
    if not (0.0 < fraction <= 1.0) or not math.isfinite(fraction):
        raise HarnessError(f"--fraction must be in (0, 1], got {fraction}")
    return fraction


# ----------------------------------------------------------------------------- labels
class LabelHierarchy:
    """Child -> parents (a DAG); ``expand(labels)`` adds every ancestor."""

    def __init__(self, parents: dict[str, str | list[str]]):
        self.parents = {str(k): [str(p) for p in (v if isinstance(v, (list, tuple)) else [v])]
                        for k, v in parents.items()}
        self._ancestors: dict[str, frozenset[str]] = {}
        for node in self.parents:
            self._ancestors_of(node, ())

    def _ancestors_of(self, node: str, path: tuple[str, ...]) -> frozenset[str]:
        if node in self._ancestors:
            return self._ancestors[node]
        if node in path:
            cycle = " -> ".join(path[path.index(node):] + (node,))
            raise HarnessError(f"label hierarchy has a cycle: {cycle}")
        out: set[str] = set()
        for parent in self.parents.get(node, ()):
            out.add(parent)
            out |= self._ancestors_of(parent, path + (node,))
        self._ancestors[node] = frozenset(out)
        return self._ancestors[node]

    def ancestors(self, label: str) -> frozenset[str]:
        return self._ancestors.get(str(label), frozenset())

    def expand(self, labels) -> list[str]:
        """The labels plus all their ancestors, sorted."""
        out = set(labels)
        for label in labels:
            out |= self.ancestors(label)
        return sorted(out)

    @classmethod
    def load(cls, path) -> "LabelHierarchy":
        """JSON ``{"child": "parent" | ["parent", ...]}``."""
        path = Path(path)
        if not path.is_file():
            raise HarnessError(f"label hierarchy not found: {path}")
        try:
            obj = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HarnessError(f"{path}: not a JSON label hierarchy ({exc})") from None
        if not isinstance(obj, dict):
            raise HarnessError(f'{path}: a label hierarchy is a JSON object {{"child": "parent" or [parents]}}')
        parents = {}
        for child, value in obj.items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in values):
                raise HarnessError(f"{path}: parents of {child!r} must be label names, got {value!r}")
            parents[str(child)] = [str(v) for v in values]
        return cls(parents)


def labels_of(value, where: str) -> list[str]:
    """Label names from a manifest or sample value (a name, an integer, or a list of them)."""
    if value is None:
        return []
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise HarnessError(f"{where}: labels must be names or integers, got {item!r}")
        text = str(item).strip()
        if text:
            out.append(text)
    return out


def read_classes(path) -> list[str]:
    """A ``--classes`` file: one class name per line, in index order."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"classes file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise HarnessError(f"{path}: duplicate class names")
    if not names:
        raise HarnessError(f"{path}: no class names")
    return names


def vocabulary(found: set[str], classes: list[str] | None, where: str) -> list[str]:
    """The class list: ``classes`` when given (every found label must be in it), else the found labels sorted."""
    if classes is None:
        return sorted(found)
    unknown = sorted(found - set(classes))
    if unknown:
        raise HarnessError(f"{where}: label(s) {', '.join(map(repr, unknown[:5]))} are not in --classes")
    return list(classes)


def multi_hot(indices, num_classes: int) -> torch.Tensor:
    target = torch.zeros(num_classes, dtype=torch.float32)
    if indices:
        target[list(indices)] = 1.0
    return target


# ----------------------------------------------------------------------------- images
def decode_image(src: Path | bytes) -> torch.Tensor:
    """A path or encoded bytes -> uint8 tensor [3, H, W] (RGB); JPEGs through torchvision's decoder
    (the same pixels as PIL's, see ``harness.datasets.images``), other formats through PIL."""
    if not isinstance(src, (bytes, bytearray)):
        if not Path(src).is_file():
            raise HarnessError(f"image not found: {src}")
        try:
            return decode_image_file(Path(src))
        except OSError as exc:
            raise HarnessError(f"{src}: not a readable image ({exc})") from None
    try:
        if bytes(src[:3]) == JPEG_MAGIC:
            return decode_jpeg_bytes(src)
        return decode_pil(io.BytesIO(src))
    except OSError as exc:
        raise HarnessError(f"an image in the shards: not a readable image ({exc})") from None
