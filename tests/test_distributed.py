"""Distributed helpers: torchrun environment, single-process no-op path, sharding without padding,
and 2 gloo processes predicting exactly what 1 process predicts (plus a DDP training smoke).

This file is also the torchrun worker: ``torchrun --nproc_per_node 2 -m tests.test_distributed OUT``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness import distributed as hd
from harness.errors import HarnessError

HERE = Path(__file__).resolve()
NUM_IMAGES = 5  # odd: a padded sampler would duplicate one


def test_read_env_defaults_and_torchrun_values(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert hd.read_env() == (0, 1, 0)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert hd.read_env() == (3, 4, 1)
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(HarnessError, match="inconsistent"):
        hd.read_env()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(HarnessError, match="not an integer"):
        hd.read_env()


def test_single_process_path_is_a_no_op(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = hd.init_distributed(device="cpu")
    assert env == hd.DistEnv(0, 1, 0, torch.device("cpu")) and env.is_main and not env.distributed
    assert not hd.is_initialized() and hd.get_world_size() == 1 and hd.is_main_process()
    hd.barrier()
    hd.cleanup()
    assert hd.all_gather_object({"a": 1}) == [{"a": 1}] and hd.broadcast_object(5) == 5
    t = torch.tensor([2.0])
    assert hd.all_reduce_mean(t).item() == 2.0


def test_world_size_without_rendezvous_is_a_user_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(HarnessError, match="torchrun"):
        hd.init_distributed(device="cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_a_gpu_is_a_user_error():
    with pytest.raises(HarnessError, match="no CUDA device"):
        hd.select_device("cuda")
    assert hd.select_device(None) == torch.device("cpu")
    with pytest.raises(HarnessError, match="unsupported device"):
        hd.select_device("mps")


def test_shards_cover_every_index_once_without_padding():
    for n, world in [(7, 3), (5, 2), (2, 4), (0, 2)]:
        shards = [list(hd.shard_indices(n, r, world)) for r in range(world)]
        flat = sorted(i for s in shards for i in s)
        assert flat == list(range(n))
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_gather_predictions_sorts_and_checks():
    assert hd.gather_predictions([(2, "c"), (0, "a"), (1, "b")], num_items=3) == ["a", "b", "c"]
    with pytest.raises(RuntimeError, match="more than once"):
        hd.gather_predictions([(0, "a"), (0, "a")])
    with pytest.raises(RuntimeError, match="missing"):
        hd.gather_predictions([(0, "a"), (2, "c")], num_items=3)


# ----------------------------------------------------------------------------- 2 processes
def _model_and_data():
    from tests.support import SMALL_ARCH, Shapes, tiny_backbone, tiny_detector

    torch.manual_seed(0)
    return tiny_detector(tiny_backbone(SMALL_ARCH), box_score_thresh=0.0), Shapes(NUM_IMAGES)


@pytest.mark.slow
def test_two_gloo_processes_predict_exactly_what_one_does(tmp_path):
    from harness.engine import predict

    model, data = _model_and_data()
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tests.test_distributed",
           str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: same kernels, same bits
    try:
        single = predict(model, data, progress=False)
    finally:
        torch.set_num_threads(threads)
    double = torch.load(tmp_path / "preds.pt", weights_only=True)
    assert len(single) == len(double) == NUM_IMAGES
    assert any(len(p["boxes"]) for p in single)
    for a, b in zip(single, double):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    report = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert report["world_size"] == 2 and report["same_weights_on_every_rank"]
    assert report["iterations"] == 2 and report["backbone_changed"]


def _worker(out: Path) -> None:
    from harness.engine import TrainConfig, predict, train
    from harness.protocols import apply_protocol

    torch.set_num_threads(1)
    env = hd.init_distributed(device="cpu")
    try:
        model, data = _model_and_data()
        model.load_state_dict(torch.load(out / "weights.pt", weights_only=True))
        preds = predict(model, data, env=env, progress=False)
        if env.is_main:
            torch.save(preds, out / "preds.pt")
        else:
            assert preds is None

        backbone = model.backbone.body
        stem = next(backbone.parameters())  # the first convolution's weight
        before = stem.detach().clone()
        apply_protocol(model, backbone, "finetune", world_size=env.world_size, device=env.device)
        cfg = TrainConfig(iterations=2, batch_size=2, lr=0.01, warmup_iters=0, checkpoint_period=2)
        result = train(model, data, cfg, out / "train", env=env, progress=False)
        digest = torch.cat([p.detach().flatten() for p in model.parameters()]).double().sum().item()
        digests = hd.all_gather_object(digest)
        if env.is_main:
            torch.save(
                {
                    "world_size": result.world_size,
                    "iterations": torch.load(out / "train" / "checkpoint.pt", weights_only=True)["iteration"],
                    "same_weights_on_every_rank": len(set(digests)) == 1,
                    "backbone_changed": not torch.equal(before, stem.detach()),
                },
                out / "ddp.pt",
            )
        hd.barrier()
    finally:
        hd.cleanup()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
