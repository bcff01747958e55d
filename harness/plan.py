"""An eval's plan and its run folders, without torch: the options of `harness eval`, where each
(task, protocol, seed) cell writes, collecting finished cells into `<out>/results.json` and the
printed table. The launchers and `harness status` need only this, so they answer without loading
torch; `harness.runner` runs the cells."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.cards import PROTOCOLS, TaskCard, backbone_card, is_card_name, task_card
from harness.errors import HarnessError
from harness.results import RESULTS_NAME, RunSummary, read_result, summarize, write_results

TABLE_HEADERS = {"AP": "mAP@[.5,.95]"}


@dataclass
class EvalPlan:
    backbone: str
    arch: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["coco", "voc", "seg", "pose"])
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    profile: str = "smoke"
    data_root: Path | None = None
    synthetic: bool = False
    seeds: int = 1
    out: Path = Path("runs/default")
    device: str | None = None
    batch_size: int | None = None  # overrides the card's; epochs kept (detectron2's auto_scale_workers)
    accumulate: int = 1  # micro-batches per optimizer step (the total batch stays the card's)
    precision: str | None = None  # overrides the card's fp32 | bf16 | fp16
    workers: int | None = None  # data-loading processes per training process; None: 4 on CUDA, 0 on the CPU
    dry_run: bool = False  # print the plan, train 2 steps and predict 2 images per cell; no results
    progress: bool = True
    checkpoint_options: dict = field(default_factory=dict)  # key, prefix, normalization, allow_*, unsafe_load


def run_dir(out: Path, task: str, protocol: str, seed: int) -> Path:
    return Path(out) / task / protocol / f"seed{seed}"


def synthetic_data_dir(out: Path) -> Path:
    """Where ``--synthetic`` writes its data: inside the run folder."""
    return Path(out) / "synthetic-data"


def check_plan(plan: EvalPlan) -> list[TaskCard]:
    """The plan's task cards, after checking its options (a user mistake is a one-line ``HarnessError``)."""
    for flag, names in (("--tasks", plan.tasks), ("--protocols", plan.protocols)):
        if not names:
            raise HarnessError(f"{flag} names nothing")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise HarnessError(f"{flag} names {', '.join(twice)} more than once")
    if plan.batch_size is not None and plan.batch_size < 1:
        raise HarnessError("--batch-size must be at least 1")
    if plan.accumulate < 1:
        raise HarnessError("--accumulate must be at least 1")
    cards = [task_card(t) for t in plan.tasks]
    for card in cards:
        total = plan.batch_size or card.profile(plan.profile).batch_size
        if total % plan.accumulate:  # found here, by --dry-run too, not when the cell starts
            raise HarnessError(f"{card.name}: a total batch of {total} does not split into --accumulate "
                               f"{plan.accumulate} equal micro-batches")
        for protocol in plan.protocols:
            if protocol not in card.protocols:
                raise HarnessError(f"task {card.name} has no protocol {protocol!r}")
    if plan.seeds < 1:
        raise HarnessError("--seeds must be at least 1")
    if plan.workers is not None and plan.workers < 0:
        raise HarnessError("--workers must be 0 or more")
    if is_card_name(plan.backbone):
        backbone_card(plan.backbone)  # an unknown name is a one-line error here, before any cell or job
    elif not plan.backbone.startswith("random:") and not Path(plan.backbone).is_file():
        raise HarnessError(f"--backbone {plan.backbone}: no such checkpoint file (or a random:<arch>, or a backbone "
                           "card name: `harness backbones list`)")
    file_only = sorted(k for k, v in plan.checkpoint_options.items() if v not in (None, False) and k != "normalization")
    if plan.backbone.startswith("random:") and file_only:  # they would be recorded in the results, not used
        raise HarnessError(f"--{file_only[0].replace('_', '-')} reads a checkpoint file; {plan.backbone} has none")
    return cards


def collect(plan: EvalPlan) -> list[RunSummary]:
    """Aggregate the plan's finished cells into ``<out>/results.json`` as ``run_eval`` writes it; every
    cell must be finished, under the plan's task cards and profile and with one backbone."""
    results = []
    for task in plan.tasks:
        card = task_card(task)
        for protocol in plan.protocols:
            for seed in range(plan.seeds):
                path = run_dir(plan.out, task, protocol, seed) / "result.json"
                if not path.is_file():
                    raise HarnessError(f"{path} is missing: {task}/{protocol}/seed{seed} has not finished")
                result = read_result(path)
                if (result.card_hash, result.profile) != (card.card_hash, plan.profile):
                    raise HarnessError(f"{path} was made with another task card or profile; use another --out")
                results.append(result)
    made = {(r.backbone.sha256, r.backbone.arch) for r in results}
    if len(made) > 1:
        raise HarnessError(f"{plan.out} holds results of {len(made)} different backbones; use another --out")
    summary = summarize(results)
    write_results(Path(plan.out) / RESULTS_NAME, summary)
    return summary.runs


def format_table(rows: list[RunSummary]) -> str:
    """One block per task: protocol, seeds, then the card's columns as mean ± std (detection and
    keypoint AP headed mAP@[.5,.95]); a block with frozen rows is titled with the stages frozen."""
    blocks = []
    for task in dict.fromkeys(r.task for r in rows):
        card = task_card(task)
        columns = card.metric.columns
        headers = ["task", "protocol", "seeds"] + [TABLE_HEADERS.get(c, c) for c in columns]
        lines = []
        for row in (r for r in rows if r.task == task):
            cells = [task, row.protocol, str(len(row.seeds))]
            for key in columns:
                m = row.metrics.get(key)
                if m is None:
                    cells.append("-")
                else:
                    cells.append(f"{m.mean:.1f} ± {m.std:.1f}" if len(row.seeds) > 1 else f"{m.mean:.1f}")
            lines.append(cells)
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        title = []
        if any(r.protocol == "frozen" for r in rows if r.task == task):
            title = [f"{task} (frozen: {' '.join(card.model.frozen_stages)} fixed)"]
        blocks.append("\n".join(title + [fmt(headers)] + [fmt(line) for line in lines]))
    return "\n\n".join(blocks)
