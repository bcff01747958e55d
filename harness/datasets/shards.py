"""WebDataset tar shards for pretraining, streamed through the ``webdataset`` library.

Shards: ``data-{000000..000099}.tar`` (brace patterns), a folder of ``*.tar``, globs, ``pipe:CMD``
and ``http(s)://`` URLs (webdataset's ``gopen``; http goes through curl). A sample is the members
sharing a key, webdataset's rule (the path up to the first dot of the file name): an image
(``<key>.jpg``, ``.png``, ...) and ``<key>.json`` with ``{"labels": [...]}`` (or ``"label"``, or a
bare list) or ``<key>.cls`` with an integer class (a name from ``--classes`` when given).

``index_shards`` reads every shard once before training: it counts each shard's images in the
subset, collects the label vocabulary, and refuses duplicate keys, a sample without an image or a
label, and unreadable shards, each in one line.

``ShardStream`` is an ``IterableDataset``; iterating it gives one epoch of this process's part:
  * nodes: rank ``r`` of ``W`` streams the shards ``r::W`` (webdataset's ``split_by_node``, with
    the rank given, so tests can play several ranks in one process);
  * workers: DataLoader worker ``j`` of ``n`` streams this rank's shards ``j::n`` (webdataset's
    ``split_by_worker``; see resuming for the one change);
  * per epoch ``e``, a worker visits its shards in an order seeded by ``(seed, rank, worker, e)``,
    through webdataset's shuffle buffer seeded the same way, keeps the ``fraction`` subset (the
    key's hash, ``harness.datasets.labelled``), and decodes; with ``augment`` each sample is
    augmented with a generator seeded by ``(seed, e, key)``.
An epoch is one pass: the DataLoader drains every worker, so each image of the subset is read
exactly once per epoch across ranks and workers. The DataLoader returns the workers' samples in
its in-order round robin (sample ``i`` of worker 0, 1, ..., n-1, then ``i + 1``; a worker that
has finished drops out), so the order is a function of the seed and the number of workers.

Resuming (``batches(start, ...)``): an uninterrupted run and a resumed one see the same samples in
the same order. webdataset has no notion of a position in a stream (its ``resampled`` and
``with_epoch`` modes give neither exact epochs nor a resumable order), so this module keeps the
smallest own code that does: ``resume_point`` finds, for a position in the epoch, how many of each
worker's samples the round robin had taken and which worker was next; in the resumed epoch each
worker skips its taken samples before decoding them, and worker ``j`` plays the part of worker
``(j + next) % n``, so the round robin continues where it stopped. The next epochs start fresh.
Changing the number of workers or the shuffle buffer changes the order; ``harness pretrain``
records both in its checkpoint so that a resume with others is refused.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import random
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.shardlists import expand_urls

from harness.datasets.labelled import LabelHierarchy, decode_image, in_subset, labels_of, multi_hot
from harness.errors import HarnessError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
LABEL_EXTENSIONS = ("json", "cls")


def is_url(spec: str) -> bool:
    return spec.startswith("pipe:") or "://" in spec


def list_shards(spec: str) -> list[str]:
    """Shard URLs of ``spec``: a folder (its ``*.tar``), brace patterns, globs, ``pipe:``/URLs."""
    if is_url(spec):
        return list(expand_urls(spec))
    path = Path(spec)
    if path.is_dir():
        shards = sorted(str(p) for ext in ("*.tar", "*.tar.gz", "*.tgz") for p in path.glob(ext))
        if not shards:
            raise HarnessError(f"{spec}: no .tar shards in this folder")
        return shards
    shards = []
    for item in expand_urls(spec):
        if any(c in item for c in "*?["):
            found = sorted(str(p) for p in Path(item).parent.glob(Path(item).name))
            if not found:
                raise HarnessError(f"no shard matches {item}")
            shards += found
        else:
            if not Path(item).is_file():
                raise HarnessError(f"shard not found: {item}")
            shards.append(item)
    return shards


def read_shard(url: str) -> Iterator[dict]:
    """The samples of one shard in order (webdataset dicts: ``__key__``, ``__url__``, one entry per
    extension); a shard that cannot be opened or read is a one-line error."""
    samples = wds.tarfile_samples([{"url": url}])
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            return
        except (OSError, ValueError, EOFError, tarfile.TarError) as exc:
            reason = str(exc.args[0] if exc.args else exc).splitlines()[0]
            raise HarnessError(f"{url}: not a readable tar shard ({type(exc).__name__}: {reason})") from None
        yield sample


def sample_labels(sample: dict, classes: list[str] | None) -> list[str]:
    """The label names of one sample (its ``.json`` or ``.cls`` member)."""
    where = f"{sample['__url__']}: sample {sample['__key__']}"
    if "json" in sample:
        try:
            obj = json.loads(sample["json"])
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise HarnessError(f"{where}: .json is not JSON ({exc})") from None
        if isinstance(obj, dict):
            return labels_of(obj["labels"] if "labels" in obj else obj.get("label"), where)
        return labels_of(obj, where)
    if "cls" in sample:
        text = sample["cls"].decode("utf-8", "replace").strip()
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


def sample_image(sample: dict) -> bytes:
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise HarnessError(f"{sample['__url__']}: sample {sample['__key__']} has no image member "
                       f"({', '.join(IMAGE_EXTENSIONS)})")


@dataclass
class ShardIndex:
    """What one pass over the shards found: subset images per shard, image counts, labels."""

    counts: dict[str, int] = field(default_factory=dict)
    total: int = 0  # images in the shards
    kept: int = 0  # images in the subset
    labels: set[str] = field(default_factory=set)  # label names in the subset (hierarchy applied)


def index_shards(shards: list[str], fraction: float = 1.0, subset_seed: int = 0,
                 hierarchy: LabelHierarchy | None = None, classes: list[str] | None = None) -> ShardIndex:
    """Read every shard once: counts, labels, and the checks (see the module docstring)."""
    index, keys = ShardIndex(), set()
    for url in shards:
        index.counts[url] = 0
        for sample in read_shard(url):
            key = sample["__key__"]
            index.total += 1
            if key in keys:
                raise HarnessError(f"{url}: sample key {key!r} appears twice in the shards (keys decide the subsets)")
            keys.add(key)
            sample_image(sample)
            labels = sample_labels(sample, classes)
            if in_subset(key, fraction, subset_seed):
                index.kept += 1
                index.counts[url] += 1
                index.labels.update(hierarchy.expand(labels) if hierarchy is not None else labels)
    if index.total == 0:
        raise HarnessError(f"{' '.join(shards[:2])}{' ...' if len(shards) > 2 else ''}: the shards hold no sample")
    return index


def write_shards(records, out_pattern: str, per_shard: int) -> list[Path]:
    """Write ``(key, image bytes, ext, labels)`` records as WebDataset shards (``out_pattern`` with one
    ``%d``-style field, e.g. ``shards/data-%06d.tar``) with webdataset's ``ShardWriter``."""
    Path(out_pattern % 0).parent.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    with wds.ShardWriter(out_pattern, maxcount=per_shard, verbose=0, mtime=0,
                         post=lambda name: paths.append(Path(name))) as sink:
        for key, data, ext, labels in records:
            sink.write({"__key__": key, ext: data, "json": {"labels": list(labels)}})
    return paths


