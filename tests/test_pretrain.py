"""`harness pretrain` and its data: subsets, the three data formats (shards streamed across ranks and
DataLoader workers, resumable), losses, hierarchy, training, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from harness.backbones import build_backbone
from harness.checkpoints import load_backbone, sha256_file
from harness.datasets.labelled import LabelHierarchy, in_subset, subset_score
from harness.datasets.pretraining import open_pretrain_data
from harness.datasets.shards import ShardStream, index_shards, list_shards, resume_point, write_shards
from harness.errors import HarnessError
from harness.pretrain import (
    PretrainAugment,
    PretrainConfig,
    PretrainModel,
    pretrain,
    read_sidecar,
    sigmoid_loss,
    softmax_loss,
)
from tests.support import SMALL_ARCH


# ----------------------------------------------------------------------------- helpers
def _png_bytes(value: int, size: int = 8) -> bytes:
    """A flat image whose red channel is ``value`` (lossless, so a sample can be told by its pixels)."""
    import io

    arr = np.zeros((size, size, 3), np.uint8)
    arr[..., 0] = value
    arr[..., 1] = 7
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _write_png(path: Path, value: int, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png_bytes(value, size))


LABELS = [["cat"], ["dog"], ["cat", "dog"], ["bird"], [], ["dog", "bird"]]


def _manifest(tmp: Path) -> Path:
    for i in range(len(LABELS)):
        _write_png(tmp / "img" / f"{i}.png", 10 * i)
    path = tmp / "m.jsonl"
    path.write_text("".join(json.dumps({"path": f"img/{i}.png", "labels": ls}) + "\n" for i, ls in enumerate(LABELS)))
    return path


def _epoch_values(stream: ShardStream, workers: int = 0, epoch: int = 0) -> list[int]:
    """One epoch of ``stream`` read by a DataLoader with ``workers`` workers: each sample's red value."""
    stream.set_epoch(epoch)
    return [int(image[0, 0, 0]) for image, _ in DataLoader(stream, batch_size=None, num_workers=workers,
                                                             collate_fn=lambda sample: sample)]


def _batch_values(stream: ShardStream, start: int, stop: int, per_rank: int, workers: int) -> list[int]:
    return [int(image[0, 0, 0]) for images, _ in stream.batches(start, stop, per_rank, workers) for image in images]


def _shards(tmp: Path, n: int = 24, per_shard: int = 4) -> Path:
    records = [(f"s{i:03d}", _png_bytes(i), "png", ["even" if i % 2 == 0 else "odd"] + (["three"] if i % 3 == 0 else []))
               for i in range(n)]
    write_shards(records, str(tmp / "shards" / "data-%03d.tar"), per_shard)
    return tmp / "shards"


# ----------------------------------------------------------------------------- subsets
def test_fraction_subsets_are_nested_and_sized_by_the_fraction():
    keys = [f"images/{i:07d}.jpg" for i in range(4000)]
    subsets = {f: {k for k in keys if in_subset(k, f)} for f in (0.01, 0.03, 0.1, 0.3, 1.0)}
    assert subsets[0.01] <= subsets[0.03] <= subsets[0.1] <= subsets[0.3] <= subsets[1.0] == set(keys)
    for f, s in subsets.items():  # binomial: within 5 standard deviations of f * N
        assert abs(len(s) - f * len(keys)) <= 5 * math.sqrt(len(keys) * f * (1 - f)) + 1e-9, (f, len(s))
    # the key alone decides: order does not matter, another salt gives another (still nested) subset
    assert {k for k in reversed(keys) if in_subset(k, 0.1)} == subsets[0.1]
    other = {k for k in keys if in_subset(k, 0.1, subset_seed=1)}
    assert other != subsets[0.1] and other <= {k for k in keys if in_subset(k, 0.3, subset_seed=1)}
    assert 0.0 <= subset_score("x") < 1.0


def test_loaded_subsets_are_nested(tmp_path):
    from harness.datasets.synthetic import write_pretrain_synthetic

    manifest = write_pretrain_synthetic(tmp_path / "pre", size=60, label_noise=0.0, image_size=32)
    keys = {}
    for f in (0.1, 0.3, 1.0):
        data = open_pretrain_data(str(manifest), fraction=f)
        keys[f] = {r.key for r in data.dataset.records}
        assert data.images == len(keys[f]) and data.total_images == 60
    assert keys[0.1] < keys[0.3] < keys[1.0]
    with pytest.raises(HarnessError):
        open_pretrain_data(str(manifest), fraction=0.0)
    with pytest.raises(HarnessError, match="empty"):
        open_pretrain_data(str(manifest), fraction=1e-9)


