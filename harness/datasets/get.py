"""`harness data get`: download, verify and unpack the standard datasets into a data root.

The registry (`registry.yaml` beside this file, or $HARNESS_DATA_REGISTRY) names each archive's
sources, checksum, size and destination. Archives are kept in `ROOT/archives/`; each is verified
before it is unpacked, unpacked into a temporary folder inside the root, and only then moved into
place, so an interrupted or failed run leaves no half-extracted dataset. A second run verifies the
archives and skips what is done (`ROOT/archives/<name>.extracted` marks an unpacked archive).
"""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from harness.errors import HarnessError, first_problem, one_line
from harness.fetch import fetch, free_bytes, parse_checksum
from harness.files import write_text_atomic

REGISTRY_ENV = "HARNESS_DATA_REGISTRY"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Archive(_Strict):
    urls: list[str]
    checksum: str | None = None
    size: int | None = None
    extract: dict[str, str]


class DatasetEntry(_Strict):
    archives: list[str]
    needs: list[str] = []
    convert: str | None = None


class Registry(_Strict):
    archives: dict[str, Archive]
    datasets: dict[str, DatasetEntry]
    counts: dict[str, dict[str, int]] = {}
    test_images: dict[str, int] = {}  # standard test splits, by their name in results


def registry_path(path: str | Path | None = None) -> Path:
    if path:
        return Path(path)
    if os.environ.get(REGISTRY_ENV):
        return Path(os.environ[REGISTRY_ENV])
    return Path(__file__).resolve().parent / "registry.yaml"


def load_registry(path: str | Path | None = None) -> Registry:
    path = registry_path(path)
    try:
        data = yaml.safe_load(path.read_text())
        reg = Registry.model_validate(data)
    except FileNotFoundError:
        raise HarnessError(f"data registry not found: {path}") from None
    except yaml.YAMLError as exc:
        raise HarnessError(f"{path}: not valid YAML ({one_line(exc)})") from None
    except ValidationError as exc:
        raise HarnessError(f"{path}: {first_problem(exc)}") from None
    for name, entry in reg.datasets.items():
        for a in entry.archives:
            if a not in reg.archives:
                raise HarnessError(f"{path}: dataset {name} names unknown archive {a}")
        for n in entry.needs:
            if n not in reg.datasets:
                raise HarnessError(f"{path}: dataset {name} needs unknown dataset {n}")
    for a in reg.archives.values():
        parse_checksum(a.checksum)
    return reg


def resolve(reg: Registry, names: list[str]) -> list[str]:
    """Dataset names with what they need first, each once; ``all`` is every dataset."""
    if "all" in names:
        names = list(reg.datasets)
    order: list[str] = []

    def visit(name: str) -> None:
        if name not in reg.datasets:
            raise HarnessError(f"unknown dataset {name!r} (known: {', '.join(reg.datasets)}, all)")
        for need in reg.datasets[name].needs:
            visit(need)
        if name not in order:
            order.append(name)

    for name in names:
        visit(name)
    return order


# ----------------------------------------------------------------------------- unpacking
def _members(archive: Path, prefixes: list[str]):
    """(opened archive, kind, member names under one of the prefixes)."""
    def wanted(name: str) -> bool:
        name = name.rstrip("/")
        return any(name == p or name.startswith(p + "/") for p in prefixes)

    if zipfile.is_zipfile(archive):
        z = zipfile.ZipFile(archive)
        return z, "zip", [n for n in z.namelist() if wanted(n)]
    try:
        t = tarfile.open(archive)
    except tarfile.TarError:
        raise HarnessError(f"{archive}: neither a zip nor a tar archive") from None
    return t, "tar", [m for m in t.getmembers() if wanted(m.name)]


