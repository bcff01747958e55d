"""PASCAL VOC in its devkit layout: detection XML, ImageSets lists, segmentation PNGs, SBD.

Boxes stay in the devkit's 1-based inclusive pixel convention in `VocObject`; the torch
datasets convert them to 0-based continuous coordinates (x1 - 1, y1 - 1, x2, y2), as detectron2.
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harness.datasets.images import read_image
from harness.datasets.voc_devkit import SEG_CLASSES, VOC_CLASSES, voc_colormap
from harness.errors import HarnessError


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


@dataclass(frozen=True)
class VocObject:
    name: str
    difficult: bool
    box: tuple[float, float, float, float]  # xmin, ymin, xmax, ymax: 1-based, inclusive (as in the XML)


@dataclass(frozen=True)
class VocAnnotation:
    image_id: str
    width: int
    height: int
    objects: tuple[VocObject, ...]


def voc_year(voc_dir: str | Path) -> int:
    """The year a `VOC20xx` folder is named for."""
    match = re.fullmatch(r"VOC(\d{4})", Path(voc_dir).resolve().name)
    if not match:
        raise HarnessError(f"{voc_dir}: cannot tell the VOC year from the folder name; pass --year")
    return int(match.group(1))


def read_image_set(voc_dir: str | Path, split: str, kind: str = "Main") -> list[str]:
    """Image ids of `ImageSets/<kind>/<split>.txt`, in file order."""
    path = Path(voc_dir) / "ImageSets" / kind / f"{split}.txt"
    if not path.is_file():
        available = sorted(p.stem for p in path.parent.glob("*.txt") if "_" not in p.stem or p.stem == "train_aug")
        raise HarnessError(f"VOC split list not found: {path} (available: {', '.join(available) or 'none'})")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not part of the first id
    except UnicodeDecodeError as exc:
        raise HarnessError(f"{path}: not a text list of image ids ({exc})") from None
    ids = [line.split()[0] for line in text.splitlines() if line.strip()]
    if not ids:
        raise HarnessError(f"{path}: the split list is empty")
    if len(set(ids)) != len(ids):  # each image would count twice in the score
        twice = next(i for n, i in enumerate(ids) if i in ids[:n])
        raise HarnessError(f"{path}: lists image {twice} more than once")
    return ids


def read_voc_xml(path: str | Path) -> VocAnnotation:
    """Parse one devkit annotation XML."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"VOC annotation not found: {path}")
    try:
        root = ET.parse(path).getroot()
        size = root.find("size")
        width, height = int(size.findtext("width")), int(size.findtext("height"))
        objects = []
        for obj in root.findall("object"):
            name = obj.findtext("name").strip()
            if name not in VOC_CLASSES:
                raise HarnessError(f"{path}: unknown VOC class {name!r}")
            bb = obj.find("bndbox")
            box = tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            if not (all(map(math.isfinite, box)) and box[0] <= box[2] and box[1] <= box[3]):
                raise HarnessError(f"{path}: object {len(objects) + 1} ({name}) has the box {box} "
                                   "(xmin, ymin, xmax, ymax): not finite numbers with min <= max")
            difficult = (obj.findtext("difficult") or "0").strip()
            if difficult not in ("0", "1"):
                raise HarnessError(f"{path}: object {len(objects) + 1} ({name}) has <difficult>{difficult}</difficult>; "
                                   "the devkit reads 0 or 1")
            objects.append(VocObject(name, difficult == "1", box))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as exc:
        raise HarnessError(f"{path}: not a valid VOC annotation ({exc})") from None
    return VocAnnotation(path.stem, width, height, tuple(objects))


def load_voc_detection(voc_dir: str | Path, split: str) -> list[VocAnnotation]:
    """Annotations of every image of a detection split (`ImageSets/Main/<split>.txt`)."""
    voc_dir = Path(voc_dir)
    if not voc_dir.is_dir():
        raise HarnessError(f"VOC folder not found: {voc_dir}")
    return [read_voc_xml(voc_dir / "Annotations" / f"{i}.xml") for i in read_image_set(voc_dir, split)]


