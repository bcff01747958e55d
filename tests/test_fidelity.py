"""tasks/FIDELITY.md is data: every `check` of its tables is compared with the card's `full` model
and schedule as the harness builds them (untrained), so the table and the code cannot drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.backbones import build_backbone
from harness.cards import all_cards, task_card
from harness.models.detection import FP32AnchorGenerator, FP32BoxCoder, RoIAlignV2, pad_colour
from harness.kinds import KINDS
from harness.runner import train_config

FIDELITY = Path(__file__).resolve().parents[1] / "tasks" / "FIDELITY.md"


def fidelity_checks() -> dict[str, list[tuple[str, str]]]:
    """``{card: [(key, value), ...]}`` from the check column of each card's table."""
    checks: dict[str, list[tuple[str, str]]] = {}
    card = None
    for line in FIDELITY.read_text().splitlines():
        heading = re.match(r"^## (\w+):", line)
        if heading:
            card = heading.group(1)
            checks[card] = []
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if card and len(cells) == 6 and "=" in cells[5]:
            key, value = cells[5].split("=", 1)
            checks[card].append((key.strip(), value.strip()))
    return checks


# the R-CNN cards; the seg section's checks are evaluated in tests/test_segmentation_model.py
CHECKS = {name: checks for name, checks in fidelity_checks().items() if name != "seg"}


def _pools(model: nn.Module) -> list[nn.Module]:
    from torchvision.ops import MultiScaleRoIAlign

    return [m for m in model.modules() if isinstance(m, MultiScaleRoIAlign)]


def _all_same(values: list):
    assert values and len(set(values)) == 1, f"not one value: {values}"
    return values[0]


def _proposals_fp32(model) -> bool:
    rpn = model.rpn
    return (isinstance(rpn.anchor_generator, FP32AnchorGenerator) and isinstance(rpn.box_coder, FP32BoxCoder)
            and isinstance(model.roi_heads.box_coder, FP32BoxCoder))


def _keypoint_head(model) -> str:
    convs = [m for m in model.roi_heads.keypoint_head.modules() if isinstance(m, nn.Conv2d)]
    return f"{len(convs)}x{_all_same([c.out_channels for c in convs])}"


