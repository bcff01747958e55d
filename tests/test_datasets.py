"""Readers of the real layouts, on the real fixtures and on `harness data synth` output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from harness.datasets.coco import CocoDetection, load_coco_gt
from harness.datasets.roots import check_data_root, require
from harness.datasets.voc import (
    VOC_CLASSES,
    VOCDetection,
    VOCSegmentation,
    load_voc_detection,
    read_label_png,
    read_sbd_mask,
    read_voc_xml,
)
from harness.errors import HarnessError, HarnessWarning
from tests.support import run_cli


def test_coco_keypoints_reader_on_real_mmpose_images(real):
    base = real / "mmpose/tests/data/coco"
    ds = CocoDetection(base / "test_coco.json", base, keypoints=True)
    assert len(ds) == 4 and ds.category_ids == [1] and len(ds.keypoint_names) == 17
    gt = load_coco_gt(base / "test_coco.json")
    image, target = ds[ds.image_ids.index(785)]
    info = next(i for i in gt["images"] if i["id"] == 785)
    assert image.shape == (3, info["height"], info["width"]) and 0 <= image.min() and image.max() <= 1
    ann = next(a for a in gt["annotations"] if a["image_id"] == 785)
    x, y, w, h = ann["bbox"]
    assert torch.allclose(target["boxes"][0], torch.tensor([x, y, x + w, y + h]))
    assert target["keypoints"].shape == (1, 17, 3)
    assert torch.equal(target["keypoints"][0].flatten(), torch.tensor(ann["keypoints"], dtype=torch.float32))
    # Training keeps the two people without a labelled keypoint as boxes (as detectron2 and
    # torchvision's references do); their keypoints are all invisible, so the keypoint loss skips them.
    train = CocoDetection(base / "test_coco.json", base, keypoints=True, train=True)
    targets = [train[i][1] for i in range(len(train))]
    assert sum(len(t["labels"]) for t in targets) == 14
    assert sum(int((t["keypoints"][..., 2] > 0).any(-1).sum()) for t in targets) == 12


def test_keypoint_training_skips_images_without_a_labelled_keypoint(tmp_path):
    """detectron2's MIN_KEYPOINTS_PER_IMAGE = 1; evaluation still scores every image."""
    from PIL import Image

    (tmp_path / "img").mkdir()
    images = []
    for i in (1, 2):
        Image.new("RGB", (40, 30)).save(tmp_path / "img" / f"{i}.jpg")
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 40, "height": 30})
    kps = [0] * 51
    labelled = list(kps)
    labelled[0:3] = [10, 12, 2]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0,
             "keypoints": kps, "num_keypoints": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [2, 2, 20, 20], "area": 400, "iscrowd": 0,
             "keypoints": labelled, "num_keypoints": 1},
            {"id": 3, "image_id": 2, "category_id": 1, "bbox": [25, 2, 10, 20], "area": 200, "iscrowd": 0,
             "keypoints": kps, "num_keypoints": 0}]
    cats = [{"id": 1, "name": "person", "supercategory": "person", "keypoints": [f"k{j}" for j in range(17)],
             "skeleton": []}]
    (tmp_path / "kp.json").write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    train = CocoDetection(tmp_path / "kp.json", tmp_path / "img", keypoints=True, train=True)
    assert train.image_ids == [2] and len(train[0][1]["boxes"]) == 2
    assert CocoDetection(tmp_path / "kp.json", tmp_path / "img", keypoints=True).image_ids == [1, 2]


def real_devkit(real, tmp_path, year="VOC2007", split="test"):
    base = real / "review_object_detection_metrics/data/database"
    voc = tmp_path / "VOCdevkit" / year
    (voc / "ImageSets/Main").mkdir(parents=True)
    os.symlink(base / "gts/pascalvoc_format", voc / "Annotations")
    os.symlink(base / "images", voc / "JPEGImages")
    ids = sorted(p.stem for p in (base / "gts/pascalvoc_format").glob("*.xml"))
    (voc / f"ImageSets/Main/{split}.txt").write_text("\n".join(ids) + "\n")
    return voc, ids


