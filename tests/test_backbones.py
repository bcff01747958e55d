"""Backbones: the c2..c5 contract, normalization inside forward, ViTs through a simple pyramid, timm models."""

from __future__ import annotations

import argparse
import ast
import re
from collections import OrderedDict
from graphlib import TopologicalSorter
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

from harness.backbones import Backbone, FeatureInfo, ViTBackbone, backbone_parameter_names, build_backbone
from harness.checkpoints import load_backbone, save_backbone
from harness.errors import HarnessError
from harness.normalization import CAFFE, IMAGENET, Normalization, resolve_normalization

VIT = "vit_tiny_patch16_224"  # ViT-Ti/16: the ViT-S/B/L code path at a test-friendly size


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Inputs here are tiny: one thread is as fast, and immune to oversubscribed shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _norm(x, n: Normalization = IMAGENET):
    if n.channel_order == "BGR":
        x = x.flip(1)
    return (x * 255.0 - torch.tensor(n.mean).view(1, 3, 1, 1)) / torch.tensor(n.std).view(1, 3, 1, 1)


def _images(h=64, w=64, seed=0):
    return torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- contract
def test_resnet_features_are_torchvision_layers():
    bb = load_backbone("random:resnet18")
    assert bb.checkpoint["layout"] == "random" and bb.arch == "resnet18"
    assert [(f.name, f.channels, f.stride) for f in bb.feature_info] == [
        ("c2", 64, 4), ("c3", 128, 8), ("c4", 256, 16), ("c5", 512, 32)]
    assert all(isinstance(f, FeatureInfo) for f in bb.feature_info)
    net = torchvision.models.resnet18()
    net.load_state_dict({**bb.state_dict(), "fc.weight": net.fc.weight, "fc.bias": net.fc.bias})
    net.eval()
    bb.eval()
    x = _images()
    with torch.no_grad():
        out = bb(x)
        h = net.maxpool(net.relu(net.bn1(net.conv1(_norm(x)))))
        refs = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = layer(h)
            refs.append(h)
    assert list(out) == ["c2", "c3", "c4", "c5"] and isinstance(out, OrderedDict)
    for got, ref in zip(out.values(), refs):
        assert torch.equal(got, ref)


def test_normalization_is_inside_and_not_in_the_state_dict():
    bb = build_backbone("resnet18").eval()
    assert not any("pixel" in k for k in bb.state_dict())
    assert not any(k.startswith("fc.") for k in bb.state_dict())
    x = _images()
    with torch.no_grad():
        assert torch.equal(bb(x)["c5"], bb.forward_features(_norm(x))["c5"])
        bb.set_normalization(CAFFE)
        got = bb(x)["c5"]
        assert torch.equal(got, bb.forward_features(_norm(x, CAFFE))["c5"])
        assert not torch.allclose(got, bb.forward_features(_norm(x))["c5"])
    assert bb.normalization == CAFFE and not any("pixel" in k for k in bb.state_dict())
    with pytest.raises(ValueError):
        bb(torch.rand(2, 1, 64, 64))


def test_normalization_values():
    assert resolve_normalization("caffe") == CAFFE and resolve_normalization(None) is None
    n = resolve_normalization('{"mean": [1, 2, 3], "std": [4, 5, 6], "channel_order": "bgr"}')
    assert n == Normalization((1.0, 2.0, 3.0), (4.0, 5.0, 6.0), "BGR")
    assert resolve_normalization(n.to_dict()) == n
    for bad in ("nope", '{"mean": [1, 2]}', {"mean": [0, 0, 0], "std": [0, 1, 1]}):
        with pytest.raises(HarnessError):
            resolve_normalization(bad)
    # 0-1 units (torchvision's transforms.Normalize values) would scale the inputs about 250-fold
    with pytest.raises(HarnessError, match="look like 0-1 units; the harness takes 0-255 pixel units"):
        resolve_normalization('{"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}')
    with pytest.raises(HarnessError, match=re.escape("unknown key(s) ['stdev']")):
        resolve_normalization({"mean": [1, 2, 3], "std": [4, 5, 6], "stdev": [4, 5, 6]})
    assert resolve_normalization({"mean": [0, 0, 0], "std": [1, 1, 1]}).std == (1.0, 1.0, 1.0)  # raw pixels
    bb = build_backbone("resnet18", normalization="inception")
    assert bb.normalization.mean == (127.5, 127.5, 127.5)


