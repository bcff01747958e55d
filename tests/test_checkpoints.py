"""Checkpoint import: every layout loads exactly, nothing runs from a file, every tensor is accounted for."""

from __future__ import annotations

import argparse
import builtins
import json
import pickle
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from harness.normalization import CAFFE, IMAGENET
from harness.checkpoints import (d2_to_tv, export_backbone, format_inspection, inspect_checkpoint, load_backbone,
                                 read_checkpoint, save_backbone, tv_to_d2)
from harness.checkpoints.formats import LAYOUTS as RECORDS
from harness.checkpoints.formats import Probe, detect
from harness.errors import HarnessError
from tests.support import run_cli

REPO = Path(__file__).resolve().parents[1]
SIZE = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Inputs here are tiny: one thread is as fast, and immune to oversubscribed shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- reference network
def _random_resnet(arch: str = "resnet50", seed: int = 0) -> torch.nn.Module:
    """torchvision ResNet with random weights and non-trivial BatchNorm statistics."""
    torch.manual_seed(seed)
    net = torchvision.models.get_model(arch, weights=None)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                m.num_batches_tracked.fill_(1234)
    return net.eval()


def _tv_layer4(net, x_norm: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        h = net.maxpool(net.relu(net.bn1(net.conv1(x_norm))))
        return net.layer4(net.layer3(net.layer2(net.layer1(h))))


def _imagenet(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET.mean).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET.std).view(1, 3, 1, 1)
    return (x * 255.0 - mean) / std


@pytest.fixture(scope="module")
def r50():
    """(state dict, images, torchvision layer4 output) of a random ResNet-50."""
    net = _random_resnet("resnet50", seed=0)
    x = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))
    return net.state_dict(), x, _tv_layer4(net, _imagenet(x))


@pytest.fixture()
def r50_net(r50):
    """A fresh torchvision ResNet-50 holding the reference weights (tests may modify it): built on the
    meta device, as every tensor is then assigned a copy of the reference one."""
    with torch.device("meta"):
        net = torchvision.models.resnet50()
    net.load_state_dict({k: v.clone() for k, v in r50[0].items()}, assign=True)
    return net.eval()


@pytest.fixture(scope="module")
def r50_file(r50, tmp_path_factory):
    """The random ResNet-50 saved as a plain torchvision state dict."""
    path = tmp_path_factory.mktemp("r50") / "r50.pth"
    torch.save(r50[0], path)
    return path


@pytest.fixture(scope="module")
def other_sd():
    """A second, different ResNet-50 state dict (momentum encoders, students, non-EMA weights)."""
    return _random_resnet("resnet50", seed=100).state_dict()


def _c5(bb, x):
    with torch.no_grad():
        return bb(x)["c5"]


def _prefixed(sd, prefix):
    return OrderedDict((prefix + k, v) for k, v in sd.items())


def _trunk(sd):
    return OrderedDict((k, v) for k, v in sd.items() if not k.startswith("fc."))


def _mlp(prefix, dims=(2048, 64, 32)):
    """A projection/prediction MLP's tensors under ``prefix`` (Linear-BN-ReLU-Linear)."""
    return OrderedDict([
        (f"{prefix}0.weight", torch.randn(dims[1], dims[0])), (f"{prefix}0.bias", torch.randn(dims[1])),
        (f"{prefix}1.weight", torch.ones(dims[1])), (f"{prefix}1.bias", torch.zeros(dims[1])),
        (f"{prefix}1.running_mean", torch.zeros(dims[1])), (f"{prefix}1.running_var", torch.ones(dims[1])),
        (f"{prefix}3.weight", torch.randn(dims[2], dims[1])),
    ])


# ----------------------------------------------------------------------------- one writer per layout
def _w_torchvision(p, sd, o):
    torch.save(sd, p)


def _w_legacy(p, sd, o):
    torch.save(sd, p, _use_new_zipfile_serialization=False)


def _w_state_dict(p, sd, o):
    torch.save({"state_dict": sd, "epoch": 5}, p)


def _w_model(p, sd, o):
    torch.save({"model": sd, "epoch": 5}, p)


def _w_timm_ema(p, sd, o):
    torch.save({"arch": "resnet50", "state_dict": o, "state_dict_ema": sd, "optimizer": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(model="resnet50", lr=0.1), "epoch": 3}, p)


def _w_ddp(p, sd, o):
    torch.save(_prefixed(sd, "module."), p)


def _w_compiled(p, sd, o):
    torch.save(_prefixed(sd, "_orig_mod."), p)


def _w_moco_v2(p, sd, o):
    state = _prefixed(_trunk(sd), "module.encoder_q.")
    state.update(_prefixed(_mlp("fc."), "module.encoder_q."))
    state.update(_prefixed(_trunk(o), "module.encoder_k."))
    state.update(_prefixed(_mlp("fc."), "module.encoder_k."))
    state["module.queue"] = torch.randn(128, 4096)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    optimizer = {"state": {0: {"momentum_buffer": torch.zeros(4)}}, "param_groups": [{"lr": 0.03, "params": [0]}]}
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": optimizer}, p)


