"""The nightly reference check: a reference made from a trusted run's results.json, and a new run of
the same backbone checked against it within a tolerance drawn from the seed spread
(`harness leaderboard make-reference` and `check-reference`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError

from harness.cards import PROTOCOLS, TaskCard, all_cards
from harness.errors import HarnessError, first_problem
from harness.leaderboard import MIN_SEEDS_FULL, SHA256, StrictModel
from harness.results import MetricStats, read_results, read_seed_results


# ----------------------------------------------------------------------------- nightly reference
class ReferenceBackbone(StrictModel):
    name: str = Field(description="checkpoint file name (or random:ARCH) as harness eval recorded it")
    arch: str
    sha256: str | None = Field(pattern=SHA256)


class ReferenceRun(StrictModel):
    task: str
    protocol: Literal[PROTOCOLS]
    profile: Literal["full", "short"]
    card_hash: str = Field(pattern=SHA256)
    seeds: list[int] = Field(min_length=MIN_SEEDS_FULL)
    metrics: dict[str, MetricStats] = Field(min_length=1)


class Reference(StrictModel):
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
    for r in read_seed_results(Path(results_path).parent).values():
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
