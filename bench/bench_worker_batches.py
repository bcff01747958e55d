"""What a batch from a DataLoader worker costs the training process: lists of tensors vs a packed batch.

    python bench/bench_worker_batches.py [--batch 32] [--side 64] [--batches 30]

A worker hands every tensor to the training process through its own shared-memory segment. The
harness's batches are lists (images of different sizes, one target dict per image), so a 32-image
batch is 64 tensors. One worker produces batches of `--batch` random `--side` px images, each with a
20-way label tensor; the training process does about 0.3 s of matrix products between batches (so
the worker is always ahead) and times only its `next()` calls. Compared: the plain lists
(`harness.batches.collate_pairs`), the packed batch (`pack_batch` in the worker, `unpack_batch` in
the training process, as the engine does with workers) and, for reference, one stacked tensor.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Dataset

from harness.batches import collate_pairs, pack_batch, unpack_batch


class RandomImages(Dataset):
    def __init__(self, n: int, side: int):
        self.n, self.side = n, side

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.rand(3, self.side, self.side), {"labels": torch.zeros(20)}


def packed(batch):
    return pack_batch(collate_pairs(batch))


def stacked(batch):
    return torch.stack([b[0] for b in batch]), torch.stack([b[1]["labels"] for b in batch])


def fetch_ms(collate, unpack, args) -> float:
    """Milliseconds per batch that the training process spends in ``next()`` (and unpacking)."""
    loader = DataLoader(RandomImages(args.batch * (args.batches + 1), args.side), batch_size=args.batch,
                        collate_fn=collate, num_workers=1)
    batches = iter(loader)
    next(batches)  # the worker's start-up, untimed
    work = torch.rand(600, 600)
    spent = 0.0
    for _ in range(args.batches):
        for _ in range(40):
            work @ work
        began = time.perf_counter()
        unpack(next(batches))
        spent += time.perf_counter() - began
    return spent / args.batches * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(1)
    same = lambda b: b  # noqa: E731
    lists = fetch_ms(collate_pairs, same, args)
    pack = fetch_ms(packed, unpack_batch, args)
    stack = fetch_ms(stacked, same, args)
    print(f"one worker, {args.batch} images of {args.side} px + a label tensor each; ms per batch in the training process")
    print(f"lists of tensors (collate_pairs)   {lists:7.2f}")
    print(f"packed (pack_batch/unpack_batch)   {pack:7.2f}   lists / packed: {lists / pack:.1f}x")
    print(f"one stacked tensor (reference)     {stack:7.2f}")


if __name__ == "__main__":
    main()