def test_parameter_counts_and_names():
    bb = build_backbone("resnet50")
    assert bb.num_parameters == sum(p.numel() for p in bb.parameters()) == 23_508_032  # torchvision R50 minus fc
    assert bb.new_parameter_names() == [] and len(bb.pretrained_parameter_names()) == len(list(bb.parameters()))

    class Task(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = build_backbone("resnet18")
            self.head = torch.nn.Conv2d(512, 2, 1)

    task = Task()
    names = backbone_parameter_names(task)
    assert names == {"backbone." + n for n, _ in task.backbone.named_parameters()}
    assert "head.weight" not in names


def test_stride_in_1x1_moves_the_stride_and_keeps_the_keys():
    a, b = build_backbone("resnet50"), build_backbone("resnet50", stride_in_1x1=True)
    assert set(a.state_dict()) == set(b.state_dict())
    assert b.layer2[0].conv1.stride == (2, 2) and b.layer2[0].conv2.stride == (1, 1)
    with torch.no_grad():
        assert b.eval()(_images())["c5"].shape == (2, 2048, 2, 2)
    with pytest.raises(HarnessError, match="bottleneck"):
        build_backbone("resnet18", stride_in_1x1=True)


def test_unknown_arch_and_wrong_options_fail_clearly():
    with pytest.raises(HarnessError, match="unknown architecture"):
        build_backbone("resnet51")
    with pytest.raises(HarnessError, match="do not apply"):
        build_backbone("resnet18", img_size=512)
    with pytest.raises(HarnessError, match="unknown architecture"):
        load_backbone("random:notanet")


# ----------------------------------------------------------------------------- ViT + simple pyramid
def _vit_ref_tokens(ref, x, n_prefix=1):
    """Independent forward of a timm ViT built for this input size: the last block's patch tokens."""
    with torch.no_grad():
        t = ref.patch_embed(_norm(x))
        prefix = [ref.cls_token.expand(x.shape[0], -1, -1)]
        if n_prefix == 2:
            prefix.append(ref.dist_token.expand(x.shape[0], -1, -1))
        t = torch.cat(prefix + [t], dim=1) + ref.pos_embed
        t = ref.blocks(t)[:, n_prefix:]
    g = x.shape[-1] // 16
    return t.transpose(1, 2).reshape(x.shape[0], -1, g, g)


@pytest.fixture(scope="module")
def vit112():
    """A random ViT-Ti/16 built for 112 px (7x7 grid) and its state dict (with head and final norm)."""
    torch.manual_seed(3)
    ref = timm.create_model(VIT, img_size=112).eval()
    with torch.no_grad():
        ref.pos_embed.normal_(0, 0.5)
    return ref, ref.state_dict()


def test_vit_simple_pyramid_matches_the_trunk(tmp_path, vit112):
    ref, sd = vit112
    path = tmp_path / "vit.pth"
    torch.save(sd, path)
    bb = load_backbone(path, arch=VIT, img_size=112)
    assert isinstance(bb, ViTBackbone) and bb.arch == VIT
    report = bb.load_report
    assert report["ok"] and not report["missing"] and not report["interpolated"]
    assert {"head.", "norm."} <= {i["prefix"] for i in report["ignored_prefixes"]}
    assert report["new_layers"]["parameters"] > 0  # the pyramid: new, not counted as missing
    assert [(f.name, f.channels, f.stride) for f in bb.feature_info] == [
        ("c2", 48, 4), ("c3", 96, 8), ("c4", 192, 16), ("c5", 192, 32)]
    x = _images(112, 112)
    with torch.no_grad():
        out = bb(x)
    c4 = _vit_ref_tokens(ref, x)
    assert (out["c4"] - c4).abs().max().item() <= 1e-5
    assert torch.equal(out["c5"], F.max_pool2d(out["c4"], 2))
    assert out["c2"].shape == (2, 48, 28, 28) and out["c3"].shape == (2, 96, 14, 14)
    assert all(n.startswith("pyramid.") for n in bb.new_parameter_names())
    assert not any(n.startswith("pyramid.") for n in bb.pretrained_parameter_names())
    assert "vit.pos_embed" in bb.pretrained_parameter_names()


def test_vit_position_embeddings_are_interpolated(tmp_path, vit112):
    ref, sd = vit112
    path = tmp_path / "vit.pth"
    torch.save(sd, path)
    bb = load_backbone(path, arch=VIT)  # default grid: 224 px -> 14x14
    assert bb.load_report["interpolated"] == [{"key": "pos_embed", "from": [1, 50, 192], "to": [1, 197, 192]}]
    pos = sd["pos_embed"]
    grid = pos[:, 1:].reshape(1, 7, 7, 192).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False, antialias=True)
    want = torch.cat([pos[:, :1], want.permute(0, 2, 3, 1).reshape(1, 196, 192)], dim=1)
    assert (bb.vit.pos_embed.detach() - want).abs().max().item() <= 1e-5
    assert not torch.allclose(bb.vit.pos_embed[:, 1:50], pos[:, 1:])  # not copied, not dropped
    with torch.no_grad():  # any input size: resampled again to the input grid at forward
        out = bb(_images(64, 96))
    assert out["c4"].shape == (2, 192, 4, 6) and out["c2"].shape == (2, 48, 16, 24)
    assert all(torch.isfinite(v).all() for v in out.values())


