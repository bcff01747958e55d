"""bench/gpu_check.py --tiny runs on the CPU and reports every card x precision setting, so the GPU check cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cards import all_cards

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)  # about 25 s alone on the 2-core development machine
def test_gpu_check_tiny_writes_a_positive_row_per_card_and_setting(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    settings = {(p, cl) for p in ("fp32", "bf16") for cl in (False, True)}
    rows = {(r["task"], r["precision"], r["channels_last"]): r for r in report["rows"]}
    assert set(rows) == {(task, p, cl) for task in all_cards() for p, cl in settings}
    numbers = ("harness_s_per_step", "bare_s_per_step", "harness_images_per_s", "bare_images_per_s",
               "harness_over_bare", "harness_peak_mb", "bare_peak_mb", "predict_images_per_s")
    for key, row in rows.items():
        for name in numbers:
            assert row[name] > 0, (key, name, row[name])
    assert all(r["task"] in proc.stdout for r in report["rows"])  # the table is printed


def test_keypoint_model_trains_in_channels_last():
    import torch

    from harness.backbones import build_backbone
    from harness.models.pose import build_keypoint_model

    torch.manual_seed(0)
    model = build_keypoint_model(build_backbone("resnet18"), min_size=64, max_size=96, test_min_size=64, neck_channels=16,
                                 keypoint_head_channels=16, keypoint_head_layers=1, representation_size=32)
    model.to(memory_format=torch.channels_last).train()
    kps = torch.zeros(1, 17, 3)
    kps[0, :, 0], kps[0, :, 1], kps[0, :, 2] = torch.linspace(12, 50, 17), torch.linspace(10, 60, 17), 2
    target = {"boxes": torch.tensor([[8.0, 6.0, 56.0, 70.0]]), "labels": torch.tensor([1]), "keypoints": kps}
    losses = model([torch.rand(3, 80, 64)], [target])
    assert torch.isfinite(losses["loss_keypoint"]) and losses["loss_keypoint"] > 0
    sum(losses.values()).backward()
