"""Synthetic datasets in the real COCO and VOC layouts, and a multi-label pretraining set.

Every image is a scene drawn by ``harness.datasets.scenes`` from the shape vocabulary of
``harness.datasets.shapes`` (the 20 VOC categories; people are stick figures with the 17 COCO
keypoints). This module decides what each dataset holds (classes, image counts and sizes, splits)
and writes the images, annotations and lists in the real layouts.

Everything is deterministic by seed: each image has its own random stream keyed by (seed,
dataset, image key), JPEGs use a fixed quality and JSON is written with sorted keys.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from harness.datasets.roots import MARKER, read_marker
from harness.datasets.scenes import Annotation, annotate, mask_polygons, mask_rle, render_scene
from harness.datasets.shapes import CATEGORY, COCO_KEYPOINTS, COCO_SKELETON
from harness.datasets.voc_devkit import VOC_CLASSES, voc_colormap
from harness.errors import HarnessError

JPEG_QUALITY = 90

COCO_CLASSES = ("person", "bicycle", "car", "aeroplane", "boat", "bird", "dog", "bottle", "chair",
                "tvmonitor")
# people are about a third of COCO's objects, as in the real set (the pose task trains on them)
COCO_WEIGHTS = np.array([4.0 if c == "person" else 1.0 for c in COCO_CLASSES])
# the classes drawn in the synthetic VOC sets: half of VOC's 20, so that the smoke schedule (about
# one epoch) can learn them; the other ten have no ground truth and drop out of the VOC mean.
VOC_SCENE_CLASSES = ("aeroplane", "bicycle", "bird", "bottle", "car", "chair", "cow", "person", "train",
                     "tvmonitor")
VOC_SCENE_WEIGHTS = np.array([2.0 if c == "person" else 1.0 for c in VOC_SCENE_CLASSES])
VOC_CLASS_INDEX = {c: k + 1 for k, c in enumerate(VOC_CLASSES)}  # segmentation label of each class

# coco_train 600 gives the pose smoke run about 560 people with keypoints to learn from (200 gave
# 180); training time does not grow with the image count, only generation (a few seconds)
DEFAULT_SIZES = {
    "coco_train": 600, "coco_val": 50,
    "voc07_trainval": 200, "voc07_test": 100,
    "voc12_train": 150, "voc12_val": 50, "voc12_aug_extra": 100,
    "min_side": 128, "max_side": 192,
}


def _rng(seed: int, *keys: object) -> np.random.Generator:
    """An independent random stream for (seed, keys...)."""
    return np.random.default_rng([int(seed)] + [zlib.crc32(str(k).encode()) for k in keys])


# ----------------------------------------------------------------------------- writers
def _save_jpeg(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY)


def _size(rng: np.random.Generator, sizes: dict) -> tuple[int, int]:
    lo, hi = int(sizes["min_side"]), int(sizes["max_side"])
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def _write_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")))


def _coco_image(job: tuple) -> tuple[dict, list[tuple[dict, dict | None]]]:
    """Render, save and annotate one COCO image: its image record and, per object, its annotation
    (without the id) and its keypoint fields (people only). Its own rng: any process gives the same file."""
    seed, split, idx, image_id, sizes, img_dir = job
    rng = _rng(seed, "coco", split, idx)
    w, h = _size(rng, sizes)
    n_obj = 0 if idx % 12 == 5 else int(rng.integers(1, 7))
    scene = render_scene(rng, w, h, COCO_CLASSES, n_obj, crowd=idx % 10 == 2, weights=COCO_WEIGHTS)
    name = f"{image_id:012d}.jpg"
    _save_jpeg(scene.image, img_dir / name)
    image = {"id": image_id, "file_name": name, "width": w, "height": h, "license": 1,
             "coco_url": "", "flickr_url": "", "date_captured": "2017-01-01 00:00:00"}
    objects = []
    for a in annotate(scene):
        x0, y0, x1, y1 = a.box
        rec = {"image_id": image_id, "category_id": CATEGORY[a.cls].coco_id,
               "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
               "area": float(a.area), "iscrowd": int(a.crowd),
               "segmentation": mask_rle(a.mask) if a.crowd else mask_polygons(a.mask)}
        keypoints = {"keypoints": a.keypoints, "num_keypoints": a.num_keypoints} if a.cls == "person" else None
        objects.append((rec, keypoints))
    return image, objects


def _run_jobs(fn: Callable, jobs: list, workers: int) -> list:
    """``[fn(job) for job in jobs]``, spread over ``workers`` processes when that many are asked for and
    there are enough jobs (results in order; every job draws from its own rng, so the files are the same)."""
    if workers <= 1 or len(jobs) < 4 * workers:
        return [fn(job) for job in jobs]
    start = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start)) as pool:
        return list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))))


def _write_coco(root: Path, seed: int, sizes: dict, workers: int = 1) -> dict:
    """COCO 2017 layout: instances_* and person_keypoints_* JSON, images %012d.jpg."""
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    cats = sorted((CATEGORY[n] for n in COCO_CLASSES), key=lambda c: c.coco_id)
    categories = [{"id": c.coco_id, "name": c.coco_name, "supercategory": c.supercategory} for c in cats]
    kp_category = {"id": 1, "name": "person", "supercategory": "person",
                   "keypoints": list(COCO_KEYPOINTS), "skeleton": [list(s) for s in COCO_SKELETON]}
    info = {"description": "harness synthetic data in the COCO 2017 layout", "url": "", "version": "1.0",
            "year": 2017, "contributor": "harness", "date_created": "2017/09/01"}
    licenses = [{"id": 1, "name": "synthetic", "url": ""}]
    splits = (("train2017", sizes["coco_train"]), ("val2017", sizes["coco_val"]))
    id_rng = _rng(seed, "coco", "ids")
    all_ids = id_rng.choice(600_000, sum(n for _, n in splits), replace=False) + 1
    summary, ann_id, offset = {}, 1, 0
    for split, n in splits:
        img_dir = root / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ids = sorted(all_ids[offset: offset + n].tolist())
        offset += n
        images, anns, kp_anns = [], [], []
        jobs = [(seed, split, idx, image_id, sizes, img_dir) for idx, image_id in enumerate(ids)]
        for image, objects in _run_jobs(_coco_image, jobs, workers):
            images.append(image)
            for rec, keypoints in objects:
                rec = {"id": ann_id, **rec}
                anns.append(rec)
                if keypoints is not None:
                    kp_anns.append({**rec, **keypoints})
                ann_id += 1
        base = {"info": info, "licenses": licenses, "images": images}
        _write_json({**base, "annotations": anns, "categories": categories},
                    ann_dir / f"instances_{split}.json")
        _write_json({**base, "annotations": kp_anns, "categories": [kp_category]},
                    ann_dir / f"person_keypoints_{split}.json")
        summary[split] = {"images": len(images), "objects": len(anns),
                          "crowd": sum(a["iscrowd"] for a in anns),
                          "empty_images": len(images) - len({a["image_id"] for a in anns}),
                          "persons_with_keypoints": sum(a["num_keypoints"] > 0 for a in kp_anns)}
    return summary


def _voc_xml(year: str, image_id: str, w: int, h: int, segmented: bool, anns: list[Annotation]) -> str:
    """An annotation file laid out like the devkit's (tabs, 1-based integer boxes)."""
    src_year = image_id[:4] if "_" in image_id else "2007"
    lines = ["<annotation>", f"\t<folder>VOC{year}</folder>", f"\t<filename>{image_id}.jpg</filename>",
             "\t<source>", f"\t\t<database>The VOC{src_year} Database</database>",
             f"\t\t<annotation>PASCAL VOC{src_year}</annotation>", "\t\t<image>flickr</image>",
             "\t</source>", "\t<size>", f"\t\t<width>{w}</width>", f"\t\t<height>{h}</height>",
             "\t\t<depth>3</depth>", "\t</size>", f"\t<segmented>{int(segmented)}</segmented>"]
    for a in anns:
        x0, y0, x1, y1 = a.box
        lines += ["\t<object>", f"\t\t<name>{a.cls}</name>", f"\t\t<pose>{a.pose}</pose>",
                  f"\t\t<truncated>{int(a.truncated)}</truncated>"]
        if year != "2007":
            lines.append(f"\t\t<occluded>{int(a.occluded)}</occluded>")
        lines += [f"\t\t<difficult>{int(a.difficult)}</difficult>", "\t\t<bndbox>",
                  f"\t\t\t<xmin>{x0 + 1}</xmin>", f"\t\t\t<ymin>{y0 + 1}</ymin>",
                  f"\t\t\t<xmax>{x1 + 1}</xmax>", f"\t\t\t<ymax>{y1 + 1}</ymax>", "\t\t</bndbox>",
                  "\t</object>"]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _voc_ids(rng: np.random.Generator, n: int, year: str) -> list[str]:
    if year == "2007":
        return [f"{i:06d}" for i in sorted(rng.choice(max(9963, 2 * n), n, replace=False) + 1)]
    nums = rng.choice(5 * max(9000, 2 * n), n, replace=False)
    return sorted(f"{2007 + k // max(9000, 2 * n)}_{k % max(9000, 2 * n):06d}" for k in nums)