def test_voc_detection_reader_on_real_images(real, tmp_path):
    voc, ids = real_devkit(real, tmp_path)
    ann = read_voc_xml(voc / "Annotations" / "2007_000032.xml")
    assert [o.name for o in ann.objects] == ["aeroplane", "aeroplane", "person", "person"]
    ds = VOCDetection([(voc, "test")])
    assert len(ds) == 100
    image, target = ds[ds.image_ids.index("2007_000032")]
    assert image.shape[1:] == (ann.height, ann.width)
    first = ann.objects[0].box  # devkit 1-based inclusive -> 0-based continuous, as detectron2
    assert target["boxes"][0].tolist() == [first[0] - 1, first[1] - 1, first[2], first[3]]
    assert target["labels"].tolist() == [1, 1, 15, 15]
    difficult = sum(int(ds[i][1]["difficult"].sum()) for i in range(len(ds)))
    assert difficult == 38


def test_voc_07_plus_12_union(real, tmp_path):
    voc07, ids = real_devkit(real, tmp_path, "VOC2007", "trainval")
    voc12, _ = real_devkit(real, tmp_path / "b", "VOC2012", "trainval")
    both = VOCDetection([(voc07, "trainval"), (voc12, "trainval")])
    assert len(both) == 2 * len(ids)  # the same ids in different years are different images
    again = VOCDetection([(voc07, "trainval"), (voc07, "trainval")])
    assert len(again) == len(ids)  # a folder listed twice is not double-counted


def test_sbd_mat_masks_build_train_aug(tmp_path):
    voc = tmp_path / "VOCdevkit/VOC2012"
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    (voc / "JPEGImages").mkdir()
    (voc / "ImageSets/Segmentation/train.txt").write_text("a\n")
    (voc / "ImageSets/Segmentation/val.txt").write_text("v\n")
    sbd = tmp_path / "SBD/dataset"
    (sbd / "cls").mkdir(parents=True)
    (sbd / "train.txt").write_text("s\nv\n")
    (sbd / "val.txt").write_text("t\n")
    from PIL import Image
    for name in ("a", "s", "t", "v"):
        Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(voc / "JPEGImages" / f"{name}.jpg")
    Image.fromarray(np.full((6, 8), 4, np.uint8), mode="L").save(voc / "SegmentationClass/a.png")
    for name, value in (("s", 7), ("t", 9)):
        cls = np.full((6, 8), value, np.uint8)
        cls[0, 0] = 0
        savemat(sbd / "cls" / f"{name}.mat", {"GTcls": {"Segmentation": cls, "Boundaries": [], "CategoriesPresent": [value]}})
    ds = VOCSegmentation(voc, "train_aug", sbd_dir=tmp_path / "SBD")
    assert ds.image_ids == ["a", "s", "t"]  # the VOC12 val image v is excluded
    masks = {i: ds[k][1] for k, i in enumerate(ds.image_ids)}
    assert masks["a"].unique().tolist() == [4] and masks["s"].unique().tolist() == [0, 7]
    assert masks["t"].dtype == torch.int64 and masks["t"][0, 0] == 0


def test_data_check_reports_missing_datasets(tmp_path, capsys):
    rows = {r["name"]: r for r in check_data_root(tmp_path)}
    assert not any(r["present"] for r in rows.values())
    assert any("instances_train2017.json" in m for m in rows["COCO 2017"]["missing"])
    with pytest.raises(HarnessError, match=f"VOC2007 not found under {tmp_path}: missing .*Annotations"):
        require(tmp_path, "VOC2007")
    code, _, err = run_cli(capsys, "data", "check", "--root", tmp_path / "none")
    assert code == 2 and "data root not found" in err and len(err.strip().splitlines()) == 1


def test_coco_tasks_need_only_their_own_annotation_files(synthetic_root, tmp_path):
    from harness.cards import task_card
    from harness.runner import task_data

    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for name in ("train2017", "val2017"):
        (coco / name).symlink_to(synthetic_root / "coco" / name)
    for split in ("train", "val"):  # detection only: no person_keypoints_*.json
        (coco / "annotations" / f"instances_{split}2017.json").symlink_to(
            synthetic_root / "coco" / "annotations" / f"instances_{split}2017.json")
    with pytest.warns(HarnessWarning, match=r"coco: annotations/instances_val2017.json under .* has \d+ images, the "
                                             r"standard split 5000: its numbers do not compare"):
        data = task_data(task_card("coco"), tmp_path, "smoke")  # real layout, no SYNTHETIC.json, 50 images
    assert len(data.test) == len(load_coco_gt(coco / "annotations" / "instances_val2017.json")["images"])
    with pytest.raises(HarnessError, match=f"COCO 2017 not found under {tmp_path}: missing .*person_keypoints_train2017.json"):
        task_data(task_card("pose"), tmp_path, "smoke")


