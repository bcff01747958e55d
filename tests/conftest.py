"""Shared fixtures: one torch thread, the real fixtures in ../shared/data/real and a synthetic data root."""

from __future__ import annotations

from pathlib import Path

import pytest

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"


def pytest_collection_modifyitems(config, items):
    """The end-to-end tests first in every worker's share: a long test started last would keep one
    core busy after the others have run out of tests. pytest-xdist's worksteal hands worker k the k-th
    contiguous share of this list and later moves tests from the end of a busy worker's queue to an
    idle one, so each share starts with every n-th end-to-end test and ends with short ones (with
    all of them in the first share, the second share stole them back one by one and the suite ended
    on one core for 25 s)."""
    slow = [item for item in items if item.get_closest_marker("slow")]
    fast = [item for item in items if not item.get_closest_marker("slow")]
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    ordered, remaining = [], len(items)
    for k in range(workers):
        size = remaining // (workers - k)  # the share worksteal sends worker k
        remaining -= size
        share = slow[k::workers][:size]
        take = size - len(share)
        ordered += share + fast[:take]
        fast = fast[take:]
    placed = set(ordered)
    items[:] = ordered + [item for item in slow if item not in placed] + fast


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests run tiny models: one intra-op thread is as fast, and on a shared CPU two threads spin-wait
    for each other (measured on test_models.py + test_protocols.py at load 15: 45 CPU-s with two, 13 with
    one). Subprocesses keep their own setting (OMP_NUM_THREADS)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def real() -> Path:
    """../shared/data/real beside the checkout (a user's checkout has none: those tests skip)."""
    if not REAL.is_dir():
        pytest.skip(f"real fixtures not found at {REAL} (../shared is beside the project only in its own CI)")
    return REAL


# enough for the end-to-end runs (6 training images per task, a few to score) and the readers'
# checks (difficult VOC objects, people with keypoints): 46 images, where the default is 1,250
SYNTHETIC_SIZES = dict(coco_train=16, coco_val=6, voc07_trainval=8, voc07_test=4, voc12_train=6, voc12_val=4,
                       voc12_aug_extra=2)


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A small data root written by `harness data synth` (seed 0, ``SYNTHETIC_SIZES``), shared by every
    test of the session."""
    from harness.datasets.synthetic import write_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    write_synthetic(root, seed=0, **SYNTHETIC_SIZES)
    return root
