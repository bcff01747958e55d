"""Reading images and label PNGs, with missing or unreadable files reported by name."""

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


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (the devkit's labelcolormap.m): row i is the RGB of class i."""
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def read_label_png(path: str | Path) -> np.ndarray:
    """A label map as uint8 class indices [H, W].

    Palette ('P') and grayscale PNGs hold the indices themselves (VOC SegmentationClass,
    SegmentationClassAug); an RGB PNG is decoded through the VOC colour map, and a colour
    outside it is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"label PNG not found: {path}")
    try:
        with Image.open(path) as im:
            mode = im.mode
            array = np.asarray(im)
    except OSError as exc:
        raise HarnessError(f"{path}: not a readable PNG ({exc})") from None
    if mode in ("P", "L"):
        return array.astype(np.uint8, copy=False)
    if mode in ("I", "I;16"):
        if array.max(initial=0) > 255:
            raise HarnessError(f"{path}: label values above 255")
        return array.astype(np.uint8)
    if mode in ("RGB", "RGBA"):
        return _decode_colors(array[..., :3], path)
    raise HarnessError(f"{path}: unsupported PNG mode {mode!r} for a label map")


def _decode_colors(rgb: np.ndarray, path: Path) -> np.ndarray:
    cmap = voc_colormap().astype(np.int64)
    code_of_index = (cmap[:, 0] << 16) | (cmap[:, 1] << 8) | cmap[:, 2]
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    unique, inverse = np.unique(codes, return_inverse=True)
    lookup = {int(code): idx for idx, code in enumerate(code_of_index)}  # first index wins
    out = np.empty(len(unique), dtype=np.uint8)
    for k, code in enumerate(unique):
        if int(code) not in lookup:
            code = int(code)
            color = ((code >> 16) & 255, (code >> 8) & 255, code & 255)
            raise HarnessError(f"{path}: colour {color} is not in the VOC colour map")
        out[k] = lookup[int(code)]
    return out[inverse].reshape(codes.shape)
