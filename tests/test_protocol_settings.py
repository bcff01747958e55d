"""The settings that make a number comparable: total batch (rescaling, accumulation, off-protocol),
precision (fp32 proposals under bf16 autocast; every task model under CPU autocast), PreciseBN,
the frozen depth, and `harness eval --dry-run` on every full and short profile."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from harness.backbones import build_backbone
from harness.cards import all_cards, task_card
from harness.cli import main as harness_main
from harness.engine import TrainConfig, predict, train
from harness.errors import HarnessError
from harness.models.detection import build_detector, pad_colour
from harness.protocols import apply_protocol
from harness.kinds import KINDS
from harness.kinds.detection import aspect_groups
from harness.plan import format_table
from harness.runner import off_protocol, train_config
from tests.support import SMALL_ARCH


# ----------------------------------------------------------------------------- total batch
def test_another_batch_keeps_the_cards_epochs():
    card = task_card("coco")
    full = train_config(card, "full", seed=0)
    half = train_config(card, "full", seed=0, batch_size=8)
    assert (full.batch_size, full.iterations, list(full.steps), full.warmup_iters) == (16, 90000, [60000, 80000], 1000)
    assert (half.iterations, list(half.steps), half.warmup_iters) == (180000, [120000, 160000], 2000)
    assert half.lr == pytest.approx(0.01) and half.checkpoint_period == 10000
    assert off_protocol(card, "full", full) == []
    assert off_protocol(card, "full", half) == ["total batch 8 (card: 16)"]
    bf16 = train_config(card, "full", seed=0, precision="bf16", accumulate=4)
    assert bf16.batch_size == 16 and bf16.accumulate == 4 and bf16.iterations == 90000
    assert off_protocol(card, "full", bf16) == ["precision bf16 (card: fp32)"]


class Linear(nn.Module):
    """A BatchNorm-free model: accumulated micro-batches give the full batch's gradient."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 1)

    def forward(self, images, targets=None):
        pred = self.lin(torch.stack([im.flatten()[:4] for im in images])).squeeze(1)
        return {"loss": ((pred - torch.stack(targets)) ** 2).mean()}