# ----------------------------------------------------------------------------- the three formats
def test_image_folder(tmp_path):
    for cls, values in (("dog", (1, 2)), ("cat", (3, 4, 5))):
        for v in values:
            _write_png(tmp_path / "tree" / cls / f"{v}.png", v)
    (tmp_path / "tree" / "cat" / "notes.txt").write_text("not an image")
    data = open_pretrain_data(str(tmp_path / "tree"))
    assert (data.kind, data.classes, data.images) == ("imagefolder", ["cat", "dog"], 5)
    for i in range(5):
        image, target = data.dataset[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
        expected = [1.0, 0.0] if int(image[0, 0, 0]) in (3, 4, 5) else [0.0, 1.0]
        assert target["labels"].tolist() == expected
    from harness.pretrain import resolve_loss

    assert resolve_loss("auto", data.kind, None) == "softmax"
    assert resolve_loss("auto", "manifest", None) == "sigmoid"


def test_jsonl_and_csv_manifests(tmp_path):
    jsonl = _manifest(tmp_path)
    data = open_pretrain_data(str(jsonl))
    assert (data.kind, data.classes, data.images) == ("manifest", ["bird", "cat", "dog"], 6)
    for i, labels in enumerate(LABELS):
        image, target = data.dataset[i]
        assert int(image[0, 0, 0]) == 10 * i
        assert target["labels"].tolist() == [float(c in labels) for c in data.classes]
    csv_path = tmp_path / "m.csv"
    csv_path.write_text("path,labels\n" + "".join(f"img/{i}.png,{';'.join(ls)}\n" for i, ls in enumerate(LABELS)))
    from_csv = open_pretrain_data(str(csv_path))
    assert from_csv.classes == data.classes
    assert [t["labels"].tolist() for _, t in (from_csv.dataset[i] for i in range(6))] == \
           [t["labels"].tolist() for _, t in (data.dataset[i] for i in range(6))]
    # a folder holding manifest.jsonl is that manifest; a "label" key is one label
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"path": "img/0.png", "label": "cat"}) + "\n")
    assert open_pretrain_data(str(tmp_path)).dataset.records[0].labels == ("cat",)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"path": "img/0.png"}\nnot json\n')
    with pytest.raises(HarnessError, match=r"bad.jsonl:2"):
        open_pretrain_data(str(bad))
    with pytest.raises(HarnessError, match="header"):
        (tmp_path / "bad.csv").write_text("file,tags\na.png,x\n")
        open_pretrain_data(str(tmp_path / "bad.csv"))


def test_webdataset_shards_stream_split_across_ranks_and_workers(tmp_path):
    folder = _shards(tmp_path)
    assert len(list_shards(str(folder))) == 6
    assert list_shards(str(folder / "data-{000..005}.tar")) == list_shards(str(folder))
    data = open_pretrain_data(str(folder), shuffle_buffer=3)
    assert (data.kind, data.images, data.total_images, data.shards) == ("wds", 24, 24, 6)
    assert data.classes == ["even", "odd", "three"]
    stream = data.dataset
    first_pass = _epoch_values(stream)
    assert sorted(first_pass) == list(range(24))  # one epoch = every sample once, shuffled
    assert first_pass != list(range(24))
    second_pass = _epoch_values(stream, epoch=1)
    assert sorted(second_pass) == list(range(24)) and second_pass != first_pass  # reshuffled per epoch
    image, target = next(iter(stream))
    v = int(image[0, 0, 0])
    assert image.dtype == torch.uint8 and image.shape == (3, 8, 8)
    assert target["labels"].tolist() == [float(v % 2 == 0), float(v % 2 == 1), float(v % 3 == 0)]
    # the subset filter applies to the stream too, with the same keys as everywhere
    sub = open_pretrain_data(str(folder), fraction=0.5)
    expected = sorted(i for i in range(24) if in_subset(f"s{i:03d}", 0.5))
    assert sub.images == len(expected) and sorted(_epoch_values(sub.dataset)) == expected


