"""`harness pretrain`: train a backbone on labelled images and write it in the harness's own format.

Data (``open_pretrain_data``), detected from ``--data`` unless ``--format`` says:
  * **ImageFolder** tree ``root/<class>/<image>`` (single label per image);
  * **manifest**: JSONL (``{"path": ..., "labels": [...]}`` per line; ``"label"`` for one label;
    optional ``"key"``) or CSV with a header holding ``path`` and ``labels`` (``;``- or
    ``|``-separated) or ``label``; paths are relative to the manifest's folder. A folder holding
    ``manifest.jsonl`` (what ``harness data synth --pretrain`` writes) is read as that manifest;
  * **WebDataset** tar shards (``data-{000000..000099}.tar``, a folder of ``*.tar``, ``pipe:CMD``
    or ``http(s)://`` URLs): samples are the members sharing a key (``<key>.jpg`` + ``<key>.json``
    with ``{"labels": [...]}`` or ``<key>.cls`` with an integer class). Shards are streamed, never
    indexed for random access: rank ``r`` of ``W`` reads shards ``r::W``, and its ``workers``
    reader threads split those again; each reader loops over its shards with a seeded shard order
    and shuffle buffer. An index pass (names and label members only) counts the images and finds
    the label vocabulary first.

Subsets (``fraction``): an image is kept when ``u(key) < fraction``, with ``u`` the first 8 bytes
of ``sha1("<subset_seed>:<key>")`` read as a number in ``[0, 1)``. The key is the manifest path (or
its ``key``), the ImageFolder path relative to the root, or the WebDataset sample key, so the 10%
subset lies inside the 30% subset, the subset of an image does not depend on the order or the
sharding of the data, and its size is about ``fraction × images``.

Losses (``PretrainModel``): ``sigmoid`` = per-label sigmoid cross-entropy summed over labels and
averaged over images (multi-label, the paper's; an image without labels is a negative for every
label); ``softmax`` = cross-entropy against the image's labels as a uniform target distribution
(the usual one-hot cross-entropy for single-label data; images without labels are left out).
``auto`` picks softmax for an ImageFolder tree without a hierarchy and sigmoid otherwise. A label
hierarchy (JSON ``{"child": "parent"}`` or ``{"child": ["parent", ...]}``) adds every ancestor of
an image's labels.

Training goes through :func:`harness.engine.train` (DDP under torchrun, AMP on CUDA, checkpoints
every ``checkpoint_period`` iterations that a rerun resumes from, tqdm, ``metrics.jsonl``) in
``work_dir`` (default ``<out stem>.run/`` beside the output); the model is the backbone, global
average pooling of ``c5`` and a linear classifier. Rank 0 writes ``out`` with
:func:`harness.backbones.save_backbone` (``harness eval --backbone out`` takes it directly) and
``<out stem>.json`` (data, subset, classes, schedule, sha256). Rerunning a finished command with
the same settings returns the recorded result at once.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import math
import queue
import re
import subprocess
import tarfile
import threading
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import Dataset

from harness.errors import HarnessError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".gif", ".tif", ".tiff")
WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
WDS_LABEL_EXTENSIONS = ("json", "cls")
FORMATS = ("imagefolder", "manifest", "wds")
LOSSES = ("auto", "sigmoid", "softmax")


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


# ----------------------------------------------------------------------------- label hierarchy
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


# ----------------------------------------------------------------------------- records
@dataclass(frozen=True)
class Record:
    """One image of a map-style source: its subset key, file and labels (names)."""

    key: str
    path: Path
    labels: tuple[str, ...]


def _labels_of(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [value]
    out = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise HarnessError(f"{where}: labels must be names or integers, got {item!r}")
        text = str(item).strip()
        if text:
            out.append(text)
    return out


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
            if "labels" in obj:
                labels = _labels_of(obj["labels"], where)
            else:
                labels = _labels_of(obj.get("label"), where)
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


def decode_image(src) -> torch.Tensor:
    """A path or bytes -> uint8 tensor [3, H, W] (RGB)."""
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, (bytes, bytearray)) else src) as im:
            array = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise HarnessError(f"image not found: {src}") from None
    except OSError as exc:
        name = "an image in the shards" if isinstance(src, (bytes, bytearray)) else str(src)
        raise HarnessError(f"{name}: not a readable image ({exc})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


def multi_hot(indices, num_classes: int) -> torch.Tensor:
    target = torch.zeros(num_classes, dtype=torch.float32)
    if indices:
        target[list(indices)] = 1.0
    return target


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


# ----------------------------------------------------------------------------- WebDataset shards
def brace_expand(pattern: str) -> list[str]:
    """``a{0..2}b`` -> a0b a1b a2b (zero padding kept); ``{x,y}`` -> both; nested braces work."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = r.group(1), r.group(2)
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    return [out for item in items for out in brace_expand(head + item + tail)]


