"""`harness scaling`: the data-scaling study (pretraining-data size -> transfer metric).

For each fraction of the pretraining data, ``run_scaling`` pretrains a backbone on the nested
hash subset (:func:`harness.pretrain.pretrain`, resumable, skipped when already done) or takes the
checkpoint given for that fraction, evaluates it with :func:`harness.runner.run_eval` on the chosen
tasks, protocols, profile and seeds, and fits, for every task, protocol and metric column of the
task card,

    metric = a + b · log10(images)

by least squares over all (size, seed) points (``scipy.stats.linregress``), with a t-based
confidence interval on the slope ``b`` (``b ± t_{(1+c)/2, n-2} · se(b)``; none when n < 3).
Rank 0 writes ``scaling.json`` (points, per-seed values, fits), ``scaling.md`` (the table) and
``scaling.png`` (the primary metric against the pretraining images on a log axis, one line per
task/protocol, error bars = std over seeds, dashed = the fit).

Layout under ``out``: ``pretrain/f<fraction>/backbone.safetensors`` (+ ``.json`` record and the
``.run/`` training folder), ``eval/f<fraction>/`` (``harness eval``'s run folder) and the outputs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from harness.cards import PROTOCOLS
from harness.datasets.labelled import check_fraction
from harness.errors import HarnessError
from harness.pretrain import PretrainConfig
from harness.files import atomic_write, write_json_atomic
from harness.results import PretrainRecord, RunSummary, read_pretrain_record

Evaluator = Callable[[str, Path], list[RunSummary]]  # (checkpoint, eval run folder) -> results.json's runs


@dataclass
class ScalingPlan:
    arch: str
    fractions: list[float]
    out: Path
    data: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["voc", "seg"])
    protocols: list[str] = field(default_factory=lambda: list(PROTOCOLS))
    profile: str = "short"
    seeds: int = 1
    synthetic: bool = False
    data_root: Path | None = None
    device: str | None = None
    batch_size: int | None = None  # evaluation batch (the card's by default)
    checkpoints: dict[float, str] = field(default_factory=dict)
    pretrain: PretrainConfig | None = None  # template: fraction and out are set per point
    confidence: float = 0.95
    progress: bool = True


def fraction_label(fraction: float) -> str:
    return f"f{fraction:g}"


def parse_fractions(text: str) -> list[float]:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise HarnessError("--fractions needs at least one fraction, e.g. 0.1,0.3,1")
    try:
        fractions = [float(t) for t in items]
    except ValueError:
        raise HarnessError(f"--fractions: bad list {text!r} (numbers in (0, 1], comma-separated)") from None
    for f in fractions:
        try:
            check_fraction(f)
        except HarnessError:
            raise HarnessError(f"--fractions: {f} is not in (0, 1]") from None
    if len(set(fractions)) != len(fractions):
        raise HarnessError(f"--fractions: {text!r} repeats a fraction")
    return sorted(fractions)


def parse_checkpoints(text: str | None) -> dict[float, str]:
    """``0.1=a.safetensors,0.3=b.safetensors`` -> {0.1: ..., 0.3: ...}."""
    out: dict[float, str] = {}
    for item in [t.strip() for t in (text or "").split(",") if t.strip()]:
        key, sep, path = item.partition("=")
        try:
            fraction = check_fraction(float(key))
        except ValueError:
            fraction = None
        if not sep or fraction is None or not path.strip():
            raise HarnessError(f"--checkpoints: bad entry {item!r}; use FRACTION=PATH, e.g. 0.1=ckpt.safetensors")
        out[fraction] = path.strip()
    return out


# ----------------------------------------------------------------------------- the fit
def fit_log_linear(images, values, confidence: float = 0.95) -> dict:
    """Least-squares ``value = a + b·log10(images)`` with a t-based confidence interval on ``b``.

    ``images`` and ``values`` are paired (repeat a size once per seed). Needs two distinct sizes;
    the interval needs at least three points (``None`` otherwise).
    """
    from scipy import stats

    x = [math.log10(float(n)) for n in images]
    y = [float(v) for v in values]
    if len(x) != len(y):
        raise ValueError("images and values differ in length")
    if any(n <= 0 for n in images):
        raise HarnessError("image counts must be positive")
    sizes = sorted(set(images))
    if len(sizes) < 2:
        raise HarnessError(f"a fit needs at least two distinct data sizes, got {sizes}")
    res = stats.linregress(x, y)
    n = len(x)
    dof = n - 2
    ci = None
    if dof >= 1 and math.isfinite(res.stderr):
        t = float(stats.t.ppf(0.5 + confidence / 2, dof))
        ci = [float(res.slope - t * res.stderr), float(res.slope + t * res.stderr)]
    return {
        "a": float(res.intercept), "b": float(res.slope), "b_stderr": float(res.stderr) if dof >= 1 else None,
        "b_ci": ci, "confidence": confidence, "r2": float(res.rvalue ** 2) if math.isfinite(res.rvalue) else None,
        "p_value": float(res.pvalue) if dof >= 1 and math.isfinite(res.pvalue) else None,
        "n": n, "sizes": [int(s) for s in sizes],
    }


def fit_points(points: list[dict], confidence: float = 0.95) -> list[dict]:
    """One fit per (task, protocol, metric) over every (size, seed) value of ``points``.

    A point is ``{"images": N, "results": {"task/protocol": {"primary": KEY, "metrics": {KEY:
    {"values": [...]}}}}}``.
    """
    series: dict[tuple[str, str], dict] = {}
    for p in points:
        for name, res in p["results"].items():
            for key, m in res["metrics"].items():
                s = series.setdefault((name, key), {"images": [], "values": [], "primary": res["primary"] == key})
                s["images"] += [p["images"]] * len(m["values"])
                s["values"] += list(m["values"])
    fits = []
    for (name, key), s in sorted(series.items()):
        task, protocol = name.split("/")
        entry = {"task": task, "protocol": protocol, "metric": key, "primary": s["primary"]}
        try:
            entry.update(fit_log_linear(s["images"], s["values"], confidence))
        except HarnessError as exc:
            entry.update({"a": None, "b": None, "b_ci": None, "error": str(exc), "n": len(s["values"])})
        fits.append(entry)
    return fits


# ----------------------------------------------------------------------------- table + plot
def _cell(m: dict | None) -> str:
    if m is None:
        return "-"
    return f"{m['mean']:.1f} ± {m['std']:.1f}" if len(m["values"]) > 1 else f"{m['mean']:.1f}"


def format_table(points: list[dict], fits: list[dict]) -> str:
    """Markdown: primary metric per fraction and task/protocol, then the fits of every metric."""
    names = sorted({n for p in points for n in p["results"]})
    head = ["fraction", "images"] + [f"{n} {points[0]['results'][n]['primary']}" if n in points[0]["results"] else n
                                     for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in points:
        cells = [f"{p['fraction']:g}", str(p["images"])]
        for n in names:
            res = p["results"].get(n)
            cells.append(_cell(res["metrics"].get(res["primary"])) if res else "-")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| task | protocol | metric | a | b (per 10x images) | CI of b | R² | points |", "|---|---|---|---|---|---|---|---|"]
    for f in fits:
        if f.get("b") is None:
            lines.append(f"| {f['task']} | {f['protocol']} | {f['metric']} | - | - | {f.get('error', '-')} | - | {f['n']} |")
            continue
        ci = f"[{f['b_ci'][0]:+.2f}, {f['b_ci'][1]:+.2f}] ({f['confidence']:.0%})" if f["b_ci"] else "- (n < 3)"
        r2 = f"{f['r2']:.2f}" if f.get("r2") is not None else "-"
        mark = "**" if f["primary"] else ""
        lines.append(f"| {f['task']} | {f['protocol']} | {mark}{f['metric']}{mark} | {f['a']:.2f} | {f['b']:+.2f} | "
                     f"{ci} | {r2} | {f['n']} |")
    return "\n".join(lines)


def plot_scaling(points: list[dict], fits: list[dict], path: Path, title: str = "") -> Path:
    """``scaling.png``: primary metric vs pretraining images (log x), one line per task/protocol."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    names = sorted({n for p in points for n in p["results"]})
    fit_of = {(f["task"] + "/" + f["protocol"], f["metric"]): f for f in fits}
    colors = [f"C{i % 10}" for i in range(len(names))]
    for name, color in zip(names, colors):
        pts = sorted((p["images"], p["results"][name]) for p in points if name in p["results"])
        key = pts[0][1]["primary"]
        xs = [n for n, _ in pts]
        means = [r["metrics"][key]["mean"] for _, r in pts]
        stds = [r["metrics"][key]["std"] for _, r in pts]
        fit = fit_of.get((name, key))
        label = f"{name} {key}"
        if fit and fit.get("b") is not None:
            label += f": b = {fit['b']:+.1f}/decade"
            if fit.get("b_ci"):
                label += f" [{fit['b_ci'][0]:+.1f}, {fit['b_ci'][1]:+.1f}]"
            lo, hi = min(xs), max(xs)
            grid = [lo * (hi / lo) ** (i / 50) for i in range(51)] if hi > lo else [lo]
            ax.plot(grid, [fit["a"] + fit["b"] * math.log10(g) for g in grid], "--", color=color, linewidth=1)
        ax.errorbar(xs, means, yerr=stds, marker="o", capsize=3, color=color, linestyle="-", linewidth=1.5, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("pretraining images (log scale)")
    ax.set_ylabel("primary metric (%)")
    ax.grid(True, which="both", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if names:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


# ----------------------------------------------------------------------------- the study
def summarize_rows(rows: list[RunSummary]) -> dict:
    """``run_eval`` rows -> ``{"task/protocol": {"primary": KEY, "metrics": {KEY: {mean, std, values}}}}``
    (the card's metric columns; the primary first)."""
    from harness.cards import task_card

    out = {}
    for row in rows:
        card = task_card(row.task)
        keys = [card.metric.primary] + [k for k in card.metric.columns if k != card.metric.primary]
        metrics = {k: row.metrics[k].model_dump() for k in keys if k in row.metrics}
        if card.metric.primary not in metrics:
            raise HarnessError(f"{row.task}/{row.protocol}: no {card.metric.primary} in the results")
        out[f"{row.task}/{row.protocol}"] = {"primary": card.metric.primary, "metrics": metrics,
                                            "seeds": list(row.seeds)}
    return out


def _shared_synthetic(plan: ScalingPlan, eval_dir: Path) -> None:
    """Let every fraction's eval folder use one synthetic data root (``harness eval --synthetic``
    writes ``<out>/synthetic-data`` once per folder; the data is the same, seed 0)."""
    from harness.distributed import get_rank

    if get_rank() != 0:
        return
    from harness.datasets.synthetic import write_synthetic_once
    from harness.plan import synthetic_data_dir

    shared = synthetic_data_dir(plan.out)
    write_synthetic_once(shared)
    link = synthetic_data_dir(eval_dir)
    eval_dir.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        try:
            link.symlink_to(shared.resolve(), target_is_directory=True)
        except OSError:
            pass  # run_eval writes its own copy


def default_evaluator(plan: ScalingPlan) -> Evaluator:
    def evaluate(checkpoint: str, out: Path) -> list[RunSummary]:
        from harness.plan import EvalPlan
        from harness.runner import run_eval

        if plan.synthetic:
            _shared_synthetic(plan, out)
        return run_eval(EvalPlan(
            backbone=str(checkpoint), arch=plan.arch, tasks=list(plan.tasks), protocols=list(plan.protocols),
            profile=plan.profile, data_root=plan.data_root, synthetic=plan.synthetic, seeds=plan.seeds, out=out,
            device=plan.device, batch_size=plan.batch_size, progress=plan.progress,
        ))

    return evaluate


def _images_of(plan: ScalingPlan, fraction: float, checkpoint: str) -> int:
    record = read_pretrain_record(checkpoint)
    if record is not None:
        if abs(record.fraction - fraction) > 1e-12:
            raise HarnessError(f"--checkpoints: {checkpoint} was pretrained on fraction {record.fraction}, "
                               f"not {fraction:g}")
        return record.images
    if not plan.data:
        raise HarnessError(f"--checkpoints: {checkpoint} has no pretraining record (.json beside it) to tell its "
                           "image count; pass --data to count the subset")
    from harness.datasets.labelled import LabelHierarchy
    from harness.datasets.pretraining import open_pretrain_data

    template = plan.pretrain or PretrainConfig(data=plan.data, arch=plan.arch, out="")
    data = open_pretrain_data(plan.data, fraction=fraction, subset_seed=template.subset_seed,
                              data_format=template.data_format,
                              hierarchy=LabelHierarchy.load(template.hierarchy) if template.hierarchy else None)
    return data.images


def run_scaling(plan: ScalingPlan, evaluate: Evaluator | None = None) -> dict:
    """Pretrain (or take) a checkpoint per fraction, evaluate each, fit, write the outputs."""
    from harness.checkpoints import sha256_file
    from harness.distributed import get_rank
    from harness.pretrain import pretrain

    fractions = sorted(plan.fractions)
    if len(fractions) < 2:
        raise HarnessError("a scaling study needs at least two fractions")
    extra = sorted(set(plan.checkpoints) - set(fractions))
    if extra:
        raise HarnessError(f"--checkpoints names fraction(s) {extra} that are not in --fractions")
    need_pretrain = [f for f in fractions if f not in plan.checkpoints]
    if need_pretrain and not plan.data:
        raise HarnessError(f"fraction(s) {need_pretrain} have no checkpoint: pass --data to pretrain them")
    for f, path in plan.checkpoints.items():
        if not Path(path).is_file():
            raise HarnessError(f"--checkpoints: {path} (fraction {f:g}) not found")
    out = Path(plan.out)
    evaluate = evaluate or default_evaluator(plan)
    points = []
    for f in fractions:
        label = fraction_label(f)
        if f in plan.checkpoints:
            checkpoint = plan.checkpoints[f]
            images = _images_of(plan, f, checkpoint)
            record = read_pretrain_record(checkpoint)
        else:
            template = plan.pretrain or PretrainConfig(data=plan.data, arch=plan.arch, out="", epochs=1)
            cfg = dataclasses.replace(template, data=plan.data, arch=plan.arch, fraction=f,
                                      out=str(out / "pretrain" / label / "backbone.safetensors"), work_dir=None,
                                      device=template.device or plan.device, progress=plan.progress)
            record = PretrainRecord.model_validate(pretrain(cfg))
            checkpoint, images = cfg.out, record.images
        rows = evaluate(checkpoint, out / "eval" / label)
        points.append({
            "fraction": f, "images": images, "checkpoint": str(checkpoint),
            "sha256": sha256_file(checkpoint) if get_rank() == 0 else None,
            "pretrain": None if record is None else record.model_dump(include={"images", "total_images", "loss",
                                                                               "num_classes", "training"}),
            "results": summarize_rows(rows),
        })
    fits = fit_points(points, plan.confidence)
    summary = {
        "arch": plan.arch, "data": plan.data, "profile": plan.profile, "tasks": list(plan.tasks),
        "protocols": list(plan.protocols), "seeds": plan.seeds, "synthetic": plan.synthetic,
        "fit": "metric = a + b * log10(images); CI on b is t-based", "points": points, "fits": fits,
    }
    if get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "scaling.json", summary)
        table = format_table(points, fits)
        (out / "scaling.md").write_text(table + "\n")
        title = f"{plan.arch}, profile {plan.profile}" + (" (synthetic data)" if plan.synthetic else "")
        plot_scaling(points, fits, out / "scaling.png", title=title)
        summary["table"] = table
    return summary
