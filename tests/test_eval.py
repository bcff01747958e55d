"""`harness eval` end to end on synthetic data, with task cards shrunk to a few iterations."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.datasets.synthetic import MARKER
from tests.support import SMALL_ARCH, run_cli
from tests.support import tiny_cards as write_tiny_cards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_cards(tmp_path_factory) -> Path:
    """Copies of the real cards whose smoke profile runs 3 iterations on 6 training images."""
    return write_tiny_cards(tmp_path_factory.mktemp("tasks"))


@pytest.fixture
def tiny(tiny_cards, monkeypatch) -> Path:
    """The shrunk cards in use (``HARNESS_TASKS``) for an in-process `harness eval`."""
    monkeypatch.setenv("HARNESS_TASKS", str(tiny_cards))
    return tiny_cards


@pytest.mark.slow
def test_eval_writes_results_skips_finished_runs_and_aggregates_seeds(tiny, synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["eval", "--backbone", f"random:{SMALL_ARCH}", "--tasks", "voc,seg", "--protocols", "finetune,frozen",
            "--profile", "smoke", "--data-root", synthetic_root, "--seeds", "2", "--out", out, "--no-progress", "--device", "cpu"]
    code, stdout, stderr = run_cli(capsys, *args)
    assert code == 0, stderr[-3000:]
    for task in ("voc", "seg"):
        for protocol in ("finetune", "frozen"):
            for seed in (0, 1):
                run = out / task / protocol / f"seed{seed}"
                result = json.loads((run / "result.json").read_text())
                assert (result["task"], result["protocol"], result["profile"], result["seed"]) == (task, protocol, "smoke", seed)
                assert result["backbone"]["sha256"] is None and result["backbone"]["layout"] == "random"
                assert (run / "metrics.jsonl").is_file() and (run / "checkpoint.pt").is_file()
                split = "ImageSets/Main/test.txt" if task == "voc" else "ImageSets/Segmentation/val.txt"
                voc = "VOC2007" if task == "voc" else "VOC2012"
                n = len((synthetic_root / "VOCdevkit" / voc / split).read_text().split())
                assert result["dataset"]["images_scored"] == n
                assert result["dataset"]["images_trained"] == 6 and result["training"]["iterations"] == 3
                assert result["dataset"]["synthetic"] is True  # `harness data synth` output, though given as --data-root
    summary = json.loads((out / "results.json").read_text())
    assert summary["synthetic"] is True
    rows = {(r["task"], r["protocol"]): r for r in summary["runs"]}
    miou = rows[("seg", "frozen")]["metrics"]["mIoU"]
    assert len(miou["values"]) == 2 and miou["mean"] == pytest.approx(sum(miou["values"]) / 2)
    assert "mAP@[.5,.95]" in stdout and "AP50" in stdout and "mIoU" in stdout
    code, stdout, _ = run_cli(capsys, *args)
    assert code == 0 and stdout.count("done earlier, skipped") == 8
    assert json.loads((out / "results.json").read_text())["runs"] == summary["runs"]
    # a rerun that would make other results is refused, not answered with these (they were skipped before)
    unmarked = tmp_path / "unmarked"  # the same images, no longer marked as `harness data synth` output
    shutil.copytree(synthetic_root, unmarked, symlinks=True)
    (unmarked / MARKER).unlink()
    for extra, message in [(["--batch-size", "4"], "training batch_size"),
                           (["--normalization", "caffe"], "another normalization"),
                           (["--precision", "bf16"], "another training precision"),
                           (["--data-root", unmarked], "another data (data: [True,")]:
        code, _, stderr = run_cli(capsys, *args, *extra)
        assert code == 2 and message in stderr and "use another --out" in stderr, stderr
    code, _, stderr = run_cli(capsys, *args, "--batch-size", "4", "--dry-run")  # the dry run finds it too
    assert code == 2 and "training batch_size" in stderr


@pytest.mark.slow
def test_eval_coco_and_pose_on_synthetic(tiny, synthetic_root, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, stderr = run_cli(capsys, "eval", "--backbone", "random:resnet18", "--tasks", "coco,pose", "--protocols", "frozen",
                              "--profile", "smoke", "--data-root", synthetic_root, "--out", out, "--no-progress", "--device", "cpu")
    assert code == 0, stderr[-3000:]
    pose = json.loads((out / "pose/frozen/seed0/result.json").read_text())
    assert {"AP", "AP50", "box_AP", "box_AP50"} <= set(pose["metrics"])
    gt = json.loads((synthetic_root / "coco/annotations/person_keypoints_val2017.json").read_text())
    assert pose["dataset"]["images_scored"] == len(gt["images"])
    coco = json.loads((out / "coco/frozen/seed0/result.json").read_text())
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(coco["metrics"])
    # the pose yardstick rebuilds the run's model from its card and checkpoint and re-scores it
    pose_prior = runpy.run_path(str(ROOT / "bench" / "pose_prior.py"))["main"]
    assert pose_prior(["--data", str(synthetic_root), "--run", str(out / "pose/frozen/seed0")]) == 0
    lines = capsys.readouterr().out.splitlines()
    own = lines[lines.index(f"{out / 'pose/frozen/seed0'}, its own boxes and keypoints (as harness eval):") + 1]
    assert own.split()[:2] == ["AP", f"{pose['metrics']['AP']:.2f}"]
    assert any(line.endswith("its keypoint head on the true boxes:") for line in lines)
    # the demo's profile rebuilds both cells, times their checkpoint writes, prediction and scoring,
    # and reproduces every recorded metric
    breakdown = runpy.run_path(str(ROOT / "bench" / "demo_breakdown.py"))["main"]
    assert breakdown([str(out), "--data", str(synthetic_root), "--repeat", "1", "--no-startup",
                      "--threads", str(torch.get_num_threads())]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "/seed0 |" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| coco/frozen/seed0", "| pose/frozen/seed0"]
    assert all(row.endswith("| yes |") for row in rows)


@pytest.mark.slow
def test_eval_under_torchrun_with_two_gloo_processes(tiny_cards, synthetic_root, tmp_path):
    """DDP training, test set sharded over 2 ranks, one result scoring every image (SyncBatchNorm needs CUDA;
    on the CPU the result says the statistics are per process)."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HARNESS_TASKS": str(tiny_cards)}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "harness",
           "eval", "--backbone", f"random:{SMALL_ARCH}", "--tasks", "voc", "--protocols", "finetune", "--profile", "smoke",
           "--data-root", str(synthetic_root), "--out", str(out), "--no-progress", "--device", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("mAP@[.5,.95]") == 1  # the table is printed by rank 0 only
    result = json.loads((out / "voc/finetune/seed0/result.json").read_text())
    assert result["training"]["world_size"] == 2 and result["training"]["per_process_batch"] == 1
    assert "BatchNorm statistics per process" in result["protocol_info"]["norm"]
    n = len((synthetic_root / "VOCdevkit/VOC2007/ImageSets/Main/test.txt").read_text().split())
    assert result["dataset"]["images_scored"] == n


