"""DeepLabV3 as mmsegmentation's deeplabv3_r50-d8_512x512_20k_voc12aug: dilation, heads, loss,
pipelines, test resize, and the seg card's schedule (tasks/FIDELITY.md, seg section)."""

from __future__ import annotations

import colorsys

import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml
from torch import nn

from harness.backbones import build_backbone
from harness.cards import cards_dir, load_card, task_card
from harness.engine import lr_factor, make_optimizer
from harness.errors import HarnessError
from harness.kinds.segmentation import settings as model_settings
from harness.models.detection import pad_colour
from harness.models.segmentation import (
    IGNORE_INDEX,
    build_segmenter,
    distort_photometric,
    random_crop_box,
    rescale_size,
    scale_saturation,
    segmentation_train_augment,
)
from harness.protocols import apply_protocol, is_norm
from harness.runner import train_config
from tests.support import PyramidStandIn, Shapes


def _snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ----------------------------------------------------------------------------- output stride 8
def test_dilated_resnet50_equals_torchvision_replace_stride_with_dilation():
    torch.manual_seed(0)
    backbone = build_backbone("resnet50")
    before = _snapshot(backbone)
    model = build_segmenter(backbone, num_classes=21, neck_channels=16, output_stride=8)
    after = _snapshot(backbone)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    ref = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
    missing, _ = ref.load_state_dict(after, strict=False)
    assert missing == ["fc.weight", "fc.bias"]  # the classifier the backbone drops
    backbone.eval(), ref.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        ours = backbone(x)
        r = ref.maxpool(ref.relu(ref.bn1(ref.conv1(backbone.normalize(x)))))
        r3 = ref.layer3(ref.layer2(ref.layer1(r)))
        r4 = ref.layer4(r3)
    assert torch.equal(ours["c4"], r3) and torch.equal(ours["c5"], r4)
    assert ours["c5"].shape[-2:] == (8, 8) and model.output_stride == 8
    # mmseg's contract_dilation: each stage's first block keeps the previous dilation
    assert [b.conv2.dilation[0] for b in backbone.layer3] == [1] + [2] * 5
    assert [b.conv2.dilation[0] for b in backbone.layer4] == [2, 4, 4]
    assert model.aux_head is None  # aux_loss_weight 0 builds none


def test_aspp_and_aux_head_on_resnet18_at_output_stride_8():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18")
    model = build_segmenter(backbone, num_classes=21, neck_channels=16, output_stride=8,
                            aspp_dilations=[1, 12, 24, 36], aux_channels=8, aux_loss_weight=0.4, dropout=0.1)
    # BasicBlocks as mmseg's: conv1 carries the dilation, conv2 stays at 1
    assert [b.conv1.dilation[0] for b in backbone.layer3] == [1, 2]
    assert [b.conv1.dilation[0] for b in backbone.layer4] == [2, 4]
    assert all(b.conv2.dilation == (1, 1) for b in (*backbone.layer3, *backbone.layer4))
    head = model.classifier
    assert model.aspp_dilations == (1, 12, 24, 36) and model.neck_channels == 16 and model.dropout == 0.1
    convs = [branch[0] for branch in head.aspp]
    assert [(c.kernel_size[0], c.dilation[0], c.padding[0]) for c in convs] == [(1, 1, 0), (3, 12, 12), (3, 24, 24), (3, 36, 36)]
    assert all(c.in_channels == 512 for c in convs)  # c5 of resnet18, from feature_info
    assert isinstance(head.image_pool[0], nn.AdaptiveAvgPool2d) and head.image_pool[1][0].kernel_size == (1, 1)
    assert head.bottleneck[0].in_channels == 5 * 16 and head.bottleneck[0].kernel_size == (3, 3)
    assert isinstance(head.dropout, nn.Dropout2d) and head.conv_seg.out_channels == 21
    assert model.aux_head.convs[0].in_channels == 256 and model.aux_head.convs[0].out_channels == 8  # c4 of resnet18
    assert model.aux_loss_weight == 0.4 and model.aux_head.dropout.p == 0.1

    shapes = {}
    head.register_forward_hook(lambda m, i, o: shapes.setdefault("aspp", []).append(tuple(o.shape)))
    model.aux_head.register_forward_hook(lambda m, i, o: shapes.setdefault("aux", []).append(tuple(o.shape)))
    images, masks = zip(*(Shapes(2, kind="segmentation")[i] for i in range(2)))
    model.train()
    losses = model(list(images), list(masks))
    assert set(losses) == {"loss_seg", "loss_aux"} and all(torch.isfinite(v) for v in losses.values())
    assert shapes == {"aspp": [(2, 21, 8, 10)], "aux": [(2, 21, 8, 10)]}  # 64x80 at stride 8
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 64, 80)])
    assert out[0].shape == (21, 64, 80)
    assert len(shapes["aspp"]) == 2 and len(shapes["aux"]) == 1  # the auxiliary head runs in training only


