"""The leaderboard: submissions (one JSON per entry, added by PR) -> validation -> Markdown, CSV, HTML.

    leaderboard/submissions/<slug>.json   written by `harness leaderboard submit` from a run's results.json
    leaderboard/reported.yaml             published numbers, shown only as marked "reported" rows
    leaderboard/reference/*.json          the nightly reference runs (`make-reference`, `check-reference`)
    leaderboard/{README.md, leaderboard.csv, index.html, schema.json}   written by `render`

Validation reads JSON and YAML only: it never loads a checkpoint, fetches a URL or runs anything
named by a submission. Results made under an older task card are shown apart from the current ones.
"""

from __future__ import annotations

import csv
import datetime as dt
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from harness.cards import TaskCard, all_cards
from harness.errors import HarnessError, field_path as _field, first_problem
from harness.results import MetricStats, Result, mean_std, read_result, read_results

SHA256 = r"^[0-9a-f]{64}$"
URL = r"^https?://[^\s<>\"']+$"
MIN_SEEDS_FULL = 3  # the `full` profile needs at least this many seeds
CONSISTENCY_TOL = 1e-6  # |stored mean/std - recomputed| allowed, in metric points


# ----------------------------------------------------------------------------- schema
class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SubmittedBackbone(_Model):
    name: str = Field(min_length=1, max_length=120, description="display name, unique on the leaderboard")
    arch: str = Field(min_length=1, description="architecture as the harness names it, e.g. resnet50")
    parameters: int = Field(gt=0, description="backbone parameters")
    pretraining_data: str = Field(min_length=1, description="pretraining data set, e.g. ImageNet-1k, JFT-300M")
    pretraining_images: int | None = Field(default=None, gt=0, description="pretraining images (data set size)")
    checkpoint_sha256: str | None = Field(pattern=SHA256, description="sha256 of the checkpoint; null: random init")
    checkpoint_url: str | None = Field(default=None, pattern=URL, description="where the checkpoint can be downloaded")
    layout: str = Field(description="checkpoint layout the harness detected")


class SubmittedDataset(_Model):
    name: str
    train_split: str
    test_split: str
    images_scored: int = Field(ge=0)
    synthetic: bool


class SubmittedTraining(_Model):
    iterations: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    world_size: int = Field(gt=0)
    device: str
    precision: str
    wall_time_s: list[float] = Field(description="per seed")
    off_protocol: list[str] = Field(default=[], description="departures from the card's total batch or precision")


class TaskResult(_Model):
    task: str = Field(description="task card name (tasks/<task>.yaml)")
    protocol: Literal["finetune", "frozen"]
    profile: Literal["full", "short", "smoke"]
    card_hash: str = Field(pattern=SHA256, description="hash of the task card the runs were made with")
    seeds: list[int] = Field(min_length=1)
    dataset: SubmittedDataset
    training: SubmittedTraining
    metrics: dict[str, MetricStats] = Field(min_length=1, description="percent, e.g. AP, AP50, mIoU")


class Submission(_Model):
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


class ReportedResult(_Model):
    task: str
    protocol: Literal["finetune", "frozen"]
    metrics: dict[str, float] = Field(min_length=1)
    trials: int | None = Field(default=None, gt=0, description="runs the published mean is over")


class ReportedEntry(_Model):
    name: str = Field(min_length=1)
    arch: str
    pretraining_data: str
    pretraining_images: int | None = Field(default=None, gt=0)
    citation: str = Field(min_length=1)
    url: str = Field(pattern=URL)
    results: list[ReportedResult] = Field(min_length=1)


class ReportedFile(_Model):
    reported: list[ReportedEntry] = []


def schema_json() -> str:
    return json.dumps(Submission.model_json_schema(), indent=2) + "\n"


