"""Reading images, with missing or unreadable files reported by name (label PNGs: datasets/voc.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image

from harness.errors import HarnessError


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_pil(path: Path) -> torch.Tensor:
    """Any image file PIL reads, as uint8 [3, H, W] RGB."""
    with Image.open(path) as im:
        array = np.asarray(im.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def decode_torchvision(path: Path) -> torch.Tensor:
    """JPEG files through torchvision's libjpeg-turbo decoder, other formats through PIL; uint8 [3, H, W] RGB.

    The same pixels as `decode_pil` on JPEGs (both libjpeg-turbo, integer DCT, fancy upsampling;
    tested on colour, grayscale, CMYK and progressive files).
    """
    data = torchvision.io.read_file(str(path))
    if bytes(data[:3].numpy()) != JPEG_MAGIC:
        return decode_pil(path)
    try:
        return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB)
    except RuntimeError as exc:  # "decode_jpeg, <source file>:<line>, <what is wrong>"
        raise OSError(str(exc).splitlines()[0].rsplit(", ", 1)[-1] or "corrupt JPEG") from None


# the decoder read_image uses (bench/bench_loader.py compares the two)
decode_image_file = decode_torchvision


def read_image(path: str | Path) -> torch.Tensor:
    """An image file as a float tensor [3, H, W], RGB in [0, 1] (grayscale/CMYK converted)."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"image not found: {path}")
    try:
        image = decode_image_file(path)
    except OSError as exc:
        raise HarnessError(f"{path}: not a readable image ({exc})") from None
    return image.float().div_(255.0)
