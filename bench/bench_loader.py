"""Training data pipeline at real image sizes: images/s of one loader process for each card's `full` pipeline.

    python bench/bench_loader.py [--images 24] [--rounds 3] [--tasks coco voc voc_fpn pose seg]

Writes `harness data synth` data with 480..640 px sides (about a 640x480 photograph's pixel count)
as JPEG (quality 90) in a temporary folder, in the COCO and VOCdevkit layouts the readers expect.
Then, with one torch thread (as in a DataLoader worker), for each card it runs the `full` profile's
per-image training pipeline: read + decode, the augmentation of the card's kind (`harness.kinds`)
(flip; for seg the random rescale, pad and 512 crop) and targets; for the detection cards also the
resize to the card's sizes (a short side drawn from `min_size`, long side at most `max_size`) that
the model's transform applies in the training process (on the GPU when there is one, so the
`+ resize` column is the pessimistic figure of a loader that did it on its CPU). Each card runs with
PIL and with torchvision.io.decode_jpeg as the decoder, after an untimed warm-up, in alternating
order over `--rounds` rounds; both decoders give identical pixels here (checked on every image).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from harness.backbones import build_backbone
from harness.cards import task_card
from harness.datasets import images as image_io
from harness.datasets.synthetic import write_synthetic
from harness.batches import sample_seed
from harness.models.detection import make_transform
from harness.kinds import KINDS
from harness.runner import task_data

TASKS = ("coco", "voc", "voc_fpn", "pose", "seg")
DECODERS = {"PIL": image_io.decode_pil, "torchvision": image_io.decode_torchvision}


def pipeline(task: str, root: Path):
    """(dataset, per-sample function without resize, resize function or None) of a card's `full` profile."""
    card = task_card(task)
    data = task_data(card, root, "full")
    kind = KINDS[card.model.kind]
    model_kw, aug_kw = kind.settings(card, "full")
    augment = kind.train_augment(build_backbone("resnet18"), **aug_kw)
    resize = None
    if card.model.kind != "segmentation":
        transform = make_transform(model_kw["min_size"], model_kw["max_size"], model_kw["test_min_size"]).train()
        resize = transform.resize
    return data.train, augment, resize


def run(dataset, augment, resize, decoder, with_resize: bool) -> float:
    """Seconds to produce every training sample of `dataset` once."""
    with mock.patch.object(image_io, "decode_image_file", decoder):
        began = time.perf_counter()
        for i in range(len(dataset)):
            image, target = dataset[i]
            image, target = augment(image, target, torch.Generator().manual_seed(sample_seed(0, 0, i)))
            if with_resize and resize is not None:
                image, target = resize(image, target)
        return time.perf_counter() - began


def check_identical(dataset) -> None:
    """Both decoders give the same pixels on every image of the dataset."""
    for i in range(len(dataset)):
        with mock.patch.object(image_io, "decode_image_file", image_io.decode_pil):
            a = dataset[i][0]
        with mock.patch.object(image_io, "decode_image_file", image_io.decode_torchvision):
            b = dataset[i][0]
        if not torch.equal(a, b):
            raise SystemExit(f"decoders differ on image {i}: max |diff| {(a - b).abs().max().item()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24, help="training images per dataset")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic(root, seed=0, coco_train=n, coco_val=1, voc07_trainval=n, voc07_test=1,
                        voc12_train=n, voc12_val=1, voc12_aug_extra=0, min_side=480, max_side=640)
        print(f"one process, 1 torch thread; {args.rounds} rounds, alternating decoder order; images/s")
        print(f"{'task':<8} {'images':>6} {'mean px':>8} | {'PIL':>7} {'tv':>7} {'tv/PIL':>6} | "
              f"{'PIL+resize':>10} {'tv+resize':>9} {'tv/PIL':>6}")
        for task in args.tasks:
            dataset, augment, resize = pipeline(task, root)
            check_identical(dataset)
            pixels = sum(dataset[i][0].shape[-1] * dataset[i][0].shape[-2] for i in range(len(dataset))) / len(dataset)
            variants = [(d, r) for r in ((False, True) if resize else (False,)) for d in DECODERS]
            for d, r in variants:  # warm-up, untimed
                run(dataset, augment, resize, DECODERS[d], r)
            totals = dict.fromkeys(variants, 0.0)
            for k in range(args.rounds):
                for d, r in (variants if k % 2 == 0 else variants[::-1]):
                    totals[(d, r)] += run(dataset, augment, resize, DECODERS[d], r)
            rate = {key: args.rounds * len(dataset) / seconds for key, seconds in totals.items()}
            line = (f"{task:<8} {len(dataset):>6} {pixels / 1e3:>7.0f}k | {rate[('PIL', False)]:>7.1f} "
                    f"{rate[('torchvision', False)]:>7.1f} {rate[('torchvision', False)] / rate[('PIL', False)]:>6.2f} | ")
            if resize:
                line += (f"{rate[('PIL', True)]:>10.1f} {rate[('torchvision', True)]:>9.1f} "
                         f"{rate[('torchvision', True)] / rate[('PIL', True)]:>6.2f}")
            else:
                line += f"{'(resize is in the augmentation)':>28}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