# ----------------------------------------------------------------------------- helpers
def slugify(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    if not slug:
        raise HarnessError(f"name {name!r} has no letters or digits to make a file name from")
    return slug


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


@dataclass
class Problem:
    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {_one_line(self.message)}"


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
    errors, notes = [], []

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
def _seed_results(folder: Path) -> dict[tuple, Result]:
    """Every per-seed result.json under a run folder, by (task, protocol, profile, seed)."""
    found = {}
    for path in sorted(folder.rglob("result.json")):
        r = read_result(path)
        found[(r.task, r.protocol, r.profile, r.seed)] = r
    return found


def build_submission(results_path: str | Path, *, name: str, pretraining_data: str,
                     pretraining_images: int | None = None, paper: str | None = None,
                     checkpoint_url: str | None = None, code: str | None = None, hardware: str | None = None,
                     today: dt.date | None = None) -> Submission:
    """A submission from a run folder's results.json and its per-seed result.json files."""
    results_path = Path(results_path)
    data = read_results(results_path)
    if data.synthetic:
        raise HarnessError(f"{results_path}: made on synthetic data (--synthetic); synthetic results cannot go on the leaderboard")
    if not data.runs:
        raise HarnessError(f"{results_path}: no runs")
    seeds_found = _seed_results(results_path.parent)
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


# ----------------------------------------------------------------------------- table
@dataclass(frozen=True)
class Column:
    key: str
    title: str
    task: str
    protocol: str
    metric: str


COLUMNS = (
    Column("coco_finetune_AP", "COCO mAP@[.5,.95] fine-tune", "coco", "finetune", "AP"),
    Column("coco_frozen_AP", "COCO mAP@[.5,.95] frozen", "coco", "frozen", "AP"),
    Column("voc_finetune_AP50", "VOC AP50", "voc", "finetune", "AP50"),
    Column("voc_finetune_AP", "VOC AP", "voc", "finetune", "AP"),
    Column("seg_finetune_mIoU", "Seg mIoU fine-tune", "seg", "finetune", "mIoU"),
    Column("seg_frozen_mIoU", "Seg mIoU frozen", "seg", "frozen", "mIoU"),
    Column("pose_finetune_AP", "Pose AP", "pose", "finetune", "AP"),
)


@dataclass
class Row:
    name: str
    arch: str
    pretraining: str
    cells: dict[str, MetricStats | float]  # MetricStats (measured) or a published mean (reported)
    seeds: str = ""
    link: str | None = None
    cards: str = ""  # older card versions: task:hash prefix
    source: str = ""  # reported rows: the citation
    extra: dict = field(default_factory=dict)

    def sort_key(self):
        v = self.cells.get(COLUMNS[0].key)
        mean = v.mean if isinstance(v, MetricStats) else v
        return (mean is None, -(mean or 0.0), self.name.lower())


@dataclass
class Section:
    key: str
    title: str
    intro: str
    rows: list[Row]


def _images(n: int | None) -> str:
    if not n:
        return ""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def _pretraining(data: str, images: int | None) -> str:
    return f"{data} ({_images(images)} images)" if images else data


def _seed_counts(counts: list[int]) -> str:
    if not counts:
        return ""
    lo, hi = min(counts), max(counts)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def build_sections(subs: list[Submission], reported: list[ReportedEntry], cards: dict[str, TaskCard]) -> list[Section]:
    """Measured rows by (card current or older, profile); reported rows in their own section, never mixed."""
    buckets: dict[tuple[str, bool], list[Row]] = {}
    for sub in subs:
        b = sub.backbone
        groups: dict[tuple[str, bool], list[TaskResult]] = {}
        for r in sub.results:
            current = r.task in cards and r.card_hash == cards[r.task].card_hash
            groups.setdefault((r.profile, current), []).append(r)
        for key, rs in groups.items():
            cells, counts = {}, []
            for col in COLUMNS:
                for r in rs:
                    if (r.task, r.protocol) == (col.task, col.protocol) and col.metric in r.metrics:
                        cells[col.key] = r.metrics[col.metric]
                        counts.append(len(r.seeds))
            older = sorted({f"{r.task}:{r.card_hash[:8]}" for r in rs}) if not key[1] else []
            buckets.setdefault(key, []).append(Row(
                name=b.name, arch=b.arch, pretraining=_pretraining(b.pretraining_data, b.pretraining_images),
                cells=cells, seeds=_seed_counts(counts), link=sub.paper, cards=" ".join(older),
                extra={"pretraining_data": b.pretraining_data, "pretraining_images": b.pretraining_images or "",
                       "paper": sub.paper or "", "checkpoint_url": b.checkpoint_url or "",
                       "checkpoint_sha256": b.checkpoint_sha256 or ""}))
    sections = []
    titles = {
        ("full", True): ("measured", "Measured (full schedule)",
                         "The task cards' `full` profile (the literature's schedules), at least "
                         f"{MIN_SEEDS_FULL} seeds, mean ± sample std over seeds."),
        ("short", True): ("short", "Measured, short schedule",
                          "The `short` profile (about 1/8 of the full schedule): not comparable with the table above."),
        ("full", False): ("older-full", "Older card version (full schedule)",
                          "Made under task cards that have changed since: comparable only with runs of the same card hashes."),
        ("short", False): ("older-short", "Older card version (short schedule)",
                           "Made under task cards that have changed since, with the `short` profile."),
    }
    for key, (skey, title, intro) in titles.items():
        rows = sorted(buckets.get(key, []), key=Row.sort_key)
        if rows or skey == "measured":
            sections.append(Section(skey, title, intro, rows))
    rrows = []
    for e in reported:
        cells, trials = {}, []
        for col in COLUMNS:
            for r in e.results:
                if (r.task, r.protocol) == (col.task, col.protocol) and col.metric in r.metrics:
                    cells[col.key] = r.metrics[col.metric]
                    trials.append(r.trials or 1)
        rrows.append(Row(name=e.name, arch=e.arch, pretraining=_pretraining(e.pretraining_data, e.pretraining_images),
                         cells=cells, seeds=_seed_counts(trials), link=e.url, source=e.citation,
                         extra={"pretraining_data": e.pretraining_data, "pretraining_images": e.pretraining_images or "",
                                "paper": e.url, "checkpoint_url": "", "checkpoint_sha256": ""}))
    if rrows:
        sections.append(Section("reported", "Reported (published numbers, not measured by harness)",
                                "Copied from the cited source, which ran its own code (means only), in the order "
                                "of reported.yaml. They are not harness measurements and are never ranked with them.",
                                rrows))
    return sections


def _cell_text(v) -> str:
    if v is None:
        return "—"
    if isinstance(v, MetricStats):
        return f"{v.mean:.1f} ± {v.std:.1f}" if len(v.values) > 1 else f"{v.mean:.1f}"
    return f"{v:.1f}"


def _headers(section: Section) -> list[str]:
    heads = ["Backbone", "Arch", "Pretraining data", *(c.title for c in COLUMNS), "Seeds"]
    if section.key.startswith("older"):
        heads.append("Card versions")
    if section.key == "reported":
        heads[-1] = "Trials"
        heads.append("Source")
    return heads


def _md(text: str) -> str:
    return _one_line(text).replace("|", "\\|")


README_HEAD = """\
# Leaderboard

Transfer results of pretrained backbones, measured by `harness eval` under the task cards in `tasks/`.
This file, `leaderboard.csv`, `index.html` (sortable, works offline) and `schema.json` are written by
`harness leaderboard render` from `submissions/*.json` and `reported.yaml`: do not edit them by hand.

Columns: COCO is Faster R-CNN + FPN (`coco` card); VOC is Faster R-CNN C4 on VOC07+12 → VOC07 test
(`voc` card), fine-tune; Seg is DeepLabV3 on VOC2012 aug (`seg` card); Pose is Keypoint R-CNN
(`pose` card), fine-tune. Values are percent, mean ± sample std over seeds. Rows are sorted by COCO
mAP@[.5,.95] fine-tune.

## Submitting

    harness eval --backbone CKPT --data-root DATA --profile full --seeds 3 --out runs/NAME
    harness leaderboard submit --results runs/NAME/results.json --name "NAME" \\
        --pretraining-data ImageNet-1k --pretraining-images 1281167 [--paper URL] [--checkpoint-url URL]
    harness leaderboard validate && harness leaderboard render

and open a pull request with `submissions/<name>.json` and the re-rendered files. CI validates the
submission (schema, current card hashes, metrics in 0..100, at least 3 seeds for the `full` profile,
means and stds equal to those of the per-seed values, no synthetic or smoke results, a unique name)
and checks that the committed tables equal a fresh render. Validation never loads a checkpoint or runs
anything from a submission. Results made under an older card are listed under "older card version".
"""


def render_markdown(sections: list[Section]) -> str:
    out = [README_HEAD]
    for s in sections:
        out.append(f"\n## {s.title}\n\n{s.intro}\n")
        if not s.rows:
            out.append("\nNo entries yet.\n")
            continue
        heads = _headers(s)
        out.append("\n| " + " | ".join(heads) + " |\n|" + "---|" * len(heads) + "\n")
        for r in s.rows:
            name = f"[{_md(r.name)}]({r.link})" if r.link else _md(r.name)
            if s.key == "reported":
                name += " (reported)"
            cells = [name, _md(r.arch), _md(r.pretraining), *(_cell_text(r.cells.get(c.key)) for c in COLUMNS), r.seeds]
            if s.key.startswith("older"):
                cells.append(r.cards)
            if s.key == "reported":
                cells.append(_md(r.source))
            out.append("| " + " | ".join(cells) + " |\n")
    return "".join(out)


def render_csv(sections: list[Section]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "name", "arch", "pretraining_data", "pretraining_images",
                *(f"{c.key}_{s}" for c in COLUMNS for s in ("mean", "std", "n")),
                "seeds", "card_versions", "paper", "checkpoint_url", "checkpoint_sha256", "source"])
    for s in sections:
        for r in s.rows:
            values = []
            for c in COLUMNS:
                v = r.cells.get(c.key)
                if isinstance(v, MetricStats):
                    values += [repr(v.mean), repr(v.std), len(v.values)]
                else:
                    values += ["" if v is None else repr(v), "", ""]
            w.writerow([s.key, r.name, r.arch, r.extra["pretraining_data"], r.extra["pretraining_images"], *values,
                        r.seeds, r.cards, r.extra["paper"], r.extra["checkpoint_url"], r.extra["checkpoint_sha256"],
                        r.source])
    return buf.getvalue()


