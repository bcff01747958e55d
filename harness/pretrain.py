"""`harness pretrain`: train a backbone on labelled images and write it in the harness's own format.

Data: ``harness.datasets.pretraining.open_pretrain_data`` (ImageFolder trees, JSONL/CSV manifests,
WebDataset shards streamed by ``harness.datasets.shards``), with nested ``fraction`` subsets decided
by a hash of each image's key (``harness.datasets.labelled``). ``--workers`` DataLoader workers
decode and augment for either.

Losses (``PretrainModel``): ``sigmoid`` = per-label sigmoid cross-entropy summed over labels and
averaged over images (multi-label, the paper's; an image without labels is a negative for every
label); ``softmax`` = cross-entropy against the image's labels as a uniform target distribution
(the usual one-hot cross-entropy for single-label data; images without labels are left out).
``auto`` picks softmax for an ImageFolder tree without a hierarchy and sigmoid otherwise. A label
hierarchy (JSON ``{"child": "parent"}`` or ``{"child": ["parent", ...]}``) adds every ancestor of
an image's labels.

Training goes through :func:`harness.engine.train` (DDP under torchrun, AMP on CUDA, checkpoints
every ``checkpoint_period`` iterations that a rerun resumes from, tqdm, ``metrics.jsonl``) in
``work_dir`` (default ``<out stem>.run/`` beside the output); the model is the backbone, global
average pooling of ``c5`` and a linear classifier. Shards reach the engine as this rank's batches
(``ShardStream.batches``), which a resumed run continues in the same order. Rank 0 writes ``out``
with :func:`harness.checkpoints.save_backbone` (``harness eval --backbone out`` takes it directly)
and ``<out stem>.json`` (data, subset, classes, schedule, sha256). Rerunning a finished command
with the same settings returns the recorded result at once.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from harness.datasets.labelled import LabelHierarchy, read_classes
from harness.datasets.pretraining import open_pretrain_data
from harness.datasets.shards import ShardStream
from harness.errors import HarnessError

LOSSES = ("auto", "sigmoid", "softmax")


# ----------------------------------------------------------------------------- augmentation
class PretrainAugment:
    """Random resized crop (area ``[min_scale, 1]`` of the image, aspect ``[3/4, 4/3]``) to
    ``image_size``² and a horizontal flip; uint8 in, float RGB ``[0, 1]`` out. Draws only from the
    engine's per-sample generator."""

    def __init__(self, image_size: int = 224, min_scale: float = 0.35, flip: bool = True):
        if image_size < 16:
            raise HarnessError(f"--image-size must be at least 16, got {image_size}")
        if not 0.0 < min_scale <= 1.0:
            raise HarnessError(f"--min-scale must be in (0, 1], got {min_scale}")
        self.image_size, self.min_scale, self.flip = int(image_size), float(min_scale), bool(flip)

    def crop_box(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        u = torch.rand(4, generator=generator).tolist()
        area = height * width * (self.min_scale + (1.0 - self.min_scale) * u[0])
        ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u[1])
        w = int(round(min(width, max(1.0, math.sqrt(area * ratio)))))
        h = int(round(min(height, max(1.0, math.sqrt(area / ratio)))))
        top = int(u[2] * (height - h + 1)) if height > h else 0
        left = int(u[3] * (width - w + 1)) if width > w else 0
        return top, left, h, w

    def __call__(self, image: torch.Tensor, target: dict, generator: torch.Generator):
        _, height, width = image.shape
        top, left, h, w = self.crop_box(height, width, generator)
        crop = image[:, top: top + h, left: left + w].float().div_(255.0).unsqueeze(0)
        out = F.interpolate(crop, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False,
                            antialias=True)[0].clamp_(0.0, 1.0)
        if self.flip and torch.rand(1, generator=generator).item() < 0.5:
            out = out.flip(-1)
        return out, target


# ----------------------------------------------------------------------------- losses + model
def sigmoid_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-label sigmoid cross-entropy, summed over labels, averaged over images."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="sum") / logits.shape[0]