def test_output_stride_8_refuses_a_backbone_without_resnet_stages():
    model = build_segmenter(PyramidStandIn(), num_classes=3, neck_channels=8, output_stride=16)
    assert model.feature == "c4" and model.aspp_dilations == (1, 6, 12, 18)
    with pytest.raises(HarnessError, match="output stride 8 .* needs a ResNet with layer3/layer4"):
        build_segmenter(PyramidStandIn(), num_classes=3, output_stride=8)


def test_loss_averages_over_every_pixel_as_mmseg():
    torch.manual_seed(0)
    model = build_segmenter(build_backbone("resnet18"), num_classes=3, neck_channels=8, dropout=0.0,
                            aux_loss_weight=0.4, aux_channels=8)
    seen = {}
    model.classifier.register_forward_hook(lambda m, i, o: seen.__setitem__("main", o))
    model.aux_head.register_forward_hook(lambda m, i, o: seen.__setitem__("aux", o))
    images = [torch.rand(3, 32, 32) for _ in range(2)]
    masks = [torch.randint(0, 3, (32, 32)) for _ in range(2)]
    masks[0][:, :16] = IGNORE_INDEX  # a quarter of the batch's pixels ignored
    model.train()
    losses = model(images, masks)
    target = torch.stack(masks)
    for key, name, weight in (("loss_seg", "main", 1.0), ("loss_aux", "aux", 0.4)):
        logits = F.interpolate(seen[name], size=(32, 32), mode="bilinear", align_corners=False)
        per_pixel = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
        assert losses[key].item() == pytest.approx(weight * per_pixel.sum().item() / target.numel(), rel=1e-5)
        torch_mean = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX).item()
        assert losses[key].item() == pytest.approx(weight * 0.75 * torch_mean, rel=1e-5)


def test_frozen_output_stride_8_backbone_stays_bit_identical():
    torch.manual_seed(0)
    backbone = build_backbone("resnet18")
    model = build_segmenter(backbone, num_classes=3, neck_channels=8, output_stride=8, aux_loss_weight=0.4,
                            aux_channels=8)
    apply_protocol(model, backbone, "frozen")
    before = _snapshot(backbone)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9, weight_decay=1e-2)
    ds = Shapes(2, kind="segmentation")
    for _ in range(2):
        model.train()
        loss = sum(model([ds[0][0], ds[1][0]], [ds[0][1], ds[1][1]]).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _snapshot(backbone)
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- test resize
def test_test_resize_scale_as_mmcv_imrescale():
    assert rescale_size(375, 500, 512, 2048) == (512, 683)  # a typical VOC image: short side 512
    assert rescale_size(500, 375, 512, 2048) == (683, 512)
    assert rescale_size(100, 1000, 512, 2048) == (205, 2048)  # the long side caps it
    assert rescale_size(512, 512, 512, 2048) == (512, 512)
    torch.manual_seed(0)
    model = build_segmenter(build_backbone("resnet18"), num_classes=3, neck_channels=8, test_min_size=48, max_size=64)
    seen = []
    model.backbone.register_forward_hook(lambda m, i, o: seen.append(tuple(i[0].shape[-2:])))
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 30, 40), torch.rand(3, 20, 100)])
        batched = model(torch.rand(2, 3, 30, 40))
    assert seen == [(48, 64), (13, 64), (48, 64), (48, 64)]  # each image resized, then scored at its own size
    assert [tuple(o.shape) for o in out] == [(3, 30, 40), (3, 20, 100)] and batched.shape == (2, 3, 30, 40)


# ----------------------------------------------------------------------------- training pipeline
def test_cat_max_ratio_retries_ten_times_then_takes_an_unchecked_crop():
    one_label = torch.ones(40, 40, dtype=torch.long)
    g = torch.Generator().manual_seed(5)
    draws = [(int(torch.randint(0, 31, (), generator=g)), int(torch.randint(0, 31, (), generator=g))) for _ in range(11)]
    # never acceptable (one label): 10 checked crops, then the 11th is taken as it comes
    assert random_crop_box(one_label, 10, 0.75, torch.Generator().manual_seed(5)) == draws[10]
    # without cat_max_ratio the first draw is taken
    assert random_crop_box(one_label, 10, 1.0, torch.Generator().manual_seed(5)) == draws[0]
    # 255 does not count as a label
    ignored = one_label.clone()
    ignored[:, ::2] = IGNORE_INDEX
    assert random_crop_box(ignored, 10, 0.75, torch.Generator().manual_seed(5)) == draws[10]


