"""`harness data get` offline: tiny archives with the real names and inner layouts, served on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image
from scipy.io import savemat

from harness.datasets.get import get_data
from harness.datasets.roots import check_data_root
from harness.datasets.synthetic import write_synthetic
from harness.errors import HarnessError
from tests.loopback import Loopback
from tests.support import SMALL_ARCH, run_cli

SIZES = {"coco_train": 6, "coco_val": 3, "voc07_trainval": 6, "voc07_test": 4, "voc12_train": 6, "voc12_val": 4,
         "voc12_aug_extra": 4, "min_side": 64, "max_side": 96}


def _zip(files: dict[str, Path | bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, src in files.items():
            z.writestr(name, src if isinstance(src, bytes) else src.read_bytes())
    return buf.getvalue()


def _tar(files: dict[str, Path | bytes], gz: bool = False) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w") as t:
        for name, src in files.items():
            data = src if isinstance(src, bytes) else src.read_bytes()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _tree(base: Path, prefix: str, keep=lambda rel: True) -> dict[str, Path]:
    return {f"{prefix}/{p.relative_to(base).as_posix()}": p for p in sorted(base.rglob("*"))
            if p.is_file() and keep(p.relative_to(base).as_posix())}


def _mat(png: Path) -> bytes:
    buf = io.BytesIO()
    savemat(buf, {"GTcls": {"Segmentation": np.asarray(Image.open(png)), "Boundaries": [], "CategoriesPresent": []}})
    return buf.getvalue()


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The synthetic data written as the real archives (coco zips, VOC tars, SBD's benchmark.tgz)."""
    src = tmp_path_factory.mktemp("src")
    write_synthetic(src, seed=0, **SIZES)
    marker = json.loads((src / "SYNTHETIC.json").read_text())
    coco, v07, v12 = src / "coco", src / "VOCdevkit" / "VOC2007", src / "VOCdevkit" / "VOC2012"
    test_ids = set((v07 / "ImageSets/Main/test.txt").read_text().split())
    is_test = lambda rel: rel == "ImageSets/Main/test.txt" or rel.split("/")[-1].split(".")[0] in test_ids  # noqa: E731
    seg_lists = {s: (v12 / f"ImageSets/Segmentation/{s}.txt").read_text().split() for s in ("train", "val", "train_aug")}
    sbd_ids = sorted(set(seg_lists["train_aug"]) - set(seg_lists["train"])) + seg_lists["train"][:2]  # extras + 2 of VOC's
    sbd = {f"benchmark_RELEASE/dataset/cls/{i}.mat": _mat(v12 / "SegmentationClassAug" / f"{i}.png") for i in sbd_ids}
    sbd["benchmark_RELEASE/dataset/train.txt"] = "".join(f"{i}\n" for i in sbd_ids[:3]).encode()
    sbd["benchmark_RELEASE/dataset/val.txt"] = "".join(f"{i}\n" for i in sbd_ids[3:]).encode()
    sbd["benchmark_RELEASE/dataset/img/ignored.jpg"] = b"not extracted"
    archives = {
        "train2017.zip": _zip({**_tree(coco / "train2017", "train2017"),  # big enough to be cut mid-way
                               "train2017/padding.bin": np.random.default_rng(0).bytes(1 << 20)}),
        "val2017.zip": _zip(_tree(coco / "val2017", "val2017")),
        "annotations_trainval2017.zip": _zip(_tree(coco / "annotations", "annotations")),
        "VOCtrainval_06-Nov-2007.tar": _tar(_tree(v07, "VOCdevkit/VOC2007", lambda r: not is_test(r))),
        "VOCtest_06-Nov-2007.tar": _tar(_tree(v07, "VOCdevkit/VOC2007", is_test)),
        "VOCtrainval_11-May-2012.tar": _tar(_tree(v12, "VOCdevkit/VOC2012",
                                                  lambda r: "Aug" not in r and "train_aug" not in r)),
        "benchmark.tgz": _tar(sbd, gz=True),
    }
    return {"archives": archives, "expected": marker["expected"], "src": src, "train_aug": seg_lists["train_aug"]}