HTML_STYLE = """\
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1400px;padding:0 1rem;color:#1b1f24}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem}p.intro{color:#57606a;margin:.2rem 0 .6rem}
table{border-collapse:collapse;width:100%}th,td{border-bottom:1px solid #d0d7de;padding:.35rem .5rem;text-align:right;white-space:nowrap}
.t{text-align:left}td.t:last-child{white-space:normal;min-width:18rem}
th{background:#f6f8fa;cursor:pointer;user-select:none}th:focus{outline:2px solid #0969da}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tbody tr:hover{background:#f6f8fa}table.reported td{font-style:italic;color:#57606a}span.tag{font-size:.75rem;border:1px solid #bf8700;color:#7d4e00;border-radius:.6rem;padding:0 .4rem;margin-left:.3rem;font-style:normal}
p.empty{color:#57606a;font-style:italic}div.scroll{overflow-x:auto}"""

HTML_SCRIPT = """\
(function () {
  function value(td, numeric) {
    var v = td.getAttribute("data-v");
    if (numeric) { return v === "" ? null : parseFloat(v); }
    return v.toLowerCase();
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.board"), function (table) {
    var heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, col) {
      function sort() {
        var numeric = th.getAttribute("data-type") === "num";
        var now = th.getAttribute("aria-sort");
        var dir = now === "descending" ? "ascending" : now === "ascending" ? "descending" : (numeric ? "descending" : "ascending");
        var sign = dir === "ascending" ? 1 : -1;
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = value(a.cells[col], numeric), y = value(b.cells[col], numeric);
          if (x === null || y === null) { return (x === null) - (y === null); }
          return x < y ? -sign : x > y ? sign : 0;
        });
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", dir);
        rows.forEach(function (r) { body.appendChild(r); });
      }
      th.tabIndex = 0;
      th.addEventListener("click", sort);
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sort(); }
      });
    });
  });
})();"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def render_html(sections: list[Section]) -> str:
    out = ['<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
           '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
           'style-src \'unsafe-inline\'; script-src \'unsafe-inline\'">\n',
           '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
           f"<title>harness leaderboard</title>\n<style>\n{HTML_STYLE}\n</style>\n</head>\n<body>\n",
           "<h1>harness leaderboard</h1>\n<p class=\"intro\">Transfer results of pretrained backbones under the "
           "task cards. Values are percent, mean ± sample std over seeds. Click a column header to sort.</p>\n"]
    for s in sections:
        out.append(f'<section id="{s.key}">\n<h2>{_e(s.title)}</h2>\n<p class="intro">{_e(s.intro.replace("`", ""))}</p>\n')
        if not s.rows:
            out.append('<p class="empty">No entries yet.</p>\n</section>\n')
            continue
        heads = _headers(s)
        numeric = {c.title for c in COLUMNS} | {"Seeds", "Trials"}
        cls = "board reported" if s.key == "reported" else "board"
        out.append(f'<div class="scroll"><table class="{cls}">\n<thead><tr>')
        for h in heads:
            sort = ' aria-sort="descending"' if h == COLUMNS[0].title and s.key != "reported" else ""
            kind, cls = ("num", "") if h in numeric else ("text", ' class="t"')
            out.append(f'<th data-type="{kind}"{cls}{sort}>{_e(h)}</th>')
        out.append("</tr></thead>\n<tbody>\n")
        for r in s.rows:
            name = f'<a href="{_e(r.link)}" rel="noopener">{_e(r.name)}</a>' if r.link else _e(r.name)
            if s.key == "reported":
                name += '<span class="tag">reported</span>'
            cells = [f'<td class="t" data-v="{_e(r.name)}">{name}</td>',
                     f'<td class="t" data-v="{_e(r.arch)}">{_e(r.arch)}</td>',
                     f'<td class="t" data-v="{_e(r.pretraining)}">{_e(r.pretraining)}</td>']
            for c in COLUMNS:
                v = r.cells.get(c.key)
                mean = "" if v is None else repr(v.mean if isinstance(v, MetricStats) else v)
                cells.append(f'<td data-v="{mean}">{_e(_cell_text(v))}</td>')
            cells.append(f'<td data-v="{_e(r.seeds.split("–")[0])}">{_e(r.seeds)}</td>')
            if s.key.startswith("older"):
                cells.append(f'<td class="t" data-v="{_e(r.cards)}">{_e(r.cards)}</td>')
            if s.key == "reported":
                cells.append(f'<td class="t" data-v="{_e(r.source)}">{_e(r.source)}</td>')
            out.append("<tr>" + "".join(cells) + "</tr>\n")
        out.append("</tbody>\n</table></div>\n</section>\n")
    out.append(f"<script>\n{HTML_SCRIPT}\n</script>\n</body>\n</html>\n")
    return "".join(out)


def render(board: Path, cards: dict[str, TaskCard] | None = None) -> dict[str, str]:
    """The generated files' contents, by name; refuses when a submission does not validate."""
    cards = all_cards() if cards is None else cards
    errors, _, subs = validate(submission_files(board), board, cards)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise HarnessError(f"cannot render: {errors[0]}{more}; run harness leaderboard validate")
    sections = build_sections(list(subs.values()), load_reported(board, cards), cards)
    return {"README.md": render_markdown(sections), "leaderboard.csv": render_csv(sections),
            "index.html": render_html(sections), "schema.json": schema_json()}