def _w_moco_v3(p, sd, o):
    state = _prefixed(_trunk(sd), "module.base_encoder.")
    state.update(_prefixed(_mlp("fc."), "module.base_encoder."))
    state.update(_prefixed(_trunk(o), "module.momentum_encoder."))
    state.update(_prefixed(_mlp("fc."), "module.momentum_encoder."))
    state.update(_mlp("module.predictor.", (32, 64, 32)))
    torch.save({"epoch": 100, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}, "param_groups": []},
                "scaler": {"scale": 65536.0}}, p)


def _w_dino(p, sd, o):
    teacher = _prefixed(_trunk(sd), "backbone.")
    teacher.update({"head.mlp.0.weight": torch.randn(64, 2048), "head.last_layer.weight_g": torch.ones(128, 1)})
    student = _prefixed(_trunk(o), "module.backbone.")
    student.update({"module.head.mlp.0.weight": torch.randn(64, 2048)})
    torch.save({"student": student, "teacher": teacher, "optimizer": {"state": {}, "param_groups": []}, "epoch": 100,
                "args": argparse.Namespace(arch="resnet50", patch_size=16, out_dim=65536, output_dir=Path("/tmp/dino")),
                "dino_loss": {"center": torch.zeros(1, 128)}}, p)


def _w_byol(p, sd, o):
    state = _prefixed(sd, "online_encoder.net.")  # lucidrains byol-pytorch: NetWrapper(net) keeps the resnet's fc
    state.update(_mlp("online_encoder.projector.net."))
    state.update(_prefixed(o, "target_encoder.net."))
    state.update(_mlp("target_encoder.projector.net."))
    state.update(_mlp("online_predictor.net.", (32, 64, 32)))
    torch.save(state, p)


def _w_simclr(p, sd, o):
    state = _prefixed(_trunk(sd), "encoder.")
    state.update({"projector.0.weight": torch.randn(64, 2048), "projector.2.weight": torch.randn(32, 64)})
    torch.save(state, p)


def _w_mmpretrain(p, sd, o):
    state = _prefixed(_trunk(sd), "backbone.")
    state.update({"neck.mlp.0.weight": torch.randn(64, 2048), "head.fc.weight": torch.randn(10, 2048)})
    torch.save({"meta": {"mmengine_version": "0.10.3", "epoch": 200, "dataset_meta": {"classes": ["a"]}},
                "state_dict": state}, p)


def _w_lightning(p, sd, o):
    state = _prefixed(sd, "model.")
    state.update({"criterion.weight": torch.ones(3)})
    torch.save({"epoch": 9, "global_step": 1000, "pytorch-lightning_version": "2.2.1", "state_dict": state,
                "loops": {"fit_loop": {"epoch_progress": {"total": {"ready": 10}}}}, "callbacks": {},
                "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}], "lr_schedulers": [],
                "hparams_name": "kwargs", "hyper_parameters": {"arch": "resnet50", "lr": 0.1}}, p)


def _moco_detectron2(sd):
    """Exactly what MoCo's convert-pretrain-to-detectron2.py does to an encoder_q state dict."""
    new = {}
    for k, v in sd.items():
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        new[k] = v.numpy()
    return new


def _w_detectron2_pkl(p, sd, o):
    with open(p, "wb") as f:
        pickle.dump({"model": _moco_detectron2(sd), "__author__": "MOCO", "matching_heuristics": True}, f)


def _w_detectron2_model(p, sd, o):
    state = {"backbone.bottom_up." + k: torch.from_numpy(v) for k, v in _moco_detectron2(_trunk(sd)).items()}
    state.update({"backbone.fpn_lateral2.weight": torch.randn(8, 256, 1, 1), "roi_heads.box_predictor.cls_score.weight":
                  torch.randn(81, 8), "proposal_generator.rpn_head.conv.weight": torch.randn(8, 8, 3, 3)})
    torch.save({"model": state, "iteration": 90000}, p)


def _w_safetensors(p, sd, o):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(p), metadata={"format": "pt"})


def _w_tv_detection(p, sd, o):
    det = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    body = {k: v for k, v in _trunk(sd).items() if not k.endswith("num_batches_tracked")}
    det.backbone.body.load_state_dict(body)
    torch.save(det.state_dict(), p)


def _w_harness(p, sd, o):
    bb = load_backbone(_save_tmp(p, sd), arch="resnet50")
    save_backbone(bb, p)


def _save_tmp(p, sd):
    tmp = Path(str(p) + ".src.pth")
    torch.save(sd, tmp)
    return tmp


