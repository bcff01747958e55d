"""COCO box and keypoint metrics against pycocotools itself, on real and random cases."""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from harness.errors import HarnessError
from harness.metrics.coco import BOX_METRICS, KEYPOINT_METRICS, coco_box_metrics, coco_keypoint_metrics


def pycocotools_stats(gt: dict, preds: list, iou_type: str) -> list[float]:
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(preds))
        ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return list(ev.stats)


def assert_equal_to_pycocotools(ours: dict, stats: list[float], names) -> None:
    assert list(ours) == list(names)
    for name, ref in zip(names, stats):
        if ref < 0:
            assert ours[name] is None, name
        else:
            assert ours[name] is not None and abs(ours[name] / 100 - ref) <= 1e-6, (name, ours[name], ref)


def random_gt(rng: np.random.Generator, n_images=30, cat_ids=(1, 3, 7, 18, 44, 90), keypoints=False) -> dict:
    images = [{"id": int(i), "width": 640, "height": 480, "file_name": f"{i:012d}.jpg"} for i in rng.choice(10**6, n_images, replace=False)]
    cats = [{"id": c, "name": f"c{c}", "supercategory": "x"} for c in cat_ids]
    if keypoints:
        cats = [{"id": 1, "name": "person", "supercategory": "person",
                 "keypoints": [f"k{i}" for i in range(17)], "skeleton": []}]
    anns = []
    for img in images:
        for _ in range(int(rng.integers(0, 8))):  # some images have no object
            w, h = float(rng.uniform(4, 300)), float(rng.uniform(4, 300))
            x, y = float(rng.uniform(0, 640 - w)), float(rng.uniform(0, 480 - h))
            ann = {"id": len(anns) + 1, "image_id": img["id"], "category_id": int(rng.choice([c["id"] for c in cats])),
                   "bbox": [x, y, w, h], "area": w * h * float(rng.uniform(0.5, 1.0)),
                   "iscrowd": int(rng.random() < 0.08)}
            if keypoints:
                kp = np.zeros((17, 3))
                kp[:, 0] = rng.uniform(x, x + w, 17)
                kp[:, 1] = rng.uniform(y, y + h, 17)
                kp[:, 2] = rng.choice([0, 1, 2], 17, p=[0.3, 0.2, 0.5])
                kp[kp[:, 2] == 0, :2] = 0
                ann["keypoints"] = kp.ravel().tolist()
                ann["num_keypoints"] = int((kp[:, 2] > 0).sum())
            anns.append(ann)
    return {"images": images, "annotations": anns, "categories": cats}


def random_preds(rng: np.random.Generator, gt: dict, keypoints=False) -> list[dict]:
    preds = []
    cat_ids = [c["id"] for c in gt["categories"]]
    for ann in gt["annotations"]:  # noisy copies of the truth, some with the wrong class
        for _ in range(int(rng.integers(0, 3))):
            x, y, w, h = ann["bbox"]
            jitter = rng.normal(0, 0.1, 4) * [w, h, w, h]
            p = {"image_id": ann["image_id"], "score": float(rng.random()),
                 "category_id": ann["category_id"] if rng.random() < 0.8 else int(rng.choice(cat_ids)),
                 "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])]}
            if keypoints:
                kp = np.array(ann["keypoints"], dtype=float).reshape(17, 3)
                kp[:, :2] += rng.normal(0, 6, (17, 2))
                kp[:, 2] = rng.random(17)
                p["keypoints"] = kp.ravel().tolist()
                del p["bbox"]
            preds.append(p)
    for img in gt["images"]:  # pure false positives
        for _ in range(int(rng.integers(0, 4))):
            w, h = float(rng.uniform(2, 200)), float(rng.uniform(2, 200))
            p = {"image_id": img["id"], "category_id": int(rng.choice(cat_ids)), "score": float(rng.random()),
                 "bbox": [float(rng.uniform(0, 500)), float(rng.uniform(0, 400)), w, h]}
            if keypoints:
                p["keypoints"] = np.column_stack([rng.uniform(0, 640, 17), rng.uniform(0, 480, 17), rng.random(17)]).ravel().tolist()
                del p["bbox"]
            preds.append(p)
    return preds


@pytest.mark.parametrize("seed", range(6))
def test_boxes_equal_pycocotools_on_random_cases(seed):
    rng = np.random.default_rng(seed)
    gt = random_gt(rng)
    preds = random_preds(rng, gt)
    assert_equal_to_pycocotools(coco_box_metrics(gt, preds), pycocotools_stats(gt, preds, "bbox"), BOX_METRICS)


@pytest.mark.parametrize("seed", range(4))
def test_keypoints_equal_pycocotools_on_random_cases(seed):
    rng = np.random.default_rng(100 + seed)
    gt = random_gt(rng, keypoints=True)
    preds = random_preds(rng, gt, keypoints=True)
    assert_equal_to_pycocotools(coco_keypoint_metrics(gt, preds), pycocotools_stats(gt, preds, "keypoints"), KEYPOINT_METRICS)


def test_boxes_equal_pycocotools_on_cocoapi_val2014_100(real):
    base = real / "faster_coco_eval/tests/dataset/cocoapi"
    gt = json.loads((base / "instances_val2014_100.json").read_text())
    preds = json.loads((base / "instances_val2014_fakebbox100_results.json").read_text())
    ours = coco_box_metrics(gt, preds)
    assert_equal_to_pycocotools(ours, pycocotools_stats(gt, preds, "bbox"), BOX_METRICS)
    # The figure cocoapi's own demo notebook prints for these files.
    assert ours["AP"] == pytest.approx(50.5, abs=0.05)


def test_keypoints_equal_pycocotools_on_real_image_139099(real):
    base = real / "faster_coco_eval/tests/keypoints_dataset"
    gt = json.loads((base / "gt_dataset.json").read_text())
    preds = json.loads((base / "dt_dataset.json").read_text())
    assert_equal_to_pycocotools(coco_keypoint_metrics(gt, preds), pycocotools_stats(gt, preds, "keypoints"), KEYPOINT_METRICS)


def test_person_boxes_equal_pycocotools_on_mmpose_detections(real):
    base = real / "mmpose/tests/data/coco"
    gt = json.loads((base / "test_coco.json").read_text())
    preds = json.loads((base / "test_coco_det_AP_H_56.json").read_text())
    ours = coco_box_metrics(gt, preds)
    assert_equal_to_pycocotools(ours, pycocotools_stats(gt, preds, "bbox"), BOX_METRICS)
    assert ours["AP"] > 50  # a real human detector on real people


def test_boxes_on_real_voc_images_in_coco_format(real):
    base = real / "review_object_detection_metrics/data/database"
    gt = json.loads((base / "gts/coco_format_v1/instances_default.json").read_text())
    # Perfect detections of the real ground truth score 100 on every defined metric.
    preds = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
             for a in gt["annotations"]]
    ours = coco_box_metrics(gt, preds)
    assert_equal_to_pycocotools(ours, pycocotools_stats(gt, preds, "bbox"), BOX_METRICS)
    assert ours["AP"] == pytest.approx(100.0)


