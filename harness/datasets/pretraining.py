"""Pretraining data: ``open_pretrain_data`` reads (or, for shards, indexes) the data and takes the
``fraction`` subset (see ``harness.datasets.labelled`` for how keys decide subsets).

Formats, detected from ``data`` unless ``data_format`` says:
  * **ImageFolder** tree ``root/<class>/<image>`` (single label per image; key: the path relative
    to the root);
  * **manifest**: JSONL (``{"path": ..., "labels": [...]}`` per line; ``"label"`` for one label;
    optional ``"key"``, else the path is the key) or CSV with a header holding ``path`` and ``labels``
    (``;``- or ``|``-separated) or ``label``; paths are relative to the manifest's folder. A folder
    holding ``manifest.jsonl`` (what ``harness data synth --pretrain`` writes) is read as that manifest;
  * **WebDataset** tar shards (``harness.datasets.shards``), streamed.

Folders and manifests give a map-style ``LabeledImages``; shards give a ``ShardStream``
(an ``IterableDataset``). Both yield ``(uint8 image [3, H, W], {"labels": multi-hot float [C]})``.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

from harness.datasets.labelled import (LabelHierarchy, check_fraction, decode_image, in_subset, labels_of,
                                       multi_hot, vocabulary)
from harness.datasets.shards import ShardStream, index_shards, is_url, list_shards
from harness.errors import HarnessError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff")
FORMATS = ("imagefolder", "manifest", "wds")


@dataclass(frozen=True)
class Record:
    """One image of a map-style source: its subset key, file and labels (names)."""

    key: str
    path: Path
    labels: tuple[str, ...]


def read_jsonl_manifest(path: Path) -> list[Record]:
    base = path.parent
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HarnessError(f"{where}: not JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("path"), str):
                raise HarnessError(f'{where}: each line needs {{"path": ..., "labels": [...]}}')
            labels = labels_of(obj["labels"] if "labels" in obj else obj.get("label"), where)
            records.append(Record(str(obj.get("key", obj["path"])), base / obj["path"], tuple(labels)))
    return records


def read_csv_manifest(path: Path) -> list[Record]:
    base = path.parent
    records = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in (reader.fieldnames or [])]
        if "path" not in fields or not ({"labels", "label"} & set(fields)):
            raise HarnessError(f"{path}: a CSV manifest needs a header with 'path' and 'labels' (or 'label') columns")
        for lineno, row in enumerate(reader, 2):
            row = {(k or "").strip(): (v or "") for k, v in row.items()}
            cell = row.get("labels", row.get("label", ""))
            labels = [t.strip() for t in re.split(r"[;|]", cell) if t.strip()]
            if not row["path"].strip():
                raise HarnessError(f"{path}:{lineno}: empty path")
            key = row.get("key", "").strip() or row["path"].strip()
            records.append(Record(key, base / row["path"].strip(), tuple(labels)))
    return records


def read_image_folder(root: Path) -> list[Record]:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise HarnessError(f"{root}: no class folders (an ImageFolder tree is root/<class>/<image>)")
    records = []
    for name in classes:
        for file in sorted((root / name).rglob("*")):
            if file.is_file() and file.suffix.lower() in IMAGE_EXTENSIONS:
                records.append(Record(file.relative_to(root).as_posix(), file, (name,)))
    return records


class LabeledImages(Dataset):
    """Map-style pretraining set: ``(uint8 image [3, H, W], {"labels": multi-hot float [C]})``."""

    def __init__(self, records: list[Record], class_index: dict[str, int]):
        self.records = records
        self.class_index = class_index
        self.targets = [tuple(class_index[label] for label in r.labels) for r in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        image = decode_image(self.records[index].path)
        return image, {"labels": multi_hot(self.targets[index], len(self.class_index))}


@dataclass
class PretrainData:
    """What ``open_pretrain_data`` found: the dataset the engine trains on and its description."""

    kind: str  # imagefolder | manifest | wds
    source: str
    classes: list[str]
    total_images: int  # before the fraction
    images: int  # in the subset
    dataset: Dataset  # LabeledImages, or a ShardStream for shards
    shards: int = 0

    def describe(self) -> dict:
        return {"format": self.kind, "source": self.source, "total_images": self.total_images,
                "images": self.images, "classes": len(self.classes), "shards": self.shards}


def detect_format(data: str) -> str:
    if is_url(data) or data.endswith((".tar", ".tgz", ".tar.gz")) or "{" in data:
        return "wds"
    path = Path(data)
    if path.is_file():
        if path.suffix.lower() in (".jsonl", ".json", ".csv"):
            return "manifest"
        raise HarnessError(f"{data}: a data file must be a .jsonl/.csv manifest or a .tar shard")
    if path.is_dir():
        if (path / "manifest.jsonl").is_file() or (path / "manifest.csv").is_file():
            return "manifest"
        if any(path.glob("*.tar")) or any(path.glob("*.tar.gz")):
            return "wds"
        return "imagefolder"
    if any(c in data for c in "*?["):
        return "wds"
    raise HarnessError(f"pretraining data not found: {data}")


def _manifest_path(data: str) -> Path:
    path = Path(data)
    if path.is_dir():
        for name in ("manifest.jsonl", "manifest.csv"):
            if (path / name).is_file():
                return path / name
        raise HarnessError(f"{data}: no manifest.jsonl or manifest.csv in this folder")
    if not path.is_file():
        raise HarnessError(f"manifest not found: {data}")
    return path


def open_pretrain_data(data: str, *, fraction: float = 1.0, subset_seed: int = 0, data_format: str | None = None,
                       hierarchy: LabelHierarchy | None = None, classes: list[str] | None = None, rank: int = 0,
                       world_size: int = 1, seed: int = 0, shuffle_buffer: int = 1000) -> PretrainData:
    """Read (or, for shards, index) the pretraining data and take the ``fraction`` subset. ``rank``,
    ``world_size``, ``seed`` and ``shuffle_buffer`` concern shards only (which shards this process
    streams, their order and shuffle)."""
    data = str(data)
    fraction = check_fraction(fraction)
    kind = data_format or detect_format(data)
    if kind not in FORMATS:
        raise HarnessError(f"unknown data format {kind!r}: use one of {', '.join(FORMATS)}")
    if kind == "wds":
        shards = list_shards(data)
        index = index_shards(shards, fraction, subset_seed, hierarchy, classes)
        if index.kept == 0:
            raise HarnessError(f"{data}: the {fraction:g} subset of {index.total} images is empty")
        vocab = vocabulary(index.labels, classes, data)
        if not vocab:
            raise HarnessError(f"{data}: no labels in the {fraction:g} subset")
        stream = ShardStream(shards, {name: i for i, name in enumerate(vocab)}, index.counts, fraction=fraction,
                             subset_seed=subset_seed, hierarchy=hierarchy, classes=classes, rank=rank,
                             world_size=world_size, seed=seed, shuffle_buffer=shuffle_buffer)
        return PretrainData("wds", data, vocab, index.total, index.kept, stream, shards=len(shards))
    if kind == "imagefolder":
        root = Path(data)
        if not root.is_dir():
            raise HarnessError(f"ImageFolder root not found: {data}")
        records = read_image_folder(root)
        source = str(root)
    else:
        path = _manifest_path(data)
        records = read_csv_manifest(path) if path.suffix.lower() == ".csv" else read_jsonl_manifest(path)
        source = str(path)
    if not records:
        raise HarnessError(f"{source}: no images")
    keys = [r.key for r in records]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise HarnessError(f"{source}: image key {dup!r} appears twice (keys decide the subsets)")
    total = len(records)
    records = [r for r in records if in_subset(r.key, fraction, subset_seed)]
    if not records:
        raise HarnessError(f"{source}: the {fraction:g} subset of {total} images is empty")
    if hierarchy is not None:
        records = [Record(r.key, r.path, tuple(hierarchy.expand(r.labels))) for r in records]
    vocab = vocabulary({label for r in records for label in r.labels}, classes, source)
    if not vocab:
        raise HarnessError(f"{source}: no labels in the {fraction:g} subset")
    index = {name: i for i, name in enumerate(vocab)}
    return PretrainData(kind, source, vocab, total, len(records), LabeledImages(records, index))
