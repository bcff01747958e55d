"""Eval-time prediction at the `full` test sizes on the CPU: images/s of `harness.engine.predict`, batch 1 and batched.

    python bench/bench_predict.py [--images 4] [--batch 2] [--rounds 2] [--tasks coco voc voc_fpn pose seg]

Each card's model is built with its `full` settings (test short side 800, long side at most 1333;
seg at the image's own size, padded to a batch's largest) on a random-init ResNet-18 backbone and predicts `harness data synth`
test images with 480..640 px sides, through `harness.engine.predict` with the runner's
postprocessing (the records that get scored). After an untimed warm-up, batch 1 and `--batch` run
in alternating order over `--rounds` rounds in one process. Then it checks whether batching leaves
each image's predictions identical to batch 1: the detection models run with a score threshold of 0
for that check (a random-init head scores below the card's 0.05), so that every image has 100
detections to compare; it prints the largest box and score differences and how many images differ.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from harness.backbones import build_backbone
from harness.cards import task_card
from harness.datasets.synthetic import write_synthetic
from harness.engine import default_postprocess, predict
from harness.kinds import KINDS
from harness.models.segmentation import segmentation_postprocess
from harness.runner import task_data

TASKS = ("coco", "voc", "voc_fpn", "pose", "seg")


def build(task: str):
    card = task_card(task)
    kind = KINDS[card.model.kind]
    model_kw, _ = kind.settings(card, "full")
    torch.manual_seed(0)
    return card, kind.build_model(build_backbone("resnet18"), **model_kw).eval()


def timed_predict(model, dataset, batch: int, postprocess) -> tuple[float, list]:
    began = time.perf_counter()
    records = predict(model, dataset, batch_size=batch, postprocess=postprocess, progress=False)
    return time.perf_counter() - began, records


def differences(a: list, b: list) -> tuple[int, float, float, int]:
    """Between two lists of raw outputs (dicts of tensors, or masks): (images that differ, max |box or
    keypoint coordinate diff| (masks: the fraction of pixels whose class changed), max |score diff|,
    detections compared)."""
    differ, coord, score, count = 0, 0.0, 0.0, 0
    for ra, rb in zip(a, b):
        if torch.is_tensor(ra):  # segmentation masks
            changed = ra != rb
            differ += int(bool(changed.any()))
            coord = max(coord, float(changed.float().mean()))
            continue
        count += len(ra["boxes"])
        if any(ra[k].shape != rb[k].shape or not torch.equal(ra[k], rb[k]) for k in ra):
            differ += 1
        if ra["boxes"].shape != rb["boxes"].shape:
            coord = float("inf")
            continue
        for key in ("boxes", "keypoints"):
            if key in ra and ra[key].numel():
                coord = max(coord, float((ra[key] - rb[key]).abs().max()))
        if ra["scores"].numel():
            score = max(score, float((ra["scores"] - rb["scores"]).abs().max()))
    return differ, coord, score, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="test images per dataset")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    args = parser.parse_args()
    n = args.images
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_synthetic(root, seed=0, coco_train=2, coco_val=n, voc07_trainval=2, voc07_test=n,
                        voc12_train=2, voc12_val=n, voc12_aug_extra=0, min_side=480, max_side=640)
        print(f"CPU, {torch.get_num_threads()} threads, random-init ResNet-18, {args.rounds} rounds alternating; images/s")
        for task in args.tasks:
            card, model = build(task)
            test = task_data(card, root, "full").test
            post = KINDS[card.model.kind].postprocess(card, test)
            batches = (1, args.batch)
            for b in batches:  # warm-up, untimed
                timed_predict(model, test, b, post)
            totals = dict.fromkeys(batches, 0.0)
            for r in range(args.rounds):
                for b in (batches if r % 2 == 0 else batches[::-1]):
                    totals[b] += timed_predict(model, test, b, post)[0]
            rates = {b: args.rounds * len(test) / s for b, s in totals.items()}
            if card.model.kind != "segmentation":
                model.roi_heads.score_thresh = 0.0
            # raw outputs (boxes, labels, scores, keypoints; seg: class-index masks) of batch 1 and batched
            raw = (lambda out, _: segmentation_postprocess(out)) if card.model.kind == "segmentation" else default_postprocess
            one, many = (timed_predict(model, test, b, raw)[1] for b in batches)
            differ, box, score, count = differences(one, many)
            what = "pixels changed" if card.model.kind == "segmentation" else "max |coord diff| px"
            print(f"{task:<8} batch 1: {rates[1]:5.2f}  batch {args.batch}: {rates[args.batch]:5.2f} "
                  f"({rates[args.batch] / rates[1]:.2f}x)  | batched vs batch 1: {differ}/{len(test)} images differ, "
                  f"{what} {box:.3g}, max |score diff| {score:.3g}" + (f" ({count} detections)" if count else ""), flush=True)


if __name__ == "__main__":
    main()
