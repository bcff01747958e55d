"""Backbone cards: the shipped ones validate and describe their files; `--backbone NAME` downloads
(from a loopback server), verifies, pins and loads with the card's layout and normalization."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
from collections import OrderedDict
from pathlib import Path

import pytest
import timm
import torch
import torchvision
import yaml

from harness.normalization import CAFFE, IMAGENET
from harness.cards import all_backbone_cards
from harness.checkpoints import inspect_checkpoint
from harness.errors import HarnessError
from harness.results import git_commit
from harness.zoo import load_eval_backbone
from tests.loopback import Loopback
from tests.support import run_cli

ROOT = Path(__file__).resolve().parents[1]


def _resnet18_sd() -> OrderedDict:
    torch.manual_seed(0)
    return torchvision.models.resnet18().state_dict()


def _moco_v2(sd):
    state = OrderedDict(("module.encoder_q." + k, v) for k, v in sd.items())
    state.update(("module.encoder_k." + k, v) for k, v in sd.items())
    state["module.queue"] = torch.randn(8, 16)
    return {"epoch": 800, "arch": "resnet18", "state_dict": state}


def _moco_v3(sd):
    state = OrderedDict(("module.base_encoder." + k, v) for k, v in sd.items())
    state.update(("module.momentum_encoder." + k, v) for k, v in sd.items())
    state["module.predictor.0.weight"] = torch.randn(4, 4)
    return {"epoch": 1000, "arch": "resnet18", "state_dict": state}


def _swav(sd):
    state = OrderedDict(("module." + k, v) for k, v in sd.items() if not k.startswith("fc."))
    state.update({"module.projection_head.0.weight": torch.randn(8, 512), "module.prototypes.weight": torch.randn(3, 8)})
    return state


# what each public checkpoint holds (facebookresearch's and torchvision's release code), at resnet18 / ViT-Ti size
STRUCTURES = {
    "torchvision": lambda sd: sd,
    "moco-v1/v2": _moco_v2,
    "moco-v3": _moco_v3,
    "torchvision+module.": _swav,
}


def test_shipped_cards_validate_and_name_their_files():
    cards = all_backbone_cards()
    assert len(cards) >= 8
    assert {"torchvision-resnet50-v1", "torchvision-resnet50-v2", "moco-v2-800ep", "dino-vits16", "mae-vitb16",
            "swav-800ep", "barlowtwins-resnet50"} <= set(cards)
    for card in cards.values():
        assert card.urls[0].startswith("https://") and card.licence and card.paper.startswith("https://arxiv.org/")
        assert card.pretraining.images == 1281167  # all of them: ImageNet-1k train
        match = re.search(r"-([0-9a-f]{8})\.pth$", card.file_name)
        if "download.pytorch.org" in card.urls[0]:  # torchvision: the file name carries the sha256 prefix
            assert match and card.checksum == f"sha256:{match.group(1)}"


@pytest.mark.parametrize("name", ["torchvision-resnet50-v1", "moco-v2-800ep", "moco-v3-resnet50-1000ep",
                                  "swav-800ep", "barlowtwins-resnet50", "dino-resnet50"])
def test_resnet_card_layouts_are_what_inspect_reports(tmp_path, name):
    """A file built like the card's checkpoint (resnet18-sized) is reported with the card's layout."""
    card = all_backbone_cards()[name]
    sd = _resnet18_sd()
    if name in ("barlowtwins-resnet50", "dino-resnet50"):  # released without the fc layer
        sd = OrderedDict((k, v) for k, v in sd.items() if not k.startswith("fc."))
    torch.save(STRUCTURES[card.layout](sd), tmp_path / card.file_name)
    report = inspect_checkpoint(tmp_path / card.file_name, arch="resnet18")
    assert report["ok"] and report["layout"] == card.layout, report["summary"]


@pytest.mark.parametrize("name,wrap", [("dino-vits16", lambda sd: sd), ("mae-vitb16", lambda sd: {"model": sd})])
def test_vit_card_layouts_are_what_inspect_reports(tmp_path, name, wrap):
    card = all_backbone_cards()[name]
    sd = {k: v for k, v in timm.create_model("vit_tiny_patch16_224", num_classes=0).state_dict().items()}
    torch.save(wrap(sd), tmp_path / card.file_name)
    report = inspect_checkpoint(tmp_path / card.file_name, arch="vit_tiny_patch16_224")
    assert report["ok"] and report["layout"] == card.layout, report["summary"]


# ----------------------------------------------------------------------------- downloading by name
def _card(folder: Path, name: str, urls: list[str], layout: str, checksum: str | None = None,
          normalization: str = "imagenet") -> None:
    card = {"name": name, "description": "test", "arch": "resnet18", "urls": urls, "layout": layout,
            "normalization": normalization, "pretraining": {"method": "test", "data": "none", "images": 1},
            "paper": "https://arxiv.org/abs/0000.00000", "licence": "MIT", "source": "tests/test_zoo.py"}
    if checksum:
        card["checksum"] = checksum
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(card))


@pytest.fixture
def zoo(tmp_path, monkeypatch):
    """A loopback server with resnet18 checkpoints and a card folder naming them."""
    sd = _resnet18_sd()
    files = {}
    for layout, build in STRUCTURES.items():
        path = tmp_path / "build.pth"
        torch.save(build(sd), path)
        files[layout] = path.read_bytes()
    cards = tmp_path / "cards"
    cards.mkdir()
    monkeypatch.setenv("HARNESS_BACKBONES", str(cards))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    with Loopback() as server:
        tv_sha = hashlib.sha256(files["torchvision"]).hexdigest()
        server.files[f"/tv/resnet18-{tv_sha[:8]}.pth"] = files["torchvision"]
        server.files["/moco/moco.pth.tar"] = files["moco-v1/v2"]
        server.files["/swav/swav.pth.tar"] = files["torchvision+module."]
        _card(cards, "tv", [f"{server.url}/dead/resnet18-{tv_sha[:8]}.pth", f"{server.url}/tv/resnet18-{tv_sha[:8]}.pth"],
              "torchvision", f"sha256:{tv_sha[:8]}", normalization="caffe")
        _card(cards, "moco", [f"{server.url}/moco/moco.pth.tar"], "moco-v1/v2",
              "md5:" + hashlib.md5(files["moco-v1/v2"]).hexdigest()[:8])
        _card(cards, "swav", [f"{server.url}/swav/swav.pth.tar"], "torchvision+module.")
        _card(cards, "badsum", [f"{server.url}/moco/moco.pth.tar"], "moco-v1/v2", "md5:deadbeef")
        _card(cards, "badlayout", [f"{server.url}/swav/swav.pth.tar"], "moco-v3")
        yield {"server": server, "cards": cards, "sd": sd, "files": files, "cache": tmp_path / "cache"}


def test_named_backbones_download_verify_and_load_with_the_card(zoo, capsys):
    server, sd = zoo["server"], zoo["sd"]
    bb, named = load_eval_backbone("tv", progress=False)
    assert "/dead/" in capsys.readouterr().out  # the dead first source, in one line
    assert named == {"name": "tv", "card": "tv", "url": server.url + "/tv/" + bb.checkpoint["path"].split("/")[-1]}
    assert bb.checkpoint["sha256"] == hashlib.sha256(zoo["files"]["torchvision"]).hexdigest()
    assert bb.normalization == CAFFE and bb.checkpoint["layout"] == "torchvision"  # the card's normalization
    trunk = {k[len(bb.trunk_prefix):]: v for k, v in bb.state_dict().items() if k.startswith(bb.trunk_prefix)}
    assert all(torch.equal(trunk[k], v) for k, v in sd.items() if not k.startswith("fc."))  # the file's weights
    moco, named = load_eval_backbone("moco", progress=False)
    assert moco.checkpoint["layout"] == "moco-v1/v2" and moco.normalization == IMAGENET
    requests = len(server.log)
    load_eval_backbone("moco", progress=False)  # cached: verified, not downloaded again
    assert len(server.log) == requests

    # no published checksum: pinned on first download; a changed file later is an error and is removed
    load_eval_backbone("swav", progress=False)
    pins = json.loads((zoo["cache"] / "pins.json").read_text())
    assert pins["backbone/swav"] == hashlib.sha256(zoo["files"]["torchvision+module."]).hexdigest()
    cached = zoo["cache"] / "backbones/swav/swav.pth.tar"
    cached.unlink()
    server.files["/swav/swav.pth.tar"] = zoo["files"]["torchvision"]
    with pytest.raises(HarnessError, match="swav.pth.tar removed: backbone/swav: sha256 .* differs from the one pinned"):
        load_eval_backbone("swav", progress=False)
    assert not cached.exists()


def test_named_backbone_errors_are_one_line(zoo):
    with pytest.raises(HarnessError, match="moco.pth.tar: no source gave a verified file"):
        load_eval_backbone("badsum", progress=False)
    assert not (zoo["cache"] / "backbones/badsum/moco.pth.tar").exists()
    with pytest.raises(HarnessError, match="layout 'torchvision\\+module.' differs from the card's 'moco-v3'"):
        load_eval_backbone("badlayout", progress=False)
    with pytest.raises(HarnessError, match="unknown backbone 'nosuch': not a file, random:<arch>, nor a card \\(badlayout"):
        load_eval_backbone("nosuch", progress=False)
    with pytest.raises(HarnessError, match="backbone tv is a resnet18; --arch resnet50 contradicts its card"):
        load_eval_backbone("tv", arch="resnet50", progress=False)


def test_paths_and_random_specs_keep_working(tmp_path, zoo):
    path = tmp_path / "mine.pth"
    path.write_bytes(zoo["files"]["moco-v1/v2"])
    bb, named = load_eval_backbone(str(path), options={"normalization": "caffe", "allow_missing": False})
    assert named == {"name": "mine.pth", "card": None, "url": None} and bb.normalization == CAFFE
    bb, named = load_eval_backbone("random:resnet18")
    assert named["name"] == "random:resnet18" and bb.checkpoint["layout"] == "random"


def test_git_commit_is_the_harness_checkouts_not_the_working_directorys(tmp_path, monkeypatch):
    other = tmp_path / "user-repo"
    other.mkdir()
    subprocess.run(["git", "init", "-q", str(other)], check=True)
    monkeypatch.chdir(other)
    top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=ROOT, capture_output=True, text=True)
    if top.returncode != 0:
        pytest.skip("the tests do not run from a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert git_commit() == head


@pytest.mark.slow
def test_eval_by_name_records_card_url_sha256_and_options(zoo, tmp_path, monkeypatch, capsys):
    from harness.datasets.synthetic import write_synthetic

    root = tmp_path / "data"
    write_synthetic(root, seed=0, voc12_train=4, voc12_val=2, voc12_aug_extra=0, coco_train=1, coco_val=1,
                    voc07_trainval=1, voc07_test=1, min_side=64, max_side=96)
    cards = tmp_path / "tasks"
    cards.mkdir()
    seg = yaml.safe_load((ROOT / "tasks/seg.yaml").read_text())
    seg["profiles"]["smoke"].update({"iterations": 2, "batch_size": 2, "warmup_iters": 1, "train_images": 4,
                                     "checkpoint_period": 2})
    (cards / "seg.yaml").write_text(yaml.safe_dump(seg))
    monkeypatch.setenv("HARNESS_TASKS", str(cards))
    code, _, err = run_cli(capsys, "eval", "--backbone", "moco", "--tasks", "seg", "--protocols", "frozen", "--profile", "smoke",
                           "--data-root", root, "--out", tmp_path / "run", "--device", "cpu", "--no-progress",
                           "--normalization", "caffe")
    assert code == 0, err[-2000:]
    result = json.loads((tmp_path / "run/seg/frozen/seed0/result.json").read_text())
    bb = result["backbone"]
    assert (bb["name"], bb["card"], bb["url"]) == ("moco", "moco", zoo["server"].url + "/moco/moco.pth.tar")
    assert bb["sha256"] == hashlib.sha256(zoo["files"]["moco-v1/v2"]).hexdigest() and bb["layout"] == "moco-v1/v2"
    assert result["checkpoint_options"] == {"normalization": "caffe"} and bb["normalization"]["channel_order"] == "BGR"
    assert result["environment"]["torch"] == torch.__version__ and result["environment"]["timm"] == timm.__version__


def test_cli_lists_backbone_and_task_cards(monkeypatch, capsys):
    monkeypatch.delenv("HARNESS_BACKBONES", raising=False)
    monkeypatch.delenv("HARNESS_TASKS", raising=False)

    def run(*args):
        code, out, err = run_cli(capsys, *args)
        assert code == 0, err
        return out

    listed = json.loads(run("backbones", "list", "--json"))
    assert set(listed) == {p.stem for p in (ROOT / "backbones").glob("*.yaml")} and len(listed) >= 8
    assert listed["moco-v2-800ep"]["checksum"] == "md5:a04e12f8" and listed["moco-v2-800ep"]["layout"] == "moco-v1/v2"
    table = run("backbones", "list")
    assert "pinned on first download" in table and f"{len(listed)} backbone card(s) in {ROOT / 'backbones'}" in table
    tasks = run("tasks", "list")
    assert f"task card(s) in {ROOT / 'tasks'}" in tasks and all(f"{p.stem} " in tasks for p in (ROOT / "tasks").glob("*.yaml"))
