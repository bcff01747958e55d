"""Pretraining overhead: `harness.pretrain.pretrain` against a bare torchvision classification loop, same batches.

    python bench/bench_pretrain.py [--rounds 3] [--steps 20] [--batch 32] [--image-size 64] [--shard-images 512] [--threads N] [--workers 0]

Data: `write_pretrain_synthetic` images (multi-label manifest, 20 classes) written at
`--image-size` px. The harness side is the whole `harness pretrain` run for `--steps` iterations
(opening the manifest, model build, the engine's data order, per-sample decode + random resized
crop + flip, the sigmoid loss, metrics.jsonl, progress bar, checkpoint, the exported backbone, its
sha256 and the JSON record) with `--workers 0` (the default), i.e. decoding in the training process, or
with `--workers N` loader processes. The bare side
is torchvision's resnet18 with a 20-way linear layer and the same loss, optimizer and learning rate
on the same batches: the engine's shuffle and augmentation for the round's seed, decoded, cropped and
normalized before its clock starts. A third side, `engine`, is `harness.engine.train` with the
pretraining model and schedule on those batches handed over ready (no decoding, no loader, the
final checkpoint included): engine / bare is the harness without its data path. After an untimed
warm-up of each, `--rounds` rounds in alternating order in one process. Prints images/s of each, the
ratios of the totals, and harness / bare within each round with their median (a machine whose speed
drifts over the minutes of a run moves both sides of a round alike).

Then it writes the same images as WebDataset tar shards and prints images/s read from the local
shards by one loader process (`ShardStream` iterated in this process with one torch thread: tar read
through webdataset, subset filter, shuffle buffer, JPEG decode, labels), with and without the
pretraining augmentation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DistributedSampler

from harness.datasets.synthetic import write_pretrain_synthetic
from harness.backbones import build_backbone
from harness.batches import sample_seed
from harness.engine import seed_everything, train
from harness.datasets.pretraining import open_pretrain_data
from harness.datasets.shards import write_shards
from harness.pretrain import PretrainAugment, PretrainConfig, PretrainModel, pretrain, train_schedule


def engine_samples(dataset, steps: int, batch: int, seed: int, augment) -> list:
    """The engine's batches for ``seed`` (epoch-0 shuffle, per-sample crops and flips): lists of (image, target)."""
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(0)
    order = list(sampler)[: steps * batch]
    samples = [augment(*dataset[i], torch.Generator().manual_seed(sample_seed(seed, 0, i))) for i in order]
    return [samples[s * batch:(s + 1) * batch] for s in range(steps)]


def bare_batches(samples: list) -> list:
    """``engine_samples`` stacked and normalized, as a bare loop takes them."""
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return [(torch.stack([(im - mean) / std for im, _ in b]), torch.stack([t["labels"] for _, t in b])) for b in samples]


def bare_steps(batches: list, classes: int, lr: float, seed: int) -> float:
    """Seconds for plain SGD steps of torchvision's resnet18 on prepared batches."""
    seed_everything(seed)
    model = torchvision.models.resnet18(num_classes=classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-4)
    model.train()
    began = time.perf_counter()
    for images, labels in batches:
        logits = model(images)
        loss = F.binary_cross_entropy_with_logits(logits, labels, reduction="sum") / logits.shape[0]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - began


def harness_run(manifest: Path, out: Path, steps: int, batch: int, lr: float, image_size: int,
                seed: int, workers: int = 0) -> tuple[float, float]:
    """Seconds of the whole `pretrain` call, and of its training loop alone (the per-iteration times in
    metrics.jsonl: data, step, logging; without setup, the final checkpoint and the export)."""
    cfg = PretrainConfig(data=str(manifest), arch="resnet18", out=str(out / f"r{seed}.safetensors"), iterations=steps,
                         batch_size=batch, lr=lr, image_size=image_size, min_scale=0.35, seed=seed, workers=workers,
                         checkpoint_period=10**9, device="cpu", progress=True)
    began = time.perf_counter()
    record = pretrain(cfg)
    total = time.perf_counter() - began
    metrics = Path(record["training"]["work_dir"]) / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert lines[-1]["iter"] == steps, "metrics.jsonl should end at the last iteration"
    # each line holds the mean iteration time of the iterations since the previous line
    return total, sum(line["time"] * (line["iter"] - prev) for line, prev in zip(lines, [0] + [x["iter"] for x in lines]))