def test_each_sample_is_read_once_per_epoch_across_ranks_and_workers(tmp_path):
    """Simulated ranks, each with a DataLoader of 2 worker processes: the ranks' shards are disjoint,
    and together the ranks read every sample exactly once per epoch (also with a fraction, and
    with shards of unequal size, so the workers hold unequal numbers of images)."""
    shards = list_shards(str(_shards(tmp_path, n=26)))  # 7 shards: six of 4 images, one of 2
    world_size = 3  # ranks hold 3, 2 and 2 shards
    for fraction in (1.0, 0.6):
        index = index_shards(shards, fraction)
        expected = sorted(i for i in range(26) if in_subset(f"s{i:03d}", fraction))
        for epoch in (0, 1):
            seen = []
            for rank in range(world_size):
                stream = ShardStream(shards, {"even": 0, "odd": 1, "three": 2}, index.counts, fraction=fraction,
                                     rank=rank, world_size=world_size, seed=3, shuffle_buffer=5)
                values = _epoch_values(stream, 2, epoch)
                assert len(values) == stream.rank_images == sum(stream.worker_images(2))
                seen += values
            assert sorted(seen) == expected, (fraction, epoch)


def test_shard_stream_is_deterministic_and_resumes_mid_epoch(tmp_path):
    """The batches from iteration ``start`` on are those an uninterrupted run gives from there, for
    every start (inside the first epoch, on and across epoch boundaries), with 0 and 2 workers."""
    shards = list_shards(str(_shards(tmp_path, n=26)))
    index = index_shards(shards)

    def make():
        return ShardStream(shards, {"even": 0, "odd": 1, "three": 2}, index.counts, seed=5, shuffle_buffer=4)

    for workers, starts in ((0, range(1, 16)), (2, (3, 7, 14))):
        full = _batch_values(make(), 0, 16, 4, workers)  # 64 samples: two epochs of 26 and part of a third
        assert len(full) == 64 and sorted(full[:26]) == sorted(full[26:52]) == list(range(26))
        for start in starts:
            assert _batch_values(make(), start, 16, 4, workers) == full[start * 4:], (workers, start)
        assert _batch_values(make(), 0, 16, 4, workers) == full  # deterministic
    other = _batch_values(ShardStream(shards, {"even": 0, "odd": 1, "three": 2}, index.counts, seed=6,
                                      shuffle_buffer=4), 0, 7, 4, 2)
    assert other != full[:28]  # another seed, another order


def test_resume_point_follows_the_round_robin():
    """Against a direct simulation of the DataLoader's in-order round robin over uneven workers."""
    for counts in ([3, 3], [5, 2, 0, 4], [1], [0, 6, 1]):
        order = [(w, r) for r in range(max(counts)) for w in range(len(counts)) if r < counts[w]]
        for offset in range(sum(counts)):
            taken = [sum(1 for w2, _ in order[:offset] if w2 == w) for w in range(len(counts))]
            assert resume_point(counts, offset) == (taken, order[offset][0]), (counts, offset)