def _write_list(path: Path, ids: list[str]) -> None:
    path.write_text("".join(f"{i}\n" for i in sorted(ids)))


def _voc_image(job: tuple) -> list[tuple[str, bool]]:
    """Render one VOC image and write its JPEG, XML and (segmentation sets) PNGs; returns (class,
    difficult) per object. Its own rng: any process gives the same files."""
    seed, year, image_id, sizes, dirs, segmented, augmented, palette = job
    rng = _rng(seed, "voc", year, image_id)
    w, h = _size(rng, sizes)
    scene = render_scene(rng, w, h, VOC_SCENE_CLASSES, int(rng.integers(1, 5)), weights=VOC_SCENE_WEIGHTS)
    anns = annotate(scene)
    _save_jpeg(scene.image, dirs["JPEGImages"] / f"{image_id}.jpg")
    (dirs["Annotations"] / f"{image_id}.xml").write_text(_voc_xml(year, image_id, w, h, segmented, anns))
    if segmented or augmented:
        cls_map = np.zeros((h, w), np.uint8)
        obj_map = np.zeros((h, w), np.uint8)
        for k, a in enumerate(anns):
            cls_map[a.mask] = VOC_CLASS_INDEX[a.cls]
            obj_map[a.mask] = k + 1
        if augmented:
            Image.fromarray(cls_map).save(dirs["SegmentationClassAug"] / f"{image_id}.png")
        if segmented:
            void = _boundary(obj_map)
            for a in anns:
                if a.difficult:
                    void |= a.mask
            for arr, sub in ((cls_map, "SegmentationClass"), (obj_map, "SegmentationObject")):
                arr = np.where(void, 255, arr).astype(np.uint8)
                png = Image.fromarray(arr)
                png.putpalette(palette)  # an 'L' image with a palette becomes 'P'
                png.save(dirs[sub] / f"{image_id}.png")
    return [(a.cls, a.difficult) for a in anns]


