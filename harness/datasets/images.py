"""Reading images, with missing or unreadable files reported by name (label PNGs: datasets/voc.py)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torchvision
from PIL import Image, ImageOps

from harness.errors import HarnessError


JPEG_MAGIC = b"\xff\xd8\xff"


def decode_pil(src: Path | BinaryIO) -> torch.Tensor:
    """Any image file (a path or an open binary file) PIL reads, as uint8 [3, H, W] RGB, turned upright
    by its EXIF orientation (as detectron2's ``read_image``)."""
    with Image.open(src) as im:
        array = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def torchvision_decodes_jpeg() -> bool:
    """Whether this torchvision has its JPEG decoder: 0.29 deprecates its image decoders in favour of
    TorchCodec, and where a later one has removed them, PIL (the same pixels) reads JPEGs too."""
    return hasattr(torchvision.io, "decode_jpeg") and hasattr(torchvision.io, "ImageReadMode")


def decode_jpeg_bytes(data: bytes | bytearray) -> torch.Tensor:
    """An encoded JPEG as uint8 [3, H, W] RGB, upright by its EXIF orientation, through torchvision's
    libjpeg-turbo decoder (or PIL without it); a corrupt file raises OSError with the decoder's reason."""
    if not torchvision_decodes_jpeg():
        return decode_pil(io.BytesIO(data))
    try:
        buffer = data if isinstance(data, bytearray) else bytearray(data)  # frombuffer wants it writable
        return torchvision.io.decode_jpeg(torch.frombuffer(buffer, dtype=torch.uint8),
                                          mode=torchvision.io.ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as exc:  # "decode_jpeg, <source file>:<line>, <what is wrong>"
        raise OSError(str(exc).splitlines()[0].rsplit(", ", 1)[-1] or "corrupt JPEG") from None


def decode_torchvision(path: Path) -> torch.Tensor:
    """JPEG files through torchvision's libjpeg-turbo decoder, other formats through PIL; uint8 [3, H, W] RGB.

    The same pixels as `decode_pil` on JPEGs (both libjpeg-turbo, integer DCT, fancy upsampling;
    tested on colour, grayscale, CMYK and progressive files).
    """
    with open(path, "rb") as f:
        data = bytearray(f.read())
    if data[:3] != JPEG_MAGIC:
        return decode_pil(path)
    return decode_jpeg_bytes(data)


# the decoder read_image uses (bench/bench_loader.py compares the two)
decode_image_file = decode_torchvision


def read_image(path: str | Path, size: tuple[int, int] | None = None) -> torch.Tensor:
    """An image file as a float tensor [3, H, W], RGB in [0, 1] (grayscale/CMYK converted); with
    ``size`` = (height, width) from its annotation, another size is an error (detectron2's
    ``check_image_size``): its boxes would not be where its pixels are."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"image not found: {path}")
    try:
        image = decode_image_file(path)
    except OSError as exc:
        raise HarnessError(f"{path}: not a readable image ({exc})") from None
    if size is not None and tuple(image.shape[1:]) != tuple(size):
        raise HarnessError(f"{path}: the image is {image.shape[2]}x{image.shape[1]} (width x height, upright), its "
                           f"annotation says {size[1]}x{size[0]}")
    return image.float().div_(255.0)
