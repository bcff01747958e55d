"""mIoU / aAcc / mAcc from the confusion matrix, against plain per-class counting, on random and real masks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from harness.datasets.voc import read_label_png, voc_colormap
from harness.errors import HarnessError
from harness.metrics.segmentation import confusion_matrix, segmentation_metrics
from tests.support import run_cli


def reference(gts, preds, k, ignore=255):
    """Per-class intersection and union counted directly from boolean masks."""
    inter, union, gt_px, correct, total = np.zeros(k), np.zeros(k), np.zeros(k), 0, 0
    for g, p in zip(gts, preds):
        valid = g != ignore
        for c in range(k):
            gc, pc = (g == c) & valid, (p == c) & valid
            inter[c] += np.logical_and(gc, pc).sum()
            union[c] += np.logical_or(gc, pc).sum()
            gt_px[c] += gc.sum()
        correct += ((g == p) & valid).sum()
        total += valid.sum()
    present = union > 0
    return {"mIoU": 100 * np.mean(inter[present] / union[present]), "aAcc": 100 * correct / total,
            "mAcc": 100 * np.mean(inter[gt_px > 0] / gt_px[gt_px > 0]), "iou": inter / np.maximum(union, 1), "present": present}


@pytest.mark.parametrize("seed", range(5))
def test_equal_to_per_class_counting_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    k = 21
    used = rng.choice(k, 8, replace=False)  # most classes absent: the mean must skip them
    gts, preds = [], []
    for _ in range(4):
        g = rng.choice(used, (37, 53)).astype(np.uint8)
        g[rng.random(g.shape) < 0.1] = 255
        p = np.where(rng.random(g.shape) < 0.6, g, rng.choice(used, g.shape)).astype(np.uint8)
        p[p == 255] = 0
        gts.append(g)
        preds.append(p)
    cm = sum(confusion_matrix(g, p, k) for g, p in zip(gts, preds))
    ours = segmentation_metrics(cm)
    ref = reference(gts, preds, k)
    for key in ("mIoU", "aAcc", "mAcc"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-9)
    for c in range(k):
        value = ours["IoU_per_class"][str(c)]
        assert (value is None) == (not ref["present"][c])
        if value is not None:
            assert value == pytest.approx(100 * ref["iou"][c])


def test_class_predicted_but_absent_from_ground_truth_counts_in_miou():
    g = np.zeros((4, 4), np.uint8)
    p = g.copy()
    p[0, 0] = 3
    ours = segmentation_metrics(confusion_matrix(g, p, 21))
    assert ours["IoU_per_class"]["3"] == 0.0
    assert ours["mIoU"] == pytest.approx(100 * (15 / 16 + 0) / 2)


def test_real_voc_masks_with_real_predictions(real):
    base = real / "deeplabv3plus_pytorch/samples"
    gts, preds = [], []
    for i in (1, 23, 114):
        g, p = read_label_png(base / f"{i}_target.png"), read_label_png(base / f"{i}_pred.png")
        assert g.shape == p.shape == (513, 513)
        gts.append(g)
        preds.append(p)
    assert set(np.unique(gts[0])) <= {0, 1, 255} and set(np.unique(gts[1])) <= {0, 17, 255}
    assert (gts[0] == 255).any()  # the VOC boundary band decodes to ignore
    ours = segmentation_metrics(sum(confusion_matrix(g, p, 21) for g, p in zip(gts, preds)))
    ref = reference(gts, preds, 21)
    assert ours["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-9)
    assert ours["aAcc"] == pytest.approx(ref["aAcc"], abs=1e-9)
    assert ours["mIoU"] > 60  # a trained DeepLab on its own samples


def test_palette_png_round_trip(tmp_path):
    mask = np.random.default_rng(0).integers(0, 21, (20, 30)).astype(np.uint8)
    mask[0] = 255
    im = Image.fromarray(mask, mode="P")
    im.putpalette(voc_colormap().ravel().tolist())
    im.save(tmp_path / "m.png")
    assert np.array_equal(read_label_png(tmp_path / "m.png"), mask)
    Image.fromarray(voc_colormap()[mask]).save(tmp_path / "rgb.png")  # the same mask drawn in colours
    assert np.array_equal(read_label_png(tmp_path / "rgb.png"), mask)


def test_bad_masks_are_errors(tmp_path):
    with pytest.raises(HarnessError, match="shape"):
        confusion_matrix(np.zeros((4, 4)), np.zeros((4, 5)), 21)
    with pytest.raises(HarnessError, match="prediction holds class 30"):
        confusion_matrix(np.zeros((4, 4)), np.full((4, 4), 30), 21)
    Image.fromarray(np.full((4, 4, 3), (1, 2, 3), np.uint8)).save(tmp_path / "odd.png")
    with pytest.raises(HarnessError, match=r"colour \(1, 2, 3\) is not in the VOC colour map"):
        read_label_png(tmp_path / "odd.png")


def write_seg_devkit(tmp_path, real):
    """The three real masks as VOCdevkit/VOC2012 SegmentationClass palette PNGs, split 'val'."""
    voc = tmp_path / "VOC2012"
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "SegmentationClass").mkdir()
    pred_dir = tmp_path / "preds"
    pred_dir.mkdir()
    base = real / "deeplabv3plus_pytorch/samples"
    for i in (1, 23, 114):
        im = Image.fromarray(read_label_png(base / f"{i}_target.png"), mode="P")
        im.putpalette(voc_colormap().ravel().tolist())
        im.save(voc / "SegmentationClass" / f"s{i}.png")
        Image.fromarray(read_label_png(base / f"{i}_pred.png"), mode="L").save(pred_dir / f"s{i}.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("s1\ns23\ns114\n")
    return voc, pred_dir


def test_score_cli_segmentation(real, tmp_path, capsys):
    voc, pred_dir = write_seg_devkit(tmp_path, real)
    cmd = ["score", "--task", "seg", "--gt", voc, "--split", "val", "--pred", pred_dir]
    code, out, err = run_cli(capsys, *cmd, "--json")
    assert code == 0, err
    metrics = json.loads(out)
    base = real / "deeplabv3plus_pytorch/samples"
    ref = reference([read_label_png(base / f"{i}_target.png") for i in (1, 23, 114)],
                    [read_label_png(base / f"{i}_pred.png") for i in (1, 23, 114)], 21)
    assert metrics["mIoU"] == pytest.approx(ref["mIoU"], abs=1e-9)
    assert metrics["IoU_per_class"]["sheep"] is not None and metrics["IoU_per_class"]["cat"] is None
    (pred_dir / "s23.png").unlink()
    code, _, err = run_cli(capsys, *cmd)
    assert code == 2
    assert err.strip().count("\n") == 0 and "no prediction for image s23" in err
    # a prediction for an image outside the split is an error, as for detections (it was left out silently)
    (pred_dir / "s23.png").write_bytes((pred_dir / "s1.png").read_bytes())
    (pred_dir / "2007_999999.png").write_bytes((pred_dir / "s1.png").read_bytes())
    code, _, err = run_cli(capsys, *cmd)
    assert code == 2 and "1 prediction(s) for images not in the val split (e.g. 2007_999999.png)" in err
    (pred_dir / "2007_999999.png").unlink()
    (voc / "ImageSets/Segmentation/val.txt").write_text("s1\ns23\ns114\ns23\n")  # s23 would count twice
    code, _, err = run_cli(capsys, *cmd)
    assert code == 2 and "val.txt: lists image s23 more than once" in err
