"""The run records and their one reader each.

``result.json`` (``Result``): one run, per (backbone, task, protocol, profile, seed).
``results.json`` (``Results``): every run of one backbone in a run folder, aggregated over seeds
(``RunSummary`` per task, protocol and profile; ``MetricStats`` per metric). The leaderboard, the
scaling study and the nightly reference check read them through ``read_result`` and ``read_results``.
``<checkpoint>.json`` (``PretrainRecord``): how ``harness pretrain`` made a checkpoint; ``read_pretrain_record``.
Files without a ``schema_version`` (written before it was recorded) have the layout of version 1.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness import __version__
from harness.errors import HarnessError, first_problem
from harness.files import write_json_atomic

SCHEMA_VERSION = 1  # of result.json
RESULTS_SCHEMA_VERSION = 1  # of results.json
RESULTS_NAME = "results.json"


class BackboneInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    arch: str
    sha256: str | None  # None for a random initialisation
    layout: str
    parameters: int


class DatasetInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str
    train_split: str
    test_split: str
    images_trained: int
    images_scored: int
    synthetic: bool


class TrainingInfo(BaseModel):
    model_config = ConfigDict(extra="allow")
    iterations: int
    batch_size: int
    lr: float
    world_size: int
    device: str
    precision: str
    wall_time_s: float
    card_batch_size: int | None = None  # the card's total batch; another one rescaled the schedule
    accumulate: int = 1
    off_protocol: list[str] = []  # departures from the card's protocol (total batch, precision)


class Result(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION
    harness_version: str = __version__
    git_commit: str | None = None
    backbone: BackboneInfo
    task: str
    card_hash: str
    protocol: str
    profile: str
    seed: int
    dataset: DatasetInfo
    metrics: dict[str, Any]
    training: TrainingInfo
    protocol_info: dict[str, Any] = {}
    created: str
    git_dirty: bool | None = None  # uncommitted changes in the harness checkout (None: not run from one)
    environment: dict[str, Any] = {}  # python, torch, torchvision, timm, CUDA, cuDNN, GPUs (see environment())
    checkpoint_options: dict[str, Any] = {}  # --key, --prefix, --normalization, --allow-* given to eval


def harness_checkout() -> Path | None:
    """The git work tree the harness package itself runs from (its top holds a pyproject.toml of the
    project `harness` and the package folder), or None: an installed wheel, or a checkout of something else."""
    package = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=package, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    top = Path(out.stdout.strip()).resolve()
    try:
        import tomllib

        name = tomllib.loads((top / "pyproject.toml").read_text()).get("project", {}).get("name")
    except (OSError, ValueError, ImportError):
        return None
    return top if name == "harness" and package == top / "harness" else None


def _git(top: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=top, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit() -> str | None:
    """The commit of the harness checkout, when the harness runs from one (never the caller's repository)."""
    top = harness_checkout()
    return _git(top, "rev-parse", "HEAD") or None if top else None


def git_dirty() -> bool | None:
    """True when the harness checkout has uncommitted changes to tracked files; None outside a checkout."""
    top = harness_checkout()
    status = _git(top, "status", "--porcelain", "--untracked-files=no") if top else None
    return None if status is None else bool(status)


def environment() -> dict[str, Any]:
    """Versions a number may depend on: Python, torch, torchvision, timm; CUDA, cuDNN and GPU names when present."""
    import platform

    import timm
    import torch
    import torchvision

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "torchvision": torchvision.__version__, "timm": timm.__version__}
    if torch.version.cuda:
        env["cuda"] = torch.version.cuda
    if torch.backends.cudnn.is_available():
        env["cudnn"] = torch.backends.cudnn.version()
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def write_result(path: Path, result: Result) -> None:
    write_json_atomic(path, result.model_dump(mode="json"))


def read_result(path: Path) -> Result:
    try:
        return Result.model_validate_json(Path(path).read_text())
    except FileNotFoundError:
        raise HarnessError(f"result not found: {path}") from None
    except ValidationError as exc:
        raise HarnessError(f"{path}: not a harness result ({first_problem(exc)})") from None


def read_seed_results(folder: Path) -> dict[tuple, Result]:
    """Every per-seed result.json under a run folder, by (task, protocol, profile, seed)."""
    found = {}
    for path in sorted(Path(folder).rglob("result.json")):
        r = read_result(path)
        found[(r.task, r.protocol, r.profile, r.seed)] = r
    return found


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


class MetricStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    mean: float
    std: float = Field(ge=0, description="sample standard deviation over seeds (0 for one seed)")
    values: list[float] = Field(min_length=1, description="one value per seed, in the order of `seeds`")


class RunSummary(BaseModel):
    """One (task, protocol, profile) of a run folder over its seeds: each scalar metric's mean, std and values."""

    model_config = ConfigDict(extra="forbid")
    task: str
    protocol: str
    profile: str
    card_hash: str
    seeds: list[int]
    backbone: BackboneInfo
    dataset: DatasetInfo
    metrics: dict[str, MetricStats]


class Results(BaseModel):
    """``results.json``: the runs of one backbone, aggregated over seeds."""

    model_config = ConfigDict(extra="forbid")
    schema_version: int = RESULTS_SCHEMA_VERSION
    backbone: BackboneInfo
    synthetic: bool  # made on synthetic data (any run)
    runs: list[RunSummary]


def aggregate(results: list[Result]) -> list[RunSummary]:
    """Group results by (task, protocol, profile) and give each scalar metric's mean, std and per-seed values."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault((r.task, r.protocol, r.profile), []).append(r)
    rows = []
    for (task, protocol, profile), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r.seed)
        if len({r.card_hash for r in rs}) > 1 or len({r.backbone.sha256 for r in rs}) > 1:
            raise HarnessError(f"{task}/{protocol}/{profile}: seeds were run with different task cards or backbones")
        metrics = {}
        for key in rs[0].metrics:
            values = [r.metrics.get(key) for r in rs]
            if all(isinstance(v, (int, float)) for v in values):
                mean, std = mean_std([float(v) for v in values])
                metrics[key] = MetricStats(mean=mean, std=std, values=values)
        rows.append(RunSummary(task=task, protocol=protocol, profile=profile, card_hash=rs[0].card_hash,
                               seeds=[r.seed for r in rs], backbone=rs[0].backbone, dataset=rs[0].dataset,
                               metrics=metrics))
    return rows


def summarize(results: list[Result]) -> Results:
    """The ``results.json`` of ``results`` (one backbone's runs); synthetic when any run's data was."""
    return Results(backbone=results[0].backbone, synthetic=any(r.dataset.synthetic for r in results),
                   runs=aggregate(results))


def write_results(path: Path, summary: Results) -> None:
    write_json_atomic(path, summary.model_dump())  # python mode: a NaN mean stays NaN, as json writes it


def read_results(path: Path) -> Results:
    """A ``results.json``; files without ``schema_version`` read as version 1, a newer version is refused."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise HarnessError(f"results not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HarnessError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or "runs" not in data or "backbone" not in data:
        raise HarnessError(f"{path}: not a harness results.json (needs backbone and runs)")
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version > RESULTS_SCHEMA_VERSION:
        raise HarnessError(f"{path}: results.json schema version {version!r} is newer than this harness reads "
                           f"({RESULTS_SCHEMA_VERSION}); update the harness")
    try:
        return Results.model_validate(data)
    except ValidationError as exc:
        raise HarnessError(f"{path}: not a harness results.json ({first_problem(exc)})") from None


class PretrainRecord(BaseModel):
    """The record ``harness pretrain`` writes beside its checkpoint (``ckpt.safetensors`` -> ``ckpt.json``)."""

    model_config = ConfigDict(extra="allow")
    harness_pretrain: int = 1  # the record's version
    checkpoint: str
    sha256: str
    arch: str
    images: int  # pretraining images (the fraction's subset)
    total_images: int
    fraction: float
    num_classes: int
    loss: str
    settings: dict[str, Any]
    training: dict[str, Any]
    created: str


def pretrain_record_path(checkpoint) -> Path:
    """``ckpt.safetensors`` -> ``ckpt.json`` (the pretraining record beside the checkpoint)."""
    out = Path(checkpoint)
    return out.with_name(out.stem + ".json") if out.suffix else out.with_name(out.name + ".json")


def read_pretrain_record(checkpoint) -> PretrainRecord | None:
    """The pretraining record beside ``checkpoint``; None when there is none, an error when it does not read."""
    path = pretrain_record_path(checkpoint)
    if not path.is_file():
        return None
    try:
        return PretrainRecord.model_validate_json(path.read_text())
    except ValidationError as exc:
        raise HarnessError(f"{path}: not a harness pretraining record ({first_problem(exc)}); delete or fix it") from None