LAYOUTS = [
    # (writer, file name, arch given?, expected layout, ignored prefixes that must be listed)
    (_w_torchvision, "tv.pth", True, "torchvision", ["fc."]),
    (_w_legacy, "legacy.pth", True, "torchvision", ["fc."]),
    (_w_state_dict, "sd.pth", True, "state_dict-wrapper", ["fc."]),
    (_w_model, "model.pth", True, "model-wrapper", ["fc."]),
    (_w_timm_ema, "ema.pth.tar", False, "timm-ema", ["[state_dict]"]),
    (_w_ddp, "ddp.pth", True, "torchvision+module.", ["fc."]),
    (_w_compiled, "compiled.pth", True, "torchvision+_orig_mod.", ["fc."]),
    (_w_moco_v2, "moco_v2.pth.tar", False, "moco-v1/v2",
     ["encoder_k.", "queue", "queue_ptr", "encoder_q.fc.", "[optimizer]"]),
    (_w_moco_v3, "moco_v3.pth.tar", False, "moco-v3", ["momentum_encoder.", "predictor.", "base_encoder.fc."]),
    (_w_dino, "dino.pth", False, "dino", ["head.", "[student]", "[dino_loss]"]),
    (_w_byol, "byol.pt", True, "byol/simclr",
     ["target_encoder.", "online_predictor.", "online_encoder.projector.", "online_encoder.net.fc."]),
    (_w_simclr, "simclr.pt", True, "byol/simclr", ["projector."]),
    (_w_mmpretrain, "mmpretrain.pth", True, "mmpretrain", ["neck.", "head."]),
    (_w_lightning, "lightning.ckpt", False, "lightning", ["criterion.", "model.fc."]),
    (_w_detectron2_pkl, "moco_d2.pkl", True, "detectron2-pkl", ["fc."]),
    (_w_detectron2_model, "d2_model.pth", True, "detectron2",
     ["backbone.fpn_lateral2.", "roi_heads.", "proposal_generator."]),
    (_w_safetensors, "model.safetensors", True, "safetensors", ["fc."]),
    (_w_tv_detection, "frcnn.pth", True, "torchvision-detection", ["backbone.fpn.", "rpn.", "roi_heads."]),
    (_w_harness, "harness.safetensors", False, "harness", []),
]


@pytest.mark.parametrize("writer,name,give_arch,layout,ignored", LAYOUTS, ids=[x[1] for x in LAYOUTS])
def test_resnet50_layouts_load_exactly(tmp_path, r50, other_sd, writer, name, give_arch, layout, ignored):
    sd, x, ref = r50
    path = tmp_path / name
    writer(path, sd, other_sd)
    bb = load_backbone(path, arch="resnet50" if give_arch else None)
    assert bb.arch == "resnet50"
    c5 = _c5(bb, x)
    assert c5.shape == ref.shape
    assert (c5 - ref).abs().max().item() <= 1e-5
    report = bb.load_report
    assert report["layout"] == layout
    assert report["ok"] and not report["missing"] and not report["unexpected"] and not report["shape_mismatches"]
    assert report["tensors_loaded"] >= 265  # every conv/BN tensor of ResNet-50 (num_batches_tracked may be absent)
    listed = {item["prefix"] for item in report["ignored_prefixes"]}
    assert set(ignored) <= listed, listed
    assert bb.checkpoint["layout"] == layout and len(bb.checkpoint["sha256"]) == 64
    assert bb.normalization == IMAGENET


def test_inspect_agrees_with_load(tmp_path, r50, other_sd):
    sd, _, _ = r50
    path = tmp_path / "moco.pth.tar"
    _w_moco_v2(path, sd, other_sd)
    report = inspect_checkpoint(path)
    assert report["ok"] and report["layout"] == "moco-v1/v2" and report["arch"] == "resnet50"
    assert report["arch_source"] == "checkpoint 'arch' entry"
    assert report["prefix"] == "encoder_q." and report["stripped_prefixes"] == ["module."]
    assert report["tensors_loaded"] == len(_trunk(sd))
    params = sum(v.numel() for k, v in _trunk(sd).items() if "running" not in k and "num_batches" not in k)
    assert report["parameters"] == params
    reasons = {i["prefix"]: i["reason"] for i in report["ignored_prefixes"]}
    assert "momentum" in reasons["encoder_k."] and "queue" in reasons["queue"] and "optimizer" in reasons["[optimizer]"]
    text = format_inspection(report)
    assert "moco-v1/v2" in text and "encoder_k." in text and text.splitlines()[-1].startswith("OK")


def test_mmdet_export_is_recognised_by_inspect(tmp_path, r50_file):
    out = export_backbone(r50_file, "resnet50", "mmdet", tmp_path / "mm.pth")
    report = inspect_checkpoint(out)
    assert report["layout"] == "mmdet" and report["arch"] == "resnet50" and report["ok"]


