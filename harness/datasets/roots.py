"""Finding the standard datasets under a data root (COCO 2017, VOC2007, VOC2012, SBD).

Expected layout (the one each dataset's download unpacks to), under DIR:

    coco/annotations/{instances,person_keypoints}_{train,val}2017.json, coco/{train,val}2017/*.jpg
    VOCdevkit/VOC2007/{Annotations,JPEGImages,ImageSets/Main}
    VOCdevkit/VOC2012/{Annotations,JPEGImages,ImageSets/{Main,Segmentation},SegmentationClass}
    SBD: VOCdevkit/VOC2012/{SegmentationClassAug/, ImageSets/Segmentation/train_aug.txt}
         or SBD/dataset/{cls/,train.txt,val.txt} (also benchmark_RELEASE/dataset)
"""

from __future__ import annotations

import os
from pathlib import Path

from harness.errors import HarnessError

MARKER = "SYNTHETIC.json"  # what `harness data synth` writes into a root (here, so checking needs no torch)

DATA_ROOT_ENV = "HARNESS_DATA"


def _count_files(folder: Path, suffix: str) -> int:
    with os.scandir(folder) as it:
        return sum(1 for e in it if e.name.endswith(suffix))


def _count_lines(path: Path) -> int:
    try:
        return sum(1 for line in path.read_text(encoding="utf-8-sig").splitlines() if line.strip())
    except UnicodeDecodeError as exc:
        raise HarnessError(f"{path}: not a text list of image ids ({exc})") from None


def _first_dir(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.is_dir()), None)


def _coco_base(root: Path) -> Path:
    return _first_dir([root / "coco", root / "COCO", root / "coco2017"]) or root / "coco"


def _coco(root: Path) -> dict:
    base = _coco_base(root)
    needed = [base / "annotations" / f"{kind}_{split}2017.json" for kind in ("instances", "person_keypoints") for split in ("train", "val")]
    needed += [base / "train2017", base / "val2017"]
    counts = {s: _count_files(base / f"{s}2017", ".jpg") for s in ("train", "val") if (base / f"{s}2017").is_dir()}
    return {"name": "COCO 2017", "where": str(base), "images": counts, "missing": [str(p) for p in needed if not p.exists()]}


def _voc(root: Path, year: int) -> dict:
    devkit = _first_dir([root / "VOCdevkit", root / "voc" / "VOCdevkit", root / "VOC" / "VOCdevkit"]) or root / "VOCdevkit"
    base = devkit / f"VOC{year}"
    needed = [base / "Annotations", base / "JPEGImages", base / "ImageSets" / "Main" / "trainval.txt"]
    if year == 2007:
        needed.append(base / "ImageSets" / "Main" / "test.txt")
    else:
        needed += [base / "ImageSets" / "Segmentation" / f"{s}.txt" for s in ("train", "val")] + [base / "SegmentationClass"]
    lists = [("Main", "trainval"), ("Main", "test")] if year == 2007 else [("Main", "trainval"), ("Segmentation", "train"), ("Segmentation", "val")]
    counts = {}
    for kind, split in lists:
        path = base / "ImageSets" / kind / f"{split}.txt"
        if path.is_file():
            counts[f"{kind.lower()}/{split}" if year == 2012 else split] = _count_lines(path)
    return {"name": f"VOC{year}", "where": str(base), "images": counts, "missing": [str(p) for p in needed if not p.exists()]}


def _sbd(root: Path) -> dict:
    voc12 = Path(_voc(root, 2012)["where"])
    aug_list = voc12 / "ImageSets" / "Segmentation" / "train_aug.txt"
    if aug_list.is_file() and (voc12 / "SegmentationClassAug").is_dir():
        return {"name": "SBD (train_aug)", "where": str(voc12 / "SegmentationClassAug"), "images": {"train_aug": _count_lines(aug_list)}, "missing": []}
    sbd = sbd_dir(root)
    needed = [sbd / "cls", sbd / "train.txt", sbd / "val.txt"]
    counts = {s: _count_lines(sbd / f"{s}.txt") for s in ("train", "val") if (sbd / f"{s}.txt").is_file()}
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        missing.insert(0, f"{aug_list} with {voc12 / 'SegmentationClassAug'}")
    return {"name": "SBD (train_aug)", "where": str(sbd), "images": counts, "missing": missing}