def test_shards_with_cls_labels_and_pipe_urls(tmp_path):
    import io
    import tarfile

    path = tmp_path / "cls.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(4):
            for name, payload in ((f"k{i}.png", _png_bytes(i)), (f"k{i}.cls", str(i % 2).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
    data = open_pretrain_data(f"pipe:cat {path}", classes=["zero", "one"], shuffle_buffer=1)
    assert (data.kind, data.images, data.classes) == ("wds", 4, ["zero", "one"])
    samples = list(data.dataset)
    assert len(samples) == 4
    for image, target in samples:
        assert target["labels"].tolist() == ([1.0, 0.0] if int(image[0, 0, 0]) % 2 == 0 else [0.0, 1.0])
    assert list_shards("pipe:cat d-{008..010}.tar") == ["pipe:cat d-008.tar", "pipe:cat d-009.tar",
                                                         "pipe:cat d-010.tar"]
    assert list_shards(f"pipe:cat {tmp_path}/{{a,b}}{{1..2}}.tar") == [f"pipe:cat {tmp_path}/{n}.tar"
                                                                      for n in ("a1", "a2", "b1", "b2")]


def test_bad_shards_are_one_line_errors(tmp_path):
    import io
    import tarfile

    def tar(name, members):
        path = tmp_path / name
        with tarfile.open(path, "w") as tf:
            for member, payload in members:
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tf.addfile(info, io.BytesIO(payload))
        return str(path)

    cases = {
        tar("nolabel.tar", [("a.png", _png_bytes(1))]): "no label member",
        tar("noimage.tar", [("a.json", b'{"labels": ["x"]}')]): "no image member",
        tar("badjson.tar", [("a.png", _png_bytes(1)), ("a.json", b"{")]): "not JSON",
        tar("badcls.tar", [("a.png", _png_bytes(1)), ("a.cls", b"cat")]): "integer class",
    }
    for path, message in cases.items():
        with pytest.raises(HarnessError, match=message):
            open_pretrain_data(path)
    twice = tar("twice.tar", [("a.png", _png_bytes(1)), ("a.json", b'{"labels": ["x"]}')])
    with pytest.raises(HarnessError, match="appears twice"):
        open_pretrain_data(f"{tmp_path}/{{twice,twice}}.tar")
    (tmp_path / "junk.tar").write_bytes(b"not a tar file" * 100)
    with pytest.raises(HarnessError, match="not a readable tar shard"):
        open_pretrain_data(str(tmp_path / "junk.tar"))
    with pytest.raises(HarnessError, match="shard not found"):
        open_pretrain_data(str(tmp_path / "missing-{1..2}.tar"))
    with pytest.raises(HarnessError, match="not in --classes"):
        open_pretrain_data(twice, classes=["y"])
    # an image that cannot be decoded is found while streaming, in a DataLoader worker: still one line
    broken = tar("broken.tar", [("a.png", b"\x89PNG broken"), ("a.json", b'{"labels": ["x"]}')])
    stream = open_pretrain_data(broken).dataset
    with pytest.raises(HarnessError) as err:
        list(stream.batches(0, 1, 1, workers=1))
    assert "not a readable image" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(HarnessError, match="not a readable image"):  # iterated directly, it raises itself
        list(stream)


# ----------------------------------------------------------------------------- losses + hierarchy
def test_sigmoid_loss_matches_a_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.0], [0.5, 0.0, -3.0]])
    targets = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])

    def softplus(x):
        return math.log1p(math.exp(x))

    # -log sigmoid(z) = softplus(-z); -log(1 - sigmoid(z)) = softplus(z); summed over labels, mean over images
    image0 = softplus(-2.0) + softplus(-1.0) + softplus(-0.0)
    image1 = softplus(0.5) + softplus(0.0) + softplus(-3.0)
    assert sigmoid_loss(logits, targets).item() == pytest.approx((image0 + image1) / 2, rel=1e-6)


def test_softmax_loss_matches_a_hand_computation():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [5.0, 1.0, 1.0]])
    targets = torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # last: no label, left out
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    image0 = lse0 - 3.0  # -log softmax of the true class
    image1 = math.log(3.0)  # uniform logits, target 1/2 on two classes: -(1/2 log 1/3) * 2
    assert softmax_loss(logits, targets).item() == pytest.approx((image0 + image1) / 2, rel=1e-6)
    # single label = torch's cross-entropy
    one_hot = torch.eye(3)[[2, 0]]
    ref = torch.nn.functional.cross_entropy(logits[:2], torch.tensor([2, 0]))
    assert softmax_loss(logits[:2], one_hot).item() == pytest.approx(ref.item(), rel=1e-6)
    zero = softmax_loss(logits[2:], targets[2:])
    assert zero.item() == 0.0