# ----------------------------------------------------------------------------- synthetic data root
def test_synthetic_root_is_a_complete_data_root(synthetic_root, capsys):
    rows = {r["name"]: r for r in check_data_root(synthetic_root)}
    assert all(r["present"] for r in rows.values()), rows
    assert rows["COCO 2017"]["images"]["train"] > 0 and rows["VOC2007"]["images"]["test"] > 0
    code, out, err = run_cli(capsys, "data", "check", "--root", synthetic_root, "--json")
    assert code == 0, err
    assert all(r["present"] for r in json.loads(out))


def test_coco_reader_on_synthetic(synthetic_root):
    coco = synthetic_root / "coco"
    gt = load_coco_gt(coco / "annotations/instances_val2017.json")
    ids = sorted(c["id"] for c in gt["categories"])
    assert ids != list(range(1, len(ids) + 1))  # COCO's ids are not contiguous
    val = CocoDetection(coco / "annotations/instances_val2017.json", coco / "val2017")
    assert len(val) == len(gt["images"])  # evaluation keeps images without objects
    train = CocoDetection(coco / "annotations/instances_train2017.json", coco / "train2017", train=True)
    for i in range(min(len(train), 20)):
        image, target = train[i]
        labels = target["labels"]
        assert labels.min() >= 1 and labels.max() <= len(ids) and not target["iscrowd"].any()
        b = target["boxes"]
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert (b[:, 2] <= image.shape[2] + 1e-3).all() and (b[:, 3] <= image.shape[1] + 1e-3).all()
    assert train.category_id(1) == ids[0] and train.category_id(len(ids)) == ids[-1]
    pose = CocoDetection(coco / "annotations/person_keypoints_train2017.json", coco / "train2017", keypoints=True, train=True)
    _, target = pose[0]
    assert target["keypoints"].shape[1:] == (17, 3) and (target["labels"] == 1).all()


def test_voc_readers_on_synthetic(synthetic_root):
    voc07 = synthetic_root / "VOCdevkit/VOC2007"
    anns = load_voc_detection(voc07, "test")
    assert any(o.difficult for a in anns for o in a.objects)
    assert {o.name for a in anns for o in a.objects} <= set(VOC_CLASSES)
    voc12 = synthetic_root / "VOCdevkit/VOC2012"
    val = VOCSegmentation(voc12, "val")
    aug = VOCSegmentation(voc12, "train_aug")
    assert not set(val.image_ids) & set(aug.image_ids)
    image, mask = val[0]
    assert mask.shape == image.shape[1:] and set(mask.unique().tolist()) <= set(range(21)) | {255}
    _, aug_mask = aug[0]
    assert aug_mask.max() <= 20


def coco_gt_as_predictions(gt: dict, keypoints: bool) -> list[dict]:
    field = "keypoints" if keypoints else "bbox"
    return [{"image_id": a["image_id"], "category_id": a["category_id"], field: a[field], "score": 1.0}
            for a in gt["annotations"] if not a.get("iscrowd") and (not keypoints or a.get("num_keypoints", 0) > 0)]