# how each check key is read off the built model (m), its schedule (cfg) and its backbone (bb)
READERS = {
    "batch_size": lambda m, cfg, bb: cfg.batch_size,
    "iterations": lambda m, cfg, bb: cfg.iterations,
    "lr": lambda m, cfg, bb: cfg.lr,
    "steps": lambda m, cfg, bb: list(cfg.steps),
    "warmup_iters": lambda m, cfg, bb: cfg.warmup_iters,
    "weight_decay": lambda m, cfg, bb: cfg.weight_decay,
    "precision": lambda m, cfg, bb: cfg.precision,
    "precise_bn_iters": lambda m, cfg, bb: cfg.precise_bn_iters,
    "train_min_sizes": lambda m, cfg, bb: list(m.transform.train_sizes),
    "test_min_size": lambda m, cfg, bb: m.transform.min_size[0],
    "max_size": lambda m, cfg, bb: m.transform.max_size,
    "size_divisible": lambda m, cfg, bb: m.transform.size_divisible,
    "neck_channels": lambda m, cfg, bb: m.backbone.out_channels,
    "anchor_sizes": lambda m, cfg, bb: [s for sizes in m.rpn.anchor_generator.sizes for s in sizes],
    "rpn_pre_nms_topk_train": lambda m, cfg, bb: m.rpn._pre_nms_top_n["training"],
    "rpn_pre_nms_topk_test": lambda m, cfg, bb: m.rpn._pre_nms_top_n["testing"],
    "rpn_post_nms_topk_train": lambda m, cfg, bb: m.rpn._post_nms_top_n["training"],
    "rpn_post_nms_topk_test": lambda m, cfg, bb: m.rpn._post_nms_top_n["testing"],
    "rpn_nms_thresh": lambda m, cfg, bb: m.rpn.nms_thresh,
    "rpn_iou_thresholds": lambda m, cfg, bb: [m.rpn.proposal_matcher.low_threshold, m.rpn.proposal_matcher.high_threshold],
    "rpn_batch_size_per_image": lambda m, cfg, bb: m.rpn.fg_bg_sampler.batch_size_per_image,
    "rpn_smooth_l1_beta": lambda m, cfg, bb: m.rpn.smooth_l1_beta,
    "roi_batch_size_per_image": lambda m, cfg, bb: m.roi_heads.fg_bg_sampler.batch_size_per_image,
    "roi_positive_fraction": lambda m, cfg, bb: m.roi_heads.fg_bg_sampler.positive_fraction,
    "box_smooth_l1_beta": lambda m, cfg, bb: m.roi_heads.smooth_l1_beta,
    "box_reg_weights": lambda m, cfg, bb: list(m.roi_heads.box_coder.weights),
    "box_score_thresh": lambda m, cfg, bb: m.roi_heads.score_thresh,
    "box_nms_thresh": lambda m, cfg, bb: m.roi_heads.nms_thresh,
    "detections_per_image": lambda m, cfg, bb: m.roi_heads.detections_per_img,
    "box_head_fc": lambda m, cfg, bb: m.roi_heads.box_head.fc7.out_features,
    "box_pool_size": lambda m, cfg, bb: m.roi_heads.box_roi_pool.output_size[0],
    "keypoint_pool_size": lambda m, cfg, bb: m.roi_heads.keypoint_roi_pool.output_size[0],
    "keypoint_head": lambda m, cfg, bb: _keypoint_head(m),
    "num_classes": lambda m, cfg, bb: m.roi_heads.box_predictor.cls_score.out_features,
    # every RoIAlign of the model is detectron2's ROIAlignV2 with the same settings
    "roi_align_aligned": lambda m, cfg, bb: _all_same([isinstance(p, RoIAlignV2) and p.aligned for p in _pools(m)]),
    "roi_align_sampling_ratio": lambda m, cfg, bb: _all_same([p.sampling_ratio for p in _pools(m)]),
    "c4_extra_norm": lambda m, cfg, bb: isinstance(m.roi_heads.box_head.norm, nn.BatchNorm2d),
    "proposals_fp32": lambda m, cfg, bb: _proposals_fp32(m),
}


def _parse(text: str):
    if text in ("true", "false"):
        return text == "true"
    if "," in text:
        return [_parse(t) for t in text.split(",")]
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def test_the_table_has_checks_for_every_card():
    assert set(fidelity_checks()) == set(all_cards()), "every card has a section in tasks/FIDELITY.md"
    assert set(CHECKS) == {"coco", "pose", "voc", "voc_fpn"}, CHECKS.keys()
    for card, checks in CHECKS.items():
        assert len(checks) >= 8, f"{card}: only {len(checks)} checks"
        unknown = sorted({k for k, _ in checks} - set(READERS))
        assert not unknown, f"{card}: check keys without a reader: {unknown}"


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_full_model_matches_the_fidelity_table(name):
    card = task_card(name)
    torch.manual_seed(0)
    backbone = build_backbone("resnet50")
    kind = KINDS[card.model.kind]
    model_kwargs, _ = kind.settings(card, "full")
    model = kind.build_model(backbone, **model_kwargs)
    cfg = train_config(card, "full", seed=0)
    wrong = []
    for key, text in CHECKS[name]:
        expected, got = _parse(text), READERS[key](model, cfg, backbone)
        same = got == pytest.approx(expected) if isinstance(expected, (int, float)) and not isinstance(expected, bool) \
            else got == expected
        if not same:
            wrong.append(f"{key}: table {expected!r}, built {got!r}")
    assert not wrong, f"{name}: " + "; ".join(wrong)
    # padding is the backbone's mean colour, i.e. 0 after the backbone's normalization
    assert model.transform.pad_value == pytest.approx(pad_colour(backbone))
    normalized = backbone.normalize(torch.tensor(model.transform.pad_value).view(1, 3, 1, 1))
    assert normalized.abs().max() < 1e-5