def write_render(board: Path, cards=None) -> list[Path]:
    paths = []
    for name, text in render(board, cards).items():
        (board / name).write_text(text)
        paths.append(board / name)
    return paths


def stale_files(board: Path, cards=None) -> list[Path]:
    """Generated files whose committed content differs from a fresh render."""
    return [board / n for n, text in render(board, cards).items()
            if not (board / n).is_file() or (board / n).read_text() != text]


# ----------------------------------------------------------------------------- nightly reference
class ReferenceBackbone(_Model):
    name: str = Field(description="checkpoint file name (or random:ARCH) as harness eval recorded it")
    arch: str
    sha256: str | None = Field(pattern=SHA256)


class ReferenceRun(_Model):
    task: str
    protocol: Literal["finetune", "frozen"]
    profile: Literal["full", "short"]
    card_hash: str = Field(pattern=SHA256)
    seeds: list[int] = Field(min_length=MIN_SEEDS_FULL)
    metrics: dict[str, MetricStats] = Field(min_length=1)


class Reference(_Model):
    """Expected numbers of a reference backbone; a new run must land within the tolerance of each metric."""

    schema_version: Literal[1] = 1
    backbone: ReferenceBackbone
    harness_version: str
    sigmas: float = Field(default=3.0, gt=0, description="tolerance in standard errors of the difference")
    floor: float = Field(default=0.2, ge=0, description="smallest tolerance, in metric points")
    runs: list[ReferenceRun] = Field(min_length=1)


