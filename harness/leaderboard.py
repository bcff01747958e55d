"""The leaderboard: submissions (one JSON per entry, added by PR) -> validation -> Markdown, CSV, HTML.

    leaderboard/submissions/<slug>.json   written by `harness leaderboard submit` from a run's results.json
    leaderboard/reported.yaml             published numbers, shown only as marked "reported" rows
    leaderboard/reference/*.json          the nightly reference runs (`make-reference`, `check-reference`)
    leaderboard/{README.md, leaderboard.csv, index.html, schema.json}   written by `render`

This module holds the submissions' schema, their validation and `submit`; the generated files are
``harness.leaderboard_render``'s, the nightly reference ``harness.nightly``'s. Validation reads JSON
and YAML only: it never loads a checkpoint, fetches a URL or runs anything named by a submission.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.cards import PROTOCOLS, TaskCard, all_cards
from harness.errors import HarnessError, field_path as _field, first_problem, one_line
from harness.results import MetricStats, mean_std, read_results, read_seed_results

SHA256 = r"^[0-9a-f]{64}$"
URL = r"^https?://[^\s<>\"']+$"
MIN_SEEDS_FULL = 3  # the `full` profile needs at least this many seeds
CONSISTENCY_TOL = 1e-6  # |stored mean/std - recomputed| allowed, in metric points


# ----------------------------------------------------------------------------- schema
class StrictModel(BaseModel):
    """A schema that refuses fields it does not name."""

    model_config = ConfigDict(extra="forbid")


class SubmittedBackbone(StrictModel):
    name: str = Field(min_length=1, max_length=120, description="display name, unique on the leaderboard")
    arch: str = Field(min_length=1, description="architecture as the harness names it, e.g. resnet50")
    parameters: int = Field(gt=0, description="backbone parameters")
    pretraining_data: str = Field(min_length=1, description="pretraining data set, e.g. ImageNet-1k, JFT-300M")
    pretraining_images: int | None = Field(default=None, gt=0, description="pretraining images (data set size)")
    checkpoint_sha256: str | None = Field(pattern=SHA256, description="sha256 of the checkpoint; null: random init")
    checkpoint_url: str | None = Field(default=None, pattern=URL, description="where the checkpoint can be downloaded")
    layout: str = Field(description="checkpoint layout the harness detected")


class SubmittedDataset(StrictModel):
    name: str
    train_split: str
    test_split: str
    images_scored: int = Field(ge=0)
    synthetic: bool


class SubmittedTraining(StrictModel):
    iterations: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    world_size: int = Field(gt=0)
    device: str
    precision: str
    wall_time_s: list[float] = Field(description="per seed")
    off_protocol: list[str] = Field(default=[], description="departures from the card's total batch or precision")


class TaskResult(StrictModel):
    task: str = Field(description="task card name (tasks/<task>.yaml)")
    protocol: Literal[PROTOCOLS]
    profile: Literal["full", "short", "smoke"]
    card_hash: str = Field(pattern=SHA256, description="hash of the task card the runs were made with")
    seeds: list[int] = Field(min_length=1)
    dataset: SubmittedDataset
    training: SubmittedTraining
    metrics: dict[str, MetricStats] = Field(min_length=1, description="percent, e.g. AP, AP50, mIoU")


class Submission(StrictModel):
    """One leaderboard entry: a backbone and its transfer results, per task, protocol and seed."""

    model_config = ConfigDict(extra="forbid", title="harness leaderboard submission")
    schema_version: Literal[1] = 1
    backbone: SubmittedBackbone
    results: list[TaskResult] = Field(min_length=1)
    harness_version: str
    git_commit: str | None = None
    hardware: str | None = Field(default=None, description="free text, e.g. 8x A100 40GB")
    submitted: dt.date
    paper: str | None = Field(default=None, pattern=URL)
    code: str | None = Field(default=None, pattern=URL)


class ReportedResult(StrictModel):
    task: str
    protocol: Literal[PROTOCOLS]
    metrics: dict[str, float] = Field(min_length=1)
    trials: int | None = Field(default=None, gt=0, description="runs the published mean is over")


class ReportedEntry(StrictModel):
    name: str = Field(min_length=1)
    arch: str
    pretraining_data: str
    pretraining_images: int | None = Field(default=None, gt=0)
    citation: str = Field(min_length=1)
    url: str = Field(pattern=URL)
    results: list[ReportedResult] = Field(min_length=1)


class ReportedFile(StrictModel):
    reported: list[ReportedEntry] = []


def schema_json() -> str:
    return json.dumps(Submission.model_json_schema(), indent=2) + "\n"


# ----------------------------------------------------------------------------- helpers
def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise HarnessError(f"name {name!r} has no letters or digits to make a file name from")
    return slug


@dataclass
class Problem:
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {one_line(self.message)}"


def leaderboard_dir(path: str | Path = "leaderboard") -> Path:
    path = Path(path)
    if not path.is_dir():
        raise HarnessError(f"leaderboard folder not found: {path} (run from the harness checkout or pass --dir)")
    return path


def submission_files(board: Path) -> list[Path]:
    return sorted((board / "submissions").glob("*.json"))


# ----------------------------------------------------------------------------- validate
def check_submission(sub: Submission, cards: dict[str, TaskCard], file: str) -> tuple[list[Problem], list[Problem]]:
    """The rules beyond the schema: (errors, notes). Notes name results made under an older card."""
    from harness.datasets.get import load_registry

    errors, notes = [], []
    test_images = load_registry().test_images

    def err(where: str, message: str) -> None:
        errors.append(Problem(file, where, message))

    seen = set()
    for i, r in enumerate(sub.results):
        at = f"results[{i}]"
        key = (r.task, r.protocol, r.profile)
        if key in seen:
            err(at, f"{'/'.join(key)} appears twice")
        seen.add(key)
        card = cards.get(r.task)
        if card is None:
            err(f"{at}.task", f"unknown task {r.task!r} (cards: {', '.join(sorted(cards))})")
        elif r.card_hash != card.card_hash:
            notes.append(Problem(file, f"{at}.card_hash", f"made under an older {r.task} card: shown under 'older card version'"))
        else:
            if r.protocol not in card.protocols:
                err(f"{at}.protocol", f"task {r.task} has no protocol {r.protocol!r}")
            if r.dataset.name != card.dataset.name:
                err(f"{at}.dataset.name", f"{r.dataset.name!r} is not the {r.task} card's data set {card.dataset.name!r}")
            if card.metric.primary not in r.metrics:
                err(f"{at}.metrics", f"the task's primary metric {card.metric.primary!r} is missing")
            for where, message in _protocol_departures(r, card, test_images):
                err(f"{at}.{where}", message)
        if r.profile == "smoke":
            err(f"{at}.profile", "smoke results cannot go on the leaderboard")
        if r.dataset.synthetic:
            err(f"{at}.dataset.synthetic", "synthetic-data results cannot go on the leaderboard")
        if r.training.off_protocol:
            err(f"{at}.training.off_protocol", f"off-protocol results cannot go on the leaderboard "
                                               f"({'; '.join(r.training.off_protocol)})")
        if len(set(r.seeds)) != len(r.seeds):
            err(f"{at}.seeds", f"repeated seeds {r.seeds}")
        if r.profile == "full" and len(r.seeds) < MIN_SEEDS_FULL:
            err(f"{at}.seeds", f"the full profile needs at least {MIN_SEEDS_FULL} seeds, got {len(r.seeds)}")
        if len(r.training.wall_time_s) != len(r.seeds):
            err(f"{at}.training.wall_time_s", f"{len(r.training.wall_time_s)} values for {len(r.seeds)} seeds")
        for name, m in r.metrics.items():
            where = f"{at}.metrics.{name}"
            if len(m.values) != len(r.seeds):
                err(f"{where}.values", f"{len(m.values)} values for {len(r.seeds)} seeds")
                continue
            bad = [v for v in m.values if not (math.isfinite(v) and 0.0 <= v <= 100.0)]
            if bad:
                err(f"{where}.values", f"{bad[0]} is outside 0..100 (metrics are percentages)")
                continue
            mean, std = mean_std(m.values)
            if not abs(m.mean - mean) <= CONSISTENCY_TOL:
                err(f"{where}.mean", f"{m.mean} is not the mean of the values ({mean:.6f})")
            if not abs(m.std - std) <= CONSISTENCY_TOL:
                err(f"{where}.std", f"{m.std} is not the sample std of the values ({std:.6f})")
    return errors, notes


def _protocol_departures(r: TaskResult, card: TaskCard, test_images: dict[str, int]) -> list[tuple[str, str]]:
    """What the result says it ran that is not the card's protocol, with ``off_protocol`` silent about it:
    the test split and its standard image count (``test_images``), the total batch, iterations and precision."""
    if r.profile == "smoke":  # refused as such
        return []
    if r.profile not in card.profiles:
        return [("profile", f"task {r.task} has no profile {r.profile!r}")]
    p, split, t = card.profile(r.profile), card.dataset.test.name, r.training
    found = []
    if r.dataset.test_split != split:
        found.append(("dataset.test_split", f"{r.dataset.test_split!r} is not the {r.task} card's test split {split!r}"))
    standard = test_images.get(split)
    if standard is not None and r.dataset.images_scored != standard:
        found.append(("dataset.images_scored", f"{r.dataset.images_scored} images scored; {split} has {standard}"))
    for name, made, card_value in (("batch_size", t.batch_size, p.batch_size), ("iterations", t.iterations, p.iterations),
                                   ("precision", t.precision, p.precision)):
        if not t.off_protocol and made != card_value:
            found.append((f"training.{name}", f"{made!r} is not the card's {card_value!r} (and off_protocol is empty)"))
    if t.batch_size % t.world_size:
        found.append(("training.world_size", f"{t.world_size} processes cannot share a total batch of {t.batch_size}"))
    if any(not (math.isfinite(w) and w >= 0) for w in t.wall_time_s):
        found.append(("training.wall_time_s", f"{t.wall_time_s}: wall times are non-negative seconds"))
    return found


def load_submission(path: Path) -> tuple[Submission | None, list[Problem]]:
    """Parse one file; schema errors come back one per field."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None, [Problem(str(path), "(file)", "not found")]
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return None, [Problem(str(path), "(file)", f"not valid JSON ({exc})")]
    try:
        return Submission.model_validate(data), []
    except ValidationError as exc:
        return None, [Problem(str(path), _field(e["loc"]), e["msg"]) for e in exc.errors()]