def test_undefined_area_range_is_none_not_minus_one():
    gt = {"images": [{"id": 1, "width": 100, "height": 100}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0}],
          "categories": [{"id": 5, "name": "x"}]}
    preds = [{"image_id": 1, "category_id": 5, "bbox": [10, 10, 50, 50], "score": 0.9}]
    ours = coco_box_metrics(gt, preds)
    assert ours["AP"] == pytest.approx(100.0)
    assert ours["APs"] is None and ours["APl"] is None  # no small or large ground truth
    assert ours["APm"] == pytest.approx(100.0)


def test_empty_prediction_list_scores_zero_with_a_warning():
    gt = random_gt(np.random.default_rng(7))
    with pytest.warns(UserWarning, match="empty prediction list"):
        ours = coco_box_metrics(gt, [])
    assert ours["AP"] == 0.0 and ours["AR100"] == 0.0


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: p.__setitem__("image_id", 123456789), "image_id 123456789, which is not in the ground truth"),
        (lambda p: p.__setitem__("category_id", 2), "category_id 2, which is not in the ground truth"),
        (lambda p: p["bbox"].__setitem__(1, float("nan")), "NaN or infinite 'bbox'"),
        (lambda p: p["bbox"].__setitem__(2, -3.0), "negative-size bbox"),
        (lambda p: p.pop("score"), "has no 'score'"),
        (lambda p: p.__setitem__("bbox", [1, 2, 3]), "bbox is not [x, y, w, h]"),
        (lambda p: p.__setitem__("bbox", ["a", 2, 3, 4]), "'bbox' is not a list of numbers"),
        # numpy would read these as numbers; the evaluator then failed with a traceback (or took true as 1)
        (lambda p: p.__setitem__("bbox", ["1", "2", "3", "4"]), "'bbox' is not a list of numbers"),
        (lambda p: p.__setitem__("score", "0.5"), "'score' is not a number"),
        (lambda p: p.__setitem__("score", True), "'score' is not a number"),
        (lambda p: p.__setitem__("score", [0.5]), "'score' is not a number"),
    ],
)
def test_bad_predictions_name_the_first_offending_entry(mutate, message):
    rng = np.random.default_rng(3)
    gt = random_gt(rng)
    preds = random_preds(rng, gt)
    mutate(preds[5])
    with pytest.raises(HarnessError, match="entry 5") as err:
        coco_box_metrics(gt, preds, source="dets.json")
    assert message in str(err.value) and str(err.value).startswith("dets.json: ")


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda ps, i: ps.__setitem__(i, [1, 2, 3]), "is not an object"),
        (lambda ps, i: ps[i].pop("image_id"), "has no 'image_id'"),
        (lambda ps, i: ps[i].pop("category_id"), "has no 'category_id'"),
        (lambda ps, i: ps[i].pop("bbox"), "has no 'bbox'"),
        (lambda ps, i: ps[i].__setitem__("image_id", [1]), "names image_id [1], which is not in the ground truth"),
        (lambda ps, i: ps[i].__setitem__("image_id", str(ps[i]["image_id"])), "which is not in the ground truth"),
        (lambda ps, i: ps[i].__setitem__("bbox", {"x": 1}), "bbox is not [x, y, w, h]"),
        (lambda ps, i: ps[i].__setitem__("bbox", [1, 2, 3, 4, 5]), "bbox is not [x, y, w, h]"),
        (lambda ps, i: ps[i].__setitem__("score", float("inf")), "NaN or infinite 'score'"),
        (lambda ps, i: ps[i].__setitem__("score", "high"), "'score' is not a number"),
        (lambda ps, i: ps[i]["bbox"].__setitem__(1, False), "'bbox' is not a list of numbers"),
        (lambda ps, i: ps[i]["bbox"].__setitem__(0, float("-inf")), "NaN or infinite 'bbox'"),
        (lambda ps, i: ps[i]["bbox"].__setitem__(3, -0.5), "negative-size bbox"),
    ],
)
def test_every_bad_entry_is_named_even_when_later_entries_are_bad_too(mutate, message):
    rng = np.random.default_rng(11)
    gt = random_gt(rng)
    preds = random_preds(rng, gt)
    assert len(preds) > 40
    mutate(preds, 40)  # a later entry of the same kind must not be named instead
    mutate(preds, 7)
    with pytest.raises(HarnessError, match="entry 7 ") as err:
        coco_box_metrics(gt, preds, source="dets.json")
    line = str(err.value)
    assert "\n" not in line and line.startswith("dets.json: ") and message in line