def sbd_dir(root: Path) -> Path:
    """The SBD `dataset/` folder under a data root (it may be absent)."""
    for top in (root / "SBD", root / "benchmark_RELEASE", root / "sbd"):
        if (top / "dataset").is_dir():
            return top / "dataset"
        if (top / "cls").is_dir():
            return top
    return root / "SBD" / "dataset"


def read_marker(root: Path) -> dict:
    """A root's `SYNTHETIC.json` (what `harness data synth` wrote); a damaged one is a one-line error."""
    import json

    path = Path(root) / MARKER
    try:
        marker = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{path}: not valid JSON ({exc}); rewrite the data with `harness data synth`") from None
    if not isinstance(marker, dict):
        raise HarnessError(f"{path}: not a `harness data synth` marker; rewrite the data with `harness data synth`")
    return marker


def expected_counts(root: Path, registry=None) -> dict[str, dict[str, int]] | None:
    """The image counts a root should have: its `SYNTHETIC.json` marker's (None when the marker
    predates them), else the data registry's standard numbers."""
    if (Path(root) / MARKER).is_file():
        return read_marker(root).get("expected")
    from harness.datasets.get import load_registry

    return load_registry(registry).counts


def check_data_root(root: Path, registry=None) -> list[dict]:
    """One row per standard dataset: name, where it was looked for, image counts, missing paths,
    and the counts that differ from the expected ones (``wrong``: "split: expected N, found M")."""
    root = Path(root)
    if not root.is_dir():
        raise HarnessError(f"data root not found: {root}")
    rows = [_coco(root), _voc(root, 2007), _voc(root, 2012), _sbd(root)]
    expected = expected_counts(root, registry)
    for row in rows:
        row["present"] = not row["missing"]
        want = (expected or {}).get(row["name"], {})
        row["wrong"] = [f"{split}: expected {n:,}, found {row['images'][split]:,}"
                        for split, n in want.items() if split in row["images"] and row["images"][split] != n]
    return rows


def require(root: Path, name: str) -> dict:
    """The check row of one dataset ("COCO 2017", "VOC2007", "VOC2012", "SBD (train_aug)"), or a one-line error."""
    row = next(r for r in check_data_root(root) if r["name"] == name)
    if not row["present"]:
        raise HarnessError(f"{name} not found under {root}: missing {', '.join(row['missing'][:3])}")
    return row


def require_coco(root: Path, paths: list[str]) -> Path:
    """The COCO 2017 folder under a data root, once the files a task reads (``paths``, relative to
    it) are there; else a one-line error naming the missing ones. A detection task does not need
    the keypoint annotations, nor the reverse."""
    base = _coco_base(Path(root))
    missing = [str(base / p) for p in paths if not (base / p).exists()]
    if missing:
        raise HarnessError(f"COCO 2017 not found under {root}: missing {', '.join(missing[:3])}")
    return base


def format_check(rows: list[dict]) -> str:
    lines = []
    for row in rows:
        status = ("WRONG" if row.get("wrong") else "present") if row["present"] else "MISSING"
        counts = ", ".join(f"{k} {v}" for k, v in row["images"].items()) or "no images"
        lines.append(f"{row['name']:<16} {status:<8} {row['where']}  ({counts})")
        lines.extend(f"    missing: {m}" for m in row["missing"])
        lines.extend(f"    wrong count: {w}" for w in row.get("wrong", []))
    return "\n".join(lines)