def validate(files: list[Path], board: Path | None = None, cards: dict[str, TaskCard] | None = None):
    """Validate `files` (names also checked against every submission in `board`): (errors, notes, submissions)."""
    cards = all_cards() if cards is None else cards
    errors, notes, subs = [], [], {}
    for path in files:
        sub, problems = load_submission(path)
        errors += problems
        if sub is None:
            continue
        subs[Path(path)] = sub
        e, n = check_submission(sub, cards, str(path))
        errors += e
        notes += n
        if Path(path).stem != slugify(sub.backbone.name):
            errors.append(Problem(str(path), "backbone.name",
                                  f"the file must be named {slugify(sub.backbone.name)}.json after the name"))
    names: dict[str, Path] = {}
    others = [p for p in (submission_files(board) if board else []) if p.resolve() not in {f.resolve() for f in subs}]
    for path in others:  # submissions already on the board, for unique names
        other, _ = load_submission(path)
        if other is not None:
            names[slugify(other.backbone.name)] = path
    for path, sub in sorted(subs.items(), key=lambda kv: kv[0].stem != slugify(kv[1].backbone.name)):
        slug = slugify(sub.backbone.name)  # a correctly named file keeps its name; a misnamed copy is flagged
        if slug in names:
            errors.append(Problem(str(path), "backbone.name", f"{sub.backbone.name!r} is already taken by {names[slug]}"))
        else:
            names[slug] = path
    return errors, notes, subs


