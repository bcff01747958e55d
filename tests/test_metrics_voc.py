"""VOC AP against a loop-by-loop devkit reference, on random cases and 100 real VOC images."""

from __future__ import annotations

import re

import json
import os
from pathlib import Path

import numpy as np
import pytest

from harness.datasets.voc import VOC_CLASSES, VocAnnotation, VocObject, load_voc_detection
from harness.errors import HarnessError
from harness.metrics.voc import voc_detection_metrics
from tests.support import run_cli
from tests.voc_reference import reference_voc

pytestmark = pytest.mark.filterwarnings("ignore:no non-difficult ground truth")


def to_reference(annotations, preds):
    gt_by_class: dict = {}
    for ann in annotations:
        for o in ann.objects:
            gt_by_class.setdefault(o.name, {}).setdefault(ann.image_id, []).append((o.box, o.difficult))
    dets_by_class: dict = {}
    for p in preds:
        x, y, w, h = p["bbox"]
        dets_by_class.setdefault(VOC_CLASSES[p["category_id"] - 1], []).append(
            (p["image_id"], p["score"], (x + 1, y + 1, x + w, y + h)))
    return gt_by_class, dets_by_class


def random_case(rng, n_images=40, n_classes=6):
    annotations, preds = [], []
    for i in range(n_images):
        objs = []
        for _ in range(int(rng.integers(0, 6))):
            x1, y1 = rng.integers(1, 300, 2)
            x2, y2 = x1 + rng.integers(5, 200), y1 + rng.integers(5, 200)
            objs.append(VocObject(VOC_CLASSES[int(rng.integers(n_classes))], bool(rng.random() < 0.15), (float(x1), float(y1), float(x2), float(y2))))
        annotations.append(VocAnnotation(f"2008_{i:06d}", 500, 500, tuple(objs)))
        for o in objs:  # jittered true positives, duplicates, wrong classes
            for _ in range(int(rng.integers(0, 3))):
                x1, y1, x2, y2 = np.array(o.box) + rng.normal(0, 6, 4)
                cls = VOC_CLASSES.index(o.name) + 1 if rng.random() < 0.85 else int(rng.integers(1, n_classes + 1))
                preds.append({"image_id": ann_id(i), "category_id": cls, "bbox": [x1 - 1, y1 - 1, max(0.0, x2 - x1 + 1), max(0.0, y2 - y1 + 1)], "score": float(rng.random())})
        for _ in range(int(rng.integers(0, 3))):
            preds.append({"image_id": ann_id(i), "category_id": int(rng.integers(1, n_classes + 1)),
                          "bbox": [float(v) for v in rng.uniform(0, 300, 2)] + [float(v) for v in rng.uniform(5, 150, 2)], "score": float(rng.random())})
    return annotations, preds


def ann_id(i):
    return f"2008_{i:06d}"


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("use_07", [True, False])
def test_equal_to_devkit_reference_on_random_cases(seed, use_07):
    rng = np.random.default_rng(seed)
    annotations, preds = random_case(rng)
    names = VOC_CLASSES[:6]
    ours = voc_detection_metrics(annotations, preds, use_07, VOC_CLASSES)
    ref = reference_voc(*to_reference(annotations, preds), use_07)
    for key in ("AP", "AP50", "AP75"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-9), key
    assert set(k for k, v in ours["AP50_per_class"].items() if v is not None) <= set(names)


def test_difficult_objects_neither_help_nor_hurt():
    easy = VocObject("cat", False, (10.0, 10.0, 100.0, 100.0))
    hard = VocObject("cat", True, (200.0, 200.0, 300.0, 300.0))
    anns = [VocAnnotation("a", 400, 400, (easy, hard))]
    hit_easy = {"image_id": "a", "category_id": 8, "bbox": [9.0, 9.0, 91.0, 91.0], "score": 0.9}
    hit_hard = {"image_id": "a", "category_id": 8, "bbox": [199.0, 199.0, 101.0, 101.0], "score": 0.95}
    base = voc_detection_metrics(anns, [hit_easy], True, VOC_CLASSES)
    with_hard = voc_detection_metrics(anns, [hit_easy, hit_hard], True, VOC_CLASSES)
    without_hard_gt = voc_detection_metrics([VocAnnotation("a", 400, 400, (easy,))], [hit_easy], True, VOC_CLASSES)
    assert base["AP50"] == with_hard["AP50"] == without_hard_gt["AP50"] == pytest.approx(100.0)
    assert with_hard["AP50_per_class"]["dog"] is None  # no ground truth: undefined, not 0