def test_cat_max_ratio_prefers_crops_without_a_dominant_label():
    # columns 0..69 label 1, 70..99 label 2; a 20-wide crop passes when 56 <= left <= 64 (p = 9/81)
    mask = torch.ones(20, 100, dtype=torch.long)
    mask[:, 70:] = 2

    def passes(left: int) -> bool:
        crop = mask[:, left : left + 20]
        counts = torch.bincount(crop.flatten())[1:]
        return bool((counts > 0).sum() > 1 and counts.max() / counts.sum() < 0.75)

    assert [left for left in range(81) if passes(left)] == list(range(56, 65))
    n = 400
    plain = sum(passes(random_crop_box(mask, 20, 1.0, torch.Generator().manual_seed(s))[1]) for s in range(n)) / n
    ratio = sum(passes(random_crop_box(mask, 20, 0.75, torch.Generator().manual_seed(s))[1]) for s in range(n)) / n
    p = 9 / 81
    expected = 1 - (1 - p) ** 10 + (1 - p) ** 10 * p  # accepted within 10 tries, or the 11th passes by chance
    assert abs(plain - p) < 0.05 and abs(ratio - expected) < 0.07


def test_saturation_scales_hsv_s_as_opencv():
    torch.manual_seed(0)
    image = torch.rand(3, 4, 5)
    image[:, 0, 0] = 0.4  # grey: no saturation to scale
    for alpha in (0.5, 1.3, 3.0):
        out = scale_saturation(image, alpha)
        for y in range(4):
            for x in range(5):
                h, s, v = colorsys.rgb_to_hsv(*image[:, y, x].tolist())
                expected = colorsys.hsv_to_rgb(h, min(s * alpha, 1.0), v)
                assert out[:, y, x].tolist() == pytest.approx(list(expected), abs=1e-5)


