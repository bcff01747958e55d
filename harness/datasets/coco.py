"""COCO `instances_*` and `person_keypoints_*` JSON: validated loading and a torch Dataset.

Category ids stay COCO's own (non-contiguous) in files and predictions; training uses the
contiguous labels 1..K of `CocoDetection.category_ids` (0 is background, as torchvision wants).
"""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import numpy as np
import orjson
import torch

from harness.datasets.images import read_image
from harness.errors import HarnessError
from harness.gcpause import gc_paused
from harness.metrics import json_numbers, member, real_types


def _has_digit_run(data: bytes, n: int = 19) -> bool:
    """True when ``data`` holds ``n`` or more consecutive ASCII digits (a vectorised scan)."""
    run = (np.frombuffer(data, np.uint8) - np.uint8(48)) < 10
    width = 1
    while width * 2 <= n:  # run[i]: data[i:i + 2 * width] are all digits
        run = run[:-width] & run[width:]
        width *= 2
    if width < n:
        run = run[: -(n - width)] & run[n - width:]
    return bool(run.any())


def read_json(path: str | Path, what: str = "JSON file"):
    """Read a JSON file; a missing or malformed file is a one-line HarnessError naming it.

    orjson parses, several times faster than Python's json, with the same values, except where it
    refuses a file Python's json reads (NaN/Infinity literals, a byte-order mark) or turns an
    integer beyond 64 bits into a float: files with 19 or more digits in a row, and those orjson
    refuses, are parsed by Python's json, so the values and the validators' messages stay as before.
    """
    path = Path(path)
    if path.is_dir():
        raise HarnessError(f"{what} expected, got a folder: {path}")
    if not path.is_file():
        raise HarnessError(f"{what} not found: {path}")
    data = path.read_bytes()
    with gc_paused():
        if not _has_digit_run(data):
            try:
                return orjson.loads(data)
            except orjson.JSONDecodeError:
                pass
        try:
            return json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HarnessError(f"{path}: not valid JSON ({exc})") from None


