"""Training-step overhead: the harness engine against a bare torchvision loop, same model and batches.

    python bench/bench_train_step.py [--rounds 5] [--steps 10] [--device cpu|cuda]

Model: torchvision Faster R-CNN on a random-init ResNet-18 with a 64-channel FPN, 128 px images,
batch 4, on `harness data synth` VOC2007 images. After one untimed warm-up run of each, every round
runs `--steps` SGD steps of a bare loop (forward, sum of losses, backward, step) and the same steps
on the same batches (the engine's shuffle and flips for the round's seed, prepared before the clock
starts) through `harness.engine.train` (its data order, augmentation, logging, progress bar and
final checkpoint included), in alternating order, in one process so that both see the same machine
load. Prints images/s of both and the ratio harness/bare (the engine must keep at least 97%). On
CUDA it also times the engine with AMP and channels_last.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler

from harness.backbones import build_backbone
from harness.datasets.synthetic import write_synthetic
from harness.datasets.voc import VOCDetection
from harness.batches import collate_pairs, sample_seed
from harness.engine import TrainConfig, default_precision, seed_everything, train
from harness.models.detection import build_detector, detection_train_augment


def bare_batches(dataset, steps: int, batch: int, seed: int) -> list:
    """The batches the engine trains on for ``seed`` (its epoch-0 shuffle, its per-sample flips), so
    that both sides run the same images through the same model (RoI sampling included)."""
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(0)
    order, flip = list(sampler), detection_train_augment()
    samples = [flip(*dataset[i], torch.Generator().manual_seed(sample_seed(seed, 0, i))) for i in order]
    return [collate_pairs(samples[s * batch:(s + 1) * batch]) for s in range(steps)]


def bare_steps(model, dataset, steps: int, batch: int, device, lr: float, seed: int) -> float:
    """Seconds for `steps` plain SGD steps (forward, sum of losses, backward, step) on the engine's batches."""
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9, weight_decay=1e-4)
    batches = bare_batches(dataset, steps, batch, seed)
    seed_everything(seed)
    model.train()
    began = time.perf_counter()
    for images, targets in batches:
        images = [im.to(device) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - began


def harness_steps(model, dataset, steps: int, batch: int, device, lr: float, seed: int, amp: bool,
                  channels_last: bool) -> float:
    cfg = TrainConfig(iterations=steps, batch_size=batch, lr=lr, warmup_iters=0, precision=default_precision(device) if amp else "fp32", channels_last=channels_last,
                      checkpoint_period=10**9, log_period=10, seed=seed)
    with tempfile.TemporaryDirectory() as out:
        result = train(model, dataset, cfg, out, augment=detection_train_augment(), progress=True, desc="harness")
    return result.wall_time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        write_synthetic(Path(tmp), seed=0, coco_train=0, coco_val=0, voc12_train=0, voc12_val=0, voc12_aug_extra=0)
        dataset = VOCDetection([(Path(tmp) / "VOCdevkit/VOC2007", "trainval")])
        dataset = [dataset[i] for i in range(len(dataset))]  # decoded once: both sides read memory
        torch.manual_seed(0)
        base = build_detector(build_backbone("resnet18"), num_classes=20, head="fpn", min_size=128, max_size=160,
                              neck_channels=64, anchor_sizes=(16, 32, 64, 128, 256)).to(device)
        variants = [("harness", False, False)] + ([("harness amp+channels_last", True, True)] if device.type == "cuda" else [])
        def timed(name: str, amp: bool, cl: bool, r: int) -> float:
            model = copy.deepcopy(base)
            if name == "bare":
                return bare_steps(model, dataset, args.steps, args.batch, device, 0.01, r)
            return harness_steps(model, dataset, args.steps, args.batch, device, 0.01, r, amp, cl)

        runs = [("bare", False, False)] + variants
        for run in runs:  # warm-up, untimed: allocator, kernels and caches are then warm for both
            timed(*run, 0)
        totals = {name: 0.0 for name, _, _ in runs}
        for r in range(args.rounds):  # the order alternates, so neither side always goes first
            for name, amp, cl in (runs if r % 2 == 0 else runs[::-1]):
                totals[name] += timed(name, amp, cl, r)
    images = args.rounds * args.steps * args.batch
    print(f"device {device}, {args.rounds} rounds x {args.steps} steps x batch {args.batch}")
    for name, seconds in totals.items():
        print(f"{name:<28} {images / seconds:7.2f} images/s")
    print(f"harness / bare throughput: {totals['bare'] / totals['harness']:.3f}")


if __name__ == "__main__":
    main()