class VOCDetection(torch.utils.data.Dataset):
    """One or more (VOC folder, split) pairs, e.g. VOC2007 trainval + VOC2012 trainval (07+12).

    Labels are 1..20 in VOC_CLASSES order. Difficult objects are kept in training targets (as
    detectron2) and flagged in `target["difficult"]`. train=True skips images without objects
    (detectron2's FILTER_EMPTY_ANNOTATIONS); train=False keeps every image, so that all are scored.
    """

    class_names = VOC_CLASSES

    def __init__(self, sources: list[tuple[str | Path, str]], train: bool = False):
        self.items: list[tuple[Path, VocAnnotation]] = []
        seen: set[tuple[str, str]] = set()
        for voc_dir, split in sources:
            voc_dir = Path(voc_dir)
            for ann in load_voc_detection(voc_dir, split):
                key = (voc_dir.resolve().name, ann.image_id)
                if key not in seen and (ann.objects or not train):
                    seen.add(key)
                    self.items.append((voc_dir, ann))

    @property
    def image_ids(self) -> list[str]:
        return [ann.image_id for _, ann in self.items]

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each image, from its annotation XML (no decoding)."""
        return [(ann.height, ann.width) for _, ann in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        voc_dir, ann = self.items[index]
        image = read_image(voc_dir / "JPEGImages" / f"{ann.image_id}.jpg", (ann.height, ann.width))
        boxes = np.array([o.box for o in ann.objects], dtype=np.float32).reshape(-1, 4)
        boxes[:, :2] -= 1.0
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([VOC_CLASSES.index(o.name) + 1 for o in ann.objects], dtype=torch.int64),
            "difficult": torch.tensor([o.difficult for o in ann.objects], dtype=torch.bool),
            "iscrowd": torch.zeros(len(ann.objects), dtype=torch.int64),
            "image_id": ann.image_id,
        }
        return image, target


def segmentation_mask_path(voc_dir: str | Path, image_id: str, split: str) -> Path:
    """SegmentationClassAug for the SBD `train_aug` split, SegmentationClass otherwise."""
    folder = "SegmentationClassAug" if split == "train_aug" else "SegmentationClass"
    return Path(voc_dir) / folder / f"{image_id}.png"


def read_sbd_mask(path: str | Path) -> np.ndarray:
    """An SBD `cls/<id>.mat` label map (GTcls.Segmentation) as uint8 [H, W]."""
    from scipy.io import loadmat

    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"SBD mask not found: {path}")
    try:
        mat = loadmat(str(path), squeeze_me=True, struct_as_record=False)
        labels = np.asarray(mat["GTcls"].Segmentation)
        if labels.size and (labels.min() < 0 or labels.max() > 255):  # a uint8 cast would wrap them into classes
            raise HarnessError(f"{path}: labels {labels.min()}..{labels.max()} outside 0..255")
        return labels.astype(np.uint8)
    except (KeyError, AttributeError, ValueError) as exc:
        raise HarnessError(f"{path}: not an SBD class mask ({exc})") from None


def sbd_train_aug_ids(voc2012_dir: str | Path, sbd_dir: str | Path) -> list[str]:
    """The `train_aug` list: (SBD train ∪ SBD val ∪ VOC12 seg train) minus VOC12 seg val, sorted."""
    sbd = Path(sbd_dir)
    sbd_ids: set[str] = set()
    for name in ("train.txt", "val.txt"):
        path = sbd / name
        if not path.is_file():
            raise HarnessError(f"SBD list not found: {path}")
        sbd_ids.update(line.strip() for line in path.read_text().splitlines() if line.strip())
    val = set(read_image_set(voc2012_dir, "val", "Segmentation"))
    train = set(read_image_set(voc2012_dir, "train", "Segmentation"))
    return sorted((sbd_ids | train) - val)


class VOCSegmentation(torch.utils.data.Dataset):
    """A VOC2012 segmentation split: image [3,H,W] in [0,1] and an int64 mask (255 = ignore).

    split "train_aug" reads `ImageSets/Segmentation/train_aug.txt` with `SegmentationClassAug`
    PNGs (the DeepLab convention); with `sbd_dir` given instead, it builds train_aug from SBD's
    `.mat` files, preferring VOC's own masks for images that have them.
    """

    class_names = SEG_CLASSES

    def __init__(self, voc_dir: str | Path, split: str, sbd_dir: str | Path | None = None):
        self.voc_dir = Path(voc_dir)
        self.split = split
        self.sbd_dir = None
        if sbd_dir is not None and split == "train_aug":
            # Accept the SBD download's top folder or its `dataset/` folder.
            sbd_dir = Path(sbd_dir)
            self.sbd_dir = sbd_dir / "dataset" if (sbd_dir / "dataset").is_dir() else sbd_dir
            self.ids = sbd_train_aug_ids(self.voc_dir, self.sbd_dir)
        else:
            self.ids = read_image_set(self.voc_dir, split, "Segmentation")

    @property
    def image_ids(self) -> list[str]:
        return list(self.ids)

    def read_mask(self, image_id: str) -> np.ndarray:
        """The image's class map; a value that is neither a class nor 255 (ignore) is an error naming the file."""
        if self.sbd_dir is not None:
            own = self.voc_dir / "SegmentationClass" / f"{image_id}.png"
            path = own if own.is_file() else self.sbd_dir / "cls" / f"{image_id}.mat"
            mask = read_label_png(path) if own.is_file() else read_sbd_mask(path)
        else:
            path = segmentation_mask_path(self.voc_dir, image_id, self.split)
            mask = read_label_png(path)
        bad = mask[(mask >= len(SEG_CLASSES)) & (mask != 255)]
        if bad.size:
            raise HarnessError(f"{path}: label {int(bad.max())} is neither a class (0..{len(SEG_CLASSES) - 1}) nor 255 (ignore)")
        return mask

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        image_id = self.ids[index]
        image = read_image(self.voc_dir / "JPEGImages" / f"{image_id}.jpg")
        mask = self.read_mask(image_id)
        if mask.shape != tuple(image.shape[1:]):
            raise HarnessError(f"{image_id}: mask size {mask.shape} differs from image size {tuple(image.shape[1:])}")
        return image, torch.from_numpy(mask.astype(np.int64))
