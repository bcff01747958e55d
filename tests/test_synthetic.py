"""The synthetic datasets: real layouts, exact geometry, determinism, pretraining label noise."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from harness.datasets import scenes, shapes
from harness.datasets import synthetic as syn
from harness.datasets.voc import VOC_CLASSES, voc_colormap
from harness.errors import HarnessError

SMALL = dict(coco_train=24, coco_val=12, voc07_trainval=16, voc07_test=8, voc12_train=12, voc12_val=6,
             voc12_aug_extra=8)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    syn.write_synthetic(out, seed=0, workers=2, **SMALL)  # images rendered in two processes
    return out


def _coco(root: Path, kind: str, split: str) -> COCO:
    return COCO(str(root / "coco" / "annotations" / f"{kind}_{split}.json"))


# ----------------------------------------------------------------------------- determinism
def test_same_seed_same_bytes_in_one_or_two_processes_and_different_seed_differs(root, tmp_path):
    again = tmp_path / "again"
    syn.write_synthetic(again, seed=0, workers=1, **SMALL)
    a, b = _files(root), _files(again)
    assert a.keys() == b.keys()
    assert [k for k in a if a[k] != b[k]] == []
    other = tmp_path / "other"
    syn.write_synthetic(other, seed=1, **SMALL)
    c = _files(other)
    jpgs = [k for k in a if k.endswith(".jpg") and k in c]
    assert all(a[k] != c[k] for k in jpgs)  # shared VOC ids render differently
    assert a["coco/annotations/instances_val2017.json"] != c["coco/annotations/instances_val2017.json"]


def test_rewrite_replaces_synthetic_but_never_real_data(tmp_path):
    out = tmp_path / "root"
    syn.write_synthetic(out, seed=0, coco_train=2, coco_val=1, voc07_trainval=2, voc07_test=1,
                        voc12_train=1, voc12_val=1, voc12_aug_extra=1)
    summary = syn.write_synthetic(out, seed=0, coco_train=1, coco_val=1, voc07_trainval=2, voc07_test=1,
                                  voc12_train=1, voc12_val=1, voc12_aug_extra=1)
    assert summary["coco"]["train2017"]["images"] == 1
    assert len(list((out / "coco" / "train2017").iterdir())) == 1  # no stale images
    real = tmp_path / "real"
    (real / "coco").mkdir(parents=True)
    with pytest.raises(HarnessError, match="refusing"):
        syn.write_synthetic(real, seed=0, coco_train=1)
    with pytest.raises(TypeError, match="unknown size"):
        syn.write_synthetic(tmp_path / "x", cocotrain=1)


# ----------------------------------------------------------------------------- COCO
def test_coco_layout(root):
    for split, n in (("train2017", SMALL["coco_train"]), ("val2017", SMALL["coco_val"])):
        inst = _coco(root, "instances", split)
        assert len(inst.imgs) == n
        for img in inst.imgs.values():
            assert re.fullmatch(r"\d{12}\.jpg", img["file_name"]) and int(img["file_name"][:12]) == img["id"]
            with Image.open(root / "coco" / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"]) and im.mode == "RGB"
        ids = sorted(inst.cats)
        assert ids != list(range(1, len(ids) + 1)) and max(ids) > 40 and 8 <= len(ids) <= 12
        assert inst.cats[1]["name"] == "person" and inst.cats[44]["name"] == "bottle"
        assert any(not inst.getAnnIds(imgIds=[i]) for i in inst.imgs)  # images without objects
        anns = list(inst.anns.values())
        crowd = [a for a in anns if a["iscrowd"]]
        assert crowd and all(isinstance(a["segmentation"]["counts"], list) for a in crowd)
        assert all(isinstance(a["segmentation"], list) for a in anns if not a["iscrowd"])
        assert {a["category_id"] for a in anns} <= set(ids)


def test_coco_boxes_are_tight_and_masks_match_area(root):
    inst = _coco(root, "instances", "train2017")
    for ann in inst.anns.values():
        m = inst.annToMask(ann)
        ys, xs = np.nonzero(m)
        x, y, w, h = ann["bbox"]
        assert (xs.min(), ys.min(), xs.max() + 1 - xs.min(), ys.max() + 1 - ys.min()) == (x, y, w, h)
        assert m.sum() == ann["area"]


def test_polygons_reproduce_drawn_pixels_exactly():
    """pycocotools rasterises our polygons back to exactly the visible pixels of each object."""
    for k in range(25):
        rng = syn._rng(123, "poly", k)
        scene = scenes.render_scene(rng, 150, 130, syn.VOC_CLASSES, 5, crowd=k % 3 == 0)
        for a in scenes.annotate(scene):
            if a.crowd:
                rle = mask_utils.frPyObjects(scenes.mask_rle(a.mask), 130, 150)
            else:
                rle = mask_utils.merge(mask_utils.frPyObjects(scenes.mask_polygons(a.mask), 130, 150))
            np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), a.mask)
            x0, y0, x1, y1 = a.box
            assert a.mask[y0, :].any() and a.mask[y1, :].any() and a.mask[:, x0].any() and a.mask[:, x1].any()
            assert not a.mask[:y0].any() and not a.mask[y1 + 1:].any()
            assert not a.mask[:, :x0].any() and not a.mask[:, x1 + 1:].any()


def test_coco_keypoints(root):
    for split in ("train2017", "val2017"):
        inst, kp = _coco(root, "instances", split), _coco(root, "person_keypoints", split)
        assert kp.imgs.keys() == inst.imgs.keys()
        (cat,) = kp.cats.values()
        assert cat["id"] == 1 and cat["keypoints"] == list(shapes.COCO_KEYPOINTS) and len(cat["skeleton"]) == 19
        persons = {a["id"] for a in inst.anns.values() if a["category_id"] == 1}
        assert set(kp.anns) == persons
        for ann in kp.anns.values():
            k = np.array(ann["keypoints"]).reshape(17, 3)
            assert ann["num_keypoints"] == int((k[:, 2] > 0).sum())
            assert (k[k[:, 2] == 0, :2] == 0).all()
            if ann["iscrowd"]:
                assert ann["num_keypoints"] == 0
            x, y, w, h = ann["bbox"]
            m = kp.annToMask(ann)
            for px, py, v in k:
                if v == 2:
                    assert x <= px <= x + w and y <= py <= y + h
                    assert m[py, px]  # a visible keypoint sits on its person's pixels
    labelled = [a for a in _coco(root, "person_keypoints", "train2017").anns.values() if a["num_keypoints"]]
    assert labelled


def test_figure_keypoints_are_anatomical():
    rng = np.random.default_rng(0)
    for _ in range(50):
        _, marks, k, labelled, pose = shapes.stick_figure(rng, 100.0, 100.0, 80.0)
        # face, hands and feet are drawn where their keypoints are (within a limb width)
        centres = np.array([np.asarray(m).mean(0) for m in marks])
        marked = [0] + [j for j in (1, 2, 3, 4) if labelled[j]] + [9, 10, 15, 16]
        assert len(centres) == len(marked)
        assert np.abs(centres - k[marked]).max() < 0.06 * 80.0
        head = k[:5][labelled[:5]]
        assert (head[:, 1] < k[5:7, 1].min()).all()  # face above the shoulders
        assert k[5:7, 1].max() < k[11:13, 1].min()  # shoulders above hips
        assert (k[11:13, 1] < k[15:17, 1] + 1e-6).all() or pose != "Frontal"  # hips above ankles
        assert pose in ("Frontal", "Left", "Right")
        if pose == "Frontal":
            assert k[5, 0] > k[6, 0] and k[1, 0] > k[2, 0]  # the person's left is on image right


# ----------------------------------------------------------------------------- VOC
def _ids(path: Path) -> list[str]:
    return path.read_text().split()


def test_voc_layout_and_xml(root):
    voc = root / "VOCdevkit"
    y07, y12 = voc / "VOC2007", voc / "VOC2012"
    main07 = {s: _ids(y07 / "ImageSets" / "Main" / f"{s}.txt") for s in ("train", "val", "trainval", "test")}
    assert sorted(main07["train"] + main07["val"]) == main07["trainval"]
    assert not set(main07["trainval"]) & set(main07["test"])
    assert len(main07["trainval"]) == SMALL["voc07_trainval"] and len(main07["test"]) == SMALL["voc07_test"]
    assert all(re.fullmatch(r"\d{6}", i) for i in main07["trainval"] + main07["test"])
    main12 = {s: _ids(y12 / "ImageSets" / "Main" / f"{s}.txt") for s in ("train", "val", "trainval")}
    assert all(re.fullmatch(r"20(0[7-9]|1[01])_\d{6}", i) for i in main12["trainval"])
    difficult, names = 0, set()
    for year, ids in ((y07, main07["trainval"] + main07["test"]), (y12, main12["trainval"])):
        for i in ids:
            with Image.open(year / "JPEGImages" / f"{i}.jpg") as im:
                size = im.size
            tree = ET.parse(year / "Annotations" / f"{i}.xml").getroot()
            assert tree.tag == "annotation" and tree.findtext("folder") == year.name
            assert tree.findtext("filename") == f"{i}.jpg"
            w, h = int(tree.findtext("size/width")), int(tree.findtext("size/height"))
            assert (w, h) == size and tree.findtext("size/depth") == "3"
            objs = tree.findall("object")
            assert objs  # every VOC image has an object
            for obj in objs:
                names.add(obj.findtext("name"))
                assert obj.findtext("pose") in ("Frontal", "Left", "Right", "Unspecified")
                assert obj.findtext("truncated") in ("0", "1")
                difficult += int(obj.findtext("difficult"))
                b = [int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
                assert 1 <= b[0] <= b[2] <= w and 1 <= b[1] <= b[3] <= h
    assert names <= set(syn.VOC_CLASSES) and len(names) >= 10
    assert difficult > 0
    line = (y07 / "ImageSets" / "Main" / "person_trainval.txt").read_text().splitlines()[0]
    assert re.fullmatch(r"\d{6} ( 1|-1| 0)", line)


def test_voc_segmentation(root):
    y12 = root / "VOCdevkit" / "VOC2012"
    seg = {s: _ids(y12 / "ImageSets" / "Segmentation" / f"{s}.txt")
           for s in ("train", "val", "trainval", "train_aug")}
    assert not set(seg["val"]) & set(seg["train_aug"])
    assert set(seg["train"]) < set(seg["train_aug"]) and sorted(seg["train"] + seg["val"]) == seg["trainval"]
    assert set(seg["trainval"]) | set(seg["train_aug"]) <= set(_ids(y12 / "ImageSets" / "Main" / "trainval.txt"))
    palette = voc_colormap().ravel().tolist()
    for i in seg["trainval"]:
        with Image.open(y12 / "SegmentationClass" / f"{i}.png") as im:
            assert im.mode == "P" and im.getpalette()[:60] == palette[:60]
            cls = np.asarray(im)
        with Image.open(y12 / "SegmentationObject" / f"{i}.png") as im:
            assert im.mode == "P"
            obj = np.asarray(im)
        with Image.open(y12 / "SegmentationClassAug" / f"{i}.png") as im:
            assert im.mode == "L"
            aug = np.asarray(im)
        assert set(np.unique(cls)) <= set(range(21)) | {255} and 255 in cls
        assert set(np.unique(aug)) <= set(range(21))
        labelled = cls != 255
        np.testing.assert_array_equal(cls[labelled], aug[labelled])
        tree = ET.parse(y12 / "Annotations" / f"{i}.xml").getroot()
        assert tree.findtext("segmented") == "1"
        for k, o in enumerate(tree.findall("object"), start=1):
            ys, xs = np.nonzero(obj == k)
            if ys.size:  # object pixels (minus the void band) lie inside the box
                b = [int(o.findtext(f"bndbox/{t}")) - 1 for t in ("xmin", "ymin", "xmax", "ymax")]
                assert b[0] <= xs.min() and xs.max() <= b[2] and b[1] <= ys.min() and ys.max() <= b[3]
                assert set(np.unique(cls[obj == k])) == {syn.VOC_CLASSES.index(o.findtext("name")) + 1}
    for i in seg["train_aug"]:
        assert (y12 / "SegmentationClassAug" / f"{i}.png").exists()
    extra = set(seg["train_aug"]) - set(seg["train"])
    assert extra and not any((y12 / "SegmentationClass" / f"{i}.png").exists() for i in extra)


def test_voc_box_is_tight_around_aug_class_pixels(root):
    y12 = root / "VOCdevkit" / "VOC2012"
    for i in _ids(y12 / "ImageSets" / "Segmentation" / "train_aug.txt"):
        aug = np.asarray(Image.open(y12 / "SegmentationClassAug" / f"{i}.png"))
        objs = ET.parse(y12 / "Annotations" / f"{i}.xml").getroot().findall("object")
        for o in objs:
            c = syn.VOC_CLASSES.index(o.findtext("name")) + 1
            b = [int(o.findtext(f"bndbox/{t}")) - 1 for t in ("xmin", "ymin", "xmax", "ymax")]
            region = aug[b[1]: b[3] + 1, b[0]: b[2] + 1] == c
            # each edge of the box touches a pixel of the object's class
            assert region[0].any() and region[-1].any() and region[:, 0].any() and region[:, -1].any()


# ----------------------------------------------------------------------------- pretraining
def test_pretrain_manifest_and_label_noise(tmp_path):
    clean = syn.write_pretrain_synthetic(tmp_path / "clean", size=60, label_noise=0.0, seed=3)
    noisy = syn.write_pretrain_synthetic(tmp_path / "noisy", size=60, label_noise=0.3, seed=3)
    rows_c = [json.loads(line) for line in clean.read_text().splitlines()]
    rows_n = [json.loads(line) for line in noisy.read_text().splitlines()]
    assert len(rows_c) == len(rows_n) == 60
    for rc, rn in zip(rows_c, rows_n):
        assert rc["path"] == rn["path"]
        assert (clean.parent / rc["path"]).read_bytes() == (noisy.parent / rn["path"]).read_bytes()
        assert set(rn["labels"]) <= set(syn.VOC_CLASSES)
    assert sum(bool(r["labels"]) for r in rows_c) >= 55
    total = sum(len(r["labels"]) for r in rows_c)
    lost = sum(len(set(rc["labels"]) - set(rn["labels"])) for rc, rn in zip(rows_c, rows_n))
    assert lost == round(0.3 * total)
    again = syn.write_pretrain_synthetic(tmp_path / "again", size=60, label_noise=0.3, seed=3)
    assert again.read_bytes() == noisy.read_bytes()
    with pytest.raises(HarnessError):
        syn.write_pretrain_synthetic(tmp_path / "bad", size=5, label_noise=1.5)


def test_pretrain_images_are_object_centric():
    """Object-centric scenes (``half_range``) keep each object's centre in the middle of the image."""
    centres = []
    for i in range(40):
        scene = scenes.render_scene(np.random.default_rng(i), 64, 64, syn.VOC_CLASSES, 2, checks=False,
                                 half_range=(0.2, 0.45))
        for obj in scene.objects:
            ys, xs = np.nonzero(obj.mask)
            centres.append(((xs.min() + xs.max()) / 2 / 64, (ys.min() + ys.max()) / 2 / 64))
    centres = np.array(centres)
    assert len(centres) == 80 and (centres > 0.15).all() and (centres < 0.85).all()


