"""Protocols: frozen leaves every backbone tensor bit-identical; finetune trains all of it;
SyncBatchNorm only where it can run (world size > 1 on CUDA)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.errors import HarnessError
from harness.models.segmentation import build_segmenter
from harness.protocols import apply_protocol, convert_sync_batchnorm
from tests.support import Shapes, tiny_backbone, tiny_detector


def _snapshot(module: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _train_steps(model: nn.Module, steps: int = 2) -> None:
    """A few plain SGD steps (weight decay on) with ``model.train()`` called every step."""
    ds = Shapes(4)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2)
    for step in range(steps):
        model.train()
        images, targets = zip(*(ds[(2 * step + i) % len(ds)] for i in range(2)))
        loss = sum(model(list(images), list(targets)).values())
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("head", ["fpn", "c4"])
def test_frozen_backbone_is_bit_identical_after_training(head):
    torch.manual_seed(0)
    backbone = tiny_backbone()
    model = tiny_detector(backbone, head=head)
    info = apply_protocol(model, backbone, "frozen", world_size=1)
    assert info.trainable_backbone_parameters == 0 and info.trainable_parameters > 0
    assert not any(p.requires_grad for p in backbone.parameters())
    before_backbone, before_model = _snapshot(backbone), _snapshot(model)
    _train_steps(model)
    assert _same(before_backbone, _snapshot(backbone))  # weights, running stats, num_batches_tracked
    after = _snapshot(model)
    changed = [k for k in after if not torch.equal(before_model[k], after[k])]
    assert changed and all(not k.startswith("backbone.body.") and ".res5." not in k for k in changed)
    # model.train() is overridden by the pre-hooks as soon as a module runs
    model.train()
    assert backbone.training is True
    model.eval()
    with torch.no_grad():
        model([torch.rand(3, 64, 64)])
    model.train()
    model(*[[x] for x in Shapes(1)[0]])
    assert not any(m.training for m in backbone.modules())


@pytest.mark.slow
def test_frozen_keypoint_model_with_group_norm_through_the_engine(tmp_path):
    """The real path: a GN keypoint model trained by ``engine.train`` (weight decay, clipping, a
    checkpoint) leaves the frozen backbone bit-identical while the FPN's GroupNorm learns."""
    from harness.engine import TrainConfig, train
    from harness.models.pose import build_keypoint_model, keypoint_train_augment
    from tests.support import SMALL_ANCHORS

    torch.manual_seed(0)
    backbone = tiny_backbone()
    model = build_keypoint_model(backbone, min_size=64, max_size=96, test_min_size=64, neck_channels=32,
                                 representation_size=64, keypoint_head_channels=32, keypoint_head_layers=2,
                                 anchor_sizes=SMALL_ANCHORS, head_norm="gn")
    apply_protocol(model, backbone, "frozen", world_size=1)
    before_backbone, before_model = _snapshot(backbone), _snapshot(model)
    cfg = TrainConfig(iterations=3, batch_size=2, lr=0.05, warmup_iters=1, clip_grad_norm=10.0, checkpoint_period=2)
    train(model, Shapes(4, kind="keypoints"), cfg, tmp_path, augment=keypoint_train_augment(), progress=False)
    assert _same(before_backbone, _snapshot(backbone))
    after = _snapshot(model)
    gn = [k for k, m in model.named_modules() if isinstance(m, nn.GroupNorm)]
    assert gn and all(not torch.equal(before_model[f"{k}.weight"], after[f"{k}.weight"]) for k in gn)


def test_finetune_trains_every_backbone_tensor():
    torch.manual_seed(0)
    backbone = tiny_backbone()
    for p in backbone.layer1.parameters():  # a backbone handed over partly frozen trains fully
        p.requires_grad_(False)
    model = tiny_detector(backbone)
    info = apply_protocol(model, backbone, "finetune", world_size=1)
    assert info.trainable_backbone_parameters == info.backbone_parameters
    assert "BatchNorm2d" in info.norm
    before = _snapshot(backbone)
    _train_steps(model)
    after = _snapshot(backbone)
    assert not torch.equal(before["conv1.weight"], after["conv1.weight"])
    assert not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    assert not torch.equal(before["bn1.running_mean"], after["bn1.running_mean"])
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"])


def test_frozen_then_finetune_undoes_the_hooks():
    backbone = tiny_backbone()
    model = tiny_detector(backbone)
    apply_protocol(model, backbone, "frozen")
    apply_protocol(model, backbone, "finetune")
    model.train()
    model(*[[x] for x in Shapes(1)[0]])
    assert all(m.training for m in backbone.modules())
    assert all(p.requires_grad for p in backbone.parameters())


def test_syncbn_only_on_cuda_with_several_processes():
    backbone = tiny_backbone()
    model = tiny_detector(backbone, head="c4")
    info = apply_protocol(model, backbone, "finetune", world_size=2, device="cpu")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert "per process" in info.norm
    # the conversion itself needs no GPU: check it as it would happen on CUDA
    info = apply_protocol(model, backbone, "finetune", world_size=2, device="cuda")
    assert "SyncBatchNorm" in info.norm
    assert not any(isinstance(m, nn.BatchNorm2d) and not isinstance(m, nn.SyncBatchNorm) for m in model.modules())
    assert model.backbone.body is backbone and model.roi_heads.box_head.res5 is backbone.layer4
    assert isinstance(backbone.layer4[0].bn1, nn.SyncBatchNorm)


def test_frozen_with_sync_heads_keeps_backbone_batchnorm():
    backbone = tiny_backbone()
    model = build_segmenter(backbone, num_classes=3, neck_channels=8)
    apply_protocol(model, backbone, "frozen", world_size=2, device="cuda")
    assert not any(isinstance(m, nn.SyncBatchNorm) for m in backbone.modules())
    assert any(isinstance(m, nn.SyncBatchNorm) for m in model.classifier.modules())


def test_convert_sync_batchnorm_keeps_statistics():
    bn = nn.BatchNorm2d(4)
    bn.running_mean.fill_(3.0)
    net = nn.Sequential(nn.Conv2d(3, 4, 1), bn)
    assert convert_sync_batchnorm(net) == 1
    assert isinstance(net[1], nn.SyncBatchNorm) and torch.equal(net[1].running_mean, torch.full((4,), 3.0))


def test_bad_protocol_and_foreign_backbone():
    backbone = tiny_backbone()
    model = tiny_detector(backbone)
    with pytest.raises(HarnessError, match="unknown protocol"):
        apply_protocol(model, backbone, "linear")
    with pytest.raises(ValueError, match="not a submodule"):
        apply_protocol(model, tiny_backbone(), "frozen")


def test_frozen_vit_keeps_its_new_feature_pyramid_trainable():
    """A ViT's simple feature pyramid is newly initialised neck, not pretrained weights: it trains
    under frozen, while every trunk parameter is frozen and the trunk runs in eval mode."""
    from harness.backbones import build_backbone
    from harness.protocols import apply_protocol

    backbone = build_backbone("vit_small_patch16_224", img_size=64)
    model = torch.nn.Sequential(backbone, torch.nn.Linear(1, 1))
    apply_protocol(model, backbone, "frozen")
    new = set(backbone.new_parameter_names())
    assert new and all(n.startswith("pyramid.") for n in new)
    for name, p in backbone.named_parameters():
        assert p.requires_grad == (name in new), name
    model.train()
    backbone(torch.rand(1, 3, 64, 64))
    assert not any(m.training for m in backbone.vit.modules())
