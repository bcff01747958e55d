"""The detection kind: Faster R-CNN (FPN or C4) on COCO (`coco` layout) or PASCAL VOC (`voc_detection`).

Also home of what the keypoints kind shares with it as an R-CNN: the model settings of a profile,
box records, aspect-ratio groups and the head_norm check.

The interface of every kind module is listed in ``harness/kinds/__init__.py``. Code that needs
torch is imported inside the functions that use it: cards (and so the leaderboard) read these
modules' checks without importing torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from harness.datasets import roots
from harness.errors import HarnessError
from harness.metrics.coco import coco_box_metrics
from harness.metrics.voc import voc_detection_metrics
from harness.models import GN_GROUPS

if TYPE_CHECKING:
    from torch import nn

    from harness.cards import TaskCard

LAYOUTS = ("coco", "voc_detection")
HEADS = ("fpn", "c4")
MIN_IMAGES_PER_PROCESS = 1
MIN_IMAGES_REASON = ""
OWN_FIELDS = ("c4_pool_size", "c4_extra_norm")  # profile fields only this kind reads


# ----------------------------------------------------------------------------- card checks
def check_head_norm(card: TaskCard, widths: tuple[str, ...]) -> None:
    """head_norm gn needs an FPN head and the channel counts ``widths`` (profile fields) divisible
    by GN_GROUPS."""
    for name, p in card.profiles.items():
        if p.head_norm == "none":
            continue
        if card.model.head != "fpn":
            raise ValueError(f"profile {name}: head_norm {p.head_norm} needs an FPN head, not {card.model.head}")
        for key in widths:
            if getattr(p, key) % GN_GROUPS:
                raise ValueError(f"profile {name}: head_norm gn needs {key} divisible by {GN_GROUPS}, "
                                 f"got {getattr(p, key)}")


FPN_ONLY = ("neck_channels", "representation_size")  # profile fields that size the FPN model's neck and box head


def check_neck(card: TaskCard) -> None:
    """An FPN card sets ``neck_channels``; a C4 card sets neither it nor ``representation_size``
    (its RPN runs on c4 and its box head is res5), so no card holds a setting the model ignores."""
    for name, p in card.profiles.items():
        if card.model.head == "c4":
            if used := [f for f in FPN_ONLY if f in p.model_fields_set]:
                raise ValueError(f"profile {name}: the c4 head has no neck and its box head is res5: leave out "
                                 f"{', '.join(used)} (FPN settings)")
        elif p.neck_channels is None:
            raise ValueError(f"profile {name}: neck_channels (the FPN's width) is required")


def check_card(card: TaskCard) -> None:
    """Detection card rules beyond the schema (a ValueError names the profile and field)."""
    check_neck(card)
    check_head_norm(card, ("neck_channels",))
    for name, p in card.profiles.items():
        if p.c4_extra_norm and card.model.head != "c4":
            raise ValueError(f"profile {name}: c4_extra_norm needs the c4 head, not {card.model.head}")


# ----------------------------------------------------------------------------- data
def voc_sets(root: Path, sets) -> list[tuple[Path, str]]:
    """(VOC20xx folder, split) pairs of a card's ``sets`` under a data root."""
    devkit = Path(roots.check_data_root(root)[1]["where"]).parent
    return [(devkit / folder, split) for folder, split in sets]


def coco_datasets(card: TaskCard, root: Path, keypoints: bool) -> tuple:
    from harness.datasets.coco import CocoDetection

    spec = card.dataset
    coco = roots.require_coco(root, [spec.train.annotations, spec.train.images, spec.test.annotations, spec.test.images])
    train = CocoDetection(coco / spec.train.annotations, coco / spec.train.images, keypoints=keypoints, train=True)
    test = CocoDetection(coco / spec.test.annotations, coco / spec.test.images, keypoints=keypoints, train=False)
    # labels are positions in the sorted category list: both files must list the card's categories
    if train.category_ids != test.category_ids:
        raise HarnessError(f"{train.ann_file} and {test.ann_file} list different categories ({len(train.category_ids)} "
                           f"and {len(test.category_ids)}): a label trained as one would be scored as another")
    if len(train.category_ids) > spec.num_classes:  # fewer is a subset (the synthetic data has 10 of COCO's 80)
        raise HarnessError(f"{train.ann_file}: {len(train.category_ids)} categories, more than the {spec.num_classes} "
                           f"of the {card.name} card's model")
    return train, test, spec.train.name, spec.test.name


