"""Task kinds (harness/kinds): cards pick a kind, and the kind builds, records and scores;
`harness score` takes any task card, and user warnings print as one line."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import yaml

from harness.cards import Profile, all_cards, cards_dir, load_card, task_card
from harness.cli import main
from harness.datasets.voc import VOC_CLASSES, VOCDetection
from harness.errors import HarnessError
from harness.kinds import KINDS
from harness.metrics.voc import voc_detection_metrics
from harness.models.detection import build_detector, detection_train_augment
from harness.models.pose import build_keypoint_model, keypoint_train_augment
from harness.models.segmentation import build_segmenter, segmentation_train_augment

BUILDERS = {"detection": (build_detector, detection_train_augment),
            "keypoints": (build_keypoint_model, keypoint_train_augment),
            "segmentation": (build_segmenter, segmentation_train_augment)}


@pytest.mark.parametrize("name", sorted(all_cards()))
def test_settings_bind_to_the_builders_under_the_card_fields_names(name):
    card = task_card(name)
    builder, augment = BUILDERS[card.model.kind]
    assert set(BUILDERS) == set(KINDS)
    for profile_name, p in card.profiles.items():
        model_kw, aug_kw = KINDS[card.model.kind].settings(card, profile_name)
        inspect.signature(builder).bind(None, **model_kw)  # every keyword is a builder argument
        inspect.signature(augment).bind(**aug_kw)
        # one name in card, builder and FIDELITY.md; the C4 model has no neck and the card no width for it
        assert model_kw.get("neck_channels") == p.neck_channels and (p.neck_channels is None) == (card.model.head == "c4")
        for key, value in {**model_kw, **aug_kw}.items():
            if key in Profile.model_fields:  # a keyword named as a card field carries that field's value
                card_value = getattr(p, key)
                assert (list(value) if isinstance(value, tuple) else value) == \
                    (list(card_value) if isinstance(card_value, tuple) else card_value), (profile_name, key)


def _card_file(tmp_path, name, edit):
    data = yaml.safe_load((cards_dir() / f"{name}.yaml").read_text())
    edit(data)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["model"].update(kind="depth"), r"voc.yaml: model.kind: .*unknown task kind 'depth': expected one of "
                                                r"detection, keypoints, segmentation"),
    (lambda d: d["model"].update(head="aspp"), r"voc.yaml: model.head: .*detection has no head 'aspp': expected one of "
                                               r"fpn, c4"),
    (lambda d: d["dataset"].update(layout="voc_segmentation"), r"voc.yaml: .*dataset.layout 'voc_segmentation' is not "
                                                               r"one of the detection kind's layouts"),
    (lambda d: d["profiles"]["smoke"].update(keypoint_pool_size=7), r"voc.yaml: .*profile smoke: keypoint_pool_size apply "
                                                                    r"to keypoints cards only"),
])
def test_a_card_names_a_known_kind_with_its_heads_and_layouts(tmp_path, edit, message):
    with pytest.raises(HarnessError, match=message):
        load_card(_card_file(tmp_path, "voc", edit))


@pytest.mark.parametrize("name, message", [("voc_fpn", "profile short: c4_extra_norm needs the c4 head, not fpn"),
                                           ("pose", "profile short: c4_extra_norm apply to detection cards only"),
                                           ("seg", "profile short: c4_extra_norm apply to detection cards only")])
def test_settings_of_another_head_or_kind_are_refused(tmp_path, name, message):
    with pytest.raises(HarnessError, match=f"{name}.yaml: .*{message}"):
        load_card(_card_file(tmp_path, name, lambda d: d["profiles"]["short"].update(c4_extra_norm=True)))


# ----------------------------------------------------------------------------- a small VOC2007 test split
def _xml(objects) -> str:
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                   f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b in objects)
    return f"<annotation><size><width>100</width><height>80</height><depth>3</depth></size>{objs}</annotation>"


@pytest.fixture
def voc07(tmp_path):
    """Two cats in two images (devkit 1-based boxes); every other class has no ground truth."""
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets/Main").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    (voc / "ImageSets/Main/test.txt").write_text("000001\n000002\n")
    (voc / "Annotations/000001.xml").write_text(_xml([("cat", (11, 11, 50, 40))]))
    (voc / "Annotations/000002.xml").write_text(_xml([("cat", (21, 21, 60, 70))]))
    return voc


CAT = VOC_CLASSES.index("cat") + 1


def _output(boxes, scores):
    """A detector's output for one image: 0-based continuous [x1, y1, x2, y2]."""
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.full((len(boxes),), CAT),
            "scores": torch.tensor(scores)}