def test_photometric_distortion_keeps_range_and_follows_the_generator():
    image = torch.rand(3, 16, 16)
    image[0] = 1.0
    outs = [distort_photometric(image, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(o.min() >= 0 and o.max() <= 1 and o.shape == image.shape for o in outs)
    assert torch.equal(outs[3], distort_photometric(image, torch.Generator().manual_seed(3)))
    changed = sum(not torch.allclose(o, image) for o in outs)
    assert changed >= 12  # each of four steps happens with probability 1/2: all skipped 1 time in 16
    assert not torch.equal(outs[0], outs[1])


def test_training_pipeline_resizes_crops_flips_and_pads_as_mmseg():
    image = torch.rand(3, 30, 40)
    mask = torch.randint(0, 3, (30, 40))
    aug = segmentation_train_augment(crop_size=48, scale=(80, 20), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                                     flip_prob=0.0, photometric_distortion=False, pad_value=(0.25, 0.5, 0.75))
    img, m = aug(image, mask, torch.Generator().manual_seed(1))
    # scale (80, 20) x 1.0 keeping the ratio: short side 20 -> 20x27 (int(26.67 + 0.5)); padded bottom/right
    assert img.shape == (3, 48, 48) and m.shape == (48, 48)
    assert (m[20:] == IGNORE_INDEX).all() and (m[:, 27:] == IGNORE_INDEX).all() and (m[:20, :27] != IGNORE_INDEX).all()
    assert torch.equal(img[:, 40, 40], torch.tensor([0.25, 0.5, 0.75]))
    assert set(m[:20, :27].unique().tolist()) <= {0, 1, 2}
    full = segmentation_train_augment(crop_size=24, scale=(2048, 512), ratio_range=(0.5, 2.0))
    a = full(image, mask, torch.Generator().manual_seed(3))
    b = full(image, mask, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[0].shape == (3, 24, 24)
    flip = segmentation_train_augment(crop_size=48, scale=(80, 30), ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                                      flip_prob=1.0, photometric_distortion=False)
    fi, fm = flip(image, mask, torch.Generator().manual_seed(1))
    assert torch.equal(fm[:30, :40], mask.flip(-1)) and torch.allclose(fi[:, :30, :40], image.flip(-1))


def test_pad_colour_is_zero_after_the_backbone_normalization():
    for norm in ("imagenet", "caffe"):
        backbone = build_backbone("resnet18", normalization=norm)
        colour = torch.tensor(pad_colour(backbone)).view(1, 3, 1, 1).expand(1, 3, 2, 2)
        assert backbone.normalize(colour).abs().max() < 1e-5


# ----------------------------------------------------------------------------- the card's schedule
def test_seg_card_schedule_poly_floor_and_weight_decay_on_norms():
    card = task_card("seg")
    cfg = train_config(card, "full", 0, None)
    assert cfg.lr == 0.01 and cfg.batch_size == 16 and cfg.warmup_iters == 0 and cfg.iterations == 20000
    assert lr_factor(cfg, 20000) * cfg.lr == pytest.approx(1e-4)  # mmseg's min_lr / eta_min
    assert lr_factor(cfg, 10000) * cfg.lr == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)
    short = train_config(card, "short", 0, None)
    assert lr_factor(short, 5000) * short.lr == pytest.approx(5e-5)  # the floor scales with the lr
    halved = train_config(card, "full", 0, 8)
    assert halved.lr == pytest.approx(0.005) and halved.poly_min_lr == pytest.approx(5e-5)

    kwargs, aug = model_settings(card, "smoke")
    model = build_segmenter(build_backbone("resnet18"), **kwargs)
    groups = make_optimizer(model, train_config(card, "smoke", 0, None)).param_groups
    norm_ids = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    assert norm_ids and all(g["weight_decay"] == 0.0005 for g in groups)  # no paramwise_cfg in mmseg
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    assert aug["scale"] == (256, 144) and aug["cat_max_ratio"] == 0.75 and aug["photometric_distortion"]
    coco = make_optimizer(model, train_config(task_card("coco"), "smoke", 0, None)).param_groups
    assert {id(p) for p in coco[1]["params"]} == norm_ids and coco[1]["weight_decay"] == 0.0  # detectron2's


def test_segmentation_fields_are_refused_on_other_cards(tmp_path):
    data = yaml.safe_load((cards_dir() / "voc.yaml").read_text())
    data["profiles"]["smoke"]["output_stride"] = 8
    path = tmp_path / "voc.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(HarnessError, match="profile smoke: output_stride apply to segmentation cards only"):
        load_card(path)


# ----------------------------------------------------------------------------- the fidelity table
def _table_checks(path) -> list[tuple[str, str, str]]:
    """(setting, key, value) of each check in the seg section of tasks/FIDELITY.md."""
    rows, inside = [], False
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            inside = line.startswith("## seg:")
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if inside and len(cells) == 6 and cells[0] not in ("setting", "---") and cells[5]:
            key, _, value = cells[5].partition("=")
            rows.append((cells[0], key.strip(), value.strip()))
    return rows


def _parse(value: str):
    if value in ("true", "false"):
        return value == "true"
    if value == "None":
        return None
    items = []
    for item in value.split(","):
        try:
            items.append(int(item))
        except ValueError:
            try:
                items.append(float(item))
            except ValueError:
                items.append(item)
    return items[0] if len(items) == 1 else tuple(items)


def _first_dilations(stage: nn.Module) -> tuple[int, ...]:
    return tuple(next(m for m in block.modules() if isinstance(m, nn.Conv2d) and m.kernel_size[0] > 1).dilation[0]
                 for block in stage)


def test_fidelity_table_matches_the_built_full_model():
    card = task_card("seg")
    model_kwargs, aug = model_settings(card, "full")
    model = build_segmenter(build_backbone("resnet50"), **model_kwargs)
    cfg = train_config(card, "full", 0, None)
    derived = {
        "layer3_dilations": _first_dilations(model.backbone.layer3),
        "layer4_dilations": _first_dilations(model.backbone.layer4),
        "aux_head": type(model.aux_head).__name__,
        "aux_in_channels": model.aux_head.convs[0].in_channels,
        "aux_channels": model.aux_head.convs[0].out_channels,
        "aspp_image_pool": isinstance(model.classifier.image_pool[0], nn.AdaptiveAvgPool2d),
    }
    checks = _table_checks(cards_dir() / "FIDELITY.md")
    assert len(checks) >= 25
    for setting, key, value in checks:
        if key in derived:
            actual = derived[key]
        elif hasattr(model, key):
            actual = getattr(model, key)
        elif hasattr(cfg, key):
            actual = getattr(cfg, key)
        else:
            assert key in aug, f"{setting}: unknown check key {key}"
            actual = aug[key]
        actual = tuple(actual) if isinstance(actual, list) else actual
        expected = _parse(value)
        assert actual == (pytest.approx(expected) if isinstance(expected, float) else expected), setting
    assert model.dropout == model.aux_head.dropout.p  # one dropout setting for both heads, as mmseg's 0.1