def test_hierarchy_adds_ancestors(tmp_path):
    h = LabelHierarchy({"beagle": "dog", "dog": ["mammal", "pet"], "mammal": "animal", "cat": ["mammal", "pet"]})
    assert h.expand(["beagle"]) == ["animal", "beagle", "dog", "mammal", "pet"]
    assert h.expand(["cat", "rock"]) == ["animal", "cat", "mammal", "pet", "rock"]
    with pytest.raises(HarnessError, match="cycle"):
        LabelHierarchy({"a": "b", "b": "c", "c": "a"})
    path = tmp_path / "h.json"
    path.write_text(json.dumps({"cat": "animal", "dog": "animal"}))
    manifest = _manifest(tmp_path)
    data = open_pretrain_data(str(manifest), hierarchy=LabelHierarchy.load(path))
    assert data.classes == ["animal", "bird", "cat", "dog"]
    by_value = {int(im[0, 0, 0]) // 10: t["labels"].tolist() for im, t in (data.dataset[i] for i in range(6))}
    assert by_value[0] == [1.0, 0.0, 1.0, 0.0]  # cat -> cat + animal
    assert by_value[3] == [0.0, 1.0, 0.0, 0.0]  # bird has no parent
    assert by_value[4] == [0.0, 0.0, 0.0, 0.0]


def test_augment_and_model_shapes():
    aug = PretrainAugment(image_size=32, min_scale=0.5)
    image = torch.randint(0, 255, (3, 40, 60), dtype=torch.uint8)
    out, _ = aug(image, {}, torch.Generator().manual_seed(0))
    again, _ = aug(image, {}, torch.Generator().manual_seed(0))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert torch.equal(out, again)
    model = PretrainModel(build_backbone("resnet18"), num_classes=5, loss="sigmoid")
    losses = model([out, again], [{"labels": torch.tensor([1.0, 0, 0, 0, 1])}, {"labels": torch.zeros(5)}])
    assert set(losses) == {"loss_cls"} and losses["loss_cls"].ndim == 0
    model.eval()
    assert model(torch.stack([out])).shape == (1, 5)


# ----------------------------------------------------------------------------- training
def _tiny_config(data: Path, out: Path, **kw) -> PretrainConfig:
    base = dict(data=str(data), arch=SMALL_ARCH, out=str(out), iterations=4, batch_size=4, lr=0.05,
                image_size=48, warmup_iters=1, checkpoint_period=2, workers=0, progress=False, device="cpu")
    base.update(kw)
    return PretrainConfig(**base)


@pytest.mark.slow
def test_pretrain_cli_writes_a_loadable_harness_checkpoint(tmp_path, capsys):
    from harness.cli import main
    from harness.datasets.synthetic import write_pretrain_synthetic

    write_pretrain_synthetic(tmp_path / "pre", size=24, label_noise=0.2, image_size=48)
    out = tmp_path / "ckpt.safetensors"
    argv = ["pretrain", "--data", str(tmp_path / "pre"), "--arch", "resnet18", "--out", str(out), "--iterations", "3",
            "--batch-size", "4", "--image-size", "48", "--fraction", "0.5", "--workers", "0", "--device", "cpu",
            "--no-progress"]
    assert main(argv) == 0
    assert "resnet18 on" in capsys.readouterr().out
    backbone = load_backbone(str(out))
    assert backbone.checkpoint["layout"] == "harness" and backbone.arch == "resnet18"
    torch.manual_seed(0)
    init = build_backbone("resnet18").state_dict()
    trained = backbone.state_dict()
    changed = [k for k, v in init.items() if v.is_floating_point() and not torch.allclose(v, trained[k])]
    assert any(k.startswith("conv1") for k in changed) and any(k.startswith("layer4") for k in changed)
    feats = backbone(torch.rand(1, 3, 64, 64))
    assert list(feats) == ["c2", "c3", "c4", "c5"]
    record = read_sidecar(out)
    assert record["images"] < record["total_images"] == 24 and record["loss"] == "sigmoid"
    assert record["training"]["iterations"] == 3 and record["num_classes"] == len(record["settings"]["classes"])
    assert (tmp_path / "ckpt.run" / "metrics.jsonl").is_file()
    # rerun: same settings, nothing redone; other loader workers do not change the weights either
    assert main(argv) == 0
    assert "kept" in capsys.readouterr().out
    workers = argv.index("--workers") + 1
    assert main(argv[:workers] + ["1"] + argv[workers + 1:]) == 0
    assert "kept" in capsys.readouterr().out and read_sidecar(out) == record
    # the export lost, the finished run is exported again (the same tensors) with its record's losses and time
    first = load_file(out)
    out.unlink()
    assert main(argv) == 0
    again = read_sidecar(out)
    assert again["training"]["start_iteration"] == 3 and again["sha256"] == sha256_file(out) == record["sha256"]
    assert all(torch.equal(first[k], v) for k, v in load_file(out).items()) and len(first) == len(load_file(out))
    assert (again["training"]["final_losses"], again["training"]["wall_time"]) == (
        record["training"]["final_losses"], record["training"]["wall_time"])
    assert main(argv[:-1] + ["--fraction", "0", "--no-progress"]) == 2


def _interrupt_after(monkeypatch, calls: int):
    """Make the augmentation fail after ``calls`` samples (a crash in the middle of training)."""
    original = PretrainAugment.__call__
    count = {"n": 0}

    def flaky(self, image, target, generator):
        count["n"] += 1
        if count["n"] > calls:
            raise RuntimeError("simulated crash")
        return original(self, image, target, generator)

    monkeypatch.setattr(PretrainAugment, "__call__", flaky)


@pytest.mark.slow
@pytest.mark.parametrize("kind,optimizer", [("manifest", "sgd"), ("wds", "sgd"), ("manifest", "adamw")])
def test_pretrain_resumes_to_the_same_weights(tmp_path, monkeypatch, kind, optimizer):
    """Killed mid-run, a rerun resumes from the last checkpoint (optimizer state included) to the same weights."""
    from harness.datasets.synthetic import write_pretrain_synthetic

    manifest = write_pretrain_synthetic(tmp_path / "pre", size=16, label_noise=0.0, image_size=40)
    data = tmp_path / "pre"
    if kind == "wds":
        rows = [json.loads(line) for line in manifest.read_text().splitlines()]
        records = [(Path(r["path"]).stem, (data / r["path"]).read_bytes(), "jpg", r["labels"]) for r in rows]
        data = tmp_path / "shards"
        write_shards(records, str(data / "p-%02d.tar"), 4)
    straight = pretrain(_tiny_config(data, tmp_path / "a.safetensors", optimizer=optimizer, lr=None))
    assert straight["training"]["start_iteration"] == 0
    schedule = straight["settings"]["schedule"]
    assert (schedule["optimizer"], schedule["lr"]) == (optimizer, 1e-3 if optimizer == "adamw" else 0.1 * 4 / 256)

    with monkeypatch.context() as m:
        _interrupt_after(m, 3 * 4)  # iterations 1-3 fetch 12 samples; the crash comes in iteration 4
        with pytest.raises(RuntimeError, match="simulated crash"):
            pretrain(_tiny_config(data, tmp_path / "b.safetensors", optimizer=optimizer, lr=None))
    assert not (tmp_path / "b.safetensors").exists()
    if kind == "wds":  # the stream's order depends on its loader workers: resuming with others is refused
        with pytest.raises(HarnessError, match="other settings.*shard_stream"):
            pretrain(_tiny_config(data, tmp_path / "b.safetensors", optimizer=optimizer, lr=None, workers=1))
    resumed = pretrain(_tiny_config(data, tmp_path / "b.safetensors", optimizer=optimizer, lr=None))
    assert resumed["training"]["start_iteration"] == 2  # the checkpoint of iteration 2
    a = load_backbone(str(tmp_path / "a.safetensors")).state_dict()
    b = load_backbone(str(tmp_path / "b.safetensors")).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    def losses(run):
        return [(r["iter"], r["loss"]) for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    assert losses("a.run") == losses("b.run") and len(losses("a.run")) == 4


@pytest.mark.slow
def test_pretrain_under_torchrun_on_streamed_shards(tmp_path):
    """Two gloo processes (DDP): each streams its own shards; rank 0 writes one loadable checkpoint."""
    import os
    import subprocess
    import sys

    from harness.datasets.synthetic import write_pretrain_synthetic

    manifest = write_pretrain_synthetic(tmp_path / "pre", size=16, label_noise=0.0, image_size=32)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    write_shards([(Path(r["path"]).stem, (tmp_path / "pre" / r["path"]).read_bytes(), "jpg", r["labels"]) for r in rows],
                 str(tmp_path / "shards" / "p-%02d.tar"), 4)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "harness",
           "pretrain", "--data", str(tmp_path / "shards"), "--arch", "resnet18", "--out", str(out), "--iterations", "2",
           "--batch-size", "4", "--image-size", "32", "--workers", "2", "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("resnet18 on 16 of 16 images") == 1  # printed by rank 0 only
    record = read_sidecar(out)
    assert record["training"]["world_size"] == 2 and record["training"]["per_process_batch"] == 2
    assert record["settings"]["data"]["format"] == "wds" and load_backbone(str(out)).checkpoint["layout"] == "harness"


def test_pretrain_out_is_checked_before_training(tmp_path, capsys):
    """A folder or another suffix as --out failed when the trained weights were written (work lost)."""
    from harness.cli import main
    from harness.datasets.synthetic import write_pretrain_synthetic

    with pytest.raises(HarnessError, match="image_size >= 16"):
        write_pretrain_synthetic(tmp_path / "none", size=2, label_noise=0.0, image_size=0)
    write_pretrain_synthetic(tmp_path / "pre", size=4, label_noise=0.0, image_size=32)
    for out in (tmp_path, tmp_path / "ckpt.pth"):
        argv = ["pretrain", "--data", str(tmp_path / "pre"), "--arch", "resnet18", "--out", str(out), "--iterations", "1",
                "--batch-size", "2", "--image-size", "32", "--workers", "0", "--device", "cpu", "--no-progress"]
        assert main(argv) == 2
        assert "must name the .safetensors file to write" in capsys.readouterr().err