# ----------------------------------------------------------------------------- the table of layouts
def _probe(keys=("conv1.weight",), entry="", prefix="", container="torch-zip", family="resnet", top=None,
           stripped=(), harness=None, harness_format=None) -> Probe:
    return Probe(container, top or {}, entry, tuple(keys), tuple(stripped), "resnet50" if family == "resnet"
                 else "vit_tiny_patch16_224", family, prefix, harness or {}, harness_format)


VIT_KEYS = ("cls_token", "pos_embed", "blocks.0.norm1.weight")
C2_KEYS = ("res2_0_branch2a_w", "conv1_w")
D2_KEYS = ("stem.conv1.weight", "res2.0.conv1.weight")
MM_VIT_KEYS = ("backbone.layers.0.ffn.layers.0.0.weight",)
# (probe, layout): each probe also fits the next record (named in the comment), so the order decides
DETECTION = [
    (_probe(C2_KEYS, harness_format="1", container="safetensors"), "harness"),  # detectron2-caffe2
    (_probe(C2_KEYS + D2_KEYS, entry="blobs", container="pickle"), "detectron2-caffe2"),  # detectron2-pkl
    (_probe(D2_KEYS, entry="state_dict", container="pickle", top={"meta": {}}, prefix="backbone."),
     "detectron2-pkl"),  # detectron2
    (_probe(D2_KEYS, entry="state_dict", top={"meta": {}}, prefix="backbone."), "detectron2"),  # mmpretrain
    (_probe(MM_VIT_KEYS, entry="state_dict", family="vit", prefix="backbone.body."), "mmpretrain"),  # tv-detection
    (_probe(entry="state_dict", top={"meta": {}}, prefix="backbone."), "mmpretrain"),  # prefixed
    (_probe(entry="teacher", prefix="backbone.body."), "torchvision-detection"),  # dino
    (_probe(entry="teacher", prefix="encoder_q."), "dino"),  # moco-v1/v2
    (_probe(prefix="encoder_q.base_encoder."), "moco-v1/v2"),  # moco-v3
    (_probe(["base_encoder.x", "predictor.0.weight"], entry="state_dict", prefix="base_encoder.",
            top={"pytorch-lightning_version": "2"}), "moco-v3"),  # lightning, byol/simclr
    (_probe(entry="state_dict", prefix="model.", top={"pytorch-lightning_version": "2", "meta": {}},
            harness={"arch": "resnet50"}), "lightning"),  # mmdet
    (_probe(VIT_KEYS + ("mask_token",), entry="state_dict", family="vit", top={"meta": {}},
            harness={"arch": "vit_tiny_patch16_224"}), "mmdet"),  # mae
    (_probe(VIT_KEYS + ("mask_token", "dist_token"), entry="model", family="vit"), "mae"),  # deit, mae/deit
    (_probe(("encoder.dist_token", "projector.0.weight"), entry="model", family="vit", prefix="encoder."),
     "deit"),  # byol/simclr, mae/deit
    (_probe(["encoder.x", "projector.0.weight"], entry="state_dict_ema", prefix="encoder."), "byol/simclr"),  # ema
    (_probe(entry="state_dict_ema", family="vit"), "timm-ema"),  # state_dict_ema-wrapper (never mae/deit)
    (_probe(VIT_KEYS, entry="model", family="vit"), "mae/deit"),  # model-wrapper
    (_probe(entry="state_dict", container="safetensors", stripped=["module."]), "state_dict-wrapper+module."),
    (_probe(container="safetensors"), "safetensors"),  # torchvision
    (_probe(stripped=["module.", "_orig_mod."]), "torchvision+module.+_orig_mod."),  # timm
    (_probe(VIT_KEYS, family="vit"), "timm"),  # prefixed
    (_probe(prefix="net_b."), "prefixed"),
    (_probe(prefix=None), "prefixed"),  # the architecture's own names are nowhere unambiguous
]


def test_detection_tries_every_layout_record_in_order():
    for probe, name in DETECTION:
        assert detect(probe).label(probe) == name, name
    reached = {RECORDS.index(detect(probe)) for probe, _ in DETECTION}
    assert reached == set(range(len(RECORDS))), "a layout record without a detection case"