@pytest.mark.parametrize("task", ["coco", "pose", "voc", "seg"])
def test_scoring_ground_truth_as_predictions_on_synthetic_gives_100(synthetic_root, tmp_path, task, capsys):
    if task in ("coco", "pose"):
        name = "instances_val2017.json" if task == "coco" else "person_keypoints_val2017.json"
        gt_path = synthetic_root / "coco/annotations" / name
        preds = coco_gt_as_predictions(json.loads(gt_path.read_text()), task == "pose")
        args = ["--gt", gt_path]
    elif task == "voc":
        voc = synthetic_root / "VOCdevkit/VOC2007"
        preds = [{"image_id": a.image_id, "category_id": VOC_CLASSES.index(o.name) + 1, "score": 1.0,
                  "bbox": [o.box[0] - 1, o.box[1] - 1, o.box[2] - o.box[0] + 1, o.box[3] - o.box[1] + 1]}
                 for a in load_voc_detection(voc, "test") for o in a.objects]
        args = ["--gt", voc, "--split", "test"]
    else:
        voc = synthetic_root / "VOCdevkit/VOC2012"
        pred_dir = tmp_path / "pngs"
        pred_dir.mkdir()
        for image_id in VOCSegmentation(voc, "val").image_ids:
            mask = read_label_png(voc / "SegmentationClass" / f"{image_id}.png").copy()
            mask[mask == 255] = 0
            from PIL import Image
            Image.fromarray(mask, mode="L").save(pred_dir / f"{image_id}.png")
        args = ["--gt", voc, "--split", "val"]
    if task != "seg":
        pred_path = tmp_path / "pred.json"
        pred_path.write_text(json.dumps(preds))
        args += ["--pred", pred_path]
    else:
        args += ["--pred", pred_dir]
    code, out, err = run_cli(capsys, "score", "--task", task, *args, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    primary = {"coco": "AP", "pose": "AP", "voc": "AP50", "seg": "mIoU"}[task]
    assert metrics[primary] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- data a user gets wrong
def _coco_copy(synthetic_root, tmp_path, edit) -> Path:
    """A data root whose COCO annotation files are the synthetic ones after ``edit(name, gt)``."""
    coco = tmp_path / "coco"
    (coco / "annotations").mkdir(parents=True)
    for name in ("train2017", "val2017"):
        (coco / name).symlink_to(synthetic_root / "coco" / name)
    for path in (synthetic_root / "coco" / "annotations").glob("*.json"):
        gt = json.loads(path.read_text())
        edit(path.name, gt)
        (coco / "annotations" / path.name).write_text(json.dumps(gt))
    return tmp_path


@pytest.mark.parametrize("edit,message", [
    (lambda name, gt: name == "instances_val2017.json" and gt["categories"].append({"id": 999, "name": "extra"}),
     "list different categories"),
    (lambda name, gt: gt["categories"].extend({"id": 1000 + i, "name": f"c{i}"} for i in range(80)),
     "categories, more than the 80 of the coco card's model"),
    (lambda name, gt: gt["images"][0].pop("height"), "needs a 'file_name' and positive integer 'height' and 'width'"),
])
def test_coco_files_that_disagree_with_each_other_or_the_card_are_refused(synthetic_root, tmp_path, edit, message):
    from harness.cards import task_card
    from harness.runner import task_data

    root = _coco_copy(synthetic_root, tmp_path, edit)
    with pytest.raises(HarnessError, match=message):
        task_data(task_card("coco"), root, "smoke")


def test_keypoint_names_must_be_cocos_in_order_and_training_counts_labelled_points(synthetic_root, tmp_path):
    from harness.cards import task_card
    from harness.runner import task_data

    def swap(name, gt):  # left and right eyes swapped in the category's names
        for cat in gt["categories"]:
            if cat.get("keypoints"):
                cat["keypoints"][1:3] = cat["keypoints"][2:0:-1]
    with pytest.raises(HarnessError, match="not COCO's 17 in order"):
        task_data(task_card("pose"), _coco_copy(synthetic_root, tmp_path / "a", swap), "smoke")

    def zero_counts(name, gt):  # num_keypoints says 0, the flags label points: detectron2 counts the flags
        for ann in gt["annotations"]:
            ann["num_keypoints"] = 0
    plain = task_data(task_card("pose"), synthetic_root, "smoke")
    counted = task_data(task_card("pose"), _coco_copy(synthetic_root, tmp_path / "b", zero_counts), "smoke")
    assert counted.train.image_ids == plain.train.image_ids


def test_an_image_of_another_size_than_its_annotation_is_refused_and_exif_turns_it_upright(tmp_path):
    from PIL import Image

    from harness.datasets.images import read_image

    path = tmp_path / "a.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90 degrees
    Image.new("RGB", (40, 20), (200, 10, 10)).save(path, exif=exif)
    assert read_image(path, (40, 20)).shape == (3, 40, 20)  # (height, width) as shown
    with pytest.raises(HarnessError, match=r"a.jpg: the image is 20x40 \(width x height, upright\), its annotation says 40x20"):
        read_image(path, (20, 40))


def _voc_with(tmp_path, obj_xml: str, ids: str = "a\n") -> Path:
    voc = tmp_path / "VOC2007"
    for sub in ("Annotations", "ImageSets/Main", "JPEGImages"):
        (voc / sub).mkdir(parents=True)
    (voc / "Annotations" / "a.xml").write_text(
        f"<annotation><size><width>50</width><height>40</height></size><object>{obj_xml}</object></annotation>")
    (voc / "ImageSets/Main/test.txt").write_bytes(ids.encode("utf-8-sig"))
    return voc


@pytest.mark.parametrize("obj,message", [
    ("<name>dog</name><difficult>0</difficult><bndbox><xmin>nan</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>",
     "not finite numbers with min <= max"),
    ("<name>dog</name><difficult>0</difficult><bndbox><xmin>9</xmin><ymin>1</ymin><xmax>2</xmax><ymax>9</ymax></bndbox>",
     "not finite numbers with min <= max"),
    ("<name>dog</name><difficult>2</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>",
     "<difficult>2</difficult>; the devkit reads 0 or 1"),
])
def test_voc_boxes_and_flags_the_devkit_could_not_read_are_refused(tmp_path, obj, message):
    voc = _voc_with(tmp_path, obj)
    with pytest.raises(HarnessError, match=message):
        load_voc_detection(voc, "test")


def test_voc_training_skips_images_without_objects_and_scoring_keeps_them(tmp_path):
    voc = _voc_with(tmp_path, "<name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>",
                    ids="a\nb\n")
    (voc / "Annotations" / "b.xml").write_text("<annotation><size><width>50</width><height>40</height></size></annotation>")
    assert VOCDetection([(voc, "test")], train=True).image_ids == ["a"]
    assert VOCDetection([(voc, "test")]).image_ids == ["a", "b"]


def test_voc_split_list_with_a_byte_order_mark_or_bytes_that_are_not_text(tmp_path):
    obj = "<name>dog</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>9</xmax><ymax>9</ymax></bndbox>"
    voc = _voc_with(tmp_path, obj)  # written with a byte-order mark
    assert [a.image_id for a in load_voc_detection(voc, "test")] == ["a"]
    (voc / "ImageSets/Main/test.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(HarnessError, match="test.txt: not a text list of image ids"):
        load_voc_detection(voc, "test")


def test_segmentation_labels_that_are_no_class_are_refused_naming_the_file(synthetic_root, tmp_path):
    import shutil

    from PIL import Image

    voc = tmp_path / "VOC2012"
    shutil.copytree(synthetic_root / "VOCdevkit" / "VOC2012", voc)
    ds = VOCSegmentation(voc, "train_aug")
    path = voc / "SegmentationClassAug" / f"{ds.image_ids[0]}.png"
    mask = np.array(Image.open(path))
    mask[0, 0] = 100
    Image.fromarray(mask).save(path)
    with pytest.raises(HarnessError, match=f"{path}: label 100 is neither a class"):
        ds[0]
    mat = tmp_path / "x.mat"
    savemat(mat, {"GTcls": {"Segmentation": np.full((4, 4), 277, dtype=np.uint16)}})
    with pytest.raises(HarnessError, match=r"labels 277..277 outside 0..255"):
        read_sbd_mask(mat)


def test_a_damaged_synthetic_marker_is_one_line(synthetic_root, tmp_path, capsys):
    import shutil

    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root, symlinks=True)
    (root / "SYNTHETIC.json").write_text('{"seed": 0, ')  # cut short
    code, _, err = run_cli(capsys, "data", "check", "--root", root)
    assert code == 2 and err.splitlines() == [f"harness: error: {root / 'SYNTHETIC.json'}: not valid JSON (Expecting "
                                              "property name enclosed in double quotes: line 1 column 13 (char 12)); "
                                              "rewrite the data with `harness data synth`"]