def _is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def list_shards(spec: str) -> list[str]:
    """Shard URLs of ``spec``: a folder (its ``*.tar``), brace patterns, globs, ``pipe:``/URLs."""
    if _is_url(spec):
        return brace_expand(spec)
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for ext in ("*.tar", "*.tar.gz", "*.tgz") for p in path.glob(ext))
        if not shards:
            raise HarnessError(f"{spec}: no .tar shards in this folder")
        return shards
    shards = []
    for item in brace_expand(spec):
        if any(c in item for c in "*?["):
            parent = Path(item).parent
            found = sorted(str(p) for p in parent.glob(Path(item).name))
            if not found:
                raise HarnessError(f"no shard matches {item}")
            shards += found
        else:
            if not Path(item).is_file():
                raise HarnessError(f"shard not found: {item}")
            shards.append(item)
    return shards


def _open_stream(url: str):
    """A readable binary stream of one shard (local file, ``pipe:CMD`` or an http(s) URL)."""
    if url.startswith("pipe:"):
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 - the user's own command
        return proc.stdout
    if "://" in url:
        try:
            return urllib.request.urlopen(url)  # noqa: S310 - the user's own URL
        except OSError as exc:
            raise HarnessError(f"cannot open shard {url}: {exc}") from None
    try:
        return open(url, "rb")
    except OSError as exc:
        raise HarnessError(f"cannot open shard {url}: {exc}") from None


