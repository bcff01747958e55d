"""Scoring a COCO-sized detection file: harness vs faster-coco-eval vs pycocotools, end to end (loading included).

    python bench/bench_coco_score.py [--images 5000] [--dets-per-image 100] [--seed 0] [--rounds 3] [--profile]

Generates 5,000 images with 80 categories (COCO's non-contiguous ids) and about 7 objects per
image, and 100 detections per image; writes both as JSON; then times, in one process and from the
same files, `harness.score.score_files("coco", ...)` (validation included) and faster-coco-eval's
own COCO(path) + loadRes(path) + COCOeval_faster: after an untimed warm-up of each, `--rounds`
rounds in alternating order; then pycocotools' COCO + loadRes + COCOeval once. Prints the times,
the ratios, and checks that the 12 stats are identical. `--profile` prints a cProfile of one
harness run (cumulative time) instead.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

COCO_IDS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
            33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
            60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90]


def make_case(n_images: int, dets_per_image: int, seed: int) -> tuple[dict, list]:
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "width": 640, "height": 480, "file_name": f"{i + 1:012d}.jpg"} for i in range(n_images)]
    anns, preds = [], []
    for img in images:
        n = int(rng.poisson(7))
        cats = rng.choice(COCO_IDS, n)
        wh = rng.uniform(8, 300, (n, 2))
        xy = rng.uniform(0, 1, (n, 2)) * ([640, 480] - wh)
        for c, (x, y), (w, h) in zip(cats, xy, wh):
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": int(c), "bbox": [x, y, w, h],
                         "area": float(w * h * 0.7), "iscrowd": int(rng.random() < 0.01)})
        # detections: jittered copies of the truth plus background boxes, 100 in all
        k = dets_per_image
        src = rng.integers(0, max(n, 1), k)
        dwh = rng.uniform(8, 300, (k, 2))
        dxy = rng.uniform(0, 1, (k, 2)) * ([640, 480] - dwh)
        dcat = rng.choice(COCO_IDS, k)
        for j in range(k):
            if n and j < 3 * n:
                x, y, w, h = xy[src[j]][0], xy[src[j]][1], wh[src[j]][0], wh[src[j]][1]
                jit = rng.normal(0, 0.08, 4) * [w, h, w, h]
                box = [x + jit[0], y + jit[1], max(1.0, w + jit[2]), max(1.0, h + jit[3])]
                cat = int(cats[src[j]])
            else:
                box, cat = [dxy[j][0], dxy[j][1], dwh[j][0], dwh[j][1]], int(dcat[j])
            preds.append({"image_id": img["id"], "category_id": cat, "bbox": [round(float(v), 2) for v in box],
                          "score": round(float(rng.random()), 5)})
    cats = [{"id": c, "name": f"class{c}", "supercategory": "thing"} for c in COCO_IDS]
    return {"images": images, "annotations": anns, "categories": cats}, preds


def run_pycocotools(gt_path: Path, pred_path: Path) -> list[float]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(gt_path))
        dt = gt.loadRes(str(pred_path))
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return [float(s) for s in ev.stats]


def run_faster_coco_eval(gt_path: Path, pred_path: Path) -> list[float]:
    from faster_coco_eval import COCO, COCOeval_faster

    gt = COCO(str(gt_path))
    dt = gt.loadRes(str(pred_path))
    ev = COCOeval_faster(gt, dt, "bbox", print_function=lambda *a, **k: None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return [float(s) for s in ev.stats][:12]


def run_harness(gt_path: Path, pred_path: Path) -> list[float]:
    from harness.metrics.coco import BOX_METRICS
    from harness.score import score_files

    metrics = score_files("coco", gt=gt_path, pred=pred_path)
    return [-1.0 if metrics[k] is None else metrics[k] / 100.0 for k in BOX_METRICS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets-per-image", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="cProfile one harness run instead of timing")
    args = parser.parse_args()
    gt, preds = make_case(args.images, args.dets_per_image, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        gt_path, pred_path = Path(tmp) / "gt.json", Path(tmp) / "dets.json"
        gt_path.write_text(json.dumps(gt))
        pred_path.write_text(json.dumps(preds))
        print(f"case: {len(gt['images'])} images, {len(gt['categories'])} categories, "
              f"{len(gt['annotations'])} objects, {len(preds)} detections")
        del gt, preds
        if args.profile:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(run_harness, gt_path, pred_path)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
            return
        sides = {"harness score": run_harness, "faster-coco-eval": run_faster_coco_eval}
        stats = {name: run(gt_path, pred_path) for name, run in sides.items()}  # warm-up, untimed
        totals = dict.fromkeys(sides, 0.0)
        for r in range(args.rounds):  # the order alternates, so neither side always goes first
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                began = time.perf_counter()
                stats[name] = sides[name](gt_path, pred_path)
                totals[name] += time.perf_counter() - began
        began = time.perf_counter()
        ref = run_pycocotools(gt_path, pred_path)
        totals["pycocotools"] = (time.perf_counter() - began) * args.rounds
    for name, seconds in totals.items():
        print(f"{name:<18} {seconds / args.rounds:7.2f} s" + ("  (one run)" if name == "pycocotools" else f"  (mean of {args.rounds})"))
    harness = totals["harness score"]
    print(f"harness speed vs faster-coco-eval: {totals['faster-coco-eval'] / harness:5.2f}x   "
          f"vs pycocotools: {totals['pycocotools'] / harness:5.2f}x")
    for name, ours in stats.items():
        diff = max(abs(a - b) for a, b in zip(ours, ref))
        print(f"{name}: max |stat diff| vs pycocotools = {diff:.2e}   AP = {100 * ours[0]:.3f}")
        if diff > 1e-6:
            raise SystemExit(f"{name}: stats differ from pycocotools")


if __name__ == "__main__":
    main()