def validate_coco_gt(gt, source: str) -> dict:
    """Check the structure a COCO evaluator relies on; returns `gt` unchanged.

    Image and category ids are integers; every annotation has a unique integer ``id``, known ``image_id`` and
    ``category_id``, a ``bbox`` and an ``area`` (the area ranges of APs/APm/APl are read from it, not
    from the box); an annotation of a category with keypoints has ``keypoints`` (x, y, v per named
    keypoint) and ``num_keypoints``. pycocotools refuses a file without them; scoring one as if the
    field were 0 would give numbers that look right and are not.
    """
    if not isinstance(gt, dict):
        raise HarnessError(f"{source}: a COCO ground-truth file is a JSON object, got {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise HarnessError(f"{source}: no '{key}' list: is this a COCO instances/person_keypoints file?")
    image_ids = _unique_integer_ids(gt["images"], "images", source)
    keypoint_values = {cat["id"]: 3 * len(cat.get("keypoints") or ())
                       for cat in gt["categories"] if isinstance(cat, dict) and "id" in cat}
    _unique_integer_ids(gt["categories"], "categories", source)
    ann_ids = set()
    for i, ann in enumerate(gt["annotations"]):
        if not isinstance(ann, dict):
            raise HarnessError(f"{source}: annotations[{i}] is not an object")
        for key in ("id", "image_id", "category_id", "bbox", "area"):
            if key not in ann:
                raise HarnessError(f"{source}: annotations[{i}] has no '{key}'")
        if type(ann["id"]) is not int:
            raise HarnessError(f"{source}: annotations[{i}] has id {ann['id']!r}: COCO ids are integers")
        if ann["id"] in ann_ids:
            raise HarnessError(f"{source}: annotations[{i}] repeats annotation id {ann['id']!r}")
        ann_ids.add(ann["id"])
        if ann.get("iscrowd", 0) not in (0, 1) or type(ann.get("iscrowd", 0)) not in (int, bool):
            raise HarnessError(f"{source}: annotations[{i}] has iscrowd {ann['iscrowd']!r}; COCO's is 0 or 1 (a string "
                               "would read as a crowd region)")
        if not member(ann["image_id"], image_ids):
            raise HarnessError(f"{source}: annotations[{i}] names image_id {ann['image_id']!r}, not in 'images'")
        if not member(ann["category_id"], keypoint_values):
            raise HarnessError(f"{source}: annotations[{i}] names category_id {ann['category_id']!r}, not in 'categories'")
        values = keypoint_values[ann["category_id"]]
        if values and not (isinstance(ann.get("keypoints"), list) and len(ann["keypoints"]) == values
                           and "num_keypoints" in ann):
            raise HarnessError(f"{source}: annotations[{i}] of a category with keypoints needs 'keypoints' "
                               f"({values} numbers: x, y, v per keypoint) and 'num_keypoints'")
    if not gt["annotations"]:
        raise HarnessError(f"{source}: no annotations: nothing to train on or score against")
    _check_boxes(gt["annotations"], source)
    return gt


def _check_boxes(anns: list, source: str) -> None:
    """Every ``bbox`` is [x, y, w, h] of finite numbers with w, h >= 0 and every ``area`` a number (vectorised)."""
    boxes, areas = [a["bbox"] for a in anns], [a["area"] for a in anns]
    shaped = all(isinstance(b, list) and len(b) == 4 for b in boxes)
    if not (shaped and real_types(set(map(type, chain.from_iterable(boxes)))) and real_types(set(map(type, areas)))):
        for i, a in enumerate(anns):
            if not (json_numbers(a["bbox"], scalar=False) and len(a["bbox"]) == 4 and json_numbers(a["area"], scalar=True)):
                raise HarnessError(f"{source}: annotations[{i}] needs a 'bbox' of 4 numbers [x, y, w, h] and a numeric 'area'")
    values = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    bad = ~np.isfinite(values).all(axis=1) | (values[:, 2] < 0) | (values[:, 3] < 0) | ~np.isfinite(np.asarray(areas, dtype=np.float64))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise HarnessError(f"{source}: annotations[{i}] has a NaN, infinite or negative-size bbox {anns[i]['bbox']} "
                           f"or area {anns[i]['area']}")


def _unique_integer_ids(entries: list, what: str, source: str) -> set:
    ids = set()
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "id" not in entry:
            raise HarnessError(f"{source}: {what}[{i}] has no 'id'")
        if type(entry["id"]) is not int:  # not a bool, a float or a string
            raise HarnessError(f"{source}: {what}[{i}] has id {entry['id']!r}: COCO ids are integers")
        if entry["id"] in ids:
            raise HarnessError(f"{source}: {what}[{i}] repeats id {entry['id']!r}")
        ids.add(entry["id"])
    return ids


def load_coco_gt(path: str | Path) -> dict:
    """Load and validate a COCO ground-truth JSON."""
    return validate_coco_gt(read_json(path, "COCO ground-truth file"), str(path))


def _labelled_keypoints(ann: dict) -> int:
    """How many keypoints an annotation labels, from their visibility flags (as detectron2 counts them
    for MIN_KEYPOINTS_PER_IMAGE, not from ``num_keypoints``)."""
    return sum(1 for v in (ann.get("keypoints") or [])[2::3] if v > 0)


class CocoDetection(torch.utils.data.Dataset):
    """Images of a COCO split with box (and optionally keypoint) targets.

    train=True drops crowd regions and boxes of 1 pixel or less a side from targets (detectron2 keeps
    boxes over 1e-5: a departure in tasks/FIDELITY.md) and skips images left with no usable object (as
    detectron2 does); with keypoints it also skips images without a labelled keypoint by their
    visibility flags (detectron2's MIN_KEYPOINTS_PER_IMAGE = 1), while people
    without keypoints stay as box targets. train=False keeps every image of the split, so that
    evaluation scores all of them.
    """

    def __init__(self, ann_file: str | Path, image_dir: str | Path, keypoints: bool = False, train: bool = False):
        self.ann_file = Path(ann_file)
        self.image_dir = Path(image_dir)
        if not self.image_dir.is_dir():
            raise HarnessError(f"COCO image folder not found: {self.image_dir}")
        self.gt = load_coco_gt(self.ann_file)
        self.keypoints = keypoints
        cats = sorted(self.gt["categories"], key=lambda c: c["id"])
        if keypoints:
            cats = [c for c in cats if c.get("keypoints")]
            if not cats:
                raise HarnessError(f"{self.ann_file}: no category has keypoints: is this a person_keypoints file?")
        self.category_ids = [c["id"] for c in cats]
        self.class_names = [c["name"] for c in cats]
        self.keypoint_names = list(cats[0].get("keypoints", [])) if keypoints else []
        self._label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        anns_by_image: dict = {img["id"]: [] for img in self.gt["images"]}
        for ann in self.gt["annotations"]:
            if ann["category_id"] in self._label_of:
                anns_by_image[ann["image_id"]].append(ann)
        images = sorted(self.gt["images"], key=lambda im: im["id"])
        for img in images:  # what reading the images needs (scoring does not)
            if not (isinstance(img.get("file_name"), str) and all(type(img.get(k)) is int and img[k] > 0
                                                                 for k in ("height", "width"))):
                raise HarnessError(f"{self.ann_file}: image id {img['id']} needs a 'file_name' and positive integer "
                                   "'height' and 'width'")
        self.images = []
        self._anns = []
        for img in images:
            anns = anns_by_image[img["id"]]
            if train:
                anns = [a for a in anns if self._usable(a)]
                if not anns or (keypoints and not any(_labelled_keypoints(a) for a in anns)):
                    continue
            self.images.append(img)
            self._anns.append(anns)

    def _usable(self, ann: dict) -> bool:
        w, h = ann["bbox"][2], ann["bbox"][3]
        return not ann.get("iscrowd", 0) and w > 1 and h > 1

    @property
    def image_ids(self) -> list:
        return [img["id"] for img in self.images]

    def image_sizes(self) -> list[tuple[int, int]]:
        """(height, width) of each image, from the annotation file (no decoding)."""
        return [(int(img["height"]), int(img["width"])) for img in self.images]

    def category_id(self, label: int) -> int:
        """COCO category id of a contiguous label (1..K)."""
        return self.category_ids[label - 1]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = self.images[index]
        image = read_image(self.image_dir / img["file_name"], (img["height"], img["width"]))
        anns = self._anns[index]
        boxes = np.array([a["bbox"] for a in anns], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.tensor([self._label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a in anns], dtype=torch.int64),
            "image_id": img["id"],
        }
        if self.keypoints:
            k = len(self.keypoint_names)
            kps = np.array([a.get("keypoints") or [0] * (3 * k) for a in anns], dtype=np.float32)
            target["keypoints"] = torch.from_numpy(kps.reshape(-1, k, 3))
        return image, target