def _to_mmpretrain(k: str) -> str:
    k = k.replace("patch_embed.proj.", "patch_embed.projection.")
    k = re.sub(r"^blocks\.(\d+)\.", r"layers.\1.", k)
    k = k.replace(".norm1.", ".ln1.").replace(".norm2.", ".ln2.")
    k = k.replace(".mlp.fc1.", ".ffn.layers.0.0.").replace(".mlp.fc2.", ".ffn.layers.1.")
    return re.sub(r"^norm\.", "ln1.", k)


def _vit_layouts(sd):
    trunk = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("head."))
    mae = dict(sd)
    mae.update({"mask_token": torch.zeros(1, 1, 192), "decoder_embed.weight": torch.randn(64, 192),
                "decoder_pos_embed": torch.zeros(1, 50, 64), "decoder_blocks.0.norm1.weight": torch.ones(64),
                "decoder_norm.weight": torch.ones(64), "decoder_pred.weight": torch.randn(768, 64)})
    teacher = OrderedDict(("backbone." + k, v) for k, v in trunk.items())
    teacher.update({"head.mlp.0.weight": torch.randn(32, 192), "head.last_layer.weight_v": torch.randn(64, 32)})
    mm = OrderedDict(("backbone." + _to_mmpretrain(k), v) for k, v in trunk.items())
    mm["head.layers.head.weight"] = torch.randn(10, 192)
    moco3 = OrderedDict(("module.base_encoder." + k, v) for k, v in trunk.items())
    moco3.update(("module.momentum_encoder." + k, v + 1) for k, v in trunk.items())
    moco3.update({"module.base_encoder.head.0.weight": torch.randn(32, 192),
                  "module.predictor.0.weight": torch.randn(32, 32)})
    return [
        ("mae", {"model": mae, "args": argparse.Namespace(model="mae_vit_tiny_patch16", input_size=112)},
         {"decoder_embed.", "decoder_blocks.", "mask_token", "decoder_pred.", "norm."}),
        ("dino", {"teacher": teacher, "student": {}, "args": argparse.Namespace(arch="vit_tiny", patch_size=16)},
         {"head."}),
        ("mmpretrain", {"meta": {"epoch": 1}, "state_dict": mm}, {"head."}),
        ("moco-v3", {"arch": "vit_tiny", "state_dict": moco3}, {"momentum_encoder.", "base_encoder.head.", "predictor."}),
    ]


