"""Batches: the training schedule's data order and augmentation, and the handoff from loader workers.

The order of epoch ``e`` is a DistributedSampler permutation seeded by ``(seed, e)`` (``ScheduleBatches``,
with detectron2's aspect-ratio grouping); each sample's augmentation draws from a generator seeded by
``(seed, e, index)`` (``TrainView``), so a resumed run reads the same batches. With loader workers a
batch is packed into one flat buffer per dtype in the worker and unpacked as views in the training
process (``pack_batch``, ``unpack_batch``): one shared-memory handoff per buffer, not one per tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from harness.errors import HarnessError


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Seed of one sample's augmentation: a function of (seed, epoch, dataset index) only."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


def collate_pairs(batch):
    """``[(image, target), ...]`` → ``(images, targets)`` lists (images may differ in size)."""
    return [b[0] for b in batch], [b[1] for b in batch]


def collate_indexed(batch):
    return [b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch]


# ----------------------------------------------------------------------------- batches from loader workers
@dataclass(frozen=True)
class _Slot:
    dtype: torch.dtype
    offset: int
    shape: tuple


@dataclass
class PackedBatch:
    """A batch as one flat buffer per dtype and its structure with a ``_Slot`` for each tensor.

    A DataLoader worker hands every tensor to the training process through its own shared-memory
    segment: the lists of images and target fields of a 32-image batch (64 tensors) cost the training
    process 26 ms per batch on the CPU, against 2.4 ms packed (bench/bench_worker_batches.py)."""

    buffers: dict
    skeleton: Any

    def pin_memory(self) -> "PackedBatch":  # DataLoader(pin_memory=True) calls this in its pinning thread
        return PackedBatch({k: v.pin_memory() for k, v in self.buffers.items()}, self.skeleton)


def map_leaves(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with ``fn`` applied to every leaf of its nested dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {k: map_leaves(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_leaves(v, fn) for v in obj)
    return fn(obj)


def pack_batch(batch: Any) -> PackedBatch:
    """Copy the tensors of ``batch`` (nested lists, tuples, dicts) into one flat buffer per dtype."""
    chunks: dict = {}
    sizes: dict = {}

    def slot(x: Any) -> Any:
        if not torch.is_tensor(x):
            return x
        flat = x.detach().reshape(-1)
        chunks.setdefault(x.dtype, []).append(flat)
        where = _Slot(x.dtype, sizes.get(x.dtype, 0), tuple(x.shape))
        sizes[x.dtype] = where.offset + flat.numel()
        return where

    skeleton = map_leaves(batch, slot)
    return PackedBatch({dtype: torch.cat(parts) for dtype, parts in chunks.items()}, skeleton)


def unpack_batch(packed: PackedBatch) -> Any:
    """``pack_batch``'s input again, each tensor a view into the buffers (no copy)."""

    def tensor(x: Any) -> Any:
        if not isinstance(x, _Slot):
            return x
        return packed.buffers[x.dtype].narrow(0, x.offset, math.prod(x.shape)).view(x.shape)

    return map_leaves(packed.skeleton, tensor)


@dataclass(frozen=True)
class _PackedCollate:
    """``collate``, then ``pack_batch``: runs in the DataLoader's workers (picklable for spawn)."""

    collate: Callable

    def __call__(self, batch):
        return pack_batch(self.collate(batch))


def loader_batches(dataset: Dataset, collate: Callable, num_workers: int, **loader_kw) -> Iterable:
    """A DataLoader's batches; with workers, packed there and unpacked here."""
    if not num_workers:
        return DataLoader(dataset, collate_fn=collate, **loader_kw)
    loader = DataLoader(dataset, collate_fn=_PackedCollate(collate), num_workers=num_workers, **loader_kw)
    return (unpack_batch(batch) for batch in loader)


def to_device(obj: Any, device: torch.device) -> Any:
    return map_leaves(obj, lambda x: x.to(device, non_blocking=True) if torch.is_tensor(x) else x)


def to_cpu(obj: Any) -> Any:
    return to_device(obj, torch.device("cpu"))


class TrainView(Dataset):
    """The training set as the schedule sees it: key ``(epoch, index)`` gives item ``index`` augmented
    with a per-(seed, epoch, index) RNG, so every epoch draws fresh augmentations and a resumed run
    draws the same ones."""

    def __init__(self, dataset: Dataset, augment: Callable | None, seed: int):
        self.dataset, self.augment, self.seed = dataset, augment, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        image, target = self.dataset[index]
        if self.augment is not None:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            image, target = self.augment(image, target, generator)
        return image, target


class ScheduleBatches:
    """The batches of iterations ``start`` .. ``total`` across epochs, made lazily: epoch ``e`` is
    ``sampler`` after ``set_epoch(e)`` cut into ``per_rank`` batches (a trailing part is dropped).
    With ``groups`` (one id per dataset index) a batch only holds images of one group, filled in
    sampler order (detectron2's aspect-ratio grouping; each group's trailing part is dropped).
    One DataLoader reads them all, so its workers keep prefetching across epoch boundaries."""

    def __init__(self, sampler: DistributedSampler, per_rank: int, start: int, total: int,
                 groups: Sequence[int] | None = None):
        self.sampler, self.per_rank, self.start, self.total, self.groups = sampler, per_rank, start, total, groups

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        if self.groups is None:
            return [order[i * self.per_rank:(i + 1) * self.per_rank] for i in range(len(order) // self.per_rank)]
        buckets: dict[int, list[int]] = {}
        batches = []
        for k in order:
            bucket = buckets.setdefault(self.groups[k], [])
            bucket.append(k)
            if len(bucket) == self.per_rank:
                batches.append(bucket)
                buckets[self.groups[k]] = []
        return batches

    def __iter__(self):
        it, epoch = 0, 0
        if self.groups is None:  # every epoch has the same number of batches: jump to the start's epoch
            epoch, offset = divmod(self.start, len(self.sampler) // self.per_rank)
            it = self.start - offset
        while it < self.total:
            batches = self.epoch_batches(epoch)
            if not batches:
                raise HarnessError(f"epoch {epoch} has no full batch of {self.per_rank} images in one aspect group")
            for batch in batches:
                if it >= self.start:
                    yield [(epoch, k) for k in batch]
                it += 1
                if it >= self.total:
                    return
            epoch += 1


class IndexedSubset(Dataset):
    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, target = self.dataset[self.indices[i]]
        return self.indices[i], image, target