def _split_name(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the path up to the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def iter_shard(url: str, want: Callable[[str], bool] = lambda ext: True) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of one shard, in order; members whose extension ``want``
    rejects are skipped without being read (seeked past in local files)."""
    local = not _is_url(url)
    stream = None
    try:
        if local:
            tf = tarfile.open(url, "r:*")
        else:
            stream = _open_stream(url)
            tf = tarfile.open(fileobj=stream, mode="r|*")
    except (tarfile.TarError, OSError) as exc:
        raise HarnessError(f"{url}: not a readable tar shard ({exc})") from None
    key, parts = None, {}
    try:
        with tf:
            for member in tf:
                if not member.isfile():
                    continue
                k, ext = _split_name(member.name)
                if k != key:
                    if key is not None:
                        yield key, parts
                    key, parts = k, {}
                if want(ext):
                    parts[ext] = tf.extractfile(member).read()
            if key is not None:
                yield key, parts
    except tarfile.TarError as exc:
        raise HarnessError(f"{url}: corrupt tar shard ({exc})") from None
    finally:
        if stream is not None:
            stream.close()


def _sample_labels(key: str, parts: dict, url: str, classes: list[str] | None) -> list[str]:
    where = f"{url}: sample {key}"
    if "json" in parts:
        try:
            obj = json.loads(parts["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HarnessError(f"{where}: .json is not JSON ({exc})") from None
        if isinstance(obj, dict):
            return _labels_of(obj["labels"] if "labels" in obj else obj.get("label"), where)
        return _labels_of(obj, where)
    if "cls" in parts:
        text = parts["cls"].decode("utf-8", "replace").strip()
        try:
            index = int(text)
        except ValueError:
            raise HarnessError(f"{where}: .cls must hold an integer class, got {text!r}") from None
        if classes is not None:
            if not 0 <= index < len(classes):
                raise HarnessError(f"{where}: class {index} outside the {len(classes)} classes of --classes")
            return [classes[index]]
        return [str(index)]
    raise HarnessError(f"{where}: no label member (.json with labels or .cls)")


def _sample_image(key: str, parts: dict, url: str) -> bytes:
    for ext in WDS_IMAGE_EXTENSIONS:
        if ext in parts:
            return parts[ext]
    raise HarnessError(f"{url}: sample {key} has no image member ({', '.join(WDS_IMAGE_EXTENSIONS)})")


def write_shards(records, out_pattern: str, per_shard: int) -> list[Path]:
    """Write ``(key, image bytes, ext, labels)`` records as WebDataset shards (``out_pattern`` with one
    ``%d``-style field, e.g. ``shards/data-%06d.tar``). Used by tests and to convert small sets."""
    paths, tf, count = [], None, 0
    try:
        for key, data, ext, labels in records:
            if tf is None or count == per_shard:
                if tf is not None:
                    tf.close()
                path = Path(out_pattern % len(paths))
                path.parent.mkdir(parents=True, exist_ok=True)
                tf, count = tarfile.open(path, "w"), 0
                paths.append(path)
            for name, payload in ((f"{key}.{ext}", data), (f"{key}.json", json.dumps({"labels": list(labels)}).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mtime = len(payload), 0
                tf.addfile(info, io.BytesIO(payload))
            count += 1
    finally:
        if tf is not None:
            tf.close()
    return paths


def count_shard(url: str, fraction: float = 1.0, subset_seed: int = 0) -> int:
    """Images of the ``fraction`` subset in one shard (reads member names only where it can)."""
    return sum(1 for key, _ in iter_shard(url, lambda ext: False) if in_subset(key, fraction, subset_seed))


class ShardStream(Dataset):
    """The engine's view of streamed shards: ``stream[i]`` is the *next* sample of this rank's
    stream (the index only seeds the augmentation), ``len`` the number of images in the subset.

    This rank's shards (``r::W``) are split over ``workers`` reader threads; each loops over its
    shards (order reshuffled per pass) through a shuffle buffer, keeps the subset and decodes.
    Samples are taken from the readers by a seeded schedule that holds reader ``w`` exactly as
    often as its shards hold images, so every cycle of this rank's stream is one pass over its
    images (an epoch, exactly), and the sequence does not depend on thread timing.
    ``skip(n)`` fast-forwards over ``n`` samples without decoding them (resuming a run).
    ``counts`` maps each shard to its number of subset images (counted when not given).
    """

    def __init__(self, shards: list[str], class_index: dict[str, int], *, counts: dict[str, int] | None = None,
                 fraction: float = 1.0, subset_seed: int = 0, hierarchy: LabelHierarchy | None = None,
                 classes: list[str] | None = None, rank: int = 0, world_size: int = 1, workers: int = 1,
                 seed: int = 0, shuffle_buffer: int = 1000, prefetch: int = 64):
        if counts is None:
            counts = {url: count_shard(url, fraction, subset_seed) for url in shards}
        mine = shards[rank::world_size]
        if not mine:
            raise HarnessError(f"{len(shards)} shard(s) for {world_size} processes: every process needs at least one "
                               "(write more, smaller shards)")
        self.length, self.class_index = int(sum(counts[u] for u in shards)), class_index
        self.fraction, self.subset_seed, self.hierarchy, self.classes = fraction, subset_seed, hierarchy, classes
        self.rank, self.seed, self.shuffle_buffer, self.prefetch = rank, seed, max(1, int(shuffle_buffer)), prefetch
        n_workers = max(1, min(int(workers), len(mine)))
        self.worker_shards = [mine[w::n_workers] for w in range(n_workers)]
        self.worker_images = [sum(counts[u] for u in ws) for ws in self.worker_shards]
        self.rank_images = sum(self.worker_images)
        if self.rank_images == 0:
            raise HarnessError(f"process {rank} of {world_size} has no image of the {fraction:g} subset in its "
                               f"{len(mine)} shard(s): use fewer processes or a larger fraction")
        self.workers = n_workers
        self._skip = 0
        self._served = 0
        self._threads: list[threading.Thread] = []
        self._queues: list[queue.Queue] = []
        self._stop = threading.Event()

    def __len__(self) -> int:
        return self.length

    def schedule(self, cycle: int) -> np.ndarray:
        """Reader of each position of cycle ``cycle`` (reader ``w`` appears ``worker_images[w]`` times)."""
        slots = np.repeat(np.arange(self.workers), self.worker_images)
        return np.random.default_rng([self.seed, self.rank, 7919, cycle]).permutation(slots)

    def reader_of(self, k: int) -> int:
        cycle, pos = divmod(k, self.rank_images)
        return int(self.schedule(cycle)[pos])

    def _reader_skips(self, n: int) -> list[int]:
        full, rest = divmod(n, self.rank_images)
        skips = [full * c for c in self.worker_images]
        for w in self.schedule(full)[:rest]:
            skips[int(w)] += 1
        return skips

    def skip(self, n: int) -> None:
        """Start the stream ``n`` samples later (before the first item is read)."""
        if self._threads:
            raise RuntimeError("skip() after the stream started")
        self._skip = int(n)

    def _raw(self, w: int) -> Iterator[tuple[str, dict, str]]:
        shards = self.worker_shards[w]
        want = lambda ext: ext in WDS_IMAGE_EXTENSIONS or ext in WDS_LABEL_EXTENSIONS  # noqa: E731
        passes = 0
        while True:
            rng = np.random.default_rng([self.seed, self.rank, w, passes])
            buffer: list = []
            for s in rng.permutation(len(shards)):
                url = shards[s]
                for key, parts in iter_shard(url, want):
                    if self._stop.is_set():
                        return
                    if not in_subset(key, self.fraction, self.subset_seed):
                        continue
                    if len(buffer) < self.shuffle_buffer:
                        buffer.append((key, parts, url))
                        continue
                    j = int(rng.integers(len(buffer)))
                    yield buffer[j]
                    buffer[j] = (key, parts, url)
            for j in rng.permutation(len(buffer)):
                yield buffer[j]
            passes += 1

    def _decode(self, key: str, parts: dict, url: str):
        labels = _sample_labels(key, parts, url, self.classes)
        if self.hierarchy is not None:
            labels = self.hierarchy.expand(labels)
        try:
            idx = [self.class_index[label] for label in labels]
        except KeyError as exc:
            raise HarnessError(f"{url}: sample {key} has label {exc.args[0]!r}, not among the classes") from None
        image = decode_image(_sample_image(key, parts, url))
        return image, {"labels": multi_hot(idx, len(self.class_index))}

    def _run(self, w: int, skip: int) -> None:
        q = self._queues[w]
        try:
            for n, (key, parts, url) in enumerate(self._raw(w)):
                if n < skip:
                    continue
                if not self._put(q, self._decode(key, parts, url)):
                    return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(q, exc)

    def _put(self, q: queue.Queue, item) -> bool:
        while not self._stop.is_set():
            try:
                q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _start(self) -> None:
        self._stop.clear()
        self._queues = [queue.Queue(maxsize=max(2, self.prefetch // self.workers)) for _ in range(self.workers)]
        skips = self._reader_skips(self._skip)
        self._served = self._skip
        self._threads = [threading.Thread(target=self._run, args=(w, skips[w]), daemon=True, name=f"shards-{w}")
                         for w in range(self.workers) if self.worker_images[w] > 0]
        for t in self._threads:
            t.start()

    def __getitem__(self, index: int):
        if not self._threads:
            self._start()
        item = self._queues[self.reader_of(self._served)].get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        self._served += 1
        return item

    def close(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads = []


# ----------------------------------------------------------------------------- opening data
@dataclass
class PretrainData:
    """What ``open_pretrain_data`` found: the dataset the engine trains on and its description."""

    kind: str  # imagefolder | manifest | wds
    source: str
    classes: list[str]
    total_images: int  # before the fraction
    images: int  # in the subset
    dataset: Dataset
    shards: int = 0

    def describe(self) -> dict:
        return {"format": self.kind, "source": self.source, "total_images": self.total_images,
                "images": self.images, "classes": len(self.classes), "shards": self.shards}


def detect_format(data: str) -> str:
    if _is_url(data) or data.endswith((".tar", ".tgz", ".tar.gz")) or "{" in data:
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


def read_classes(path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"classes file not found: {path}")
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise HarnessError(f"{path}: duplicate class names")
    if not names:
        raise HarnessError(f"{path}: no class names")
    return names


def _vocabulary(found: set[str], classes: list[str] | None, where: str) -> list[str]:
    if classes is None:
        return sorted(found)
    unknown = sorted(found - set(classes))
    if unknown:
        raise HarnessError(f"{where}: label(s) {', '.join(map(repr, unknown[:5]))} are not in --classes")
    return list(classes)


def open_pretrain_data(data: str, *, fraction: float = 1.0, subset_seed: int = 0, data_format: str | None = None,
                       hierarchy: LabelHierarchy | None = None, classes: list[str] | None = None, rank: int = 0,
                       world_size: int = 1, workers: int = 4, seed: int = 0, shuffle_buffer: int = 1000) -> PretrainData:
    """Read (or, for shards, index) the pretraining data and take the ``fraction`` subset."""
    data = str(data)
    fraction = check_fraction(fraction)
    kind = data_format or detect_format(data)
    if kind not in FORMATS:
        raise HarnessError(f"unknown data format {kind!r}: use one of {', '.join(FORMATS)}")
    if kind == "wds":
        return _open_shards(data, fraction, subset_seed, hierarchy, classes, rank, world_size, workers, seed,
                            shuffle_buffer)
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
    vocab = _vocabulary({label for r in records for label in r.labels}, classes, source)
    if not vocab:
        raise HarnessError(f"{source}: no labels in the {fraction:g} subset")
    index = {name: i for i, name in enumerate(vocab)}
    return PretrainData(kind, source, vocab, total, len(records), LabeledImages(records, index))


def _open_shards(data, fraction, subset_seed, hierarchy, classes, rank, world_size, workers, seed,
                 shuffle_buffer) -> PretrainData:
    shards = list_shards(data)
    total = kept = 0
    counts: dict[str, int] = {}
    found: set[str] = set()
    want = lambda ext: ext in WDS_LABEL_EXTENSIONS  # noqa: E731 - the index pass skips image bytes
    keys_seen: set[str] = set()
    for url in shards:
        counts[url] = 0
        for key, parts in iter_shard(url, want):
            total += 1
            if key in keys_seen:
                raise HarnessError(f"{url}: sample key {key!r} appears twice in the shards (keys decide the subsets)")
            keys_seen.add(key)
            if not in_subset(key, fraction, subset_seed):
                continue
            kept += 1
            counts[url] += 1
            labels = _sample_labels(key, parts, url, classes)
            found.update(hierarchy.expand(labels) if hierarchy is not None else labels)
    if total == 0:
        raise HarnessError(f"{data}: the shards hold no sample")
    if kept == 0:
        raise HarnessError(f"{data}: the {fraction:g} subset of {total} images is empty")
    vocab = _vocabulary(found, classes, data)
    if not vocab:
        raise HarnessError(f"{data}: no labels in the {fraction:g} subset")
    index = {name: i for i, name in enumerate(vocab)}
    stream = ShardStream(shards, index, counts=counts, fraction=fraction, subset_seed=subset_seed, hierarchy=hierarchy,
                         classes=classes, rank=rank, world_size=world_size, workers=workers, seed=seed,
                         shuffle_buffer=shuffle_buffer)
    return PretrainData("wds", data, vocab, total, kept, stream, shards=len(shards))


# ----------------------------------------------------------------------------- augmentation
class PretrainAugment:
    """Random resized crop (area ``[min_scale, 1]`` of the image, aspect ``[3/4, 4/3]``) to
    ``image_size``² and a horizontal flip; uint8 in, float RGB ``[0, 1]`` out. Draws only from the
    engine's per-sample generator."""

    def __init__(self, image_size: int = 224, min_scale: float = 0.35, flip: bool = True):
        if image_size < 16:
            raise HarnessError(f"--image-size must be at least 16, got {image_size}")
        if not 0.0 < min_scale <= 1.0:
            raise HarnessError(f"--min-scale must be in (0, 1], got {min_scale}")
        self.image_size, self.min_scale, self.flip = int(image_size), float(min_scale), bool(flip)

    def crop_box(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        u = torch.rand(4, generator=generator).tolist()
        area = height * width * (self.min_scale + (1.0 - self.min_scale) * u[0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        w = int(round(min(width, max(1.0, math.sqrt(area * ratio)))))
        h = int(round(min(height, max(1.0, math.sqrt(area / ratio)))))
        top = int(u[2] * (height - h + 1)) if height > h else 0
        left = int(u[3] * (width - w + 1)) if width > w else 0
        return top, left, h, w

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator):
        _, height, width = image.shape
        top, left, h, w = self.crop_box(height, width, generator)
        crop = image[:, top: top + h, left: left + w].float().div_(255.0).unsqueeze(0)
        out = F.interpolate(crop, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                            antialias=True)[0].clamp_(0.0, 1.0)
        if self.flip and torch.rand(1, generator=generator).item() < 0.5:
            out = out.flip(-1)
        return out, target


# ----------------------------------------------------------------------------- losses + model
def sigmoid_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-label sigmoid cross-entropy, summed over labels, averaged over images."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]


def softmax_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against each image's labels as a uniform distribution; images without labels
    are left out (a batch without any labelled image gives a zero loss)."""
    logits, targets = logits.float(), targets.float()
    counts = targets.sum(1)
    valid = counts > 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    q = targets[valid] / counts[valid, None]
    return -(q * F.log_softmax(logits[valid], dim=1)).sum(1).mean()


LOSS_FUNCTIONS = {"sigmoid": sigmoid_loss, "softmax": softmax_loss}


def resolve_loss(loss: str, kind: str, hierarchy: LabelHierarchy | None) -> str:
    if loss not in LOSSES:
        raise HarnessError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
    if loss != "auto":
        return loss
    return "softmax" if kind == "imagefolder" and hierarchy is None else "sigmoid"


class PretrainModel(nn.Module):
    """Backbone -> global average pool of ``c5`` -> linear classifier; the engine's training
    forward ``model(images, targets)`` returns ``{"loss_cls": loss}``, inference returns logits."""

    def __init__(self, backbone: nn.Module, num_classes: int, loss: str = "sigmoid"):
        super().__init__()
        if loss not in LOSS_FUNCTIONS:
            raise HarnessError(f"unknown loss {loss!r}: use sigmoid or softmax")
        self.backbone, self.loss = backbone, loss
        channels = backbone.feature_info[-1].channels
        self.classifier = nn.Linear(channels, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        # sigmoid: start at the prior probability 1/C per label (keeps the early loss small)
        prior = 1.0 / max(2, num_classes)
        nn.init.constant_(self.classifier.bias, math.log(prior / (1 - prior)) if loss == "sigmoid" else 0.0)

    def forward(self, images, targets=None):
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        feats = self.backbone(x)["c5"]
        logits = self.classifier(feats.mean(dim=(2, 3)))
        if targets is None:
            return logits
        y = torch.stack([t["labels"] for t in targets]).to(logits.device)
        return {"loss_cls": LOSS_FUNCTIONS[self.loss](logits, y)}


# ----------------------------------------------------------------------------- pretrain
@dataclass
class PretrainConfig:
    """One ``harness pretrain`` run. Either ``epochs`` (iterations = epochs × images / batch) or
    ``iterations``. SGD: ``lr`` defaults to 0.1 × batch / 256, weight decay to 1e-4; AdamW: 1e-3 and
    0.05."""

    data: str
    arch: str
    out: str
    loss: str = "auto"
    fraction: float = 1.0
    subset_seed: int = 0
    data_format: str | None = None
    hierarchy: str | None = None
    classes: str | None = None
    epochs: float | None = None
    iterations: int | None = None
    batch_size: int = 256
    optimizer: str = "sgd"  # or "adamw"
    lr: float | None = None
    momentum: float = 0.9  # sgd
    weight_decay: float | None = None
    warmup_iters: int | None = None  # default: 5% of the iterations, at most 1000
    steps: tuple[float, ...] = (0.67, 0.89)  # lr x0.1 at these fractions of the schedule
    image_size: int = 224
    min_scale: float = 0.35
    seed: int = 0
    workers: int = 4
    shuffle_buffer: int = 1000
    checkpoint_period: int = 1000
    device: str | None = None
    work_dir: str | None = None
    progress: bool = True
    normalization: str | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["steps"] = list(self.steps)
        return d


def sidecar_path(out) -> Path:
    """``ckpt.safetensors`` -> ``ckpt.json`` (the pretraining record beside the checkpoint)."""
    out = Path(out)
    return out.with_name(out.stem + ".json") if out.suffix else out.with_name(out.name + ".json")


def read_sidecar(out) -> dict | None:
    path = sidecar_path(out)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError):
        return None


def _schedule(cfg: PretrainConfig, images: int, world_size: int, num_workers: int, device: torch.device):
    from harness.engine import TrainConfig, default_precision

    if (cfg.epochs is None) == (cfg.iterations is None):
        raise HarnessError("give exactly one of --epochs and --iterations")
    if cfg.batch_size % world_size:
        raise HarnessError(f"--batch-size {cfg.batch_size} is not divisible by the {world_size} processes")
    if cfg.iterations is not None:
        iterations = int(cfg.iterations)
    else:
        if not cfg.epochs > 0:
            raise HarnessError(f"--epochs must be positive, got {cfg.epochs}")
        iterations = max(1, math.ceil(cfg.epochs * images / cfg.batch_size))
    adamw = cfg.optimizer == "adamw"
    lr = cfg.lr if cfg.lr is not None else (1e-3 if adamw else 0.1 * cfg.batch_size / 256)
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else (0.05 if adamw else 1e-4)
    warmup = cfg.warmup_iters if cfg.warmup_iters is not None else min(1000, iterations // 20)
    steps = sorted({int(round(s * iterations)) for s in cfg.steps if 0 < s < 1})
    return TrainConfig(iterations=iterations, batch_size=cfg.batch_size, lr=lr, optimizer=cfg.optimizer,
                       momentum=cfg.momentum, weight_decay=weight_decay, warmup_iters=warmup, warmup_factor=0.1, steps=steps,
                       seed=cfg.seed, checkpoint_period=cfg.checkpoint_period,
                       log_period=max(1, min(20, iterations // 10 or 1)), num_workers=num_workers,
                       precision=default_precision(device))


def _resume_iteration(path: Path) -> int:
    """The iteration a rerun will resume from (0 without a checkpoint)."""
    if not path.is_file():
        return 0
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["iteration"])
    except Exception:  # noqa: BLE001 - the engine reports an unreadable checkpoint itself
        return 0


def pretrain(cfg: PretrainConfig) -> dict:
    """Pretrain ``cfg.arch`` on ``cfg.data`` and write ``cfg.out`` (harness format) + its record.

    Returns the record (also on non-zero ranks). A finished run with the same settings is not
    redone; an interrupted one resumes from ``work_dir/checkpoint.pt``.
    """
    from harness.backbones import build_backbone
    from harness.checkpoints import save_backbone, sha256_file
    from harness.distributed import barrier, broadcast_object, init_distributed
    from harness.engine import CHECKPOINT_NAME, train
    from harness.results import write_json_atomic

    env = init_distributed(cfg.device)
    out = Path(cfg.out)
    hierarchy = LabelHierarchy.load(cfg.hierarchy) if cfg.hierarchy else None
    classes = read_classes(cfg.classes) if cfg.classes else None
    data = open_pretrain_data(cfg.data, fraction=cfg.fraction, subset_seed=cfg.subset_seed,
                              data_format=cfg.data_format, hierarchy=hierarchy, classes=classes, rank=env.rank,
                              world_size=env.world_size, workers=cfg.workers, seed=cfg.seed,
                              shuffle_buffer=cfg.shuffle_buffer)
    loss = resolve_loss(cfg.loss, data.kind, hierarchy)
    # shards: the stream's reader threads load; map-style data: the engine's DataLoader workers
    tcfg = _schedule(cfg, data.images, env.world_size, 0 if isinstance(data.dataset, ShardStream) else cfg.workers,
                     env.device)
    settings = {
        "arch": cfg.arch, "data": {**data.describe(), "fraction": cfg.fraction, "subset_seed": cfg.subset_seed,
                                   "hierarchy": cfg.hierarchy},
        "loss": loss, "classes": data.classes, "image_size": cfg.image_size, "min_scale": cfg.min_scale,
        "normalization": cfg.normalization, "schedule": tcfg.as_dict(), "world_size": env.world_size,
    }
    previous = read_sidecar(out)
    if out.is_file() and previous is not None and previous.get("settings") == json.loads(json.dumps(settings)):
        if previous.get("sha256") == sha256_file(out):
            _close(data)
            if env.is_main:
                print(f"{out}: pretrained earlier with the same settings, kept")
            return previous

    torch.manual_seed(cfg.seed)  # the initialisation depends on the seed only
    backbone = build_backbone(cfg.arch, normalization=cfg.normalization)
    model = PretrainModel(backbone, len(data.classes), loss)
    if env.world_size > 1:
        from harness.backbones import arch_family

        tcfg.find_unused_parameters = arch_family(cfg.arch) != "resnet"  # the ViT pyramid's c2..c4 are unused
    work = Path(cfg.work_dir) if cfg.work_dir else out.with_name(out.stem + ".run")
    if isinstance(data.dataset, ShardStream):
        data.dataset.skip(_resume_iteration(work / CHECKPOINT_NAME) * (tcfg.batch_size // env.world_size))
    augment = PretrainAugment(cfg.image_size, cfg.min_scale)
    try:
        result = train(model, data.dataset, tcfg, work, augment=augment, env=env, progress=cfg.progress,
                       desc=f"pretrain {cfg.arch} ({data.images} images)")
    finally:
        _close(data)
    record = None
    if env.is_main:
        save_backbone(model.backbone, out)
        record = {
            "harness_pretrain": 1,
            "checkpoint": str(out), "sha256": sha256_file(out), "arch": backbone.arch,
            "images": data.images, "total_images": data.total_images, "fraction": cfg.fraction,
            "num_classes": len(data.classes), "loss": loss,
            "settings": json.loads(json.dumps(settings)),
            "training": {**result.as_dict(), "work_dir": str(work)},
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(sidecar_path(out), record)
    barrier()
    return broadcast_object(record)


def _close(data: PretrainData) -> None:
    if isinstance(data.dataset, ShardStream):
        data.dataset.close()