def _registry(path: Path, server: Loopback, source: dict, checksums: dict | None = None) -> Path:
    """A registry like the shipped one: a dead first source, then the loopback copy; sha256 or md5 checksums."""
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "harness/datasets/registry.yaml").read_text())
    for name, data in source["archives"].items():
        server.files[f"/files/{name}"] = data
        entry = shipped["archives"][name]
        entry["urls"] = [f"{server.url}/dead/{name}", f"{server.url}/files/{name}"]
        entry["size"] = len(data)
        alg = "md5" if name.endswith(".tar") else "sha256"
        entry["checksum"] = f"{alg}:{hashlib.new(alg, data).hexdigest()}"
    for name, value in (checksums or {}).items():
        shipped["archives"][name]["checksum"] = value
    shipped["counts"] = source["expected"]
    path.write_text(yaml.safe_dump(shipped))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_get_falls_through_resumes_verifies_and_skips_on_rerun(tmp_path, source, cache):
    root, lines = tmp_path / "data", []
    with Loopback() as server:
        reg = _registry(tmp_path / "registry.yaml", server, source, {"annotations_trainval2017.zip": None})
        train = source["archives"]["train2017.zip"]
        server.cut["/files/train2017.zip"] = 600_000
        with pytest.raises(HarnessError, match="train2017.zip: no source gave a verified file"):
            get_data(["coco"], root, registry=reg, progress=False, log=lines.append)
        assert any("/dead/train2017.zip: HTTP 404" in line and "trying the next source" in line for line in lines)
        have = (root / "archives/train2017.zip.part").stat().st_size
        assert 0 < have <= 600_000 and train.startswith((root / "archives/train2017.zip.part").read_bytes())
        assert not (root / "coco").exists()  # nothing unpacked

        # a corrupt partial download: resumed, fails its checksum, removed, downloaded again from the start
        (root / "archives").mkdir(exist_ok=True)
        (root / "archives/VOCtest_06-Nov-2007.tar.part").write_bytes(b"\0" * 1000)
        lines.clear()
        done = get_data(["coco", "voc2007", "sbd"], root, registry=reg, progress=False, log=lines.append)
        assert done == ["coco", "voc2007", "voc2012", "sbd"]  # sbd needs voc2012
        assert server.gets("/files/train2017.zip")[-1] == f"bytes={have}-"  # resumed
        assert (root / "archives/train2017.zip").read_bytes() == train
        assert server.gets("/files/VOCtest_06-Nov-2007.tar") == ["bytes=1000-", None]
        assert any("VOCtest_06-Nov-2007.tar" in line and "(resumed): checksum mismatch" in line for line in lines)
        assert (root / "archives/VOCtest_06-Nov-2007.tar").read_bytes() == source["archives"]["VOCtest_06-Nov-2007.tar"]
        pins = json.loads((cache / "pins.json").read_text())
        assert pins["data/annotations_trainval2017.zip"] == hashlib.sha256(
            source["archives"]["annotations_trainval2017.zip"]).hexdigest()  # no checksum given: pinned

        # the layouts `data check` expects, with the test registry's counts
        rows = {r["name"]: r for r in check_data_root(root, registry=reg)}
        assert all(r["present"] and not r["wrong"] for r in rows.values()), rows
        assert rows["SBD (train_aug)"]["images"]["train_aug"] == len(source["train_aug"])
        v12 = root / "VOCdevkit/VOC2012"
        assert (v12 / "ImageSets/Segmentation/train_aug.txt").read_text().split() == source["train_aug"]
        assert (root / "VOCdevkit/VOC2007/ImageSets/Main/test.txt").is_file()  # test tar merged into trainval's folder
        assert not (root / "SBD/dataset/img").exists() and not list(root.glob(".unpacking-*"))
        src12 = source["src"] / "VOCdevkit/VOC2012"
        for image_id in source["train_aug"]:  # VOC's own label where it has one, SBD's .mat otherwise
            own = src12 / "SegmentationClass" / f"{image_id}.png"
            want = np.asarray(Image.open(own if own.is_file() else src12 / "SegmentationClassAug" / f"{image_id}.png"))
            assert np.array_equal(np.asarray(Image.open(v12 / "SegmentationClassAug" / f"{image_id}.png")), want)

        # a second run verifies and skips: no download, no unpacking
        before, lines[:] = len(server.log), []
        get_data(["coco", "voc2007", "sbd"], root, registry=reg, progress=False, log=lines.append)
        assert len(server.log) == before
        assert sum("verified, unpacked earlier" in line for line in lines) == 7 and "converted earlier" in lines[-1]

        # a pinned file that changes is an error, and the changed file is removed
        (root / "archives/annotations_trainval2017.zip").unlink()
        changed = bytearray(source["archives"]["annotations_trainval2017.zip"])
        changed[-1] ^= 1
        server.files["/files/annotations_trainval2017.zip"] = bytes(changed)
        with pytest.raises(HarnessError, match="annotations_trainval2017.zip removed: .* differs from the one pinned "
                                               "on first download"):
            get_data(["coco"], root, registry=reg, progress=False, log=lines.append)
        assert not (root / "archives/annotations_trainval2017.zip").exists()