def tolerance(ref: MetricStats, n_new: int, sigmas: float, floor: float) -> float:
    """max(floor, sigmas * s * sqrt(1/m + 1/n)): s the reference's seed std over m seeds, n the new seeds.

    The difference of two means of m and n seeds with per-seed spread s has standard error
    s * sqrt(1/m + 1/n); the floor keeps a lucky, tiny reference spread from making the check flaky.
    """
    return max(floor, sigmas * ref.std * math.sqrt(1.0 / len(ref.values) + 1.0 / n_new))


def make_reference(results_path: Path, sigmas: float = 3.0, floor: float = 0.2,
                   cards: dict[str, TaskCard] | None = None) -> Reference:
    """A reference from a run of at least 3 seeds; it keeps each card's table columns."""
    cards = all_cards() if cards is None else cards
    data = read_results(results_path)
    if data.synthetic:
        raise HarnessError(f"{results_path}: synthetic results cannot be a reference")
    runs, versions = [], set()
    for row in data.runs:
        where = f"{row.task}/{row.protocol}/{row.profile}"
        if row.profile == "smoke":
            raise HarnessError(f"{results_path}: {where} is a smoke run; a reference needs the short or full profile")
        if len(row.seeds) < MIN_SEEDS_FULL:
            raise HarnessError(f"{results_path}: {where} has {len(row.seeds)} seed(s); a reference needs at least "
                               f"{MIN_SEEDS_FULL} for its seed spread")
        card = cards.get(row.task)
        if card is None or card.card_hash != row.card_hash:
            raise HarnessError(f"{results_path}: {where} was made under another {row.task} card than tasks/ holds")
        keep = {k: v for k, v in row.metrics.items() if k in card.metric.columns}
        runs.append({"task": row.task, "protocol": row.protocol, "profile": row.profile,
                     "card_hash": row.card_hash, "seeds": row.seeds, "metrics": keep})
    for r in _seed_results(Path(results_path).parent).values():
        versions.add(r.harness_version)
    b = data.backbone
    try:
        return Reference.model_validate({
            "backbone": {"name": b.name, "arch": b.arch, "sha256": b.sha256},
            "harness_version": ", ".join(sorted(versions)) or "unknown", "sigmas": sigmas, "floor": floor,
            "runs": runs})
    except ValidationError as exc:
        raise HarnessError(f"reference from {results_path}: {first_problem(exc)}") from None


