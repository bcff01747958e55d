"""Task models: Faster R-CNN (FPN, C4), DeepLabV3 (OS 16), Keypoint R-CNN, and their augmentations."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from harness.errors import HarnessError
from harness.models.detection import detection_train_augment
from harness.models.pose import (
    COCO_KEYPOINT_FLIP,
    build_keypoint_model,
    hflip_keypoints,
    keypoint_train_augment,
    keypoints_to_pixel_indices,
)
from harness.models.segmentation import build_segmenter, segmentation_train_augment
from tests.support import SMALL_ANCHORS, PyramidStandIn, Shapes, tiny_backbone, tiny_detector


# ----------------------------------------------------------------------------- helpers
def _batch(ds, n=2):
    items = [ds[i] for i in range(n)]
    return [im for im, _ in items], [t for _, t in items]


# ----------------------------------------------------------------------------- detection
def test_fpn_detector_reads_channels_and_follows_the_interface():
    torch.manual_seed(0)
    backbone = tiny_backbone()
    model = tiny_detector(backbone)
    assert model.backbone.body is backbone
    fpn_in = [block[0].in_channels for block in model.backbone.fpn.inner_blocks]
    assert fpn_in == [f.channels for f in backbone.feature_info] == [64, 128, 256, 512]
    assert model.backbone.out_channels == 32
    assert list(model.transform.image_mean) == [0.0] * 3 and list(model.transform.image_std) == [1.0] * 3
    assert model.roi_heads.box_predictor.cls_score.out_features == 3  # 2 classes + background

    images, targets = _batch(Shapes(2))
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        preds = model(images)
    assert len(preds) == 2 and set(preds[0]) == {"boxes", "labels", "scores"}
    boxes = preds[0]["boxes"]
    assert boxes.shape[1] == 4 and (boxes[:, 2] <= 80 + 1e-3).all() and (boxes[:, 3] <= 64 + 1e-3).all()


def test_c4_detector_runs_res5_only_as_the_box_head():
    torch.manual_seed(0)
    backbone = tiny_backbone()
    model = tiny_detector(backbone, head="c4")
    assert model.roi_heads.box_head.res5 is backbone.layer4
    assert model.rpn.head.conv[0][0].in_channels == 256  # c4 of resnet18, from feature_info
    assert model.roi_heads.box_predictor.cls_score.in_features == 512  # c5 channels
    seen = []
    hook = backbone.layer4.register_forward_hook(lambda m, i, o: seen.append((tuple(i[0].shape[-2:]), tuple(o.shape[-2:]))))
    images, targets = _batch(Shapes(2))
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    model.eval()
    with torch.no_grad():
        preds = model(images)
    hook.remove()
    assert seen == [((14, 14), (7, 7))] * 2  # never on the whole image, always 14x14 RoIs -> 7x7
    assert isinstance(backbone.layer4, nn.Sequential)  # restored after the trunk skipped it
    assert set(preds[0]) == {"boxes", "labels", "scores"}


def test_c4_needs_a_res5_stage():
    with pytest.raises(HarnessError, match="res5"):
        tiny_detector(PyramidStandIn(), head="c4")
    with pytest.raises(HarnessError, match="unknown detection head"):
        tiny_detector(head="c5")


def test_fpn_detector_on_a_non_resnet_backbone():
    model = tiny_detector(PyramidStandIn())
    images, targets = _batch(Shapes(2))
    model.train()
    assert torch.isfinite(sum(model(images, targets).values()))


def test_transform_multiscale_train_and_fixed_test_size():
    model = tiny_detector(min_size=(48, 56), max_size=200, test_min_size=64)
    image = torch.rand(3, 64, 80)
    model.eval()
    batch, _ = model.transform([image])
    assert batch.image_sizes == [(64, 80)]
    model.train()
    sizes = set()
    for _ in range(20):
        batch, _ = model.transform([image], [{"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([1])}])
        sizes.add(batch.image_sizes[0][0])
    assert sizes == {48, 56}


# ----------------------------------------------------------------------------- segmentation
def test_segmenter_dilates_res5_for_output_stride_16():
    torch.manual_seed(0)
    backbone = tiny_backbone()
    model = build_segmenter(backbone, num_classes=3, neck_channels=16)
    assert model.feature == "c5" and model.output_stride == 16
    convs = [m for m in backbone.layer4.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.stride == (1, 1) for c in convs)
    assert [b.conv1.dilation for b in backbone.layer4] == [(1, 1), (2, 2)]  # the first block keeps layer3's
    assert backbone(torch.rand(1, 3, 64, 64))["c5"].shape[-2:] == (4, 4)
    assert model.classifier.aspp[0][0].in_channels == 512  # from feature_info

    ds = Shapes(2, kind="segmentation")
    images, masks = _batch(ds)
    model.train()
    losses = model(images, masks)
    assert set(losses) == {"loss_seg"} and torch.isfinite(losses["loss_seg"])
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80), torch.rand(3, 50, 70)])
        batched = model(torch.rand(2, 3, 64, 64))
    assert [tuple(o.shape) for o in out] == [(3, 64, 80), (3, 50, 70)]
    assert tuple(batched.shape) == (2, 3, 64, 64)


def test_segmenter_uses_c4_without_a_res5_stage():
    model = build_segmenter(PyramidStandIn(), num_classes=3, neck_channels=8)
    assert model.feature == "c4" and model.output_stride == 16
    with pytest.raises(HarnessError, match="output stride 8 .* needs a ResNet"):
        build_segmenter(PyramidStandIn(), num_classes=3, output_stride=8)


# ----------------------------------------------------------------------------- keypoints
@pytest.mark.parametrize("pool", [14, 7])
def test_keypoint_model_losses_and_predictions(pool):
    torch.manual_seed(0)
    model = build_keypoint_model(
        tiny_backbone(), min_size=64, max_size=96, test_min_size=64, neck_channels=32, representation_size=64,
        keypoint_head_channels=16, keypoint_head_layers=2, anchor_sizes=SMALL_ANCHORS, keypoint_pool_size=pool,
    )
    heatmaps = []
    model.roi_heads.keypoint_predictor.register_forward_hook(lambda m, i, out: heatmaps.append(out.shape))
    images, targets = _batch(Shapes(2, kind="keypoints"))
    model.train()
    losses = model(images, targets)
    assert "loss_keypoint" in losses and all(torch.isfinite(v) for v in losses.values())
    assert heatmaps[-1][1:] == (17, 4 * pool, 4 * pool)  # RoIAlign size x 2 (deconv) x 2 (upsampling)
    model.eval()
    with torch.no_grad():
        preds = model(images)
    assert {"boxes", "labels", "scores", "keypoints"} <= set(preds[0])
    assert preds[0]["keypoints"].shape[1:] == (17, 3)
    for image, pred in zip(images, preds):  # keypoints are placed inside their box, in image pixels
        boxes, kps = pred["boxes"], pred["keypoints"]
        assert (kps[..., 0] >= boxes[:, None, 0] - 1).all() and (kps[..., 0] <= boxes[:, None, 2] + 1).all()
        assert (kps[..., 1] >= boxes[:, None, 1] - 1).all() and (kps[..., 1] <= boxes[:, None, 3] + 1).all()
        assert len(boxes) > 0 and boxes[:, 2].max() <= image.shape[-1]


def test_head_norm_gn_makes_the_neck_and_keypoint_head_scale_invariant():
    torch.manual_seed(0)
    backbone = tiny_backbone().eval()
    model = build_keypoint_model(
        backbone, min_size=64, max_size=96, test_min_size=64, neck_channels=32, representation_size=64,
        keypoint_head_channels=32, keypoint_head_layers=2, anchor_sizes=SMALL_ANCHORS, head_norm="gn",
    )
    head = model.roi_heads.keypoint_head
    assert [m.num_groups for m in model.backbone.fpn.modules() if isinstance(m, nn.GroupNorm)] == [32] * 8
    assert [m.num_groups for m in head.modules() if isinstance(m, nn.GroupNorm)] == [32] * 2
    assert all(m.bias is None for m in head.modules() if isinstance(m, nn.Conv2d))
    # what GN buys a frozen backbone: the pyramid and heatmaps ignore the scale of its features
    feats = backbone(torch.rand(1, 3, 64, 64))
    outputs = []
    for scale in (1.0, 10.0):
        pyramid = model.backbone.fpn(OrderedDict(("p" + k[1:], v * scale) for k, v in feats.items()))
        outputs.append((pyramid["p2"], head(pyramid["p2"][:, :, :8, :8])))
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    plain = tiny_detector(backbone).backbone.fpn
    low, high = (plain(OrderedDict(("p" + k[1:], v * s) for k, v in feats.items()))["p2"] for s in (1.0, 10.0))
    assert not torch.allclose(low, high, rtol=1e-2)
    images, targets = _batch(Shapes(2, kind="keypoints"))
    model.train()
    assert all(torch.isfinite(v) for v in model(images, targets).values())


@pytest.mark.parametrize("width", [{"neck_channels": 64}, {"representation_size": 256}])
def test_c4_refuses_the_fpn_widths_it_would_ignore(width):
    with pytest.raises(HarnessError, match="the C4 model has neither"):
        tiny_detector(head="c4", **width)


def test_head_norm_errors():
    with pytest.raises(HarnessError, match="head_norm must be one of none, gn"):
        tiny_detector(head_norm="bn")
    with pytest.raises(HarnessError, match="divisible by 32, got 16"):
        tiny_detector(neck_channels=16, head_norm="gn")
    with pytest.raises(HarnessError, match="C4 model has no FPN"):
        tiny_detector(head="c4", head_norm="gn")
    assert sum(isinstance(m, nn.GroupNorm) for m in tiny_detector(head_norm="gn").modules()) == 8


# ----------------------------------------------------------------------------- augmentation
def test_detection_flip_mirrors_boxes_and_drops_crowds():
    image = torch.zeros(3, 10, 20)
    target = {"boxes": torch.tensor([[2.0, 1, 6, 5], [0, 0, 3, 3], [4, 4, 4, 8]]), "labels": torch.tensor([1, 2, 1]),
              "iscrowd": torch.tensor([0, 1, 0]), "image_id": 7}
    always = detection_train_augment(flip_prob=1.0)
    img, out = always(image, target, torch.Generator().manual_seed(0))
    assert out["boxes"].tolist() == [[14.0, 1.0, 18.0, 5.0]]  # crowd and zero-width boxes dropped
    assert out["labels"].tolist() == [1] and out["image_id"] == 7
    never = detection_train_augment(flip_prob=0.0)
    _, same = never(image, target, torch.Generator().manual_seed(0))
    assert same["boxes"].tolist() == [[2.0, 1.0, 6.0, 5.0]]


def test_boxes_are_clipped_to_the_image_and_those_left_empty_dropped():
    """detectron2's mapper: a box wholly outside the image would make every anchor a positive (each
    ground-truth box keeps its best-matching anchors, and all overlap it by 0)."""
    image = torch.zeros(3, 10, 20)
    target = {"boxes": torch.tensor([[-5.0, 2, 6, 12], [30, 30, 40, 40], [3, 3, 8, 8]]), "labels": torch.tensor([1, 2, 3]),
              "iscrowd": torch.tensor([0, 0, 0])}
    _, out = detection_train_augment(flip_prob=0.0)(image, target, torch.Generator().manual_seed(0))
    assert out["boxes"].tolist() == [[0.0, 2.0, 6.0, 10.0], [3.0, 3.0, 8.0, 8.0]] and out["labels"].tolist() == [1, 3]
    assert target["boxes"][0].tolist() == [-5.0, 2.0, 6.0, 12.0]  # the dataset's own target is left alone


def test_boxes_of_labels_the_test_file_does_not_list_have_no_record():
    """A file with fewer categories than the model's classes (the synthetic data: 10 of COCO's 80): a box
    of a later label has no category id; COCO's evaluator scores only the file's categories anyway."""
    from harness.kinds.detection import box_records

    output = {"boxes": torch.tensor([[1.0, 2, 5, 6], [0, 0, 4, 4]]), "labels": torch.tensor([2, 11]),
              "scores": torch.tensor([0.9, 0.8])}
    ids = [10, 20]
    records = box_records(output, 7, lambda label: ids[label - 1], labels=2)
    assert records == [{"image_id": 7, "category_id": 20, "bbox": [1.0, 2.0, 4.0, 4.0], "score": pytest.approx(0.9)}]


def test_keypoint_flip_swaps_left_and_right():
    image = torch.zeros(3, 10, 20)
    kps = torch.zeros(1, 17, 3)
    kps[0, 1] = torch.tensor([3.0, 4.0, 2.0])  # left eye
    kps[0, 5] = torch.tensor([5.0, 6.0, 1.0])  # left shoulder
    target = {"boxes": torch.tensor([[1.0, 1, 9, 9]]), "labels": torch.tensor([1]), "keypoints": kps}
    _, out = hflip_keypoints(image, target)
    assert out["keypoints"][0, 2].tolist() == [17.0, 4.0, 2.0]  # now the right eye
    assert out["keypoints"][0, 6].tolist() == [15.0, 6.0, 1.0]
    assert out["keypoints"][0, 1].tolist() == [0.0, 0.0, 0.0]  # the invisible right eye moved left
    assert sorted(COCO_KEYPOINT_FLIP) == list(range(17))
    # the training augmentation works in detectron2's continuous coordinates (pixel index + 0.5), so a
    # flipped pixel index i lands on pixel W - 1 - i, and predictions go back by -0.5
    aug = keypoint_train_augment(flip_prob=1.0)
    _, out2 = aug(image, target, torch.Generator().manual_seed(0))
    assert out2["keypoints"][0, 2].tolist() == [16.5, 4.5, 2.0]
    assert keypoints_to_pixel_indices(out2["keypoints"])[0, 2, :2].tolist() == [20 - 1 - 3, 4.0]
    _, unflipped = keypoint_train_augment(flip_prob=0.0)(image, target, torch.Generator().manual_seed(0))
    assert unflipped["keypoints"][0, 1].tolist() == [3.5, 4.5, 2.0]
    assert unflipped["keypoints"][0, 0].tolist() == [0.0, 0.0, 0.0]  # unlabelled points stay at 0


def test_segmentation_augment_crops_pads_and_is_seeded():
    image, mask = torch.rand(3, 30, 40), torch.randint(0, 3, (30, 40))
    aug = segmentation_train_augment(crop_size=48, scale=(80, 30), ratio_range=(0.5, 0.5), flip_prob=0.0)
    img, m = aug(image, mask, torch.Generator().manual_seed(1))
    assert img.shape == (3, 48, 48) and m.shape == (48, 48)
    assert (m[15:, :] == 255).all() and (m[:, 20:] == 255).all()  # 15x20 after scaling, padded with ignore
    aug2 = segmentation_train_augment(crop_size=24)
    a = aug2(image, mask, torch.Generator().manual_seed(3))
    b = aug2(image, mask, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
