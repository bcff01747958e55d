"""The image reader: torchvision's JPEG decoder gives PIL's pixels; unreadable files are one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from harness.datasets.images import decode_pil, decode_torchvision, read_image
from harness.errors import HarnessError


def photo_like(seed: int = 0, h: int = 120, w: int = 160) -> np.ndarray:
    """Smooth gradients plus noise: both the DCT's low and high frequencies matter."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([x * 255 / w, y * 255 / h, (x + y) * 127 / (w + h)], axis=-1)
    return np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)


@pytest.mark.parametrize(
    "name, save",
    [
        ("rgb.jpg", lambda im, p: im.save(p, quality=90)),
        ("rgb444.jpg", lambda im, p: im.save(p, quality=75, subsampling=0)),
        ("progressive.jpg", lambda im, p: im.save(p, quality=80, progressive=True)),
        ("gray.jpg", lambda im, p: im.convert("L").save(p, quality=90)),
        ("cmyk.jpg", lambda im, p: im.convert("CMYK").save(p, quality=90)),
        ("odd.jpg", lambda im, p: im.crop((0, 0, 157, 113)).save(p, quality=95)),
        ("rgb.png", lambda im, p: im.save(p)),
    ],
)
def test_torchvision_decoder_gives_the_pixels_pil_gives(tmp_path, name, save):
    path = tmp_path / name
    save(Image.fromarray(photo_like()), path)
    ours, pil = decode_torchvision(path), decode_pil(path)
    assert ours.dtype == torch.uint8 and ours.shape[0] == 3
    assert torch.equal(ours, pil)
    image = read_image(path)
    assert image.dtype == torch.float32 and torch.equal(image, pil.float() / 255)


def test_unreadable_images_are_one_line_errors_naming_the_file(tmp_path):
    good = tmp_path / "good.jpg"
    Image.fromarray(photo_like()).save(good, quality=90)
    data = good.read_bytes()
    cases = {"truncated.jpg": data[: len(data) // 2], "garbage.jpg": data[:3] + b"not a jpeg" * 20,
             "text.jpg": b"hello"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(HarnessError) as err:
            read_image(tmp_path / name)
        message = str(err.value)
        assert message.startswith(f"{tmp_path / name}: not a readable image") and "\n" not in message
        assert ".cpp" not in message  # the decoder's source location is not the user's business
    with pytest.raises(HarnessError, match="image not found"):
        read_image(tmp_path / "missing.jpg")


def test_without_torchvision_decoders_pil_reads_the_same_pixels(tmp_path, monkeypatch):
    """torchvision 0.29 deprecates its image decoders (TorchCodec supersedes them): a torchvision
    without them reads files and shard bytes through PIL, with the same pixels and the same errors."""
    import torchvision

    from harness.datasets.labelled import decode_image

    path = tmp_path / "rgb.jpg"
    Image.fromarray(photo_like(1)).save(path, quality=90)
    with_torchvision = read_image(path)
    shard_bytes = decode_image(path.read_bytes())
    calls = []
    monkeypatch.setattr(torchvision.io, "decode_jpeg", lambda *a, **k: calls.append(a) or torch.zeros(3, 1, 1))
    assert read_image(path).shape == (3, 1, 1) and len(calls) == 1  # the decoder is looked up at each call
    monkeypatch.delattr(torchvision.io, "decode_jpeg")
    assert torch.equal(read_image(path), with_torchvision)
    assert torch.equal(decode_image(path.read_bytes()), shard_bytes)
    (tmp_path / "truncated.jpg").write_bytes(path.read_bytes()[:200])
    with pytest.raises(HarnessError, match="truncated.jpg: not a readable image"):
        read_image(tmp_path / "truncated.jpg")
    with pytest.raises(HarnessError, match="an image in the shards: not a readable image"):
        decode_image(path.read_bytes()[:200])