def test_pretrain_labels_name_objects_at_least_40_percent_visible(tmp_path):
    manifest = syn.write_pretrain_synthetic(tmp_path / "pre", size=30, label_noise=0.0, seed=1, image_size=48)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    for i, row in enumerate(rows):
        # the same scene again: write_pretrain_synthetic draws image i from the stream (seed, "pretrain", i)
        rng = syn._rng(1, "pretrain", i)
        scene = scenes.render_scene(rng, 48, 48, syn.VOC_CLASSES, 1 if rng.random() < 0.6 else 2, checks=False,
                                 half_range=(0.2, 0.45))
        recognisable = {a.cls for a in scenes.annotate(scene) if not a.difficult}
        assert set(row["labels"]) == recognisable, row
    assert sum(bool(r["labels"]) for r in rows) >= 25


def test_the_vocabulary_is_the_devkit_classes_and_colours():
    """The synthetic VOC sets draw the devkit's 20 classes in its order, painted in its colour map
    (devkit labelcolormap.m: aeroplane (128, 0, 0), person (192, 128, 128), 255 (224, 224, 192))."""
    assert tuple(c.name for c in shapes.VOCAB) == VOC_CLASSES and syn.VOC_CLASSES is VOC_CLASSES
    cmap = voc_colormap()
    assert cmap.shape == (256, 3) and tuple(cmap[0]) == (0, 0, 0)
    assert tuple(cmap[1]) == (128, 0, 0) and tuple(cmap[15]) == (192, 128, 128) and tuple(cmap[255]) == (224, 224, 192)


def test_default_synthetic_root_is_written_once_and_checked(tmp_path):
    """`eval --synthetic` and the scaling study share one write-once root; a root from other settings is refused."""
    from harness.datasets.synthetic import DEFAULT_SIZES, MARKER, check_default_synthetic, write_synthetic_once

    root = tmp_path / "synthetic-data"
    root.mkdir()
    (root / ".complete").write_text("")  # a finished write: nothing is written again
    (root / MARKER).write_text(json.dumps({"seed": 0, "sizes": DEFAULT_SIZES}))
    assert write_synthetic_once(root) == root and sorted(p.name for p in root.iterdir()) == [".complete", MARKER]
    assert check_default_synthetic(root) == root
    (root / MARKER).write_text(json.dumps({"seed": 0, "sizes": {"coco_train": 200}}))
    with pytest.raises(HarnessError, match="generated with other settings.*use another --out"):
        check_default_synthetic(root)