def load_reference(path: Path) -> Reference:
    try:
        return Reference.model_validate_json(Path(path).read_text())
    except FileNotFoundError:
        raise HarnessError(f"reference not found: {path}") from None
    except ValidationError as exc:
        raise HarnessError(f"{path}: {first_problem(exc)}") from None


@dataclass
class Check:
    run: str
    metric: str
    expected: float | None
    got: float | None
    tol: float | None
    status: str  # ok, below, above, missing, card changed, not in reference

    @property
    def failed(self) -> bool:
        return self.status not in ("ok", "not in reference")

    def __str__(self) -> str:
        def f(x):
            return "—" if x is None else f"{x:.2f}"
        return f"{self.run:<24} {self.metric:<8} ref {f(self.expected):>6}  got {f(self.got):>6}  tol {f(self.tol):>5}  {self.status}"


def check_reference(results_path: Path, reference: Reference) -> list[Check]:
    """Compare a run with a reference: every reference metric within its tolerance, in either direction."""
    data = read_results(results_path)
    if data.synthetic:
        raise HarnessError(f"{results_path}: made on synthetic data; the reference is for real data")
    if data.backbone.sha256 != reference.backbone.sha256:
        raise HarnessError(f"{results_path}: backbone sha256 {data.backbone.sha256} is not the reference's "
                           f"{reference.backbone.sha256} ({reference.backbone.name})")
    rows = {(r.task, r.protocol, r.profile): r for r in data.runs}
    checks = []
    for ref in reference.runs:
        run = f"{ref.task}/{ref.protocol}/{ref.profile}"
        row = rows.pop((ref.task, ref.protocol, ref.profile), None)
        if row is None:
            checks.append(Check(run, "*", None, None, None, "missing"))
            continue
        if row.card_hash != ref.card_hash:
            checks.append(Check(run, "*", None, None, None, "card changed: re-record the reference"))
            continue
        for name, m in ref.metrics.items():
            got = row.metrics.get(name)
            if got is None:
                checks.append(Check(run, name, m.mean, None, None, "missing"))
                continue
            tol = tolerance(m, len(got.values), reference.sigmas, reference.floor)
            diff = got.mean - m.mean
            status = "ok" if abs(diff) <= tol else ("below" if diff < 0 else "above")
            checks.append(Check(run, name, m.mean, got.mean, tol, status))
    for task, protocol, profile in rows:
        checks.append(Check(f"{task}/{protocol}/{profile}", "*", None, None, None, "not in reference"))
    return checks