@pytest.mark.parametrize("layout", ["mae", "dino", "mmpretrain", "moco-v3"])
def test_vit_checkpoint_layouts(tmp_path, vit112, layout):
    ref, sd = vit112
    name, obj, ignored = next(x for x in _vit_layouts(sd) if x[0] == layout)
    path = tmp_path / f"{layout.replace('/', '_')}.pth"
    torch.save(obj, path)
    named = layout != "mmpretrain"  # mmpretrain files keep the arch in a config, not in the checkpoint
    bb = load_backbone(path, arch=None if named else VIT, img_size=112)
    assert bb.arch == VIT and (named or bb.load_report["arch_source"] == "user")
    assert bb.load_report["layout"] == name and bb.load_report["ok"]
    assert ignored <= {i["prefix"] for i in bb.load_report["ignored_prefixes"]}
    x = _images(112, 112)
    with torch.no_grad():
        assert (bb(x)["c4"] - _vit_ref_tokens(ref, x)).abs().max().item() <= 1e-5


def test_moco_v3_vit_small_has_12_heads(tmp_path):
    torch.manual_seed(8)
    ref = timm.create_model("vit_small_patch16_224", num_heads=12, img_size=112).eval()
    trunk = {k: v for k, v in ref.state_dict().items() if not k.startswith(("head.", "norm."))}
    state = {"module.base_encoder." + k: v for k, v in trunk.items()}
    state.update({"module.momentum_encoder." + k: v for k, v in trunk.items()})
    path = tmp_path / "mocov3_vits.pth.tar"
    torch.save({"arch": "vit_small", "state_dict": state, "epoch": 300}, path)
    bb = load_backbone(path, img_size=112)
    assert bb.arch == "vit_small_patch16_224" and bb.options["num_heads"] == 12
    assert bb.vit.blocks[0].attn.num_heads == 12 and any("12 attention heads" in n for n in bb.load_report["notes"])
    x = _images(112, 112)
    with torch.no_grad():
        assert (bb(x)["c4"] - _vit_ref_tokens(ref, x)).abs().max().item() <= 1e-5


def test_deit_distillation_token(tmp_path):
    torch.manual_seed(4)
    ref = timm.create_model("deit_tiny_distilled_patch16_224", img_size=112).eval()
    path = tmp_path / "deit.pth"
    torch.save({"model": ref.state_dict(), "args": argparse.Namespace(model="deit_tiny_distilled_patch16_224")}, path)
    bb = load_backbone(path, arch=VIT, img_size=112)  # plain ViT arch: the dist token rides as a prefix token
    report = bb.load_report
    assert report["layout"] == "deit" and report["options"]["reg_tokens"] == 1 and report["ok"]
    assert "head_dist." in {i["prefix"] for i in report["ignored_prefixes"]}
    x = _images(112, 112)
    with torch.no_grad():
        assert (bb(x)["c4"] - _vit_ref_tokens(ref, x, n_prefix=2)).abs().max().item() <= 1e-5
    named = load_backbone(path, img_size=112)  # the checkpoint's own arch name (timm's distilled DeiT)
    assert named.arch == "deit_tiny_distilled_patch16_224" and named.load_report["ok"]


def test_vit_harness_format_round_trip_keeps_the_pyramid(tmp_path):
    bb = load_backbone(f"random:{VIT}", normalization="inception").eval()
    path = save_backbone(bb, tmp_path / "vit.safetensors")
    again = load_backbone(path)
    assert again.arch == VIT and again.normalization == bb.normalization
    assert again.load_report["layout"] == "harness" and again.load_report["arch_source"] == "checkpoint metadata"
    x = _images()
    with torch.no_grad():
        a, b = bb(x), again(x)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_vit_missing_block_is_reported(tmp_path, vit112):
    _, sd = vit112
    path = tmp_path / "cut.pth"
    torch.save({k: v for k, v in sd.items() if not k.startswith("blocks.11.")}, path)
    with pytest.raises(HarnessError, match=r"missing \(blocks\.11\."):
        load_backbone(path, arch=VIT)