# ----------------------------------------------------------------------------- caffe2 / MSRA weights (BGR, stride in 1x1)
def _caffe2_blobs(sd):
    """MSRA's R-50.pkl naming, BatchNorm folded into scale/shift (as caffe2's AffineChannel)."""
    blobs = {}
    for k, v in sd.items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue
        m = re.match(r"layer(\d)\.(\d+)\.(conv|bn)(\d)\.(weight|bias)", k)
        d = re.match(r"layer(\d)\.(\d+)\.downsample\.(0|1)\.(weight|bias)", k)
        if k.startswith("conv1."):
            name = "conv1_w"
        elif k.startswith("bn1."):
            name = "res_conv1_bn_" + ("s" if k.endswith("weight") else "b")
        elif k.startswith("fc."):
            name = "fc1000_" + ("w" if k.endswith("weight") else "b")
        elif m:
            branch = {"1": "2a", "2": "2b", "3": "2c"}[m[4]]
            tail = "w" if m[3] == "conv" else ("bn_s" if m[5] == "weight" else "bn_b")
            name = f"res{int(m[1]) + 1}_{m[2]}_branch{branch}_{tail}"
        elif d:
            tail = "w" if d[3] == "0" else ("bn_s" if d[4] == "weight" else "bn_b")
            name = f"res{int(d[1]) + 1}_{d[2]}_branch1_{tail}"
        else:
            raise AssertionError(k)
        blobs[name] = v.numpy().copy()
        if name.startswith("res2_"):  # caffe2 files also carry optimizer momentum blobs
            blobs[name + "_momentum"] = np.zeros_like(blobs[name])
    return blobs