class Pairs(Dataset):
    def __init__(self, n=12):
        g = torch.Generator().manual_seed(1)
        self.items = [(torch.rand(3, 2, 2, generator=g), torch.rand((), generator=g)) for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def test_gradient_accumulation_gives_the_full_batch_step(tmp_path):
    weights = []
    for accumulate in (1, 2, 4):
        torch.manual_seed(0)
        model = Linear()
        cfg = TrainConfig(iterations=5, batch_size=4, lr=0.1, warmup_iters=0, accumulate=accumulate, checkpoint_period=5)
        result = train(model, Pairs(), cfg, tmp_path / f"acc{accumulate}", progress=False)
        assert result.accumulate == accumulate and result.per_process_batch == 4
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(weights[0], weights[1], atol=1e-6) and torch.allclose(weights[0], weights[2], atol=1e-6)
    with pytest.raises(HarnessError, match="not divisible"):
        train(Linear(), Pairs(), TrainConfig(iterations=1, batch_size=4, lr=0.1, accumulate=3), tmp_path / "bad",
              progress=False)


# ----------------------------------------------------------------------------- PreciseBN
class Normed(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.inputs: list[torch.Tensor] = []

    def forward(self, images, targets=None):
        x = self.lin(torch.stack([im.flatten()[:4] for im in images]))
        if not torch.is_grad_enabled():  # PreciseBN's passes run without gradients
            self.inputs.append(x.detach().clone())
        return {"loss": self.bn(x).pow(2).mean() + 0 * torch.stack(targets).sum()}


def test_precise_bn_sets_running_statistics_to_the_average_over_its_batches(tmp_path):
    torch.manual_seed(0)
    model = Normed()
    cfg = TrainConfig(iterations=3, batch_size=4, lr=0.01, warmup_iters=0, precise_bn_iters=3, checkpoint_period=3)
    result = train(model, Pairs(), cfg, tmp_path / "run", progress=False)
    assert result.precise_bn_iters == 3 and len(model.inputs) == 3  # after the last step, without gradients
    means = torch.stack([x.mean(0) for x in model.inputs]).mean(0)
    variances = torch.stack([x.var(0, unbiased=True) for x in model.inputs]).mean(0)
    assert torch.allclose(model.bn.running_mean, means, atol=1e-6)
    assert torch.allclose(model.bn.running_var, variances, atol=1e-6)
    assert model.bn.momentum == 0.1  # restored
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    assert torch.equal(saved["bn.running_mean"], model.bn.running_mean)  # the final checkpoint holds them


# ----------------------------------------------------------------------------- precision
def _tiny_image(seed: int, size=(3, 96, 128)):
    return torch.rand(*size, generator=torch.Generator().manual_seed(seed))


def test_proposals_under_bf16_autocast_equal_fp32_ones():
    """Anchors, box decoding and proposal selection run in fp32 under autocast: given the same RPN
    head outputs (values a bf16 head would give), bf16 autocast and fp32 give the same proposals.
    The backbone only feeds the RPN head, whose outputs are fixed below: SMALL_ARCH."""
    torch.manual_seed(0)
    backbone = build_backbone(SMALL_ARCH)
    model = build_detector(backbone, num_classes=3, min_size=800, max_size=1333, neck_channels=64).eval()
    images, _ = model.transform([_tiny_image(0, (3, 600, 1000))])
    features = model.backbone(images.tensors)
    objectness, deltas = model.rpn.head(list(features.values()))
    objectness = [o.to(torch.bfloat16).float() for o in objectness]  # exactly representable in bf16
    deltas = [d.to(torch.bfloat16).float() for d in deltas]

    class Fixed(nn.Module):
        def forward(self, x):
            dtype = torch.bfloat16 if torch.is_autocast_enabled("cpu") else torch.float32
            return [o.to(dtype) for o in objectness], [d.to(dtype) for d in deltas]

    model.rpn.head = Fixed()
    with torch.no_grad():
        fp32, _ = model.rpn(images, features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half_features = {k: v.to(torch.bfloat16) for k, v in features.items()}
            bf16, _ = model.rpn(images, half_features)
    assert bf16[0].dtype == torch.float32 and bf16[0].shape == fp32[0].shape
    assert (bf16[0] - fp32[0]).abs().max().item() < 1e-3
    assert fp32[0].max() > 500  # coordinates where bf16 anchors would snap to a 4-pixel grid


@pytest.mark.slow
@pytest.mark.parametrize("task", ["coco", "voc", "seg", "pose"])
def test_every_task_model_trains_and_predicts_under_cpu_bf16_autocast(task, tmp_path):
    # SMALL_ARCH (timm's test_resnet, with the res5 stage the C4 head needs): on a CPU without native
    # bf16, bf16 convolutions take torch's slow reference path (ResNet-18's voc model: 45 s)
    card = task_card(task)
    torch.manual_seed(0)
    backbone = build_backbone(SMALL_ARCH)
    kind = KINDS[card.model.kind]
    kwargs, aug = kind.settings(card, "smoke")
    model = kind.build_model(backbone, **kwargs)
    apply_protocol(model, backbone, "finetune")
    if card.model.kind == "segmentation":
        items = [(_tiny_image(i), torch.randint(0, 21, (96, 128), generator=torch.Generator().manual_seed(i)))
                 for i in range(2)]
    else:
        boxes = torch.tensor([[10.0, 12.0, 60.0, 80.0], [50.0, 20.0, 110.0, 70.0]])
        items = []
        for i in range(2):
            target = {"boxes": boxes, "labels": torch.tensor([1, 1]), "iscrowd": torch.tensor([0, 0]), "image_id": i}
            if card.model.kind == "keypoints":
                kps = torch.zeros(2, 17, 3)
                kps[:, :, 0] = boxes[:, :1] + 5 + torch.arange(17.0)
                kps[:, :, 1] = boxes[:, 1:2] + 10
                kps[:, :, 2] = 2
                target["keypoints"] = kps
            items.append((_tiny_image(i), target))

    class Items(Dataset):
        def __len__(self):
            return len(items)

        def __getitem__(self, i):
            return items[i]

    cfg = TrainConfig(iterations=1, batch_size=2, lr=0.001, warmup_iters=0, precision="bf16", checkpoint_period=1)
    result = train(model, Items(), cfg, tmp_path / "run", augment=kind.train_augment(backbone, **aug), progress=False)
    assert result.precision == "bf16" and all(torch.isfinite(torch.tensor(v)) for v in result.final_losses.values())
    outputs = predict(model, Items(), precision="bf16", postprocess=lambda out, target: out, progress=False)
    assert len(outputs) == 2
    if card.model.kind == "segmentation":
        assert outputs[0].shape[-2:] == (96, 128)
    else:
        assert outputs[0]["boxes"].dtype == torch.float32  # decoded in fp32 under autocast


def test_fp16_on_the_cpu_is_refused(tmp_path):
    cfg = TrainConfig(iterations=1, batch_size=2, lr=0.1, precision="fp16")
    with pytest.raises(HarnessError, match="fp16 needs a CUDA device"):
        train(Linear(), Pairs(), cfg, tmp_path / "run", progress=False)


# ----------------------------------------------------------------------------- frozen depth
def test_frozen_stages_leave_the_other_stages_training():
    backbone = build_backbone("resnet18")
    model = build_detector(backbone, num_classes=2, head="c4", min_size=128, max_size=160)
    info = apply_protocol(model, backbone, "frozen", frozen_stages=["stem", "c2", "c3", "c4"])
    assert info.frozen_stages == ["stem", "c2", "c3", "c4"] and "c5 train" in info.norm
    model.train()
    assert all(p.requires_grad for p in backbone.layer4.parameters())
    assert not any(p.requires_grad for name, p in backbone.named_parameters() if not name.startswith("layer4"))
    backbone(torch.rand(1, 3, 64, 64))  # the frozen stages' pre-forward hooks put them back in eval mode
    assert backbone.layer4.training and not backbone.layer3.training and not backbone.bn1.training
    everything = build_backbone("resnet18")
    model = build_detector(everything, num_classes=2, head="c4", min_size=128, max_size=160)
    assert apply_protocol(model, everything, "frozen").frozen_stages == ["stem", "c2", "c3", "c4", "c5"]
    assert not any(p.requires_grad for p in everything.parameters())  # res5, the box head, frozen too


def test_table_header_names_the_frozen_stages():
    from harness.results import RunSummary

    row = RunSummary(task="voc", protocol="frozen", profile="smoke", card_hash="0" * 64, seeds=[0],
                     backbone={"name": "random:resnet18", "arch": "resnet18", "sha256": None, "layout": "random",
                               "parameters": 11_176_512},
                     dataset={"name": "voc", "train_split": "trainval", "test_split": "test", "images_trained": 6,
                              "images_scored": 4, "synthetic": True},
                     metrics={"AP50": {"mean": 50.0, "std": 0.0, "values": [50.0]}})
    table = format_table([row])
    assert "frozen: stem c2 c3 c4 c5 fixed" in table and "50.0" in table.splitlines()[-1]


def test_padding_uses_the_backbones_mean_colour():
    backbone = build_backbone("resnet18", normalization="caffe")  # detectron2 MSRA: BGR, mean in BGR order
    assert pad_colour(backbone) == pytest.approx(tuple(v / 255 for v in (123.675, 116.28, 103.53)))
    model = build_detector(backbone, num_classes=2, min_size=64, max_size=128)
    batch = model.transform.batch_images([torch.zeros(3, 40, 50), torch.zeros(3, 64, 60)], size_divisible=32)
    assert batch.shape[-2:] == (64, 64)
    assert torch.allclose(batch[0, :, 40:, :], torch.tensor(pad_colour(backbone)).view(3, 1, 1).expand(3, 24, 64))
    assert batch[0, :, :40, :50].abs().max() == 0  # the image itself is untouched
    assert backbone.normalize(batch[:1, :, 50:, 50:]).abs().max() < 1e-5  # padding is 0 after normalization


# ----------------------------------------------------------------------------- dry run
# a profile's schedule: the only fields in which a dry run of one profile differs from another's
SCHEDULE = {"iterations", "batch_size", "lr", "schedule", "steps", "poly_power", "poly_min_lr", "warmup_iters",
            "warmup_factor", "checkpoint_period"}


def _without_schedule(task: str, profile: str) -> dict:
    return {k: v for k, v in task_card(task).profile(profile).model_dump().items() if k not in SCHEDULE}


# the models a dry run of every card builds: each full profile, and each short one that differs from it
# in more than its schedule (a short profile that equals the full one but for its schedule builds the
# same model, so training it again would test nothing new)
DRY_RUN_MODELS = [(t, "full") for t in sorted(all_cards())] + [
    (t, "short") for t in sorted(all_cards()) if _without_schedule(t, "short") != _without_schedule(t, "full")]


def _dry_run(tasks, profile, root, out, capsys, backbone="random:resnet18") -> str:
    code = harness_main(["eval", "--backbone", backbone, "--tasks", ",".join(tasks), "--protocols",
                         "finetune", "--profile", profile, "--data-root", str(root), "--out", str(out), "--device",
                         "cpu", "--no-progress", "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "no results written" in printed and not (out / "results.json").exists()
    assert not any(out.glob("*/finetune/seed0/result.json"))
    return printed


@pytest.mark.parametrize("profile", ["full", "short"])
def test_dry_run_plans_every_card(profile, synthetic_root, tmp_path, capsys, monkeypatch):
    """Every card's plan row (batch, iterations, precision) and one dry-run cell per card; the cells
    themselves are trained in `test_dry_run_trains_and_predicts_at_the_profile_sizes`."""
    from harness import runner

    tasks = sorted(all_cards())
    cells = []
    monkeypatch.setattr(runner, "dry_run_cell", lambda plan, env, card, *args: cells.append((card.name, plan.profile)) or 0.0)
    out = _dry_run(tasks, profile, synthetic_root, tmp_path / "out", capsys)
    assert sorted(cells) == [(t, profile) for t in tasks]
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.split() and line.split()[0] in tasks}
    assert set(lines) == set(tasks)
    for task in tasks:
        p = task_card(task).profile(profile)
        row = lines[task]
        assert int(row[3]) == p.batch_size and int(row[5]) == p.iterations and row[9] == p.precision


@pytest.mark.slow
@pytest.mark.parametrize("task, profile", DRY_RUN_MODELS, ids=[f"{t}-{p}" for t, p in DRY_RUN_MODELS])
def test_dry_run_trains_and_predicts_at_the_profile_sizes(task, profile, synthetic_root, tmp_path, capsys, monkeypatch):
    """The card's model built at the profile's image sizes and heads, trained and predicting, with nothing
    written: one step and one image here (the product's 2 and 2 repeat the same code at full-size cost).
    The backbone is SMALL_ARCH, timm's 0.37M-parameter test_resnet (its odd widths, c4 192 and c5 96, check that the
    heads take their channels from the backbone): the sizes and heads are the profile's, and with
    ResNet-18 the five cells took 125 s of the suite, the voc C4 head (res5 on 512 RoIs) 46 s of it.
    An untrained R-CNN keeps 100 detections, each through the profile's heads (pose: eight 512-channel
    keypoint convs, 9 of its 20 s); here it keeps 3, which runs the same heads at the same sizes."""
    from harness import runner

    monkeypatch.setattr(runner, "DRY_RUN_ITERATIONS", 1)
    monkeypatch.setattr(runner, "DRY_RUN_IMAGES", 1)
    kind = KINDS[task_card(task).model.kind]
    build = kind.build_model

    def few_detections(*args, **kwargs):
        model = build(*args, **kwargs)
        if hasattr(model, "roi_heads"):
            model.roi_heads.detections_per_img = 3
        return model

    monkeypatch.setattr(kind, "build_model", few_detections)
    out = _dry_run([task], profile, synthetic_root, tmp_path / "out", capsys, backbone=f"random:{SMALL_ARCH}")
    assert (f"dry run: {task}/finetune/seed0 " in out
            and "(1 steps, 1 predictions each)" in out)


def test_dry_run_plan_rescales_with_the_batch(synthetic_root, tmp_path, capsys, monkeypatch):
    from harness import runner

    monkeypatch.setattr(runner, "dry_run_cell", lambda *a, **k: 0.0)  # the plan only; the slow test trains
    code = harness_main(["eval", "--backbone", "random:resnet18", "--tasks", "voc", "--protocols", "frozen",
                         "--profile", "full", "--data-root", str(synthetic_root), "--out", str(tmp_path / "o"),
                         "--device", "cpu", "--batch-size", "8", "--dry-run", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    cells = next(line.split() for line in out.splitlines() if line.startswith("voc "))
    assert cells[3:9] == ["8", "1", "48000", "0.01", "36000,44000", "200"]
    assert "off-protocol: total batch 8 (card: 16)" in out


def test_bad_settings_are_one_line_errors(synthetic_root, tmp_path, capsys):
    base = ["eval", "--backbone", "random:resnet18", "--tasks", "voc", "--profile", "smoke", "--data-root",
            str(synthetic_root), "--out", str(tmp_path / "o"), "--device", "cpu"]
    assert harness_main(base + ["--accumulate", "0"]) != 0
    assert "--accumulate must be at least 1" in capsys.readouterr().err
    assert harness_main(base + ["--precision", "fp16"]) != 0
    err = capsys.readouterr().err
    assert "fp16 needs a CUDA device" in err and len(err.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- aspect-ratio grouping
class Sized(Dataset):
    """Images of known sizes whose target is their index (to see which images share a batch)."""

    def __init__(self, sizes):
        self.sizes = sizes

    def image_sizes(self):
        return self.sizes

    def __len__(self):
        return len(self.sizes)

    def __getitem__(self, i):
        return torch.zeros(3, 2, 2), torch.tensor(float(i))


class Recorder(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.batches: list[list[int]] = []

    def forward(self, images, targets=None):
        self.batches.append([int(t) for t in targets])
        return {"loss": self.w * 0 + self.w ** 2}


def test_aspect_ratio_grouping_batches_landscape_and_portrait_apart_and_resumes(tmp_path):

    sizes = [(100, 200) if i % 3 else (200, 100) for i in range(30)]  # (h, w): two thirds landscape
    data = Sized(sizes)
    groups = aspect_groups(data)
    assert groups == [0 if w > h else 1 for h, w in sizes]
    assert aspect_groups(torch.utils.data.Subset(data, [0, 1])) == groups[:2]
    cfg = TrainConfig(iterations=20, batch_size=4, lr=0.01, warmup_iters=0, checkpoint_period=7)
    whole = Recorder()
    train(whole, data, cfg, tmp_path / "whole", groups=groups, progress=False)
    assert len(whole.batches) == 20
    assert all(len({groups[i] for i in batch}) == 1 for batch in whole.batches)  # one aspect group per batch
    assert {groups[b[0]] for b in whole.batches} == {0, 1}
    # a run resumed at iteration 7 (its checkpoint) reads the same batches from there on
    from torch.utils.data import DistributedSampler

    from harness.batches import ScheduleBatches

    sampler = DistributedSampler(data, num_replicas=1, rank=0, shuffle=True, seed=0)
    resumed = [[k for _, k in b] for b in ScheduleBatches(sampler, 4, 7, 20, groups)]
    assert resumed == whole.batches[7:]
