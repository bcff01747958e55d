"""Task cards (`tasks/<task>.yaml`): validated with pydantic, hashed for provenance.

A card fixes everything that makes two numbers comparable: dataset and splits, model and head,
metric, protocols, and per-profile schedules. A result records the card's hash; the leaderboard
compares only results made under the same card.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from harness.errors import HarnessError, first_problem, one_line
from harness.kinds import KINDS

PROFILES = ("full", "short", "smoke")
PROTOCOLS = ("finetune", "frozen")  # the transfer protocols; harness/protocols.py says what each does


TASKS_ENV = "HARNESS_TASKS"


def card_folder(env: str, checkout: str, packaged: str, what: str) -> Path:
    """``$env`` if set; else the checkout's top-level ``checkout`` folder (editable installs), else
    the copy ``harness/packaged`` shipped inside the wheel."""
    if os.environ.get(env):
        folder = Path(os.environ[env])
        if not folder.is_dir():
            raise HarnessError(f"{env}={folder}: no such folder of {what}")
        return folder
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / checkout, here / packaged):
        if candidate.is_dir():
            return candidate
    raise HarnessError(f"no {what} found (looked in {here.parent / checkout} and {here / packaged})")


def cards_dir() -> Path:
    """The task cards: $HARNESS_TASKS, else `tasks/` of the checkout, else the wheel's copy."""
    return card_folder(TASKS_ENV, "tasks", "task_cards", "task cards")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Split(_Strict):
    """One split: for COCO an annotation file + image folder under `coco/`; for VOC a list of (folder, split)."""

    annotations: str | None = None
    images: str | None = None
    sets: list[tuple[str, str]] | None = None  # VOC: [("VOC2007", "trainval"), ("VOC2012", "trainval")]

    @property
    def name(self) -> str:
        """The split as results record it: the COCO annotation file, or VOC's folder/split list(s) joined by +."""
        return self.annotations if self.annotations else "+".join(f"{folder}/{split}" for folder, split in self.sets)


class DatasetSpec(_Strict):
    name: str
    layout: str = Field(description="the on-disk layout; each kind lists the layouts it reads (LAYOUTS)")
    train: Split
    test: Split
    num_classes: int = Field(gt=0, description="object classes without background")


STAGES = ("stem", "c2", "c3", "c4", "c5")


class ModelSpec(_Strict):
    kind: str = Field(description="a task kind: a module of harness/kinds (harness.kinds.KINDS)")
    head: str = Field(description="one of the kind's HEADS")
    frozen_stages: list[Literal[STAGES]] = Field(
        default=list(STAGES), min_length=1,
        description="backbone stages the frozen protocol freezes (the rest train); all five by default")

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"unknown task kind {kind!r}: expected one of {', '.join(KINDS)}")
        return kind

    @field_validator("head")
    @classmethod
    def _kind_has_head(cls, head: str, info: ValidationInfo) -> str:
        kind = info.data.get("kind")
        if kind in KINDS and head not in KINDS[kind].HEADS:
            raise ValueError(f"{kind} has no head {head!r}: expected one of {', '.join(KINDS[kind].HEADS)}")
        return head

    @model_validator(mode="after")
    def _stages_once(self):
        if len(set(self.frozen_stages)) != len(self.frozen_stages):
            raise ValueError(f"frozen_stages {self.frozen_stages} names a stage twice")
        return self


class MetricSpec(_Strict):
    primary: str
    higher_is_better: bool = True
    columns: list[str]