def softmax_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against each image's labels as a uniform distribution; images without labels
    are left out (a batch without any labelled image gives a zero loss)."""
    logits, targets = logits.float(), targets.float()
    counts = targets.sum(1)
    valid = counts > 0
    if not bool(valid.any()):
        return logits.sum() * 0.0
    q = targets[valid] / counts[valid, None]
    return -(q * F.log_softmax(logits[valid], dim=1)).sum(1).mean()


LOSS_FUNCTIONS = {"sigmoid": sigmoid_loss, "softmax": softmax_loss}


def resolve_loss(loss: str, kind: str, hierarchy: LabelHierarchy | None) -> str:
    if loss not in LOSSES:
        raise HarnessError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
    if loss != "auto":
        return loss
    return "softmax" if kind == "imagefolder" and hierarchy is None else "sigmoid"


class PretrainModel(nn.Module):
    """Backbone -> global average pool of ``c5`` -> linear classifier; the engine's training
    forward ``model(images, targets)`` returns ``{"loss_cls": loss}``, inference returns logits."""

    def __init__(self, backbone: nn.Module, num_classes: int, loss: str = "sigmoid"):
        super().__init__()
        if loss not in LOSS_FUNCTIONS:
            raise HarnessError(f"unknown loss {loss!r}: use sigmoid or softmax")
        self.backbone, self.loss = backbone, loss
        channels = backbone.feature_info[-1].channels
        self.classifier = nn.Linear(channels, num_classes)
        nn.init.normal_(self.classifier.weight, std=0.01)
        # sigmoid: start at the prior probability 1/C per label (keeps the early loss small)
        prior = 1.0 / max(2, num_classes)
        nn.init.constant_(self.classifier.bias, math.log(prior / (1 - prior)) if loss == "sigmoid" else 0.0)

    def forward(self, images, targets=None):
        x = torch.stack(list(images)) if isinstance(images, (list, tuple)) else images
        feats = self.backbone(x)["c5"]
        logits = self.classifier(feats.mean(dim=(2, 3)))
        if targets is None:
            return logits
        y = torch.stack([t["labels"] for t in targets]).to(logits.device)
        return {"loss_cls": LOSS_FUNCTIONS[self.loss](logits, y)}


# ----------------------------------------------------------------------------- pretrain
@dataclass
class PretrainConfig:
    """One ``harness pretrain`` run. Either ``epochs`` (iterations = epochs × images / batch) or
    ``iterations``. SGD: ``lr`` defaults to 0.1 × batch / 256, weight decay to 1e-4; AdamW: 1e-3 and
    0.05."""

    data: str
    arch: str
    out: str
    loss: str = "auto"
    fraction: float = 1.0
    subset_seed: int = 0
    data_format: str | None = None
    hierarchy: str | None = None
    classes: str | None = None
    epochs: float | None = None
    iterations: int | None = None
    batch_size: int = 256
    optimizer: str = "sgd"  # or "adamw"
    lr: float | None = None
    momentum: float = 0.9  # sgd
    weight_decay: float | None = None
    warmup_iters: int | None = None  # default: 5% of the iterations, at most 1000
    steps: tuple[float, ...] = (0.67, 0.89)  # lr x0.1 at these fractions of the schedule
    image_size: int = 224
    min_scale: float = 0.35
    seed: int = 0
    workers: int | None = None  # default: the engine's (4 on CUDA, 0 on the CPU)
    shuffle_buffer: int = 1000
    checkpoint_period: int = 1000
    device: str | None = None
    work_dir: str | None = None
    progress: bool = True
    normalization: str | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        d["steps"] = list(self.steps)
        return d


def read_sidecar(out) -> dict | None:
    """The pretraining record beside ``out`` (``harness.results.read_pretrain_record``) as a dict, or None."""
    from harness.results import read_pretrain_record

    record = read_pretrain_record(out)
    return None if record is None else record.model_dump()


def _weights_settings(settings: dict | None) -> dict | None:
    """A run's recorded settings without those that do not change the weights (loader workers,
    logging and checkpoint periods), as JSON reads them back."""
    if settings is None:
        return None
    from harness.engine import NOT_FINGERPRINTED

    settings = json.loads(json.dumps(settings))
    settings["schedule"] = {k: v for k, v in settings.get("schedule", {}).items() if k not in NOT_FINGERPRINTED}
    return settings


def train_schedule(cfg: PretrainConfig, images: int, world_size: int, num_workers: int, device: torch.device):
    """The engine's ``TrainConfig`` for ``cfg`` on ``images`` images; a bad schedule is a one-line error."""
    from harness.engine import TrainConfig, default_precision

    if (cfg.epochs is None) == (cfg.iterations is None):
        raise HarnessError("give exactly one of --epochs and --iterations")
    if cfg.batch_size % world_size:
        raise HarnessError(f"--batch-size {cfg.batch_size} is not divisible by the {world_size} processes")
    if cfg.iterations is not None:
        iterations = int(cfg.iterations)
    else:
        if not cfg.epochs > 0:
            raise HarnessError(f"--epochs must be positive, got {cfg.epochs}")
        iterations = max(1, math.ceil(cfg.epochs * images / cfg.batch_size))
    adamw = cfg.optimizer == "adamw"
    lr = cfg.lr if cfg.lr is not None else (1e-3 if adamw else 0.1 * cfg.batch_size / 256)
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else (0.05 if adamw else 1e-4)
    warmup = cfg.warmup_iters if cfg.warmup_iters is not None else min(1000, iterations // 20)
    steps = sorted({int(round(s * iterations)) for s in cfg.steps if 0 < s < 1})
    return TrainConfig(iterations=iterations, batch_size=cfg.batch_size, lr=lr, optimizer=cfg.optimizer,
                       momentum=cfg.momentum, weight_decay=weight_decay, warmup_iters=warmup, warmup_factor=0.1, steps=steps,
                       seed=cfg.seed, checkpoint_period=cfg.checkpoint_period,
                       log_period=max(1, min(20, iterations // 10 or 1)), num_workers=num_workers,
                       precision=default_precision(device))


def pretrain(cfg: PretrainConfig) -> dict:
    """Pretrain ``cfg.arch`` on ``cfg.data`` and write ``cfg.out`` (harness format) + its record.

    Returns the record (also on non-zero ranks). A finished run with the same settings is not
    redone; an interrupted one resumes from ``work_dir/checkpoint.pt``.
    """
    from harness.backbones import build_backbone
    from harness.checkpoints import save_backbone, sha256_file
    from harness.distributed import barrier, broadcast_object, init_distributed
    from harness.engine import default_loader_workers, train
    from harness.files import write_json_atomic
    from harness.results import pretrain_record_path

    out = Path(cfg.out)
    if out.is_dir() or out.suffix != ".safetensors":  # found now, not after the training
        raise HarnessError(f"pretrain: --out {out} must name the .safetensors file to write")
    env = init_distributed(cfg.device)
    hierarchy = LabelHierarchy.load(cfg.hierarchy) if cfg.hierarchy else None
    classes = read_classes(cfg.classes) if cfg.classes else None
    data = open_pretrain_data(cfg.data, fraction=cfg.fraction, subset_seed=cfg.subset_seed,
                              data_format=cfg.data_format, hierarchy=hierarchy, classes=classes, rank=env.rank,
                              world_size=env.world_size, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer)
    loss = resolve_loss(cfg.loss, data.kind, hierarchy)
    workers = cfg.workers if cfg.workers is not None else default_loader_workers(env.device)
    tcfg = train_schedule(cfg, data.images, env.world_size, workers, env.device)
    stream = data.dataset if isinstance(data.dataset, ShardStream) else None
    settings = {
        "arch": cfg.arch, "data": {**data.describe(), "fraction": cfg.fraction, "subset_seed": cfg.subset_seed,
                                   "hierarchy": cfg.hierarchy},
        "loss": loss, "classes": data.classes, "image_size": cfg.image_size, "min_scale": cfg.min_scale,
        "normalization": cfg.normalization, "schedule": tcfg.as_dict(), "world_size": env.world_size,
    }
    if stream is not None:  # the stream's order depends on its loader workers
        settings["stream_workers"] = stream.loader_workers(workers)
    previous = read_sidecar(out)
    same = previous is not None and _weights_settings(previous.get("settings")) == _weights_settings(settings)
    if same and out.is_file() and previous.get("sha256") == sha256_file(out):
        if env.is_main:
            print(f"{out}: pretrained earlier with the same settings, kept")
        return previous

    torch.manual_seed(cfg.seed)  # the initialisation depends on the seed only
    backbone = build_backbone(cfg.arch, normalization=cfg.normalization)
    model = PretrainModel(backbone, len(data.classes), loss)
    if env.world_size > 1:
        from harness.backbones import arch_family

        tcfg.find_unused_parameters = arch_family(cfg.arch) != "resnet"  # the ViT pyramid's c2..c4 are unused
    work = Path(cfg.work_dir) if cfg.work_dir else out.with_name(out.stem + ".run")
    augment = PretrainAugment(cfg.image_size, cfg.min_scale)
    streamed = {}
    if stream is not None:  # the stream augments in its workers; its order depends on the workers and the buffer
        per_rank = tcfg.batch_size // env.world_size
        streamed = dict(
            batches=lambda start: stream.batches(start, tcfg.iterations, per_rank, workers, augment),
            identity={"shard_stream": {"workers": stream.loader_workers(workers),
                                       "shuffle_buffer": stream.shuffle_buffer}})
    result = train(model, data.dataset, tcfg, work, augment=None if stream else augment, env=env,
                   progress=cfg.progress, desc=f"pretrain {cfg.arch} ({data.images} images)", **streamed)
    training = {**result.as_dict(), "work_dir": str(work)}
    if result.start_iteration >= result.iterations and same:  # finished before: its losses and time stand
        training.update({k: previous["training"][k] for k in ("final_losses", "wall_time") if k in previous["training"]})
    record = None
    if env.is_main:
        save_backbone(model.backbone, out)
        record = {
            "harness_pretrain": 1,
            "checkpoint": str(out), "sha256": sha256_file(out), "arch": backbone.arch,
            "images": data.images, "total_images": data.total_images, "fraction": cfg.fraction,
            "num_classes": len(data.classes), "loss": loss,
            "settings": json.loads(json.dumps(settings)),
            "training": training,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
        write_json_atomic(pretrain_record_path(out), record)
    barrier()
    return broadcast_object(record)