# ----------------------------------------------------------------------------- other timm models
def test_timm_convnext_checkpoint(tmp_path):
    torch.manual_seed(5)
    ref = timm.create_model("convnext_atto").eval()
    path = tmp_path / "convnext.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    bb = load_backbone(path, arch="convnext_atto")
    assert bb.load_report["layout"] == "safetensors" and bb.load_report["ok"]
    assert {i["prefix"] for i in bb.load_report["ignored_prefixes"]} == {"head."}
    x = _images(64, 96)
    with torch.no_grad():
        out = bb(x)
        h = ref.stem(_norm(x))
        for name, stage in zip(out, ref.stages):
            h = stage(h)
            assert (out[name] - h).abs().max().item() <= 1e-5
        assert (out["c5"] - ref.forward_features(_norm(x))).abs().max().item() <= 1e-5
    for f, v in zip(bb.feature_info, out.values()):
        assert v.shape[1] == f.channels and 64 // v.shape[2] == f.stride


def test_timm_regnet_ema_checkpoint(tmp_path):
    torch.manual_seed(6)
    ref = timm.create_model("regnetx_002").eval()
    other = timm.create_model("regnetx_002").state_dict()
    path = tmp_path / "regnet.pth.tar"
    torch.save({"epoch": 10, "arch": "regnetx_002", "state_dict": other, "state_dict_ema": ref.state_dict()}, path)
    bb = load_backbone(path)
    assert bb.arch == "regnetx_002" and bb.load_report["layout"] == "timm-ema"
    with torch.no_grad():
        assert (bb(_images())["c5"] - ref.forward_features(_norm(_images()))).abs().max().item() <= 1e-5


def test_timm_swin_any_input_size():
    bb = build_backbone("swin_tiny_patch4_window7_224").eval()
    with torch.no_grad():
        out = bb(_images(64, 96))
    assert [tuple(v.shape[1:]) for v in out.values()] == [(96, 16, 24), (192, 8, 12), (384, 4, 6), (768, 2, 3)]
    assert [f.channels for f in bb.feature_info] == [96, 192, 384, 768]
    assert "norm." in bb.head_prefixes  # the classifier's final norm is not part of the trunk


def test_timm_model_without_the_strides_fails_clearly():
    with pytest.raises(HarnessError, match=r"strides \[16\]; the harness needs 4, 8, 16 and 32"):
        build_backbone("mixer_s16_224")


def test_backbone_is_the_documented_type():
    for arch in ("resnet18", VIT, "regnetx_002"):
        bb = build_backbone(arch)
        assert isinstance(bb, Backbone) and isinstance(bb.normalization, Normalization)
        assert [f.stride for f in bb.feature_info] == [4, 8, 16, 32]
        assert bb.describe()["parameters"] == bb.num_parameters


def test_random_init_is_the_same_every_time_and_leaves_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = load_backbone("random:resnet18"), load_backbone("random:resnet18")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    torch.manual_seed(1)
    assert not torch.equal(a.state_dict()["conv1.weight"], build_backbone("resnet18").state_dict()["conv1.weight"])


def _harness_imports() -> dict[str, set[str]]:
    """Module -> the harness modules it imports anywhere in its code (lazy imports inside functions too;
    not those under ``if TYPE_CHECKING:``, which never run)."""
    root = Path(__file__).resolve().parents[1] / "harness"
    modules = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
               for p in root.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        tree = ast.parse(path.read_text())
        for block in ast.walk(tree):  # imports only a type checker runs are not imports at run time
            if isinstance(block, ast.If) and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
                block.body = []
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("harness"):
                deps |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("harness")}
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def test_imports_flow_one_way():
    """backbones builds architectures and knows no checkpoint file; no harness module imports back up."""
    graph = _harness_imports()
    assert graph["harness.backbones"] <= {"harness.errors", "harness.normalization"}
    assert graph["harness.normalization"] <= {"harness.errors"}
    assert "harness.backbones" in graph["harness.checkpoints.load"]
    TopologicalSorter(graph).prepare()  # raises CycleError naming the modules of any import cycle