def datasets(card: TaskCard, root: Path) -> tuple:
    """(train, test, train split name, test split name) of the card under a data root; a missing
    dataset is a one-line error."""
    spec = card.dataset
    if spec.layout == "coco":
        return coco_datasets(card, root, keypoints=False)
    from harness.datasets.voc import VOCDetection

    for folder, _ in spec.train.sets + spec.test.sets:
        roots.require(root, folder)
    return (VOCDetection(voc_sets(root, spec.train.sets), train=True), VOCDetection(voc_sets(root, spec.test.sets)),
            spec.train.name, spec.test.name)


def aspect_groups(dataset) -> list[int] | None:
    """detectron2's aspect-ratio groups (0: landscape, 1: portrait or square) of each training image,
    from the annotations; None when the dataset does not know its image sizes."""
    import torch

    base, indices = dataset, None
    if isinstance(dataset, torch.utils.data.Subset):
        base, indices = dataset.dataset, list(dataset.indices)
    if not hasattr(base, "image_sizes"):
        return None
    sizes = base.image_sizes()
    return [0 if w > h else 1 for h, w in (sizes if indices is None else [sizes[i] for i in indices])]


def train_groups(card: TaskCard, profile_name: str, train) -> list[int] | None:
    """Aspect-ratio groups of the training images when the profile asks for them."""
    return aspect_groups(train) if card.profile(profile_name).aspect_ratio_grouping else None


# ----------------------------------------------------------------------------- model
R_CNN_SETTINGS = ("rpn_pre_nms_topk_train", "rpn_pre_nms_topk_test", "rpn_post_nms_topk_train", "rpn_smooth_l1_beta",
                  "box_smooth_l1_beta", "roi_align_aligned", "roi_align_sampling_ratio", "proposals_test")


def rcnn_settings(card: TaskCard, profile_name: str) -> dict:
    """The R-CNN builder keywords a profile sets (detection and keypoints)."""
    p = card.profile(profile_name)
    sizes = {"min_size": list(p.min_size), "max_size": p.max_size, "test_min_size": p.test_min_size}
    if card.model.head == "fpn":  # the C4 model has no neck and its box head is res5
        sizes.update(neck_channels=p.neck_channels, representation_size=p.representation_size)
    if p.anchor_sizes:
        sizes["anchor_sizes"] = list(p.anchor_sizes)
    sizes["roi_batch_per_image"] = p.roi_batch_per_image
    sizes["head_norm"] = p.head_norm
    sizes.update({k: getattr(p, k) for k in R_CNN_SETTINGS if getattr(p, k) is not None})
    return sizes


def settings(card: TaskCard, profile_name: str) -> tuple[dict, dict]:
    """Keyword arguments of ``build_model`` and of ``train_augment``; a keyword set by a card field
    has that field's name."""
    p = card.profile(profile_name)
    detector = {"num_classes": card.dataset.num_classes, "head": card.model.head, **rcnn_settings(card, profile_name)}
    if card.model.head == "c4":
        detector["c4_pool_size"] = p.c4_pool_size
        detector["c4_extra_norm"] = p.c4_extra_norm
    return detector, {"flip_prob": 0.5 if p.flip else 0.0}


def build_model(backbone: nn.Module, **kwargs) -> nn.Module:
    """Faster R-CNN on ``backbone`` (``harness.models.detection.build_detector``)."""
    from harness.models.detection import build_detector

    return build_detector(backbone, **kwargs)


def train_augment(backbone: nn.Module, **kwargs) -> Callable:
    """Horizontal flip of image and boxes (``harness.models.detection.detection_train_augment``)."""
    from harness.models.detection import detection_train_augment

    return detection_train_augment(**kwargs)