def test_msra_caffe2_pkl_is_bgr_with_stride_in_1x1(tmp_path, r50, r50_net):
    sd, x, _ = r50
    path = tmp_path / "R-50.pkl"
    with open(path, "wb") as f:
        pickle.dump({"blobs": _caffe2_blobs(sd)}, f, protocol=2)
    bb = load_backbone(path, arch="resnet50")
    report = bb.load_report
    assert report["layout"] == "detectron2-caffe2" and report["ok"], report["summary"]
    assert bb.normalization == CAFFE and bb.options == {"stride_in_1x1": True}
    assert any(i["prefix"] == "*_momentum" and "optimizer" in i["reason"] for i in report["ignored_prefixes"])
    assert any("running_mean" in d["keys"] for d in report["defaulted"])
    # reference: torchvision ResNet-50, stride moved to the 1x1 convs, BN as a pure affine
    net = _stride_in_1x1(r50_net)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                m.eps = 0.0
    ref = _tv_layer4(net, _caffe(x))
    assert (_c5(bb, x) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


def _stride_in_1x1(net):
    for layer in (net.layer2, net.layer3, net.layer4):
        layer[0].conv1.stride, layer[0].conv2.stride = (2, 2), (1, 1)
    return net


def _caffe(x):
    return x.flip(1) * 255.0 - torch.tensor(CAFFE.mean).view(1, 3, 1, 1)


@pytest.mark.parametrize("author", ["Detectron2 Model Zoo", "MOCO"])
def test_detectron2_file_conventions_follow_its_author(tmp_path, r50, r50_net, author):
    """detectron2's own files are caffe-style (BGR, stride in the 1x1 conv); MoCo's conversion keeps torchvision's."""
    sd, x, ref = r50
    path = tmp_path / "model_final.pkl"
    with open(path, "wb") as f:
        pickle.dump({"model": _moco_detectron2(sd), "__author__": author}, f)
    bb = load_backbone(path, arch="resnet50")
    report = bb.load_report
    assert report["layout"] == "detectron2-pkl" and report["naming"] == "detectron2" and report["ok"]
    if author == "MOCO":
        assert bb.normalization == IMAGENET and bb.options == {} and "MoCo" in report["normalization"]["source"]
    else:
        assert bb.normalization == CAFFE and bb.options == {"stride_in_1x1": True}
        ref = _tv_layer4(_stride_in_1x1(r50_net), _caffe(x))
    assert (_c5(bb, x) - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()


# ----------------------------------------------------------------------------- accounting failures
def test_resnet50_as_resnet101_fails_naming_missing_keys(tmp_path, r50):
    sd, _, _ = r50
    path = tmp_path / "r50.pth"
    torch.save({"arch": "resnet50", "state_dict": _prefixed(sd, "module.encoder_q.")}, path)
    with pytest.raises(HarnessError) as err:
        load_backbone(path, arch="resnet101")
    msg = str(err.value)
    assert "\n" not in msg
    assert "does not match resnet101" in msg and "missing" in msg and "layer3.6.conv1.weight" in msg
    assert "the checkpoint names resnet50" in msg
    report = inspect_checkpoint(path, arch="resnet101")
    with torch.device("meta"):  # the names only
        r101 = torchvision.models.resnet101().state_dict()
    expected = {k for k in r101 if k not in sd and not k.endswith("num_batches_tracked")}
    assert not report["ok"] and set(report["missing"]) == expected and len(expected) == 255


def test_shape_mismatch_and_unexpected_keys_fail(tmp_path, r50, r50_file):
    sd, x, ref = r50
    with pytest.raises(HarnessError, match="shape mismatches"):
        load_backbone(r50_file, arch="wide_resnet50_2")
    extra = dict(sd)
    extra["mystery.weight"] = torch.ones(3)
    path = tmp_path / "extra.pth"
    torch.save(extra, path)
    with pytest.raises(HarnessError, match=r"1 unexpected \(mystery.weight\)"):
        load_backbone(path, arch="resnet50")
    bb = load_backbone(path, arch="resnet50", allow_unexpected=True)  # deliberate, explicit
    assert bb.load_report["unexpected"] == ["mystery.weight"]
    assert (_c5(bb, x) - ref).abs().max().item() <= 1e-5


def test_partial_checkpoint_needs_allow_missing(tmp_path, r50):
    sd, _, _ = r50
    part = {k: v for k, v in sd.items() if not k.startswith("layer4.2.")}
    path = tmp_path / "part.pth"
    torch.save(part, path)
    with pytest.raises(HarnessError, match="missing"):
        load_backbone(path, arch="resnet50")
    bb = load_backbone(path, arch="resnet50", allow_missing=True)
    assert bb.load_report["ok"] and "layer4.2.conv1.weight" in bb.load_report["missing"]
    assert torch.equal(bb.layer4[1].conv1.weight, sd["layer4.1.conv1.weight"])


def test_nan_weights_fail(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    sd["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    with pytest.raises(HarnessError, match="NaN"):
        load_backbone(path, arch="resnet18")


def test_two_unknown_complete_encoders_refuse_to_guess(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    path = tmp_path / "two.pth"
    torch.save({**_prefixed(sd, "net_a."), **_prefixed(sd, "net_b.")}, path)
    with pytest.raises(HarnessError, match="refusing to guess"):
        load_backbone(path, arch="resnet18")
    bb = load_backbone(path, arch="resnet18", prefix="net_b")
    assert bb.load_report["prefix"] == "net_b." and any(i["prefix"] == "net_a." for i in bb.load_report["ignored_prefixes"])
    assert bb.load_report["layout"] == "prefixed"


def test_arch_required_when_not_named(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(HarnessError, match=r"does not name its architecture .*; pass --arch"):
        load_backbone(path)


def test_key_option_selects_entry(tmp_path, r50, other_sd):
    sd, x, ref = r50
    path = tmp_path / "dino.pth"
    _w_dino(path, other_sd, sd)  # the *student* holds the reference weights here
    bb = load_backbone(path, key="student")
    assert bb.load_report["entry"] == "student"
    assert (_c5(bb, x) - ref).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- safety
class _Evil:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _evil_files(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    files = {}
    for kind in ("zip", "legacy", "pkl"):
        marker = tmp_path / f"marker_{kind}"
        payload = {"state_dict": sd, "extra": _Evil(marker)}
        path = tmp_path / f"evil_{kind}.pth"
        if kind == "zip":
            torch.save(payload, path)
        elif kind == "legacy":
            torch.save(payload, path, _use_new_zipfile_serialization=False)
        else:
            with open(path, "wb") as f:
                pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}, "extra": _Evil(marker)}, f)
        files[kind] = (path, marker)
    return files


def test_code_in_a_checkpoint_is_refused_and_never_runs(tmp_path):
    for kind, (path, marker) in _evil_files(tmp_path).items():
        with pytest.raises(HarnessError) as err:
            load_backbone(path, arch="resnet18")
        msg = str(err.value)
        assert "refused" in msg and "exec" in msg and "\n" not in msg, msg
        with pytest.raises(HarnessError):
            inspect_checkpoint(path, arch="resnet18")
        assert not marker.exists(), f"{kind}: code from the file ran"


def test_unsafe_load_is_an_explicit_opt_in(tmp_path):
    path, marker = _evil_files(tmp_path)["zip"]
    bb = load_backbone(path, arch="resnet18", unsafe_load=True)  # the payload is real: the opt-in runs it
    assert marker.exists() and bb.arch == "resnet18"


def test_harmless_types_of_real_checkpoints_are_allowed(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    path = tmp_path / "np.pth"
    torch.save({"state_dict": sd, "args": argparse.Namespace(arch="resnet18", data=Path("/data")),
                "best_acc": np.float64(71.2), "hist": np.arange(5, dtype=np.int32), "flag": np.bool_(True)}, path)
    obj, container, _ = read_checkpoint(path)
    assert container == "torch-zip" and obj["args"].arch == "resnet18" and float(obj["best_acc"]) == 71.2
    assert load_backbone(path).arch == "resnet18"  # arch from args.arch


def test_truncated_and_non_checkpoint_files_fail_clearly(tmp_path, r50):
    sd = torchvision.models.resnet18().state_dict()
    full = tmp_path / "full.pth"
    torch.save(sd, full)
    pkl = tmp_path / "full.pkl"
    with open(pkl, "wb") as f:
        pickle.dump({"model": {k: v.numpy() for k, v in sd.items()}}, f)
    st = tmp_path / "full.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    for src in (full, pkl, st):
        cut = tmp_path / ("cut_" + src.name)
        data = src.read_bytes()
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(HarnessError, match="truncated or corrupt") as err:
            load_backbone(cut, arch="resnet18")
        assert "\n" not in str(err.value)
    text = tmp_path / "notes.txt"
    text.write_text("these are my training notes, not weights\n")
    with pytest.raises(HarnessError, match="not a checkpoint"):
        load_backbone(text, arch="resnet18")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(HarnessError, match="empty file"):
        load_backbone(empty, arch="resnet18")
    with pytest.raises(HarnessError, match="no such checkpoint"):
        load_backbone(tmp_path / "absent.pth", arch="resnet18")
    junk = tmp_path / "junk.pth"
    torch.save({"epoch": 3, "notes": "no weights here"}, junk)
    with pytest.raises(HarnessError, match="no state dict found"):
        load_backbone(junk, arch="resnet18")


# ----------------------------------------------------------------------------- export
def test_key_renaming_round_trips():
    with torch.device("meta"):
        keys = torchvision.models.resnet50().state_dict().keys()
    for k in keys:
        assert d2_to_tv(tv_to_d2(k)) == k
    assert tv_to_d2("layer1.0.downsample.1.running_var") == "res2.0.shortcut.norm.running_var"
    assert tv_to_d2("bn1.weight") == "stem.conv1.norm.weight"


@pytest.mark.parametrize("to", ["detectron2", "torchvision", "mmdet"])
def test_export_round_trip(tmp_path, r50, r50_file, to):
    sd, x, ref = r50
    out = export_backbone(r50_file, "resnet50", to, tmp_path / f"out_{to}")
    bb = load_backbone(out, arch="resnet50" if to == "torchvision" else None)
    assert (_c5(bb, x) - ref).abs().max().item() <= 1e-5
    if to == "detectron2":
        obj, container, _ = read_checkpoint(out)  # the restricted unpickler reads it
        assert container == "pickle" and obj["__author__"] == "harness" and obj["matching_heuristics"] is True
        assert isinstance(obj["model"]["res2.0.shortcut.norm.running_var"], np.ndarray)
        assert "stem.conv1.norm.running_mean" in obj["model"] and "stem.fc.weight" not in obj["model"]
        assert obj["harness"]["detectron2_config"]["INPUT.FORMAT"] == "RGB"
        assert bb.load_report["layout"] == "detectron2-pkl"


def test_export_keeps_bgr_and_stride_in_1x1(tmp_path, r50):
    sd, x, _ = r50
    src = tmp_path / "R-50.pkl"
    with open(src, "wb") as f:
        pickle.dump(_caffe2_blobs(sd), f, protocol=4)  # blobs at the top level also occur
    out = export_backbone(src, "resnet50", "detectron2", tmp_path / "msra_d2.pkl")
    again = load_backbone(out)
    assert again.normalization == CAFFE and again.options == {"stride_in_1x1": True}
    obj, _, _ = read_checkpoint(out)
    cfg = obj["harness"]["detectron2_config"]
    assert cfg["MODEL.RESNETS.STRIDE_IN_1X1"] is True and cfg["INPUT.FORMAT"] == "BGR"
    assert cfg["MODEL.PIXEL_MEAN"] == list(CAFFE.mean)
    out2 = export_backbone(out, None, "mmdet", tmp_path / "msra_mmdet.pth")  # export of an export
    third = load_backbone(out2)
    assert third.normalization == CAFFE and third.options == {"stride_in_1x1": True}
    assert (_c5(third, x) - _c5(again, x)).abs().max().item() == 0.0
    meta = torch.load(out2, weights_only=True)["meta"]["harness"]["mmdet"]
    assert meta["backbone"]["style"] == "caffe" and meta["data_preprocessor"]["bgr_to_rgb"] is False


def test_the_same_weights_saved_twice_are_the_same_bytes(tmp_path):
    """safetensors orders its metadata as a Rust HashMap does, differently on every write; a result
    identifies its backbone by the file's sha256, so the harness sorts it."""
    bb = load_backbone("random:resnet18")
    first, second = (save_backbone(bb, tmp_path / f"{i}.safetensors").read_bytes() for i in range(2))
    assert first == second
    again = load_backbone(tmp_path / "0.safetensors")
    assert again.arch == "resnet18" and again.checkpoint["layout"] == "harness"


def test_export_of_non_resnet_to_detectron2_is_refused(tmp_path):
    vit = save_backbone(load_backbone("random:vit_tiny_patch16_224"), tmp_path / "vit.safetensors")
    with pytest.raises(HarnessError, match="supports ResNets"):
        export_backbone(vit, None, "detectron2", tmp_path / "x.pkl")


def test_export_refuses_what_it_could_not_write_faithfully(r50_file, tmp_path):
    """A random or partial backbone would be passed off as loaded weights; the input is never overwritten."""
    with pytest.raises(HarnessError, match="random:resnet50 is a random initialisation"):
        export_backbone("random:resnet50", None, "torchvision", tmp_path / "r.pth")
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in torch.load(r50_file, weights_only=True).items() if not k.startswith("layer4.")}, partial)
    with pytest.raises(HarnessError, match=r"export: \d+ tensors of resnet50 are not in .*partial.pth \(e.g. layer4"):
        export_backbone(partial, "resnet50", "torchvision", tmp_path / "out.pth", allow_missing=True)
    before = r50_file.read_bytes()
    with pytest.raises(HarnessError, match="is the checkpoint being exported"):
        export_backbone(r50_file, "resnet50", "torchvision", r50_file)
    assert r50_file.read_bytes() == before
    with pytest.raises(HarnessError, match="is a folder"):
        export_backbone(r50_file, "resnet50", "torchvision", tmp_path)
    with pytest.raises(HarnessError, match="writes a PyTorch file"):
        export_backbone(r50_file, "resnet50", "mmdet", tmp_path / "x.safetensors")
    assert not list(tmp_path.glob("out.pth*")) and not (tmp_path / "x.safetensors").exists()


def test_a_torch_file_named_safetensors_is_read_as_what_it_holds(r50_file, tmp_path):
    """torch.load reads a path named *.safetensors as safetensors whatever it holds (a traceback before)."""
    named = tmp_path / "r50.safetensors"
    named.write_bytes(r50_file.read_bytes())
    assert load_backbone(named, arch="resnet50").load_report["container"] == "torch-zip"


def test_normalization_override(r50, r50_file, r50_net):
    sd, x, _ = r50
    bb = load_backbone(r50_file, arch="resnet50", normalization="caffe")
    assert bb.normalization == CAFFE and bb.load_report["normalization"]["source"] == "user"
    ref = _tv_layer4(r50_net, x.flip(1) * 255.0 - torch.tensor(CAFFE.mean).view(1, 3, 1, 1))
    assert (_c5(bb, x) - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


# ----------------------------------------------------------------------------- CLI
def test_cli_inspect_json_and_errors(tmp_path, r50, other_sd, capsys):
    sd, _, _ = r50
    path = tmp_path / "moco.pth.tar"
    _w_moco_v2(path, sd, other_sd)
    code, out, err = run_cli(capsys, "inspect", "--backbone", path, "--json")
    assert code == 0, err
    report = json.loads(out)
    for key in ("path", "sha256", "layout", "arch", "tensors_loaded", "missing", "unexpected", "ignored_prefixes",
                "parameters", "feature_info", "normalization"):
        assert key in report
    assert report["layout"] == "moco-v1/v2" and report["arch"] == "resnet50" and report["missing"] == []
    assert report["feature_info"][-1] == {"name": "c5", "channels": 2048, "stride": 32}
    assert report["normalization"]["channel_order"] == "RGB" and len(report["sha256"]) == 64

    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint at all\n")
    code, out, err = run_cli(capsys, "inspect", "--backbone", bad, "--arch", "resnet50", "--json")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("harness: error:") and "not a checkpoint" in lines[0]


def test_inspect_and_export_of_a_backbone_card_name_say_where_its_file_is(tmp_path, capsys, monkeypatch):
    from harness.cards import all_backbone_cards

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    card = next(iter(all_backbone_cards().values()))
    path = tmp_path / "cache" / "backbones" / card.name / card.file_name
    for args in (["inspect", "--backbone", card.name], ["export", "--backbone", card.name, "--to", "torchvision",
                                                         tmp_path / "x.pth"]):
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and err.splitlines() == [f"harness: error: {card.name} is a backbone card, not a checkpoint "
                                                  f"file; `harness eval --backbone {card.name}` downloads its file to {path}"]
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    code, _, err = run_cli(capsys, "inspect", "--backbone", card.name)
    assert code == 2 and err.strip().endswith(f"not a checkpoint file; its file is {path}")


def test_cli_incomplete_match_prints_lists_then_exits_2(tmp_path, r50, capsys):
    from harness.cli import main

    sd, _, _ = r50
    path = tmp_path / "r50.pth"
    torch.save({"arch": "resnet50", "state_dict": sd}, path)
    assert main(["inspect", "--backbone", str(path), "--arch", "resnet101", "--json"]) == 2
    out, err = capsys.readouterr()
    assert len(json.loads(out)["missing"]) == 255
    assert len(err.strip().splitlines()) == 1 and "255 missing" in err
    assert main(["inspect", "--backbone", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert "layout:" in out and "state_dict-wrapper" in out and out.strip().splitlines()[-1].startswith("OK")
    assert main(["export", "--backbone", str(path), "--to", "detectron2", str(tmp_path / "cli.pkl")]) == 0
    assert (tmp_path / "cli.pkl").exists()