class Profile(_Strict):
    """A schedule. `lr` goes with `batch_size` (total over processes) and scales linearly with it."""

    iterations: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    schedule: Literal["multistep", "poly"] = "multistep"
    steps: list[int] = []
    poly_power: float = 0.9
    warmup_iters: int = Field(ge=0)
    warmup_factor: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    clip_grad_norm: float | None = None
    min_size: list[int] = Field(min_length=1, description="training short side (one chosen per image for multi-scale)")
    max_size: int
    test_min_size: int | None = Field(default=None, description="test short side; None: the image's own size (seg)")
    crop_size: int | None = None  # segmentation: training crop (min_size[0] is the base short side)
    scale_range: tuple[float, float] = (0.5, 2.0)  # segmentation: random rescale of the base size
    flip: bool = True
    neck_channels: int | None = Field(default=None, gt=0, description="FPN or ASPP channels (FPN and segmentation cards)")
    roi_batch_per_image: int = Field(default=512, gt=0, description="RoIs sampled per image for the box head")
    proposals_test: int = Field(default=1000, gt=0, description="RPN proposals per image at test time")
    c4_pool_size: int = Field(default=14, gt=1, description="C4 head RoIAlign size (res5 halves it)")
    representation_size: int = Field(default=1024, gt=0, description="box head FC width (FPN head only)")
    keypoint_head_layers: int = Field(default=8, gt=0)
    keypoint_head_channels: int = Field(default=512, gt=0)
    keypoint_pool_size: int = Field(default=14, gt=1, description="keypoint RoIAlign size; heatmaps are 4x it")
    head_norm: Literal["none", "gn"] = Field(
        default="none", description="GroupNorm in the FPN and keypoint-head convs (gn) or none (detectron2's default)")
    anchor_sizes: list[int] | None = Field(default=None, description="RPN anchor sizes (FPN: one per level p2..p6)")
    # R-CNN internals; unset: the model builder's detectron2 default for its head (tasks/FIDELITY.md)
    rpn_pre_nms_topk_train: int | None = Field(default=None, gt=0, description="RPN proposals before NMS (per FPN level)")
    rpn_pre_nms_topk_test: int | None = Field(default=None, gt=0)
    rpn_post_nms_topk_train: int | None = Field(default=None, gt=0, description="RPN proposals kept per image in training")
    rpn_smooth_l1_beta: float | None = Field(default=None, ge=0, description="RPN box loss: smooth-L1 beta (0 = L1)")
    box_smooth_l1_beta: float | None = Field(default=None, ge=0, description="box head loss: smooth-L1 beta (0 = L1)")
    roi_align_aligned: bool = Field(default=True, description="RoIAlign half-pixel alignment (detectron2's ROIAlignV2)")
    roi_align_sampling_ratio: int = Field(default=0, ge=0, description="RoIAlign samples per bin (0: adaptive)")
    c4_extra_norm: bool = Field(default=False, description="MoCo's extra BatchNorm after res5 in the C4 box head")
    aspect_ratio_grouping: bool = Field(default=True, description="R-CNN kinds: batch landscape and portrait images apart")
    # training
    precision: Literal["fp32", "bf16", "fp16"] = Field(default="fp32", description="fp32 (TF32 allowed) or autocast")
    precise_bn_iters: int = Field(default=0, ge=0, description="detectron2's PreciseBN: batches that recompute BN statistics")
    train_images: int | None = Field(default=None, gt=0, description="use only the first N training images (smoke)")
    checkpoint_period: int = Field(default=1000, gt=0)
    # segmentation (mmsegmentation): each field has the name of the builder/augmentation/TrainConfig
    # argument it sets (the kind's settings and harness.runner.train_config)
    output_stride: Literal[8, 16, 32] = Field(default=16, description="8 dilates ResNet layer3+layer4 (mmseg -d8)")
    aspp_dilations: list[int] | None = Field(default=None, description="ASPP branches; None: (1, 12, 24, 36) at OS 8, scaled")
    aux_channels: int = Field(default=256, gt=0, description="auxiliary FCN head width")
    aux_loss_weight: float = Field(default=0.0, ge=0, description="auxiliary FCN head on c4; 0: no auxiliary head")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout2d before each segmentation classifier")
    cat_max_ratio: float = Field(default=1.0, gt=0, le=1, description="RandomCrop: largest share of one label")
    photometric_distortion: bool = False
    poly_min_lr: float = Field(default=0.0, ge=0, description="poly schedule floor (mmseg's eta_min / min_lr)")
    weight_decay_norm: float = Field(default=0.0, ge=0, description="weight decay of norm-layer parameters")

    @model_validator(mode="after")
    def _segmentation_values(self):
        if self.aspp_dilations is not None and (len(self.aspp_dilations) < 1 or min(self.aspp_dilations) < 1):
            raise ValueError(f"aspp_dilations {self.aspp_dilations} must be one or more positive integers")
        if self.poly_min_lr >= self.lr:
            raise ValueError(f"poly_min_lr {self.poly_min_lr} must lie below lr {self.lr}")
        return self

    @model_validator(mode="after")
    def _steps_inside(self):
        if any(s >= self.iterations for s in self.steps) or self.steps != sorted(self.steps):
            raise ValueError(f"steps {self.steps} must increase and lie below iterations {self.iterations}")
        return self

    def rescaled(self, n: int, batch_size: int | None) -> int:
        """``n`` iterations of this schedule at another total batch, keeping its epochs (detectron2's
        ``auto_scale_workers``)."""
        return int(round(n / ((batch_size or self.batch_size) / self.batch_size)))


class ReferenceSpeed(_Strict):
    """Published training speed of the card's reference model, for the dry-run's GPU-hour estimate."""

    gpu_seconds_per_image: float = Field(gt=0)
    source: str