def engine_steps(samples: list, dataset, manifest: Path, out: Path, classes: int, lr: float, seed: int) -> float:
    """Seconds of ``harness.engine.train`` (the pretraining model, schedule, logging and final checkpoint) on
    ``samples`` handed over as ready batches: the harness without its data path."""
    steps, batch = len(samples), len(samples[0])
    cfg = PretrainConfig(data=str(manifest), arch="resnet18", out=str(out / "unused.safetensors"), iterations=steps,
                         batch_size=batch, lr=lr, seed=seed, checkpoint_period=10**9, device="cpu")
    tcfg = train_schedule(cfg, len(dataset), 1, 0, torch.device("cpu"))
    torch.manual_seed(seed)
    model = PretrainModel(build_backbone("resnet18"), classes, "sigmoid")
    ready = [([im for im, _ in b], [t for _, t in b]) for b in samples]
    began = time.perf_counter()
    train(model, dataset, tcfg, out / f"engine{seed}", progress=True, batches=lambda start: iter(ready[start:]))
    return time.perf_counter() - began


def shard_rate(pattern: str, augment: PretrainAugment | None, images: int) -> float:
    """Images/s of one loader process over local shards (tar read, subset, shuffle buffer, decode, labels)."""
    stream = open_pretrain_data(pattern, shuffle_buffer=100).dataset
    stream.augment = augment
    samples = iter(stream)
    next(samples)  # open the first shard and fill the shuffle buffer, untimed
    began = time.perf_counter()
    for _ in range(images):
        next(samples)
    return images / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64, help="stored and trained image side")
    parser.add_argument("--shard-images", type=int, default=512, help="images read in the shard measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the training comparison")
    parser.add_argument("--workers", type=int, default=0,
                        help="the harness's DataLoader workers (0: decode and augment in the training process)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lr = 0.1 * args.batch / 256
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        manifest = write_pretrain_synthetic(tmp / "data", size=max(args.shard_images + 1, args.steps * args.batch),
                                            label_noise=0.0, image_size=args.image_size)
        data = open_pretrain_data(str(manifest))
        augment = PretrainAugment(args.image_size, 0.35)
        classes = len(data.classes)

        loop = 0.0

        def timed(name: str, r: int) -> float:
            nonlocal loop
            if name in ("bare", "engine"):
                samples = engine_samples(data.dataset, args.steps, args.batch, r, augment)
                if name == "engine":
                    return engine_steps(samples, data.dataset, manifest, tmp / "engine", classes, lr, r)
                return bare_steps(bare_batches(samples), classes, lr, r)
            total, in_loop = harness_run(manifest, tmp / "runs", args.steps, args.batch, lr, args.image_size, r,
                                         args.workers)
            loop += in_loop
            return total

        sides = ["bare", "harness", "engine"]
        for name in sides:  # warm-up, untimed
            timed(name, 100)
        loop = 0.0
        rounds = {name: [] for name in sides}
        for r in range(args.rounds):  # the order alternates, so neither side always goes first
            for name in (sides if r % 2 == 0 else sides[::-1]):
                rounds[name].append(timed(name, r))
        totals = {name: sum(seconds) for name, seconds in rounds.items()}
        images = args.rounds * args.steps * args.batch
        print(f"CPU ({torch.get_num_threads()} threads), resnet18, {args.image_size} px, batch {args.batch}, "
              f"{args.rounds} rounds x {args.steps} steps, harness with {args.workers} loader workers")
        for name, seconds in totals.items():
            print(f"{name:<8} {images / seconds:7.2f} images/s")
        print(f"engine alone on ready batches / bare: {totals['bare'] / totals['engine']:.3f}   (the harness without "
              "its data path: model, schedule, logging and final checkpoint)")
        print(f"harness / bare throughput: {totals['bare'] / totals['harness']:.3f}   "
              f"(training loop alone, from metrics.jsonl: {totals['bare'] / loop:.3f}; setup, final checkpoint "
              f"and export: {(totals['harness'] - loop) / args.rounds:.1f} s per run)", flush=True)
        paired = sorted(b / h for b, h in zip(rounds["bare"], rounds["harness"]))
        print(f"harness / bare in each round, sorted (the two sides run back to back, so a machine that drifts "
              f"over the run moves both): {' '.join(f'{x:.3f}' for x in paired)}, median {statistics.median(paired):.3f}",
              flush=True)

        records = [json.loads(line) for line in manifest.read_text().splitlines()]
        write_shards(((f"{i:07d}", (manifest.parent / r["path"]).read_bytes(), "jpg", r["labels"])
                      for i, r in enumerate(records)), str(tmp / "shards" / "data-%04d.tar"), per_shard=128)
        pattern = str(tmp / "shards")  # the folder's *.tar
        torch.set_num_threads(1)  # a loader process
        n = args.shard_images
        print(f"WebDataset shards ({len(records)} images, 128 per shard), one loader process, 1 torch thread: "
              f"{shard_rate(pattern, None, n):.0f} images/s read + decoded, "
              f"{shard_rate(pattern, augment, n):.0f} images/s with the crop/flip")


if __name__ == "__main__":
    main()
