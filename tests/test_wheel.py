"""The wheel works outside the checkout: cards and registry inside it, provenance without the checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.support import SMALL_ARCH

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_installed_alone_lists_cards_checks_data_and_runs_a_smoke_eval(tmp_path):
    src = tmp_path / "src"  # a copy, so the build leaves nothing in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", "runs", "build", "dist", "*.egg-info",
                                                            "__pycache__", ".pytest_cache", ".venv"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("harness-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"harness/task_cards/{p.name}" for p in (ROOT / "tasks").glob("*.yaml")} <= names
    assert {f"harness/backbone_cards/{p.name}" for p in (ROOT / "backbones").glob("*.yaml")} <= names
    assert "harness/datasets/registry.yaml" in names
    subpackages = {p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "harness").rglob("__init__.py")}
    assert {f"{s}/__init__.py" for s in subpackages} <= names, "a harness subpackage is missing from pyproject's list"

    target = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                                str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-2000:]
    work = tmp_path / "elsewhere"  # the user's own git repository: its commit must not be recorded
    work.mkdir()
    subprocess.run(["git", "init", "-q", str(work)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HARNESS_")}
    env.update({"PYTHONPATH": str(target), "OMP_NUM_THREADS": "2", "HARNESS_CACHE": str(tmp_path / "cache")})

    def harness(*args, **extra):
        return subprocess.run([sys.executable, "-m", "harness", *map(str, args)], capture_output=True, text=True,
                              cwd=work, env={**env, **extra}, timeout=600)

    where = subprocess.run([sys.executable, "-c", "import harness; print(harness.__file__)"], capture_output=True,
                           text=True, cwd=work, env=env)
    assert where.stdout.strip().startswith(str(target)), where.stdout
    tasks = harness("tasks", "list")
    assert tasks.returncode == 0 and f"task card(s) in {target / 'harness' / 'task_cards'}" in tasks.stdout, tasks.stderr
    assert all(f"{p.stem} " in tasks.stdout for p in (ROOT / "tasks").glob("*.yaml"))
    backbones = harness("backbones", "list")
    assert backbones.returncode == 0 and f"in {target / 'harness' / 'backbone_cards'}" in backbones.stdout
    assert "torchvision-resnet50-v1" in backbones.stdout

    data = tmp_path / "data"
    synth = harness("data", "synth", "--out", data, "--sizes",
                    "coco_train=1,coco_val=1,voc07_trainval=1,voc07_test=1,voc12_train=4,voc12_val=2,"
                    "voc12_aug_extra=0,min_side=64,max_side=96")
    assert synth.returncode == 0, synth.stderr
    check = harness("data", "check", "--root", data)  # the registry inside the wheel; the marker's counts
    assert check.returncode == 0 and "MISSING" not in check.stdout, check.stdout + check.stderr

    # the shipped smoke card dry-runs from the installed wheel: plan, 2 training steps, 2 predictions
    dry = harness("eval", "--backbone", f"random:{SMALL_ARCH}", "--tasks", "seg", "--protocols", "frozen", "--profile",
                  "smoke", "--data-root", data, "--out", tmp_path / "dry", "--device", "cpu", "--no-progress",
                  "--dry-run")
    assert dry.returncode == 0 and "no results written" in dry.stdout, dry.stdout + dry.stderr[-2000:]
    assert not (tmp_path / "dry" / "results.json").exists()

    # a real tiny smoke eval from the installed wheel (one task, 2 iterations)
    cards = tmp_path / "tasks"
    cards.mkdir()
    seg = yaml.safe_load((target / "harness/task_cards/seg.yaml").read_text())
    seg["profiles"]["smoke"].update({"iterations": 2, "batch_size": 2, "warmup_iters": 1, "train_images": 4,
                                     "checkpoint_period": 2})
    (cards / "seg.yaml").write_text(yaml.safe_dump(seg))
    ev = harness("eval", "--backbone", f"random:{SMALL_ARCH}", "--tasks", "seg", "--protocols", "frozen", "--profile",
                 "smoke", "--data-root", data, "--out", tmp_path / "run", "--device", "cpu", "--no-progress",
                 HARNESS_TASKS=str(cards))
    assert ev.returncode == 0, ev.stderr[-2000:]
    result = json.loads((tmp_path / "run/seg/frozen/seed0/result.json").read_text())
    assert result["git_commit"] is None and result["git_dirty"] is None  # not run from a harness checkout
    assert {"python", "torch", "torchvision", "timm"} <= set(result["environment"])
