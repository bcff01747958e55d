"""`harness scaling`: the log-linear fit and its interval, the outputs, and a tiny real study."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from harness.errors import HarnessError
from harness.scaling import (
    ScalingPlan,
    fit_log_linear,
    fit_points,
    format_table,
    parse_checkpoints,
    parse_fractions,
    plot_scaling,
    run_scaling,
)
from tests.support import SMALL_ARCH

SIZES = [1_000, 3_000, 10_000, 30_000, 100_000]


# ----------------------------------------------------------------------------- the fit
def test_fit_recovers_a_known_slope_with_a_ci_that_contains_it():
    # three seeds per size, seed-to-seed scatter of +-1.5 around the line (zero mean at every size)
    images = [n for n in SIZES for _ in range(3)]
    values = [40.0 + 6.0 * math.log10(n) + d for n in SIZES for d in (-1.5, 0.0, 1.5)]
    fit = fit_log_linear(images, values)
    lo, hi = fit["b_ci"]
    assert fit["b"] == pytest.approx(6.0) and fit["a"] == pytest.approx(40.0)
    # by hand: se(b) = s / sqrt(Sxx), residual variance s^2 = (5 sizes x 4.5) / (15 - 2 dof)
    x = np.log10(np.array(images, float))
    se = math.sqrt(5 * 4.5 / 13 / ((x - x.mean()) ** 2).sum())
    from scipy import stats

    t = stats.t.ppf(0.975, 13)
    assert fit["b_stderr"] == pytest.approx(se) and (lo, hi) == pytest.approx((6.0 - t * se, 6.0 + t * se))
    assert fit["n"] == 15 and fit["sizes"] == SIZES and fit["p_value"] < 1e-6
    exact = fit_log_linear(SIZES, [2.0 - 1.5 * math.log10(n) for n in SIZES])
    assert exact["b"] == pytest.approx(-1.5) and exact["a"] == pytest.approx(2.0)
    assert exact["b_ci"][1] - exact["b_ci"][0] < 1e-6 and exact["r2"] == pytest.approx(1.0)


def test_slope_interval_is_t_based_and_covers_at_the_nominal_rate():
    # five points, three degrees of freedom: a normal (z) interval would cover only ~85%
    rng = np.random.default_rng(1)
    trials, covered = 600, 0
    widths = []
    for _ in range(trials):
        values = [10.0 + 4.0 * math.log10(n) + rng.normal(0, 2.0) for n in SIZES]
        fit = fit_log_linear(SIZES, values, confidence=0.9)
        covered += fit["b_ci"][0] <= 4.0 <= fit["b_ci"][1]
        widths.append((fit["b_ci"][1] - fit["b_ci"][0]) / (2 * fit["b_stderr"]))
    assert 0.86 <= covered / trials <= 0.94  # 90% nominal; binomial sd ~1.2%
    from scipy import stats

    assert widths[0] == pytest.approx(stats.t.ppf(0.95, 3))


def test_fit_edge_cases():
    two = fit_log_linear([100, 1000], [1.0, 2.0])
    assert two["b"] == pytest.approx(1.0) and two["b_ci"] is None
    with pytest.raises(HarnessError, match="two distinct"):
        fit_log_linear([100, 100, 100], [1.0, 2.0, 3.0])


def _point(fraction, images, values_by_name):
    results = {}
    for name, (primary, metrics) in values_by_name.items():
        results[name] = {"primary": primary, "metrics": {
            k: {"mean": float(np.mean(v)), "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
            for k, v in metrics.items()}}
    return {"fraction": fraction, "images": images, "results": results}


def test_fit_points_pools_seeds_per_task_protocol_and_metric(tmp_path):
    points = [
        _point(f, n, {"voc/finetune": ("AP50", {"AP50": [10 + 5 * k, 11 + 5 * k], "AP": [3.0 + k, 3.0 + k]}),
                      "seg/frozen": ("mIoU", {"mIoU": [20 - k, 21 - k]})})
        for k, (f, n) in enumerate([(0.01, 100), (0.1, 1000), (1.0, 10000)])
    ]
    fits = {(f["task"], f["protocol"], f["metric"]): f for f in fit_points(points)}
    assert set(fits) == {("voc", "finetune", "AP50"), ("voc", "finetune", "AP"), ("seg", "frozen", "mIoU")}
    assert fits[("voc", "finetune", "AP50")]["b"] == pytest.approx(5.0) and fits[("voc", "finetune", "AP50")]["n"] == 6
    assert fits[("voc", "finetune", "AP50")]["primary"] and not fits[("voc", "finetune", "AP")]["primary"]
    assert fits[("seg", "frozen", "mIoU")]["b"] == pytest.approx(-1.0)
    table = format_table(points, list(fits.values()))
    assert "| 0.01 | 100 | 20.5 ± 0.7 | 10.5 ± 0.7 |" in table and "+5.00" in table
    png = plot_scaling(points, list(fits.values()), tmp_path / "s.png", title="t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_parsing_and_plan_errors(tmp_path):
    assert parse_fractions("1,0.01,0.1") == [0.01, 0.1, 1.0]
    for bad in ("", "0.1,0.1", "0,0.5", "1.5", "a"):
        with pytest.raises(HarnessError):
            parse_fractions(bad)
    assert parse_checkpoints("0.1=a.safetensors, 1=b.safetensors") == {0.1: "a.safetensors", 1.0: "b.safetensors"}
    with pytest.raises(HarnessError):
        parse_checkpoints("a.safetensors")
    with pytest.raises(HarnessError, match="--data"):
        run_scaling(ScalingPlan(arch="resnet18", fractions=[0.1, 1.0], out=tmp_path))
    ckpt = tmp_path / "c.safetensors"
    ckpt.write_bytes(b"x")
    with pytest.raises(HarnessError, match="not in --fractions"):
        run_scaling(ScalingPlan(arch="resnet18", fractions=[0.1, 1.0], out=tmp_path, checkpoints={0.3: str(ckpt)}))


# ----------------------------------------------------------------------------- a tiny real study
def _tiny_seg_card(folder: Path) -> None:
    """The real seg card with a smoke profile small enough for a test (a few steps on 64 px crops)."""
    from harness.cards import cards_dir

    card = yaml.safe_load((cards_dir() / "seg.yaml").read_text())
    card["profiles"]["smoke"] = {
        "iterations": 3, "batch_size": 2, "lr": 0.01, "schedule": "poly", "warmup_iters": 0, "weight_decay": 0.0005,
        "min_size": [72], "max_size": 128, "crop_size": 64, "scale_range": [0.75, 1.25], "neck_channels": 16,
        "checkpoint_period": 50, "train_images": 6,
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "seg.yaml").write_text(yaml.safe_dump(card, sort_keys=False))


@pytest.mark.slow
def test_a_tiny_real_study_end_to_end(tmp_path, monkeypatch, capsys):
    """Real pretraining, a given checkpoint, real `run_eval` (seg, 2 seeds), fit, outputs, rerun."""
    from harness.checkpoints import sha256_file
    from harness.cli import main
    from harness.datasets.synthetic import write_pretrain_synthetic, write_synthetic
    from harness.pretrain import PretrainConfig, pretrain

    _tiny_seg_card(tmp_path / "cards")
    monkeypatch.setenv("HARNESS_TASKS", str(tmp_path / "cards"))
    root = tmp_path / "down"
    write_synthetic(root, seed=0, coco_train=2, coco_val=2, voc07_trainval=2, voc07_test=2, voc12_train=6,
                    voc12_val=6, voc12_aug_extra=0, min_side=64, max_side=96)
    write_pretrain_synthetic(tmp_path / "pre", size=24, label_noise=0.1, image_size=32)
    common = ["--iterations", "2", "--workers", "0", "--image-size", "32"]
    given = tmp_path / "given.safetensors"
    pretrain(PretrainConfig(data=str(tmp_path / "pre"), arch=SMALL_ARCH, out=str(given), iterations=2, batch_size=4,
                            image_size=32, workers=0, device="cpu", progress=False))
    study = tmp_path / "study"
    argv = ["scaling", "--data", str(tmp_path / "pre"), "--arch", SMALL_ARCH, "--fractions", "0.25,0.5,1",
            "--checkpoints", f"1={given}", "--tasks", "seg", "--protocols", "frozen", "--profile", "smoke",
            "--data-root", str(root), "--seeds", "2", "--out", str(study), "--pretrain-batch-size", "4",
            "--device", "cpu", "--no-progress", *common]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "seg/frozen mIoU" in printed and "scaling.json" in printed

    summary = json.loads((study / "scaling.json").read_text())
    points = summary["points"]
    assert [p["fraction"] for p in points] == [0.25, 0.5, 1.0]
    assert points[0]["images"] < points[1]["images"] < points[2]["images"] == 24
    assert points[2]["checkpoint"] == str(given) and points[2]["sha256"] == sha256_file(given)
    for p in points:
        res = p["results"]["seg/frozen"]
        assert res["primary"] == "mIoU" and len(res["metrics"]["mIoU"]["values"]) == 2
        label = f"f{p['fraction']:g}"
        result = json.loads((study / "eval" / label / "seg" / "frozen" / "seed1" / "result.json").read_text())
        assert result["backbone"]["sha256"] == p["sha256"] and result["backbone"]["layout"] == "harness"
        assert result["metrics"]["mIoU"] == res["metrics"]["mIoU"]["values"][1]
    for label in ("f0.25", "f0.5"):
        assert (study / "pretrain" / label / "backbone.safetensors").is_file()
    fit = next(f for f in summary["fits"] if f["metric"] == "mIoU")
    xs = [math.log10(p["images"]) for p in points for _ in range(2)]
    ys = [v for p in points for v in p["results"]["seg/frozen"]["metrics"]["mIoU"]["values"]]
    slope, intercept = np.polyfit(xs, ys, 1)
    assert fit["primary"] and fit["n"] == 6 and fit["b"] == pytest.approx(slope, abs=1e-6)
    assert fit["a"] == pytest.approx(intercept, abs=1e-6) and fit["b_ci"][0] <= fit["b"] <= fit["b_ci"][1]
    assert (study / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "seg/frozen mIoU" in (study / "scaling.md").read_text()

    # a rerun redoes nothing and gives the same study
    assert main(argv) == 0
    again = json.loads((study / "scaling.json").read_text())
    assert again["fits"] == summary["fits"]
    assert "kept" in capsys.readouterr().out


def test_a_given_checkpoints_pretraining_record_is_read_and_checked(tmp_path):
    from harness.results import pretrain_record_path

    ckpt = tmp_path / "c.safetensors"
    ckpt.write_bytes(b"x")
    plan = ScalingPlan(arch="resnet18", fractions=[0.1, 1.0], out=tmp_path / "study",
                       checkpoints={0.1: str(ckpt), 1.0: str(ckpt)})
    with pytest.raises(HarnessError, match="has no pretraining record"):
        run_scaling(plan, evaluate=lambda checkpoint, out: [])
    record = {"harness_pretrain": 1, "checkpoint": str(ckpt), "sha256": "ab" * 32, "arch": "resnet18", "images": 12,
              "total_images": 24, "fraction": 0.5, "num_classes": 3, "loss": "sigmoid", "settings": {},
              "training": {}, "created": "2026-12-01T00:00:00+00:00"}
    pretrain_record_path(ckpt).write_text(json.dumps(record))
    with pytest.raises(HarnessError, match="c.safetensors was pretrained on fraction 0.5, not 0.1"):
        run_scaling(plan, evaluate=lambda checkpoint, out: [])
    pretrain_record_path(ckpt).write_text(json.dumps({**record, "images": "many"}))
    with pytest.raises(HarnessError, match=r"c.json: not a harness pretraining record \(images: "):
        run_scaling(plan, evaluate=lambda checkpoint, out: [])