def resume_point(counts: list[int], offset: int) -> tuple[list[int], int]:
    """Where the DataLoader's in-order round robin over workers holding ``counts`` samples stands
    after ``offset`` samples: how many samples of each worker it took, and the worker of the next one."""
    lo, hi = 0, max(counts)  # the last full round: the largest R with sum(min(c, R)) <= offset
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in counts) <= offset:
            lo = mid
        else:
            hi = mid - 1
    taken = [min(c, lo) for c in counts]
    rest = offset - sum(taken)
    active = [w for w, c in enumerate(counts) if c > lo]
    for w in active[:rest]:
        taken[w] += 1
    return taken, (active[rest] if rest < len(active) else 0)


@dataclass
class Unreadable:
    """What a stream read by ``ShardStream.batches`` yields, as its last item, for a sample it cannot
    read; ``batches`` raises the message as one line. Raised in a DataLoader worker instead, it would
    come back with the worker's traceback, and the worker would take torch's 5-second shutdown timeout
    to end. Iterated any other way, the stream raises the HarnessError itself."""

    message: str


def _key_number(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


class ShardStream(IterableDataset):
    """This rank's stream over the shards (see the module docstring). ``len`` is the number of
    images in the subset over all ranks (the engine's "images in the training set");
    ``rank_images`` this rank's, i.e. the samples of one of its epochs."""

    def __init__(self, shards: list[str], class_index: dict[str, int], counts: dict[str, int], *,
                 fraction: float = 1.0, subset_seed: int = 0, hierarchy: LabelHierarchy | None = None,
                 classes: list[str] | None = None, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 1000):
        self.shards = shards[rank::world_size]
        if not self.shards:
            raise HarnessError(f"{len(shards)} shard(s) for {world_size} processes: every process needs at least one "
                               "(write more, smaller shards)")
        self.counts, self.class_index = counts, class_index
        self.length = int(sum(counts[u] for u in shards))
        self.rank_images = int(sum(counts[u] for u in self.shards))
        if self.rank_images == 0:
            raise HarnessError(f"process {rank} of {world_size} has no image of the {fraction:g} subset in its "
                               f"{len(self.shards)} shard(s): use fewer processes or a larger fraction")
        self.fraction, self.subset_seed, self.hierarchy, self.classes = fraction, subset_seed, hierarchy, classes
        self.rank, self.seed, self.shuffle_buffer = rank, seed, max(1, int(shuffle_buffer))
        self.epoch, self.offset = 0, 0
        self.augment: Callable | None = None
        self.unreadable_as_item = False  # True in the copy that ``batches`` reads

    def __len__(self) -> int:
        return self.length

    def loader_workers(self, workers: int) -> int:
        """DataLoader workers that have shards to read (0: read in the training process)."""
        return min(int(workers), len(self.shards))

    def worker_images(self, n: int) -> list[int]:
        """Images of the subset that each of ``n`` workers streams per epoch."""
        return [sum(self.counts[u] for u in self.shards[w::n]) for w in range(max(1, n))]

    def set_epoch(self, epoch: int, offset: int = 0) -> None:
        """The next iteration gives epoch ``epoch``, from its ``offset``-th sample on (resuming)."""
        if not 0 <= offset < self.rank_images:
            raise ValueError(f"offset {offset} outside the epoch's {self.rank_images} samples")
        self.epoch, self.offset = int(epoch), int(offset)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict]]:
        info = get_worker_info()
        j, n = (info.id, info.num_workers) if info is not None else (0, 1)
        taken, first = resume_point(self.worker_images(n), self.offset) if self.offset else ([0] * n, 0)
        w = (j + first) % n
        if taken[w] >= self.worker_images(n)[w]:
            return
        tag = f"{self.seed}:{self.rank}:{w}/{n}:{self.epoch}"
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.shards[w::n], seed=tag + ":shards"),
            wds.tarfile_to_samples(),
            wds.select(lambda s: in_subset(s["__key__"], self.fraction, self.subset_seed)),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=random.Random(tag + ":buffer")),
        )
        for sample in itertools.islice(pipeline, taken[w], None):  # skipped samples are not decoded
            try:
                item = self._decode(sample)
            except HarnessError as exc:
                if not self.unreadable_as_item:
                    raise
                yield Unreadable(str(exc))
                return
            yield item

    def _decode(self, sample: dict):
        labels = sample_labels(sample, self.classes)
        if self.hierarchy is not None:
            labels = self.hierarchy.expand(labels)
        try:
            target = {"labels": multi_hot([self.class_index[label] for label in labels], len(self.class_index))}
        except KeyError as exc:
            raise HarnessError(f"{sample['__url__']}: sample {sample['__key__']} has label {exc.args[0]!r}, "
                               "not among the classes") from None
        image = decode_image(sample_image(sample))
        if self.augment is not None:
            state = np.random.SeedSequence([self.seed, self.epoch, _key_number(sample["__key__"])]).generate_state(1)
            image, target = self.augment(image, target, torch.Generator().manual_seed(int(state[0])))
        return image, target

    def batches(self, start: int, stop: int, per_rank: int, workers: int = 0,
                augment: Callable | None = None) -> Iterator[tuple[list, list]]:
        """This rank's batches of ``per_rank`` samples for iterations ``start`` .. ``stop`` (0-based,
        ``stop`` excluded), epochs back to back, read by ``workers`` DataLoader workers (0: in this
        process); the batches from ``start`` on equal those of a run from 0."""
        n = self.loader_workers(workers)
        epoch, offset = divmod(start * per_rank, self.rank_images)
        self.augment = augment
        batch: list = []
        left = (stop - start) * per_rank
        while left > 0:
            self.set_epoch(epoch, offset)
            reader = copy.copy(self)  # this epoch's stream, giving an unreadable sample as an item
            reader.unreadable_as_item = True
            loader = DataLoader(reader, batch_size=None, num_workers=n, collate_fn=_as_is)
            sample = None
            try:
                for sample in loader:
                    if isinstance(sample, Unreadable):
                        break
                    batch.append(sample)
                    left -= 1
                    if len(batch) == per_rank:
                        yield [s[0] for s in batch], [s[1] for s in batch]
                        batch = []
                    if left == 0:
                        return
            except HarnessError as exc:  # raised in a worker, the DataLoader adds its traceback: one line again
                raise HarnessError(str(exc).strip().splitlines()[-1].removeprefix("harness.errors.HarnessError: ")) \
                    from None
            if isinstance(sample, Unreadable):  # after the loop, whose end released the iterator and its workers
                raise HarnessError(sample.message)
            epoch, offset = epoch + 1, 0


def _as_is(sample):
    return sample