@pytest.mark.slow
def test_eval_with_data_loading_workers(tiny, synthetic_root, tmp_path, capsys):
    """Worker processes load and augment (resizes in a worker run on one thread, so images can
    differ from the main process's in the last float bit: metrics are not compared bit for bit)."""
    out = tmp_path / "w2"
    code, _, stderr = run_cli(capsys, "eval", "--backbone", f"random:{SMALL_ARCH}", "--tasks", "seg", "--protocols", "finetune",
                              "--profile", "smoke", "--data-root", synthetic_root, "--out", out, "--no-progress",
                              "--device", "cpu", "--workers", "2")
    assert code == 0, stderr[-3000:]
    result = json.loads((out / "seg" / "finetune" / "seed0" / "result.json").read_text())
    assert result["training"]["data_workers"] == 2 and result["training"]["iterations"] == 3
    n = len((synthetic_root / "VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt").read_text().split())
    assert result["dataset"]["images_scored"] == n


def test_eval_user_errors_are_one_line(tmp_path, capsys, monkeypatch):
    def harness(*args):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        return err

    err = harness("eval", "--backbone", "random:resnet18", "--tasks", "voc", "--profile", "smoke", "--data-root", tmp_path,
                  "--out", tmp_path / "o", "--device", "cpu")
    assert "VOC2007 not found under" in err and "missing" in err
    err = harness("eval", "--backbone", "random:resnet18", "--tasks", "imagenet", "--synthetic", "--out", tmp_path / "o")
    assert "unknown task 'imagenet'" in err
    with monkeypatch.context() as env:
        env.setenv("HARNESS_DATA", "")
        err = harness("eval", "--backbone", "random:resnet18", "--tasks", "voc", "--out", tmp_path / "o")
    assert "no data root" in err
    bad_ckpt = tmp_path / "x.pth"
    bad_ckpt.write_text("not a checkpoint")
    err = harness("eval", "--backbone", bad_ckpt, "--arch", "resnet18", "--tasks", "voc", "--synthetic", "--out", tmp_path / "o")
    assert str(bad_ckpt) in err
    err = harness("eval", "--backbone", "random:resnet18", "--tasks", "voc", "--synthetic", "--workers", "-1",
                  "--out", tmp_path / "o")
    assert "--workers must be 0 or more" in err
    stale = tmp_path / "stale" / "synthetic-data"  # made by another version of `harness data synth`
    stale.mkdir(parents=True)
    (stale / ".complete").write_text("")
    (stale / "SYNTHETIC.json").write_text(json.dumps({"seed": 0, "sizes": {"coco_train": 200}}))
    err = harness("eval", "--backbone", "random:resnet18", "--tasks", "voc", "--synthetic", "--out", tmp_path / "stale",
                  "--device", "cpu")
    assert "was generated with other settings" in err and "use another --out" in err
    for args, message in ((["--tasks", ","], "--tasks names nothing"),
                          (["--tasks", "voc,seg,voc"], "--tasks names voc more than once"),
                          (["--tasks", "voc", "--protocols", "frozen,frozen"], "--protocols names frozen more than once"),
                          (["--tasks", "voc", "--batch-size", "0"], "--batch-size must be at least 1"),
                          (["--tasks", "voc,seg", "--batch-size", "1"], "seg: the ASPP head's BatchNorm needs at least 2 images")):
        err = harness("eval", "--backbone", "random:resnet18", "--synthetic", "--out", tmp_path / "o", "--device", "cpu", *args)
        assert message in err, err
    assert not (tmp_path / "o").exists()  # a refused eval writes nothing