class TaskCard(_Strict):
    name: str
    description: str
    source: str
    reference_speed: ReferenceSpeed | None = None
    dataset: DatasetSpec
    model: ModelSpec
    metric: MetricSpec
    protocols: list[Literal[PROTOCOLS]]
    profiles: dict[Literal[PROFILES], Profile]

    @model_validator(mode="after")
    def _kind_rules(self):
        """The kind's layouts, the other kinds' own fields left unset, then the kind's own checks."""
        kind = KINDS[self.model.kind]
        if self.dataset.layout not in kind.LAYOUTS:
            raise ValueError(f"dataset.layout {self.dataset.layout!r} is not one of the {self.model.kind} kind's "
                             f"layouts ({', '.join(kind.LAYOUTS)})")
        for name, p in self.profiles.items():
            for other, module in KINDS.items():
                used = sorted(set(module.OWN_FIELDS) & p.model_fields_set) if other != self.model.kind else []
                if used:
                    raise ValueError(f"profile {name}: {', '.join(used)} apply to {other} cards only")
        kind.check_card(self)
        return self

    def profile(self, name: str) -> Profile:
        if name not in self.profiles:
            raise HarnessError(f"task {self.name} has no profile {name!r} (has: {', '.join(self.profiles)})")
        return self.profiles[name]

    @property
    def card_hash(self) -> str:
        """sha256 of the validated card's canonical JSON (comments and key order do not count)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


def load_card(path: str | Path) -> TaskCard:
    """Read and validate a card file; errors name the file and the field."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise HarnessError(f"task card not found: {path}") from None
    except yaml.YAMLError as exc:
        raise HarnessError(f"{path}: not valid YAML ({one_line(exc)})") from None
    try:
        return TaskCard.model_validate(data)
    except ValidationError as exc:
        raise HarnessError(f"{path}: {first_problem(exc)} ({exc.error_count()} problem(s))") from None


def task_card(name: str) -> TaskCard:
    """The card of a task by name (`coco`, `voc`, `seg`, `pose`, ...)."""
    path = cards_dir() / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in cards_dir().glob("*.yaml"))
        raise HarnessError(f"unknown task {name!r} (cards: {', '.join(known)})")
    card = load_card(path)
    if card.name != name:
        raise HarnessError(f"{path}: card name {card.name!r} differs from its file name")
    return card


def all_cards() -> dict[str, TaskCard]:
    return {p.stem: task_card(p.stem) for p in sorted(cards_dir().glob("*.yaml"))}


# ----------------------------------------------------------------------------- backbone cards
BACKBONES_ENV = "HARNESS_BACKBONES"


def backbone_cards_dir() -> Path:
    """$HARNESS_BACKBONES if set; else `backbones/` of the checkout, else the copy shipped in the package."""
    return card_folder(BACKBONES_ENV, "backbones", "backbone_cards", "backbone cards")


class Pretraining(_Strict):
    method: str = Field(description="e.g. supervised, MoCo v2, DINO")
    data: str = Field(description="pretraining data set, e.g. ImageNet-1k")
    images: int = Field(gt=0, description="number of pretraining images")
    epochs: int | None = Field(default=None, gt=0)


class BackboneCard(_Strict):
    """A known public checkpoint: where to get it, how to check it, how to load it."""

    name: str
    description: str
    arch: str
    urls: list[str] = Field(min_length=1, description="official first; the file name is the first URL's")
    checksum: str | None = Field(default=None, description="published ALG:HEX (a shorter HEX is a published prefix)")
    layout: str = Field(description="the layout `harness inspect` reports for the file")
    key: str | None = Field(default=None, description="checkpoint entry holding the weights, as --key")
    prefix: str | None = Field(default=None, description="encoder prefix, as --prefix")
    normalization: str = Field(description="input normalization: imagenet, caffe, inception, clip")
    pretraining: Pretraining
    paper: str
    licence: str
    source: str = Field(description="where the URL, checksum and facts come from (repository and file)")

    @model_validator(mode="after")
    def _checks(self):
        from harness.normalization import NORMALIZATIONS
        from harness.fetch import parse_checksum

        try:
            parse_checksum(self.checksum)
        except HarnessError as exc:
            raise ValueError(str(exc)) from None
        if self.normalization not in NORMALIZATIONS:
            raise ValueError(f"normalization {self.normalization!r} is not one of {', '.join(NORMALIZATIONS)}")
        if not all(u.startswith(("http://", "https://")) for u in self.urls):
            raise ValueError("urls must be http(s) URLs")
        return self

    @property
    def file_name(self) -> str:
        return self.urls[0].rstrip("/").rsplit("/", 1)[-1]


def is_card_name(spec: str) -> bool:
    """A --backbone value that names a card: not random:<arch>, not an existing file, no path separator."""
    return not spec.startswith("random:") and not Path(spec).exists() and "/" not in spec and "\\" not in spec \
        and not spec.endswith((".pth", ".pt", ".pkl", ".tar", ".safetensors", ".ckpt", ".bin"))


def backbone_card(name: str) -> BackboneCard:
    """The card `backbones/<name>.yaml`; an unknown name is a one-line error listing the known ones."""
    folder = backbone_cards_dir()
    path = folder / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.yaml"))
        raise HarnessError(f"unknown backbone {name!r}: not a file, random:<arch>, nor a card ({', '.join(known)})")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise HarnessError(f"{path}: not valid YAML ({one_line(exc)})") from None
    try:
        card = BackboneCard.model_validate(data)
    except ValidationError as exc:
        raise HarnessError(f"{path}: {first_problem(exc)} ({exc.error_count()} problem(s))") from None
    if card.name != name:
        raise HarnessError(f"{path}: card name {card.name!r} differs from its file name")
    return card


def all_backbone_cards() -> dict[str, BackboneCard]:
    return {p.stem: backbone_card(p.stem) for p in sorted(backbone_cards_dir().glob("*.yaml"))}
