"""The input normalization of a backbone, without torch (the backbone cards name its presets):
``(pixel*255 - mean) / std`` in the weights' channel order, and the presets imagenet, caffe,
inception and clip."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from harness.errors import HarnessError


@dataclass(frozen=True)
class Normalization:
    """Input normalization of a backbone: ``(pixel*255 - mean) / std`` in ``channel_order``.

    ``mean``/``std`` are in 0-255 pixel units and listed in the backbone's channel order (for BGR
    weights the first value is the blue channel's).
    """

    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channel_order: str = "RGB"

    def __post_init__(self):
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        if len(mean) != 3 or len(std) != 3:
            raise HarnessError(f"normalization needs 3 mean and 3 std values, got {mean} and {std}")
        if any(not math.isfinite(v) for v in mean + std) or any(v <= 0 for v in std):
            raise HarnessError(f"normalization std must be positive and finite, got {std}")
        if max(mean) <= 1.0 and max(std) <= 1.0 and (mean, std) != ((0.0,) * 3, (1.0,) * 3):
            raise HarnessError(f"normalization mean {mean} and std {std} look like 0-1 units; the harness takes "
                               "0-255 pixel units (ImageNet: mean [123.675, 116.28, 103.53], std [58.395, 57.12, 57.375])")
        order = str(self.channel_order).upper()
        if order not in ("RGB", "BGR"):
            raise HarnessError(f"normalization channel_order must be RGB or BGR, got {self.channel_order!r}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "channel_order", order)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std), "channel_order": self.channel_order}

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        unknown = set(d) - {"mean", "std", "channel_order"} if isinstance(d, dict) else set()
        if unknown:
            raise HarnessError(f"bad normalization {d!r}: unknown key(s) {sorted(unknown)}; it takes mean, std, channel_order")
        try:
            return cls(tuple(d["mean"]), tuple(d["std"]), d.get("channel_order", "RGB"))
        except (KeyError, TypeError, ValueError) as exc:
            raise HarnessError(f"bad normalization {d!r}: needs mean, std, channel_order") from exc


IMAGENET = Normalization((123.675, 116.28, 103.53), (58.395, 57.12, 57.375), "RGB")
CAFFE = Normalization((103.53, 116.28, 123.675), (1.0, 1.0, 1.0), "BGR")
INCEPTION = Normalization((127.5, 127.5, 127.5), (127.5, 127.5, 127.5), "RGB")
CLIP = Normalization((122.7709383, 116.7460125, 104.09373615), (68.5005327, 66.6321579, 70.32316305), "RGB")
NORMALIZATIONS = {
    "imagenet": IMAGENET,  # torchvision / timm ImageNet default, RGB
    "torchvision": IMAGENET,
    "caffe": CAFFE,  # MSRA / detectron2 caffe2 weights, BGR, std 1
    "msra": CAFFE,
    "inception": INCEPTION,
    "clip": CLIP,
}


def resolve_normalization(value) -> Normalization | None:
    """``None``, a :class:`Normalization`, a preset name (imagenet, caffe, inception, clip), a dict
    or a JSON string ``{"mean": [...], "std": [...], "channel_order": "RGB"}``."""
    if value is None or isinstance(value, Normalization):
        return value
    if isinstance(value, dict):
        return Normalization.from_dict(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in NORMALIZATIONS:
            return NORMALIZATIONS[text.lower()]
        if text.startswith("{"):
            try:
                return Normalization.from_dict(json.loads(text))
            except json.JSONDecodeError as exc:
                raise HarnessError(f"bad normalization JSON {text!r}: {exc}") from exc
        raise HarnessError(f"unknown normalization {value!r}: use one of {sorted(NORMALIZATIONS)} or a JSON object")
    raise HarnessError(f"bad normalization {value!r}")