def test_bad_keypoint_entries_are_named():
    rng = np.random.default_rng(5)
    gt = random_gt(rng, keypoints=True)
    preds = random_preds(rng, gt, keypoints=True)
    preds[3]["keypoints"] = preds[3]["keypoints"][:-3]
    with pytest.raises(HarnessError, match=r"entry 3 .*keypoints is not 51 numbers"):
        coco_keypoint_metrics(gt, preds, source="kps.json")
    preds = random_preds(np.random.default_rng(5), gt, keypoints=True)
    preds[4]["keypoints"][10] = float("nan")
    with pytest.raises(HarnessError, match=r"entry 4 .*NaN or infinite 'keypoints'"):
        coco_keypoint_metrics(gt, preds, source="kps.json")
    preds = random_preds(np.random.default_rng(5), gt, keypoints=True)
    preds[6]["keypoints"][4] = "12.5"
    with pytest.raises(HarnessError, match=r"entry 6 .*'keypoints' is not a list of numbers"):
        coco_keypoint_metrics(gt, preds, source="kps.json")


def test_scoring_in_memory_leaves_the_callers_predictions_unchanged():
    rng = np.random.default_rng(2)
    gt = random_gt(rng)
    preds = random_preds(rng, gt)
    before = copy.deepcopy(preds)
    coco_box_metrics(gt, preds)
    assert preds == before


@pytest.mark.parametrize("seed", range(2))
def test_scoring_files_equals_pycocotools_and_leaves_the_collector_on(tmp_path, seed):
    import gc

    from harness.score import score_files

    rng = np.random.default_rng(100 + seed)
    gt = random_gt(rng, n_images=60)
    preds = random_preds(rng, gt)
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "dets.json").write_text(json.dumps(preds))
    ours = score_files("coco", gt=tmp_path / "gt.json", pred=tmp_path / "dets.json")
    assert_equal_to_pycocotools(ours, pycocotools_stats(gt, preds, "bbox"), BOX_METRICS)
    assert gc.isenabled()


def test_read_json_gives_what_pythons_json_gives(tmp_path):
    from harness.datasets.coco import read_json

    cases = {
        "floats.json": json.dumps([{"score": 0.1 + 0.2, "bbox": [1e-7, 123456.789, 3, 4.5]}]),
        "nan.json": '[{"score": NaN, "x": Infinity}]',  # orjson refuses these literals; json reads them
        "bigint.json": '[{"image_id": 123456789012345678901234567890}]',  # orjson: a float
        "negint.json": '[{"image_id": -9999999999999999999, "id": 18446744073709551615}]',
        "bom.json": "\ufeff" + json.dumps({"a": [1, 2]}),
    }
    for name, text in cases.items():
        path = tmp_path / name
        path.write_bytes(text.encode())
        expected = json.loads(path.read_bytes())
        got = read_json(path)
        assert json.dumps(got) == json.dumps(expected), name
    (tmp_path / "bad.json").write_text('[{"image_id": 7,')
    with pytest.raises(HarnessError, match="bad.json: not valid JSON"):
        read_json(tmp_path / "bad.json")