def test_area_and_11_point_differ_as_the_devkit_says():
    # Recall reaches 0.5 at precision 1, then 1.0 at precision 0.5 (a false positive in between).
    objs = (VocObject("dog", False, (1.0, 1.0, 50.0, 50.0)), VocObject("dog", False, (101.0, 101.0, 150.0, 150.0)))
    anns = [VocAnnotation("x", 200, 200, objs)]
    preds = [{"image_id": "x", "category_id": 12, "bbox": [0.0, 0.0, 50.0, 50.0], "score": 0.9},
             {"image_id": "x", "category_id": 12, "bbox": [60.0, 0.0, 20.0, 20.0], "score": 0.8},
             {"image_id": "x", "category_id": 12, "bbox": [100.0, 100.0, 50.0, 50.0], "score": 0.7}]
    area = voc_detection_metrics(anns, preds, False, VOC_CLASSES)["AP50"]
    eleven = voc_detection_metrics(anns, preds, True, VOC_CLASSES)["AP50"]
    assert area == pytest.approx(100 * (0.5 * 1.0 + 0.5 * 2 / 3))
    assert eleven == pytest.approx(100 * (6 * 1.0 + 5 * 2 / 3) / 11)


def real_devkit(real: Path, tmp: Path) -> Path:
    """The 100 real VOC images laid out as VOCdevkit/VOC2007 (symlinks), split 'test'."""
    base = real / "review_object_detection_metrics/data/database"
    voc = tmp / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    os.symlink(base / "gts/pascalvoc_format", voc / "Annotations")
    os.symlink(base / "images", voc / "JPEGImages")
    ids = sorted(p.stem for p in (base / "gts/pascalvoc_format").glob("*.xml"))
    (voc / "ImageSets/Main/test.txt").write_text("\n".join(ids) + "\n")
    return voc


def real_detections(real: Path) -> list[dict]:
    """The real detector outputs (class_index score x1 y1 x2 y2, XML pixel convention) in COCO results format."""
    preds = []
    for path in sorted((real / "review_object_detection_metrics/data/database/dets/abs_xyx2y2").glob("*.txt")):
        for line in path.read_text().splitlines():
            if line.strip():
                c, s, x1, y1, x2, y2 = line.split()
                x1, y1, x2, y2 = float(x1), float(y1), float(x2), float(y2)
                preds.append({"image_id": path.stem, "category_id": int(c) + 1, "score": float(s),
                              "bbox": [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1]})
    return preds


def test_real_voc_images_with_real_detections(real, tmp_path):
    voc = real_devkit(real, tmp_path)
    annotations = load_voc_detection(voc, "test")
    assert len(annotations) == 100
    assert sum(len(a.objects) for a in annotations) == 273
    assert sum(o.difficult for a in annotations for o in a.objects) == 38
    preds = real_detections(real)
    assert len(preds) == 452
    for use_07 in (True, False):
        ours = voc_detection_metrics(annotations, preds, use_07, VOC_CLASSES)
        ref = reference_voc(*to_reference(annotations, preds), use_07)
        for key in ("AP", "AP50", "AP75"):
            assert ours[key] == pytest.approx(ref[key], abs=1e-9)
    assert 20 < ours["AP50"] < 90  # a real detector: neither perfect nor broken


def test_score_cli_on_real_voc(real, tmp_path, capsys):
    voc = real_devkit(real, tmp_path)
    pred = tmp_path / "dets.json"
    pred.write_text(json.dumps(real_detections(real)))
    code, out, err = run_cli(capsys, "score", "--task", "voc", "--gt", voc, "--split", "test", "--pred", pred, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    ref = reference_voc(*to_reference(load_voc_detection(voc, "test"), real_detections(real)), True)  # VOC2007: 11-point
    assert metrics["AP50"] == pytest.approx(ref["AP50"], abs=1e-9)
    assert set(metrics["AP50_per_class"]) == set(VOC_CLASSES)


def test_prediction_for_an_image_outside_the_split_is_an_error():
    anns = [VocAnnotation("a", 10, 10, (VocObject("cat", False, (1.0, 1.0, 5.0, 5.0)),))]
    with pytest.raises(HarnessError, match="entry 0 .* names image_id 'b', which is not in the split"):
        voc_detection_metrics(anns, [{"image_id": "b", "category_id": 8, "bbox": [0, 0, 4, 4], "score": 1.0}], True, VOC_CLASSES)
    with pytest.raises(HarnessError, match="category_id 21; VOC uses 1..20"):
        voc_detection_metrics(anns, [{"image_id": "a", "category_id": 21, "bbox": [0, 0, 4, 4], "score": 1.0}], True, VOC_CLASSES)
    good = {"image_id": "a", "category_id": 8, "bbox": [0, 0, 4, 4], "score": 1.0}
    for change, message in [({"category_id": True}, "category_id True; VOC uses 1..20"),
                            ({"image_id": ["a"]}, "names image_id ['a'], which is not in the split"),
                            ({"bbox": "1234"}, "bbox that is not a list of numbers"),  # was read as [1, 2, 3, 4]
                            ({"bbox": [0, 0, "4", 4]}, "bbox that is not a list of numbers"),
                            ({"score": "0.5"}, "score that is not a number"),
                            ({"score": True}, "score that is not a number")]:
        with pytest.raises(HarnessError, match=re.escape(message)):
            voc_detection_metrics(anns, [good, {**good, **change}], True, VOC_CLASSES)