def test_detection_records_and_the_card_s_voc_year(voc07):
    """Hit, false positive, hit: AP50 differs between the 11-point (VOC2007) and the area AP, and
    the card's test set (VOC2007) decides, as `harness score` does from the folder name."""
    card = task_card("voc_fpn")
    test = VOCDetection([(voc07, "test")])
    post = KINDS["detection"].postprocess(card, test)
    records = [post(_output([[10, 10, 50, 40], [70, 50, 90, 70]], [0.9, 0.8]), {"image_id": "000001"}),
               post(_output([[20, 20, 60, 70]], [0.7]), {"image_id": "000002"})]
    assert records[0][0] == {"image_id": "000001", "category_id": CAT, "bbox": [10.0, 10.0, 40.0, 30.0], "score": pytest.approx(0.9)}
    with pytest.warns(UserWarning, match="no non-difficult ground truth for aeroplane"):
        metrics = KINDS["detection"].score_records(card, test, records)
    preds = [p for r in records for p in r]
    anns = [ann for _, ann in test.items]
    with pytest.warns(UserWarning):
        eleven, area = (voc_detection_metrics(anns, preds, use_07, VOC_CLASSES) for use_07 in (True, False))
    assert metrics["AP50"] == pytest.approx(eleven["AP50"]) == pytest.approx(100 * (6 + 5 * 2 / 3) / 11)
    assert area["AP50"] == pytest.approx(100 * (0.5 + 0.5 * 2 / 3))


def test_segmentation_records_are_confusion_matrices():
    card = task_card("seg")
    kind = KINDS["segmentation"]
    mask = torch.zeros(6, 8, dtype=torch.int64)
    mask[2:5, 3:7] = 8  # a cat
    mask[0, 0] = 255  # ignored
    logits = torch.nn.functional.one_hot(mask.clamp(max=20), 21).permute(2, 0, 1).float()
    logits[:, 5, 7] = 0
    logits[12, 5, 7] = 1.0  # one background pixel called a dog
    records = [kind.postprocess(card, None)(logits, mask)]
    metrics = kind.score_records(card, None, records)
    assert metrics["IoU_per_class"]["cat"] == 100.0
    assert metrics["IoU_per_class"]["background"] == pytest.approx(100 * 34 / 35)
    assert metrics["IoU_per_class"]["dog"] == 0.0
    assert metrics["mIoU"] == pytest.approx((100 + 100 * 34 / 35 + 0) / 3)


# ----------------------------------------------------------------------------- harness score --task <any card>
def test_score_takes_any_task_card_and_warns_in_one_line(voc07, tmp_path, capsys):
    pred = tmp_path / "dets.json"
    pred.write_text(json.dumps([{"image_id": "000001", "category_id": CAT, "bbox": [10, 10, 40, 30], "score": 0.9},
                                {"image_id": "000002", "category_id": CAT, "bbox": [20, 20, 40, 50], "score": 0.8}]))
    scores = {}
    for task in ("voc", "voc_fpn"):
        assert main(["score", "--task", task, "--gt", str(voc07), "--split", "test", "--pred", str(pred), "--json"]) == 0
        out, err = capsys.readouterr()
        scores[task] = json.loads(out)
        others = ", ".join(c for c in VOC_CLASSES if c != "cat")
        assert err == f"harness: warning: no non-difficult ground truth for {others}: left out of the mean\n"
    assert scores["voc_fpn"] == scores["voc"] and scores["voc"]["AP50"] == pytest.approx(100.0)
    assert main(["score", "--task", "imagenet", "--gt", str(voc07), "--pred", str(pred)]) == 2
    assert capsys.readouterr().err == "harness: error: unknown task 'imagenet' (cards: coco, pose, seg, voc, voc_fpn)\n"
    assert main(["score", "--task", "seg", "--gt", str(voc07), "--pred", str(pred)]) == 2
    assert "--split is required for --task seg" in capsys.readouterr().err


def test_an_empty_coco_prediction_file_warns_in_one_line(tmp_path, capsys):
    gt = {"images": [{"id": 1, "width": 10, "height": 10, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "a"}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}]}
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "p.json").write_text("[]")
    assert main(["score", "--task", "coco", "--gt", str(tmp_path / "gt.json"), "--pred", str(tmp_path / "p.json"),
                 "--json"]) == 0
    assert capsys.readouterr().err == ("harness: warning: empty prediction list: every AP and AR is 0 (None where there "
                                       "is no ground truth)\n")