def test_checksum_mismatch_removes_the_file_and_unpacks_nothing(tmp_path, source, cache):
    root, lines = tmp_path / "data", []
    with Loopback() as server:
        reg = _registry(tmp_path / "registry.yaml", server, source, {"VOCtrainval_11-May-2012.tar": "md5:" + "0" * 32})
        with pytest.raises(HarnessError, match="VOCtrainval_11-May-2012.tar: no source gave a verified file"):
            get_data(["voc2012"], root, registry=reg, progress=False, log=lines.append)
    assert any("VOCtrainval_11-May-2012.tar from" in line and "checksum mismatch" in line and "removed" in line
               for line in lines)
    assert not list((root / "archives").iterdir()) and not (root / "VOCdevkit").exists()


def test_mirror_is_tried_first_and_disk_space_is_checked(tmp_path, source, cache):
    root, lines = tmp_path / "data", []
    with Loopback() as server:
        reg = _registry(tmp_path / "registry.yaml", server, source)
        server.files["/m/VOCtrainval_11-May-2012.tar"] = source["archives"]["VOCtrainval_11-May-2012.tar"]
        get_data(["voc2012"], root, mirrors=[f"{server.url}/m/"], registry=reg, progress=False, log=lines.append)
        assert [p for p, _ in server.log] == ["/m/VOCtrainval_11-May-2012.tar"]
        data = yaml.safe_load(reg.read_text())
        data["archives"]["val2017.zip"]["size"] = 10 ** 18
        reg.write_text(yaml.safe_dump(data))
        with pytest.raises(HarnessError, match=f"not enough free space under {root}: need about"):
            get_data(["coco"], root, registry=reg, progress=False, log=lines.append)


def test_data_check_reports_wrong_counts(tmp_path, source, capsys):
    rows = {r["name"]: r for r in check_data_root(source["src"])}  # synthetic: its marker's own counts
    assert not any(r["wrong"] for r in rows.values())
    fake = tmp_path / "root" / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    fake.mkdir(parents=True)
    (fake / "trainval.txt").write_text("000001\n000002\n")
    code, out, err = run_cli(capsys, "data", "check", "--root", tmp_path / "root")
    assert code == 1, err
    assert "wrong count: trainval: expected 5,011, found 2" in out  # the shipped registry's standard number
    assert "wrong image counts in VOC2007" in err
    (tmp_path / "empty").mkdir()
    code, out, err = run_cli(capsys, "data", "check", "--root", tmp_path / "empty")
    assert code == 1 and "MISSING" in out and "no standard dataset is complete under" in err  # exit 0 before


@pytest.mark.slow
def test_cli_get_then_check_then_eval(tmp_path, source, monkeypatch, capsys):
    """`harness data get`, `data check` and a 3-iteration seg eval on the root it made (train_aug from SBD)."""
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))

    def run(*args, **env):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        code, out, err = run_cli(capsys, *args)
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)

    with Loopback() as server:
        reg = _registry(tmp_path / "registry.yaml", server, source)
        got = run("data", "get", "all", "--root", tmp_path / "data", "--registry", reg, "--no-progress")
    assert got.returncode == 0, got.stderr[-2000:]
    dead = [line for line in got.stdout.splitlines() if "/dead/" in line]
    assert len(dead) == 7 and all(line.endswith("HTTP 404 Not Found; trying the next source") for line in dead), dead
    assert "done: coco, coco-keypoints, voc2012, sbd, voc2007 under" in got.stdout
    check = run("data", "check", "--root", tmp_path / "data", "--registry", reg)
    assert check.returncode == 0 and "WRONG" not in check.stdout and "MISSING" not in check.stdout, check.stdout
    cards = tmp_path / "tasks"
    cards.mkdir()
    seg = yaml.safe_load((Path(__file__).resolve().parents[1] / "tasks/seg.yaml").read_text())
    seg["profiles"]["smoke"].update({"iterations": 3, "batch_size": 2, "warmup_iters": 1, "train_images": 4,
                                     "checkpoint_period": 2})
    (cards / "seg.yaml").write_text(yaml.safe_dump(seg))
    ev = run("eval", "--backbone", f"random:{SMALL_ARCH}", "--tasks", "seg", "--protocols", "frozen", "--profile",
             "smoke", "--data-root", tmp_path / "data", "--out", tmp_path / "run", "--device", "cpu", "--no-progress",
             HARNESS_TASKS=str(cards))
    assert ev.returncode == 0, ev.stderr[-2000:]
    result = json.loads((tmp_path / "run/seg/frozen/seed0/result.json").read_text())
    assert result["dataset"]["synthetic"] is False and result["dataset"]["train_split"] == "VOC2012/train_aug"
    assert result["dataset"]["images_scored"] == SIZES["voc12_val"]
