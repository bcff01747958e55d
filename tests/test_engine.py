"""Engine: schedule, NaN guard, clipping, checkpoints + resume (SIGKILL test), logs, predict.

This file is also a script (``python -m tests.test_engine run OUT [--slow]``): the resume test
runs it in subprocesses and kills one with SIGKILL mid-training.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.batches import pack_batch, sample_seed, unpack_batch
from harness.engine import TrainConfig, lr_factor, predict, train
from harness.errors import HarnessError
from harness.models.detection import detection_train_augment
from harness.protocols import apply_protocol
from tests.support import SMALL_ARCH, Shapes, Toy, ToyData, tiny_backbone, tiny_detector
from tests.support import toy_config as _cfg

HERE = Path(__file__).resolve()


# ----------------------------------------------------------------------------- schedule, config
def test_warmup_multistep_schedule():
    cfg = TrainConfig(iterations=100, batch_size=2, lr=0.02, warmup_iters=10, warmup_factor=0.001, steps=(60, 80))
    assert lr_factor(cfg, 0) == pytest.approx(0.001)
    assert lr_factor(cfg, 5) == pytest.approx(0.001 * 0.5 + 0.5)
    assert lr_factor(cfg, 10) == 1.0 and lr_factor(cfg, 59) == 1.0
    assert lr_factor(cfg, 60) == pytest.approx(0.1) and lr_factor(cfg, 80) == pytest.approx(0.01)


def test_poly_schedule():
    cfg = TrainConfig(iterations=100, batch_size=2, lr=0.01, warmup_iters=0, schedule="poly", poly_min_lr=1e-4)
    assert lr_factor(cfg, 0) == pytest.approx(1.0)
    assert lr_factor(cfg, 50) * 0.01 == pytest.approx((0.01 - 1e-4) * 0.5**0.9 + 1e-4)
    assert lr_factor(cfg, 100) * 0.01 == pytest.approx(1e-4)
    with pytest.raises(HarnessError, match="schedule"):
        TrainConfig(iterations=10, batch_size=2, lr=0.1, schedule="cosine")


def test_bad_config_is_a_user_error():
    assert TrainConfig.from_dict({"iterations": 5, "batch_size": 2, "lr": 0.1, "steps": [3]}).steps == (3,)
    with pytest.raises(HarnessError, match="unknown training setting.*lr_steps"):
        TrainConfig.from_dict({"iterations": 5, "batch_size": 2, "lr": 0.1, "lr_steps": [3]})
    with pytest.raises(HarnessError, match="lacks lr"):
        TrainConfig.from_dict({"iterations": 5, "batch_size": 2})
    with pytest.raises(HarnessError, match="steps"):
        TrainConfig(iterations=10, batch_size=2, lr=0.1, steps=(8, 4))
    with pytest.raises(HarnessError, match="iterations"):
        TrainConfig(iterations=0, batch_size=2, lr=0.1)
    with pytest.raises(HarnessError, match="optimizer='adam' \\(sgd or adamw\\)"):
        TrainConfig(iterations=5, batch_size=2, lr=0.1, optimizer="adam")


# ----------------------------------------------------------------------------- loop behaviour
def test_train_logs_checkpoints_and_skips_when_done(tmp_path):
    torch.manual_seed(0)
    model, data = Toy(), ToyData()
    result = train(model, data, _cfg(), tmp_path, progress=False)
    assert result.start_iteration == 0 and result.precision == "fp32" and result.per_process_batch == 2
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [line["iter"] for line in lines] == [2, 4, 6]
    assert set(lines[0]) == {"iter", "loss", "loss_a", "loss_b", "lr", "time"}
    assert lines[0]["loss"] == pytest.approx(lines[0]["loss_a"] + lines[0]["loss_b"])
    assert lines[0]["lr"] == pytest.approx(0.01 * (0.001 * 0.5 + 0.5))  # iteration 2: warmup alpha 1/2
    assert lines[2]["lr"] == pytest.approx(0.001)  # after the step at 4
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "scaler", "iteration", "rng", "epoch", "batch_in_epoch"} <= set(ckpt)
    assert ckpt["iteration"] == 6 and ckpt["epoch"] == 1 and ckpt["batch_in_epoch"] == 1
    assert not (tmp_path / "checkpoint.pt.tmp").exists()

    weights = {k: v.clone() for k, v in model.state_dict().items()}
    again = train(Toy(), data, _cfg(), tmp_path, progress=False)  # finished: nothing to do
    assert again.start_iteration == 6
    with pytest.raises(HarnessError, match="other settings.*lr"):
        train(Toy(), data, _cfg(lr=0.5), tmp_path, progress=False)
    fresh = Toy()
    train(fresh, data, _cfg(), tmp_path, progress=False)
    assert all(torch.equal(weights[k], v) for k, v in fresh.state_dict().items())  # loaded from the checkpoint


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    data = ToyData()
    who = {"card_hash": "abc", "backbone": "random:resnet18", "protocol": "frozen"}
    train(Toy(), data, _cfg(iterations=3, steps=()), tmp_path, progress=False, identity=who)
    with pytest.raises(HarnessError, match=r"other settings \(backbone: random:resnet18 -> b.pth\)"):
        train(Toy(), data, _cfg(iterations=3, steps=()), tmp_path, progress=False, identity={**who, "backbone": "b.pth"})

    class Wider(Toy):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1, bias=False)

    with pytest.raises(HarnessError, match="holds another model's weights"):
        train(Wider(), data, _cfg(iterations=3, steps=()), tmp_path, progress=False, identity=who)


def test_nan_loss_stops_with_the_iteration(tmp_path):
    with pytest.raises(HarnessError, match=r"diverged at iteration 3: non-finite loss \(loss=nan"):
        train(Toy(nan_at=3), ToyData(), _cfg(checkpoint_period=100), tmp_path, progress=False)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_gradient_clipping_bounds_the_step(tmp_path):
    torch.manual_seed(0)
    model = Toy()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    cfg = _cfg(iterations=1, lr=1.0, momentum=0.0, weight_decay=0.0, warmup_iters=0, clip_grad_norm=1e-3)
    train(model, ToyData(), cfg, tmp_path, progress=False)
    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert 0 < (after - before).norm() <= 1e-3 + 1e-7


def test_data_order_and_augmentation_depend_only_on_seed_epoch_index(tmp_path):
    calls = []

    def augment(image, target, generator):
        calls.append(torch.rand((), generator=generator).item())
        return image, target

    orders = []
    for run, seed in enumerate((0, 0, 1)):
        data = ToyData()
        calls.clear()
        train(Toy(), data, _cfg(iterations=8, seed=seed), tmp_path / str(run), augment=augment, progress=False)
        orders.append((list(data.seen), list(calls)))
    assert orders[0] == orders[1] and orders[0][0] != orders[2][0]
    assert sorted(orders[0][0][:10]) == list(range(10))  # epoch 0 is a permutation
    expected = torch.rand((), generator=torch.Generator().manual_seed(sample_seed(0, 0, orders[0][0][0]))).item()
    assert orders[0][1][0] == expected


def test_epochs_follow_the_sampler_across_boundaries_with_or_without_workers(tmp_path):
    """7 iterations of 2 over 5 images: epochs 0 to 3 of 2 batches each (one image left out of
    each), each the sampler's own permutation; the workers' pipeline runs across epochs and
    changes nothing."""
    from torch.utils.data import DistributedSampler

    seeds = []

    def augment(image, target, generator):
        seeds.append(generator.initial_seed())
        return image, target

    data = ToyData(5)
    torch.manual_seed(0)
    train(Toy(), data, _cfg(iterations=7, steps=(5,)), tmp_path / "w0", augment=augment, progress=False)
    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    expected = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        expected += [(epoch, i) for i in list(sampler)[:4]]
    expected = expected[:14]
    assert data.seen == [i for _, i in expected]
    assert seeds == [sample_seed(0, e, i) for e, i in expected]

    with_workers = tmp_path / "w2"
    torch.manual_seed(0)
    train(Toy(), ToyData(5), _cfg(iterations=7, steps=(5,), num_workers=2), with_workers, augment=augment,
          progress=False)
    a = torch.load(tmp_path / "w0" / "checkpoint.pt", weights_only=False)["model"]
    b = torch.load(with_workers / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_small_dataset_and_indivisible_batch(tmp_path):
    with pytest.raises(HarnessError, match="fewer than one batch"):
        train(Toy(), ToyData(1), _cfg(), tmp_path, progress=False)
    with pytest.raises(HarnessError, match="nothing to train"):
        model = Toy()
        for p in model.parameters():
            p.requires_grad_(False)
        train(model, ToyData(), _cfg(), tmp_path, progress=False)


def test_train_a_segmenter_with_its_augmentation(tmp_path):
    from harness.models.segmentation import build_segmenter, segmentation_train_augment

    torch.manual_seed(0)
    backbone = tiny_backbone()
    model = build_segmenter(backbone, num_classes=3, neck_channels=8)
    apply_protocol(model, backbone, "frozen")
    result = train(model, Shapes(4, kind="segmentation"), _cfg(iterations=2, checkpoint_period=2), tmp_path,
                   augment=segmentation_train_augment(crop_size=48), progress=False)
    assert set(result.final_losses) == {"loss", "loss_seg"}


# ----------------------------------------------------------------------------- predict
def test_predict_covers_every_image_once_in_order():
    torch.manual_seed(0)
    model = Toy()
    data = ToyData(7)
    seen_targets = []

    def post(output, target):
        seen_targets.append(float(target))
        return float(output["value"])

    preds = predict(model, data, batch_size=3, postprocess=post, progress=False)
    assert len(preds) == 7 and data.seen == list(range(7))
    assert seen_targets == [float(t) for _, t in data.items]
    assert model.training  # mode restored
    model.eval()
    with torch.no_grad():
        ref = [float(model([im])[0]["value"]) for im, _ in data.items]
    assert preds == pytest.approx(ref, abs=1e-6)


def test_predict_on_a_detector_and_a_segmenter():
    torch.manual_seed(0)
    preds = predict(tiny_detector(), Shapes(3), progress=False)
    assert len(preds) == 3 and {"boxes", "labels", "scores"} <= set(preds[0])
    from harness.models.segmentation import build_segmenter, segmentation_postprocess

    seg = build_segmenter(tiny_backbone(), num_classes=3, neck_channels=8)
    masks = predict(seg, Shapes(2, kind="segmentation"), postprocess=lambda out, _: segmentation_postprocess(out),
                    progress=False)
    assert masks[0].dtype == torch.uint8 and masks[0].shape == (64, 80)


def test_predict_with_loader_workers_equals_in_process():
    torch.manual_seed(0)
    model = tiny_detector()
    here = predict(model, Shapes(3), progress=False)
    workers = predict(model, Shapes(3), progress=False, num_workers=2)
    assert [set(p) for p in workers] == [set(p) for p in here]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(here, workers) for k in a)


def test_a_packed_batch_unpacks_to_equal_tensors_as_views():
    g = torch.Generator().manual_seed(0)
    batch = ([torch.rand(3, 5, 7, generator=g), torch.rand(4, 6, generator=g).t(), torch.tensor(2.5)],
             [{"boxes": torch.rand(2, 4, generator=g), "labels": torch.tensor([1, 3]), "iscrowd": torch.zeros(0),
               "keep": torch.tensor([True, False]), "image_id": 17, "name": "a.jpg"},
              {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "image_id": 18}],
             (4, "x"))
    packed = pack_batch(batch)
    assert sorted(map(str, packed.buffers)) == ["torch.bool", "torch.float32", "torch.int64"]  # one buffer per dtype
    again = unpack_batch(pickle.loads(pickle.dumps(packed)))  # what crosses from a worker

    def same(a, b):
        if torch.is_tensor(a):
            return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    assert same(batch, again)
    first = unpack_batch(packed)[0][0]
    assert first.untyped_storage().data_ptr() == packed.buffers[torch.float32].untyped_storage().data_ptr()


# ----------------------------------------------------------------------------- SIGKILL resume
ITERS = 16


def _run_worker(out: Path, slow: bool = False) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parents[1]))
    args = [sys.executable, "-m", "tests.test_engine", "run", str(out)] + (["--slow"] if slow else [])
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _metrics(out: Path) -> list[dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "time"} for line in lines]


@pytest.mark.slow
def test_sigkill_then_rerun_matches_an_uninterrupted_run(tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _worker(str(straight), slow=False)  # the uninterrupted reference, in this process

    proc = _run_worker(killed, slow=True)
    ckpt = killed / "checkpoint.pt"
    deadline = time.time() + 240
    while not ckpt.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    interrupted_at = torch.load(ckpt, weights_only=True)["iteration"]
    assert 0 < interrupted_at < ITERS

    proc = _run_worker(killed)
    output = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, output
    assert f"resumed from {interrupted_at}" in output

    a = torch.load(straight / "checkpoint.pt", weights_only=True)
    b = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert a["iteration"] == b["iteration"] == ITERS
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert _metrics(straight) == _metrics(killed)


def _worker(out: str, slow: bool) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone = tiny_backbone(SMALL_ARCH)
    model = tiny_detector(backbone)
    apply_protocol(model, backbone, "finetune")
    flip = detection_train_augment()

    def augment(image, target, generator):
        if slow:
            time.sleep(0.15)
        return flip(image, target, generator)

    cfg = TrainConfig(iterations=ITERS, batch_size=2, lr=0.02, warmup_iters=4, steps=(10,), checkpoint_period=4,
                      log_period=2, seed=3)
    result = train(model, Shapes(6), cfg, out, augment=augment, progress=False)
    print(f"resumed from {result.start_iteration}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "run":
        _worker(sys.argv[2], slow="--slow" in sys.argv)