def _move_into(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``; when ``dst`` is a folder already (VOC2007 test into trainval), merge."""
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)
        return
    if not (src.is_dir() and dst.is_dir()):
        os.replace(src, dst)
        return
    for child in src.iterdir():
        _move_into(child, dst / child.name)


def unpack(archive: Path, extract: dict[str, str], root: Path) -> None:
    """Unpack the members under ``extract``'s prefixes into a temporary folder, then move them to their places."""
    tmp = root / f".unpacking-{archive.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        opened, kind, members = _members(archive, list(extract))
        with opened:
            if not members:
                raise HarnessError(f"{archive}: holds none of {', '.join(extract)}")
            if kind == "zip":
                opened.extractall(tmp, members)
            else:
                opened.extractall(tmp, members, filter="data")
        missing = [p for p in extract if not (tmp / p).exists()]
        if missing:
            raise HarnessError(f"{archive}: holds no {', '.join(missing)}")
        for src, dst in extract.items():
            _move_into(tmp / src, root / dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- SBD -> train_aug
def convert_train_aug(root: Path, log=print) -> None:
    """`VOC2012/SegmentationClassAug/*.png` and `ImageSets/Segmentation/train_aug.txt` from SBD's `.mat`.

    train_aug = (SBD train ∪ SBD val ∪ VOC12 seg train) − VOC12 seg val. An image with a VOC12
    label PNG keeps it (as `harness.datasets.voc.VOCSegmentation` does with SBD); the others get
    SBD's GTcls.Segmentation. Written into temporary names, then renamed.
    """
    from PIL import Image

    from harness.datasets.voc import read_label_png, read_sbd_mask, sbd_train_aug_ids

    voc12 = root / "VOCdevkit" / "VOC2012"
    sbd = root / "SBD" / "dataset"  # where the registry unpacks benchmark.tgz
    aug_list = voc12 / "ImageSets" / "Segmentation" / "train_aug.txt"
    out = voc12 / "SegmentationClassAug"
    ids = sbd_train_aug_ids(voc12, sbd)
    if aug_list.is_file() and out.is_dir() and aug_list.read_text().split() == ids and \
            all((out / f"{i}.png").is_file() for i in ids):
        log(f"train_aug: {len(ids):,} images, converted earlier")
        return
    missing = [i for i in ids if not (voc12 / "JPEGImages" / f"{i}.jpg").is_file()]
    if missing:
        raise HarnessError(f"train_aug: {len(missing)} image(s) absent from {voc12 / 'JPEGImages'}, e.g. {missing[0]}")
    tmp = voc12 / ".SegmentationClassAug.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for image_id in ids:
        own = voc12 / "SegmentationClass" / f"{image_id}.png"
        mask = read_label_png(own) if own.is_file() else read_sbd_mask(sbd / "cls" / f"{image_id}.mat")
        Image.fromarray(np.asarray(mask, dtype=np.uint8), mode="L").save(tmp / f"{image_id}.png")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    write_text_atomic(aug_list, "".join(f"{i}\n" for i in ids))
    log(f"train_aug: {len(ids):,} label PNGs in {out}, list in {aug_list}")


# ----------------------------------------------------------------------------- get
def get_data(names: list[str], root: Path, mirrors: list[str] | None = None, registry: str | Path | None = None,
             progress: bool = True, log=print) -> list[str]:
    """Download, verify and unpack the named datasets under ``root``; returns the datasets done."""
    reg = load_registry(registry)
    datasets = resolve(reg, names)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    store = root / "archives"
    archives = list(dict.fromkeys(a for d in datasets for a in reg.datasets[d].archives))

    # free space: what is left to download, plus room to unpack what is not unpacked yet
    need = 0
    for name in archives:
        a = reg.archives[name]
        size = a.size or 0
        if not (store / name).is_file():
            part = store / (name + ".part")
            need += size - (part.stat().st_size if part.is_file() else 0)
        if not (store / (name + ".extracted")).is_file():
            need += size
    free = free_bytes(root)
    if need > free:
        raise HarnessError(f"not enough free space under {root}: need about {need / 1e9:.1f} GB, "
                           f"{free / 1e9:.1f} GB free")

    for name in archives:
        a = reg.archives[name]
        marker = store / (name + ".extracted")
        bases = [m.rstrip("/") + "/" + name for m in (mirrors or [])]
        path = fetch(name, bases + a.urls, store, checksum=a.checksum, size=a.size, pin_key=f"data/{name}",
                     progress=progress, log=log)
        if marker.is_file():
            log(f"{name}: verified, unpacked earlier")
            continue
        log(f"{name}: verified, unpacking")
        unpack(path, a.extract, root)
        marker.write_text("")
    for d in datasets:
        if reg.datasets[d].convert == "train_aug":
            convert_train_aug(root, log=log)
    return datasets