def _write_voc(root: Path, year: str, seed: int, splits: dict[str, list[str]], seg: set[str],
               aug: set[str], sizes: dict, workers: int = 1) -> dict:
    """One VOCdevkit/VOC<year> folder; splits maps Main split name -> ids (all images written)."""
    palette = voc_colormap().ravel().tolist()
    dirs = {k: root / k for k in ("Annotations", "JPEGImages", "ImageSets/Main")}
    if seg:
        dirs.update({k: root / k for k in ("ImageSets/Segmentation", "SegmentationClass",
                                           "SegmentationObject")})
    if aug:
        dirs["SegmentationClassAug"] = root / "SegmentationClassAug"
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    ids = sorted({i for ids in splits.values() for i in ids})
    jobs = [(seed, year, image_id, sizes, dirs, image_id in seg, image_id in aug, palette) for image_id in ids]
    labels = dict(zip(ids, _run_jobs(_voc_image, jobs, workers)))
    for split, split_ids in splits.items():
        _write_list(dirs["ImageSets/Main"] / f"{split}.txt", split_ids)
        for c in VOC_CLASSES:  # per-class lists: 1 present, 0 only difficult, -1 absent
            rows = []
            for i in sorted(split_ids):
                found = [difficult for cls, difficult in labels[i] if cls == c]
                flag = -1 if not found else (0 if all(found) else 1)
                rows.append(f"{i} {flag:2d}\n")
            (dirs["ImageSets/Main"] / f"{c}_{split}.txt").write_text("".join(rows))
    summary = {split: {"images": len(s), "objects": sum(len(labels[i]) for i in s),
                       "difficult": sum(difficult for i in s for _, difficult in labels[i])}
               for split, s in splits.items()}
    return summary