def load_reported(board: Path, cards: dict[str, TaskCard]) -> list[ReportedEntry]:
    path = board / "reported.yaml"
    if not path.is_file():
        return []
    try:
        data = yaml.safe_load(path.read_text()) or {}
        reported = ReportedFile.model_validate(data).reported
    except yaml.YAMLError as exc:
        raise HarnessError(f"{path}: not valid YAML ({exc})") from None
    except ValidationError as exc:
        raise HarnessError(f"{path}: {first_problem(exc)}") from None
    for i, entry in enumerate(reported):
        for j, r in enumerate(entry.results):
            if r.task not in cards:
                raise HarnessError(f"{path}: reported[{i}].results[{j}].task: unknown task {r.task!r}")
            for name, v in r.metrics.items():
                if not (math.isfinite(v) and 0 <= v <= 100):
                    raise HarnessError(f"{path}: reported[{i}].results[{j}].metrics.{name}: {v} is outside 0..100")
    return reported


# ----------------------------------------------------------------------------- submit
def build_submission(results_path: str | Path, *, name: str, pretraining_data: str,
                     pretraining_images: int | None = None, paper: str | None = None,
                     checkpoint_url: str | None = None, code: str | None = None, hardware: str | None = None,
                     today: dt.date | None = None) -> Submission:
    """A submission from a run folder's results.json and its per-seed result.json files."""
    results_path = Path(results_path)
    data = read_results(results_path)
    if data.synthetic:
        raise HarnessError(f"{results_path}: made on synthetic data (--synthetic or `harness data synth` output); synthetic results cannot go on the leaderboard")
    if not data.runs:
        raise HarnessError(f"{results_path}: no runs")
    seeds_found = read_seed_results(results_path.parent)
    versions, commits, results = set(), set(), []
    for row in data.runs:
        where = f"{row.task}/{row.protocol}/{row.profile}"
        if row.profile == "smoke":
            raise HarnessError(f"{results_path}: {where} is a smoke run; smoke results cannot go on the leaderboard")
        if row.dataset.synthetic:
            raise HarnessError(f"{results_path}: {where} was scored on synthetic data")
        per_seed = []
        for i, seed in enumerate(row.seeds):
            r = seeds_found.get((row.task, row.protocol, row.profile, seed))
            if r is None:
                raise HarnessError(f"{results_path}: no result.json for {where} seed {seed} in {results_path.parent}")
            if r.card_hash != row.card_hash:
                raise HarnessError(f"{results_path}: {where} seed {seed}: result.json has another card hash")
            if r.training.off_protocol:
                raise HarnessError(f"{results_path}: {where} seed {seed} is off-protocol "
                                   f"({'; '.join(r.training.off_protocol)}); such results cannot go on the leaderboard")
            for key, m in row.metrics.items():
                if r.metrics.get(key) != m.values[i]:
                    raise HarnessError(f"{results_path}: {where} seed {seed}: {key} differs from its result.json")
            per_seed.append(r)
        versions |= {r.harness_version for r in per_seed}
        commits |= {r.git_commit for r in per_seed}
        t = per_seed[0].training
        results.append({
            "task": row.task, "protocol": row.protocol, "profile": row.profile, "card_hash": row.card_hash,
            "seeds": row.seeds,
            "dataset": row.dataset.model_dump(include={"name", "train_split", "test_split", "images_scored", "synthetic"}),
            "training": {"iterations": t.iterations, "batch_size": t.batch_size, "world_size": t.world_size,
                         "device": t.device, "precision": t.precision,
                         "wall_time_s": [r.training.wall_time_s for r in per_seed]},
            "metrics": row.metrics,
        })
    if len(versions) > 1:
        raise HarnessError(f"{results_path}: runs made with different harness versions ({', '.join(sorted(versions))})")
    b = data.backbone
    try:
        return Submission.model_validate({
            "backbone": {"name": name, "arch": b.arch, "parameters": b.parameters,
                         "pretraining_data": pretraining_data, "pretraining_images": pretraining_images,
                         "checkpoint_sha256": b.sha256, "checkpoint_url": checkpoint_url, "layout": b.layout},
            "results": results, "harness_version": versions.pop(),
            "git_commit": commits.pop() if len(commits) == 1 else None, "hardware": hardware,
            "submitted": (today or dt.date.today()).isoformat(), "paper": paper, "code": code,
        })
    except ValidationError as exc:
        raise HarnessError(f"submission from {results_path}: {first_problem(exc)}") from None


def submit(results_path, board: Path, *, force: bool = False, cards=None, **options) -> tuple[Path, list[Problem]]:
    """Write leaderboard/submissions/<slug>.json after validating it like a PR would be; returns (path, notes)."""
    cards = all_cards() if cards is None else cards
    sub = build_submission(results_path, **options)
    path = board / "submissions" / f"{slugify(sub.backbone.name)}.json"
    if path.exists() and not force:
        raise HarnessError(f"{path} exists (a submission named {sub.backbone.name!r}); pass --force to replace it")
    errors, notes = check_submission(sub, cards, str(path))
    for other_path in submission_files(board):
        other = load_submission(other_path)[0]
        if other_path != path and other is not None and slugify(other.backbone.name) == slugify(sub.backbone.name):
            errors.append(Problem(str(path), "backbone.name", f"already taken by {other_path}"))
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise HarnessError(f"not submitted: {errors[0]}{more}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(sub.model_dump(mode="json"), indent=2) + "\n")
    return path, notes