# ----------------------------------------------------------------------------- records and scores
def box_records(output: dict, image_id, category_of_label, labels: int | None = None) -> list[dict]:
    """One image's boxes in the COCO results format ([x, y, w, h], 0-based pixels). With ``labels``
    (the test file's category count, when it lists fewer than the model's classes), a box of a later
    label has no category id and no record: COCO's evaluator scores only the file's categories."""
    boxes = output["boxes"].tolist()
    records = []
    for (x1, y1, x2, y2), label, score in zip(boxes, output["labels"].tolist(), output["scores"].tolist()):
        if labels is not None and label > labels:
            continue
        records.append({"image_id": image_id, "category_id": category_of_label(int(label)),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return records


def postprocess(card: TaskCard, test) -> Callable:
    """``fn(output, target)``: one image's output as its list of box records (VOC: category_id is
    the 1-based VOC class index; COCO: the category id)."""
    if card.dataset.layout == "voc_detection":
        return lambda output, target: box_records(output, target["image_id"], int)
    labels = len(test.category_ids)
    return lambda output, target: box_records(output, target["image_id"], test.category_id, labels)


def refuse_voc_options(split, year) -> None:
    """--split and --year choose within a VOC folder; given with a COCO file they would be ignored."""
    if split is not None or year is not None:
        raise HarnessError("--split and --year are for VOC folders; a COCO annotation file is one split already")


def _scoring_year(voc_dir: Path, year: str | int | None) -> int:
    """The VOC year that picks the AP definition: the folder's name, or ``--year`` when it does not say one."""
    from harness.datasets.voc import voc_year

    if year is None:
        return voc_year(voc_dir)
    try:
        given = int(year)
    except ValueError:
        raise HarnessError(f"--year {year!r}: a VOC year such as 2007 or 2012") from None
    if not 2005 <= given <= 2012:
        raise HarnessError(f"--year {year!r}: VOC ran from 2005 to 2012")
    try:
        named = voc_year(voc_dir)
    except HarnessError:  # a folder named otherwise: --year decides
        return given
    if named != given:
        raise HarnessError(f"--year {year} contradicts the folder {voc_dir.resolve().name}; leave --year out")
    return given


def _use_07_metric(year: int) -> bool:
    return year < 2010  # VOC2007's 11-point AP; the area under the envelope from VOC2010 on


def score_records(card: TaskCard, test, records: list) -> dict:
    """Metrics (percent) of the gathered per-image records, with the code ``harness score`` uses."""
    preds = [p for r in records for p in r]
    if card.dataset.layout == "coco":
        return coco_box_metrics(test.gt, preds)
    from harness.datasets.voc import VOC_CLASSES, voc_year

    year = voc_year(card.dataset.test.sets[0][0])
    return voc_detection_metrics([ann for _, ann in test.items], preds, _use_07_metric(year), VOC_CLASSES)


def score_files(card: TaskCard, gt: str | Path, pred: str | Path, split: str | None = None,
                year: str | int | None = None) -> dict:
    """Metrics (percent) of a COCO results file against a COCO annotation file or a VOC folder."""
    from harness.datasets.coco import load_coco_gt, read_json

    if card.dataset.layout == "coco":
        refuse_voc_options(split, year)
        return coco_box_metrics(load_coco_gt(gt), read_json(pred, "prediction file"), source=str(pred), owned=True)
    from harness.datasets.voc import VOC_CLASSES, load_voc_detection

    if split is None:
        raise HarnessError(f"--split is required for --task {card.name} (e.g. test)")
    if not Path(gt).is_dir():
        raise HarnessError(f"VOC folder not found: {gt} (expected VOCdevkit/VOC20xx)")
    use_07 = _use_07_metric(_scoring_year(Path(gt), year))
    preds = read_json(pred, "prediction file")
    return voc_detection_metrics(load_voc_detection(gt, split), preds, use_07, VOC_CLASSES, source=str(pred))
