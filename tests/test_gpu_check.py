"""bench/gpu_check.py --tiny runs on the CPU and reports every card x precision setting, so the GPU check cannot rot."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from harness.cards import all_cards

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)  # about 20 s alone on the 2-core development machine
def test_gpu_check_tiny_writes_a_positive_row_per_card_and_setting(tmp_path, capsys, monkeypatch):
    """The script as its command line runs it (``__main__``), in this process (it sets one torch thread)."""
    out = tmp_path / "gpu_check.json"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", "--tiny", "--out", str(out)])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(ROOT / "bench" / "gpu_check.py"), run_name="__main__")
    finally:
        torch.set_num_threads(threads)
    stdout = capsys.readouterr().out
    report = json.loads(out.read_text())
    settings = {(p, cl) for p in ("fp32", "bf16") for cl in (False, True)}
    rows = {(r["task"], r["precision"], r["channels_last"]): r for r in report["rows"]}
    assert set(rows) == {(task, p, cl) for task in all_cards() for p, cl in settings}
    numbers = ("harness_s_per_step", "bare_s_per_step", "harness_images_per_s", "bare_images_per_s",
               "harness_over_bare", "harness_peak_mb", "bare_peak_mb", "predict_images_per_s")
    for key, row in rows.items():
        for name in numbers:
            assert row[name] > 0, (key, name, row[name])
    assert all(r["task"] in stdout for r in report["rows"])  # the table is printed


def test_keypoint_model_trains_in_channels_last():
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