def _boundary(obj_map: np.ndarray) -> np.ndarray:
    """VOC's void band: pixels whose 3 x 3 neighbourhood holds another object (or background)."""
    h, w = obj_map.shape
    p = np.pad(obj_map, 1, mode="edge")
    band = np.zeros((h, w), bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            band |= p[dy: dy + h, dx: dx + w] != obj_map
    return band


def write_synthetic(out: Path, seed: int = 0, workers: int | None = None, **sizes: int) -> dict:
    """Write COCO 2017 and VOCdevkit (VOC2007, VOC2012 with SBD-style train_aug) under out.

    sizes overrides DEFAULT_SIZES (image counts per split, min_side/max_side in pixels). Images are
    rendered in ``workers`` processes (default: one per available core); the files do not depend on it.  A
    `SYNTHETIC.json` marker is written at the root; an existing coco/ or VOCdevkit/ folder is
    replaced only when that marker shows it is synthetic.  Returns a JSON-able summary: per
    dataset, split -> counts.
    """
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise TypeError(f"write_synthetic: unknown size keyword(s) {sorted(unknown)}; "
                        f"known: {sorted(DEFAULT_SIZES)}")
    cfg = {**DEFAULT_SIZES, **{k: int(v) for k, v in sizes.items()}}
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if any(v < 0 for v in cfg.values()) or not 16 <= cfg["min_side"] <= cfg["max_side"]:
        raise HarnessError(f"synthetic data: bad sizes {cfg} (counts >= 0, 16 <= min_side <= max_side)")
    out = Path(out)
    coco, voc = out / "coco", out / "VOCdevkit"
    if (coco.exists() or voc.exists()) and not (out / MARKER).exists():
        raise HarnessError(f"{out} already holds coco/ or VOCdevkit/ that is not synthetic "
                           f"(no {MARKER}); refusing to overwrite it")
    for d in (coco, voc):
        if d.exists():
            shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"generator": __name__, "seed": seed, "sizes": cfg}))

    summary: dict = {"coco": _write_coco(coco, seed, cfg, workers)}

    rng = _rng(seed, "voc2007", "ids")
    n_tv, n_test = cfg["voc07_trainval"], cfg["voc07_test"]
    ids = list(rng.permutation(_voc_ids(rng, n_tv + n_test, "2007")))
    trainval, test = sorted(ids[:n_tv]), sorted(ids[n_tv:])
    train = sorted(rng.permutation(trainval)[: n_tv // 2].tolist())
    val = sorted(set(trainval) - set(train))
    summary["voc2007"] = _write_voc(voc / "VOC2007", "2007", seed,
                                    {"train": train, "val": val, "trainval": trainval, "test": test},
                                    set(), set(), cfg, workers)

    rng = _rng(seed, "voc2012", "ids")
    n_tr, n_va, n_ex = cfg["voc12_train"], cfg["voc12_val"], cfg["voc12_aug_extra"]
    ids = list(rng.permutation(_voc_ids(rng, n_tr + n_va + n_ex, "2012")))
    seg_train, seg_val, extra = sorted(ids[:n_tr]), sorted(ids[n_tr:n_tr + n_va]), sorted(ids[n_tr + n_va:])
    train_aug = sorted(seg_train + extra)  # SBD-style: more images than train, none from val
    summary["voc2012"] = _write_voc(voc / "VOC2012", "2012", seed,
                                    {"train": train_aug, "val": seg_val, "trainval": sorted(train_aug + seg_val)},
                                    set(seg_train + seg_val), set(train_aug + seg_val), cfg, workers)
    seg_dir = voc / "VOC2012" / "ImageSets" / "Segmentation"
    seg_dir.mkdir(parents=True, exist_ok=True)
    for name, split_ids in (("train", seg_train), ("val", seg_val), ("trainval", seg_train + seg_val),
                            ("train_aug", train_aug)):
        _write_list(seg_dir / f"{name}.txt", split_ids)
    summary["voc2012"].update({"seg_train": {"images": len(seg_train)}, "seg_val": {"images": len(seg_val)},
                               "train_aug": {"images": len(train_aug)}})
    marker = read_marker(out)
    marker["expected"] = {  # the counts `harness data check` expects of this root
        "COCO 2017": {"train": cfg["coco_train"], "val": cfg["coco_val"]},
        "VOC2007": {"trainval": len(trainval), "test": len(test)},
        "VOC2012": {"main/trainval": len(train_aug) + len(seg_val), "segmentation/train": len(seg_train),
                    "segmentation/val": len(seg_val)},
        "SBD (train_aug)": {"train_aug": len(train_aug)},
    }
    (out / MARKER).write_text(json.dumps(marker))
    return summary


COMPLETE = ".complete"  # written after a whole `write_synthetic` call: a killed write is redone


def write_synthetic_once(root: Path) -> Path:
    """The default synthetic data (seed 0, ``DEFAULT_SIZES``) at ``root``, written unless a finished
    write is there (``harness eval --synthetic`` and the scaling study share it; call on one rank)."""
    root = Path(root)
    if not (root / COMPLETE).is_file():
        write_synthetic(root, seed=0)
        (root / COMPLETE).write_text("")
    return root


def check_default_synthetic(root: Path) -> Path:
    """``root`` when its marker says it holds this version's default synthetic data, else a one-line error."""
    made = read_marker(root)
    if (made.get("seed"), made.get("sizes")) != (0, DEFAULT_SIZES):
        raise HarnessError(f"{root} was generated with other settings than this version's "
                           f"`harness data synth` ({made.get('sizes')}); use another --out")
    return Path(root)


# ----------------------------------------------------------------------------- pretraining
def write_pretrain_synthetic(out: Path, size: int, label_noise: float, seed: int = 0,
                             image_size: int = 128) -> Path:
    """A multi-label pretraining set drawn from the same shape vocabulary as the downstream sets.

    Images are object-centric (one or two objects of a fifth to nearly half the image's side, on the
    downstream sets' cluttered backgrounds).

    Writes `out/images/%07d.jpg` and `out/manifest.jsonl` ({"path": relative path, "labels": [names]}
    per line).  Labels are the classes of the objects at least 40% visible in an image; then
    round(label_noise * #labels) of them, chosen deterministically, are corrupted: dropped or
    swapped for a class the image lacks.
    The images do not depend on label_noise.  Returns the manifest path.
    """
    if size < 1 or not 0.0 <= label_noise <= 1.0 or image_size < 16:
        raise HarnessError(f"pretraining data: need size >= 1, 0 <= label_noise <= 1 and image_size >= 16, "
                           f"got size={size}, label_noise={label_noise}, image_size={image_size}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    labels: list[list[str]] = []
    paths: list[str] = []
    for i in range(size):
        rng = _rng(seed, "pretrain", i)
        # object-centric, as the photos of ImageNet or JFT: one main object, sometimes a second
        scene = render_scene(rng, image_size, image_size, VOC_CLASSES, 1 if rng.random() < 0.6 else 2,
                             checks=False, half_range=(0.2, 0.45))
        rel = f"images/{i:07d}.jpg"
        _save_jpeg(scene.image, out / rel)
        paths.append(rel)
        # the classes an annotator would tag: an object at least 40% visible, not a sliver (VOC's "difficult")
        labels.append(sorted({a.cls for a in annotate(scene) if not a.difficult}))
    noise_rng = _rng(seed, "pretrain", "noise")
    slots = [(i, k) for i, ls in enumerate(labels) for k in range(len(ls))]
    n_bad = int(round(label_noise * len(slots)))
    chosen = sorted(noise_rng.choice(len(slots), n_bad, replace=False).tolist()) if n_bad else []
    noisy = [list(ls) for ls in labels]
    for s in chosen:
        i, k = slots[s]
        if noise_rng.random() < 0.5:
            noisy[i][k] = None  # dropped
        else:
            others = [c for c in VOC_CLASSES if c not in labels[i] and c not in noisy[i]]
            noisy[i][k] = str(noise_rng.choice(others))
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(
        json.dumps({"path": p, "labels": sorted(c for c in ls if c is not None)}, sort_keys=True) + "\n"
        for p, ls in zip(paths, noisy)))
    return manifest
