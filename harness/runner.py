"""`harness eval`: tasks x protocols x seeds -> results; finished runs are skipped on rerun.

Every rank trains and predicts; rank 0 scores, writes `<out>/<task>/<protocol>/seed<k>/result.json`
and, at the end, `<out>/results.json` (mean ± std over seeds). The plan, its run folders and the
printed table are `harness.plan`'s (no torch there, for the launchers and `harness status`).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from harness.backbones import Backbone
from harness.cards import TaskCard, backbone_card, task_card
from harness.datasets import roots
from harness.datasets.synthetic import MARKER, check_default_synthetic, write_synthetic_once
from harness.distributed import DistEnv, barrier, init_distributed
from harness.engine import TrainConfig, amp_dtype, default_loader_workers, predict, train
from harness.errors import HarnessError, HarnessWarning
from harness.kinds import KINDS
from harness.plan import EvalPlan, check_plan, run_dir, synthetic_data_dir
from harness.protocols import apply_protocol
from harness.results import (RESULTS_NAME, Result, RunSummary, environment, git_commit, git_dirty, read_result,
                             summarize, write_result, write_results)
from harness.cards import is_card_name
from harness.zoo import fetch_backbone, load_eval_backbone

# ----------------------------------------------------------------------------- data
@dataclass
class TaskData:
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    train_split: str
    test_split: str


def task_data(card: TaskCard, root: Path, profile_name: str) -> TaskData:
    """The card's train and test datasets under a data root (its kind's ``datasets``), the training
    set cut to the profile's ``train_images``; a missing dataset is a one-line error. Real data whose
    test split is not the standard one's size is scored, with a warning: its numbers do not compare."""
    from harness.datasets.get import load_registry

    train_ds, test_ds, *names = KINDS[card.model.kind].datasets(card, root)
    limit = card.profile(profile_name).train_images
    if limit is not None and limit < len(train_ds):
        train_ds = torch.utils.data.Subset(train_ds, range(limit))
    standard = load_registry().test_images.get(names[1])
    if standard is not None and len(test_ds) != standard and not (Path(root) / MARKER).is_file():
        warnings.warn(f"{card.name}: {names[1]} under {root} has {len(test_ds)} images, the standard split "
                      f"{standard}: its numbers do not compare with published ones (the leaderboard refuses them)",
                      HarnessWarning, stacklevel=2)
    return TaskData(train_ds, test_ds, *names)


# ----------------------------------------------------------------------------- schedule
def train_config(card: TaskCard, profile_name: str, seed: int, batch_size: int | None = None, workers: int = 0,
                 precision: str | None = None, accumulate: int = 1) -> TrainConfig:
    """The card's schedule. Another total batch keeps the card's epochs (detectron2's
    ``auto_scale_workers``): iterations, lr steps, warmup and checkpoint period scale inversely with
    the batch and the learning rate linearly. ``accumulate`` keeps the batch in micro-batches."""
    p = card.profile(profile_name)
    batch = batch_size or p.batch_size
    scale = batch / p.batch_size
    rescale = lambda n: p.rescaled(n, batch)  # noqa: E731
    return TrainConfig(
        iterations=max(1, rescale(p.iterations)), batch_size=batch, lr=p.lr * scale, momentum=p.momentum,
        weight_decay=p.weight_decay, warmup_iters=rescale(p.warmup_iters), warmup_factor=p.warmup_factor,
        steps=[rescale(s) for s in p.steps], schedule=p.schedule, poly_power=p.poly_power,
        poly_min_lr=p.poly_min_lr * scale, weight_decay_norm=p.weight_decay_norm,
        clip_grad_norm=p.clip_grad_norm, seed=seed, checkpoint_period=max(1, rescale(p.checkpoint_period)),
        num_workers=workers, precision=precision or p.precision, accumulate=accumulate,
        precise_bn_iters=p.precise_bn_iters,
    )


def off_protocol(card: TaskCard, profile_name: str, cfg: TrainConfig) -> list[str]:
    """How a schedule departs from the card's protocol (total batch, precision); [] when it does not."""
    p = card.profile(profile_name)
    reasons = []
    if cfg.batch_size != p.batch_size:
        reasons.append(f"total batch {cfg.batch_size} (card: {p.batch_size})")
    if cfg.precision != p.precision:
        reasons.append(f"precision {cfg.precision} (card: {p.precision})")
    return reasons


# ----------------------------------------------------------------------------- predictions -> metrics
def score_predictions(card: TaskCard, test_ds, records: list) -> dict:
    """Metrics (percent) of the gathered per-image records, with the metric code `harness score` uses."""
    if len(records) != len(test_ds):
        raise RuntimeError(f"{len(records)} predictions for {len(test_ds)} test images")
    return KINDS[card.model.kind].score_records(card, test_ds, records)


# ----------------------------------------------------------------------------- runs
def _finished(path: Path, card: TaskCard, backbone: Backbone, plan: EvalPlan, cfg, data: TaskData,
              synthetic: bool) -> Result | None:
    """A finished run's result, when it was made as this plan would make it: card, backbone (file, arch,
    normalization, load options), profile, data (synthetic or not, splits and their sizes) and the
    training settings after rescaling; else an error."""
    result_path = path / "result.json"
    if not result_path.is_file():
        return None
    result = read_result(result_path)
    made = {"task card": result.card_hash, "backbone sha256": result.backbone.sha256, "arch": result.backbone.arch,
            "profile": result.profile, "normalization": result.backbone.model_dump().get("normalization"),
            "checkpoint options": result.checkpoint_options,
            "data": [result.dataset.synthetic, result.dataset.train_split, result.dataset.images_trained,
                     result.dataset.test_split, result.dataset.images_scored]}
    asked = {"task card": card.card_hash, "backbone sha256": backbone.checkpoint["sha256"], "arch": backbone.arch,
             "profile": plan.profile, "normalization": backbone.describe()["normalization"],
             "checkpoint options": checkpoint_options(plan),
             "data": [synthetic, data.train_split, len(data.train), data.test_split, len(data.test)]}
    training = {"iterations": cfg.iterations, "batch_size": cfg.batch_size, "lr": cfg.lr, "steps": list(cfg.steps),
                "accumulate": cfg.accumulate, "precision": cfg.precision}
    recorded = result.training.model_dump()
    for key, value in training.items():
        if key in recorded:  # results written before a setting was recorded are not refused for it
            made[f"training {key}"], asked[f"training {key}"] = recorded[key], value
    made, asked = json.loads(json.dumps(made)), json.loads(json.dumps(asked))
    differ = [key for key in made if made[key] != asked[key]]
    if differ:
        values = "; ".join(f"{key}: {made[key]!r}, now {asked[key]!r}" for key in differ)
        raise HarnessError(f"{result_path} was made with another {', '.join(differ)} ({values}); use another --out")
    return result


def checkpoint_options(plan: EvalPlan) -> dict:
    """The load options given to eval, as its results record them."""
    return {k: v for k, v in plan.checkpoint_options.items() if v not in (None, False)}


def training_groups(card: TaskCard, profile_name: str, data: TaskData) -> list[int] | None:
    """The kind's batching groups of the training images (R-CNN: aspect ratios), or None."""
    return KINDS[card.model.kind].train_groups(card, profile_name, data.train)


def loader_workers(plan: EvalPlan, env: DistEnv) -> int:
    """Data-loading worker processes per training process: ``plan.workers``, else the engine's default."""
    return plan.workers if plan.workers is not None else default_loader_workers(env.device)


def build_cell(plan: EvalPlan, env: DistEnv, card: TaskCard, base: Backbone, protocol: str, seed: int):
    """The cell's model (on a copy of the backbone, heads drawn with ``seed``) under ``protocol``,
    with its protocol record and training augmentation."""
    torch.manual_seed(seed)  # the heads' initialisation depends on the seed
    backbone = copy.deepcopy(base)
    kind = KINDS[card.model.kind]
    model_kwargs, aug_kwargs = kind.settings(card, plan.profile)
    model = kind.build_model(backbone, **model_kwargs)
    info = apply_protocol(model, backbone, protocol, world_size=env.world_size, device=env.device,
                          frozen_stages=card.model.frozen_stages)
    return model, backbone, info, kind.train_augment(base, **aug_kwargs)


def cell_plan(plan: EvalPlan, card: TaskCard, data: TaskData, protocol: str, seed: int) -> dict:
    """What a cell will run, after any rescaling: the ``--dry-run`` table's row."""
    cfg = train_config(card, plan.profile, seed, plan.batch_size, 0, plan.precision, plan.accumulate)
    speed = card.reference_speed
    hours = cfg.iterations * cfg.batch_size * speed.gpu_seconds_per_image / 3600 if speed else None
    return {"task": card.name, "protocol": protocol, "seed": seed, "batch": cfg.batch_size,
            "accumulate": cfg.accumulate, "iterations": cfg.iterations, "lr": cfg.lr, "steps": list(cfg.steps),
            "warmup": cfg.warmup_iters, "precision": cfg.precision, "train_images": len(data.train),
            "test_images": len(data.test), "gpu_hours": hours, "off_protocol": off_protocol(card, plan.profile, cfg)}


def format_plan(rows: list[dict]) -> str:
    """The dry-run plan, one line per cell; GPU-hours from the card's reference training speed."""
    headers = ["task", "protocol", "seed", "batch", "accum", "iterations", "lr", "steps", "warmup", "precision",
               "train imgs", "test imgs", "GPU-h"]
    lines = [[r["task"], r["protocol"], str(r["seed"]), str(r["batch"]), str(r["accumulate"]), str(r["iterations"]),
              f"{r['lr']:.4g}", ",".join(map(str, r["steps"])) or "-", str(r["warmup"]), r["precision"],
              str(r["train_images"]), str(r["test_images"]),
              "?" if r["gpu_hours"] is None else f"{r['gpu_hours']:.1f}"] for r in rows]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    notes = [f"{r['task']}/{r['protocol']}/seed{r['seed']}: off-protocol: {'; '.join(r['off_protocol'])}"
             for r in rows if r["off_protocol"]]
    return "\n".join([fmt(headers)] + [fmt(line) for line in lines] + notes)


DRY_RUN_ITERATIONS = 2  # optimizer steps of a --dry-run cell, at 2 images per process
DRY_RUN_IMAGES = 2  # test images it predicts


def dry_run_cell(plan: EvalPlan, env: DistEnv, card: TaskCard, data: TaskData, base: Backbone, protocol: str,
                 seed: int) -> float:
    """Build the cell's model as the real run would, train it ``DRY_RUN_ITERATIONS`` steps at the
    profile's image sizes (the kind's MIN_IMAGES_PER_PROCESS per process and micro-batch; the schedule's lr) in a
    temporary folder, and predict ``DRY_RUN_IMAGES`` test images through the records code.
    Returns the seconds it took; writes nothing under ``plan.out``."""
    began = time.perf_counter()
    model, _, _, augment = build_cell(plan, env, card, base, protocol, seed)
    full = train_config(card, plan.profile, seed, plan.batch_size, 0, plan.precision, plan.accumulate)
    per_process = KINDS[card.model.kind].MIN_IMAGES_PER_PROCESS
    cfg = dataclasses.replace(full, iterations=DRY_RUN_ITERATIONS, steps=(), warmup_iters=min(full.warmup_iters, 1),
                              batch_size=per_process * env.world_size * full.accumulate,
                              checkpoint_period=DRY_RUN_ITERATIONS,
                              precise_bn_iters=min(full.precise_bn_iters, 1))
    with tempfile.TemporaryDirectory(prefix="harness-dry-run-") as tmp:
        train(model, data.train, cfg, Path(tmp) / "run", augment=augment, env=env, progress=False,
              groups=training_groups(card, plan.profile, data))
    test = torch.utils.data.Subset(data.test, range(min(DRY_RUN_IMAGES, len(data.test))))
    records = predict(model, test, env=env, postprocess=KINDS[card.model.kind].postprocess(card, data.test),
                      precision=cfg.precision, progress=False)
    if env.is_main and len(records) != len(test):
        raise RuntimeError(f"dry run: {len(records)} predictions for {len(test)} images")
    return time.perf_counter() - began


def run_one(plan: EvalPlan, env: DistEnv, card: TaskCard, data: TaskData, base: Backbone, protocol: str,
            seed: int, synthetic: bool, named: dict | None = None, stop_requested=None) -> Result:
    path = run_dir(plan.out, card.name, protocol, seed)
    workers = loader_workers(plan, env)
    cfg = train_config(card, plan.profile, seed, plan.batch_size, workers, plan.precision, plan.accumulate)
    done = _finished(path, card, base, plan, cfg, data, synthetic)
    if done is not None:
        if env.is_main:
            print(f"{card.name}/{protocol}/seed{seed}: done earlier, skipped")
        return done
    model, backbone, info, augment = build_cell(plan, env, card, base, protocol, seed)
    identity = {"task": card.name, "card_hash": card.card_hash, "protocol": protocol, "profile": plan.profile,
                "backbone": base.checkpoint["sha256"] or plan.backbone, "arch": base.arch}
    trained = train(model, data.train, cfg, path, augment=augment, env=env,
                    progress=plan.progress, desc=f"{card.name}/{protocol}/seed{seed}", identity=identity,
                    groups=training_groups(card, plan.profile, data), stop_requested=stop_requested)
    records = predict(model, data.test, env=env, postprocess=KINDS[card.model.kind].postprocess(card, data.test),
                      num_workers=workers, precision=cfg.precision, progress=plan.progress, desc=f"{card.name} predict")
    result = None
    if env.is_main:
        metrics = score_predictions(card, data.test, records)
        description = backbone.describe()
        result = Result(
            git_commit=git_commit(), git_dirty=git_dirty(), environment=environment(),
            checkpoint_options=checkpoint_options(plan),
            backbone={**(named or {"name": plan.backbone if base.checkpoint["path"] is None else Path(plan.backbone).name}),
                      "arch": base.arch, "sha256": base.checkpoint["sha256"], "layout": base.checkpoint["layout"],
                      "parameters": description["parameters"], "normalization": description["normalization"]},
            task=card.name, card_hash=card.card_hash, protocol=protocol, profile=plan.profile, seed=seed,
            dataset={"name": card.dataset.name, "train_split": data.train_split, "test_split": data.test_split,
                     "images_trained": len(data.train), "images_scored": len(records), "synthetic": synthetic},
            metrics=metrics,
            training={"iterations": cfg.iterations, "batch_size": cfg.batch_size, "lr": cfg.lr,
                      "world_size": env.world_size, "device": str(env.device), "precision": trained.precision,
                      "wall_time_s": trained.wall_time, "per_process_batch": trained.per_process_batch,
                      "data_workers": workers, "card_batch_size": card.profile(plan.profile).batch_size,
                      "steps": list(cfg.steps), "warmup_iters": cfg.warmup_iters, "accumulate": cfg.accumulate,
                      "precise_bn_iters": cfg.precise_bn_iters, "tf32": cfg.tf32,
                      "off_protocol": off_protocol(card, plan.profile, cfg)},
            protocol_info=info.as_dict(),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )
        write_result(path / "result.json", result)
    barrier()
    return result if env.is_main else read_result(path / "result.json")


def resolve_data_root(plan: EvalPlan, env: DistEnv) -> Path:
    if plan.synthetic:
        root = synthetic_data_dir(plan.out)
        if env.is_main:
            write_synthetic_once(root)
        barrier()
        return check_default_synthetic(root)
    root = plan.data_root or (Path(os.environ[roots.DATA_ROOT_ENV]) if os.environ.get(roots.DATA_ROOT_ENV) else None)
    if root is None:
        raise HarnessError(f"no data root: pass --data-root DIR, set {roots.DATA_ROOT_ENV}, or use --synthetic")
    if not Path(root).is_dir():
        raise HarnessError(f"data root not found: {root}")
    return Path(root)


def run_eval(plan: EvalPlan) -> list[RunSummary]:
    """Run every (task, protocol, seed) of the plan; returns the aggregated rows on rank 0, [] elsewhere."""
    cards = check_plan(plan)
    env = init_distributed(plan.device)
    sync_bn = env.world_size > 1 and env.device.type == "cuda"
    for card in cards:
        amp_dtype(plan.precision or card.profile(plan.profile).precision, env.device)  # refused before any training
        batch = plan.batch_size or card.profile(plan.profile).batch_size
        kind = KINDS[card.model.kind]
        if batch // (env.world_size * plan.accumulate) < kind.MIN_IMAGES_PER_PROCESS and not sync_bn:
            raise HarnessError(f"{card.name}: {kind.MIN_IMAGES_REASON} needs at least {kind.MIN_IMAGES_PER_PROCESS} "
                               f"images per process and micro-batch; a total batch of {batch} on {env.world_size} "
                               f"process(es) with {plan.accumulate} accumulation step(s) gives fewer")
    if is_card_name(plan.backbone) and env.world_size > 1:  # one download, then every rank verifies and loads
        if env.is_main:
            fetch_backbone(backbone_card(plan.backbone), progress=plan.progress)
        barrier()
    base, named = load_eval_backbone(plan.backbone, plan.arch, plan.checkpoint_options,
                                     progress=plan.progress and env.is_main)
    root = resolve_data_root(plan, env)
    synthetic = plan.synthetic or (root / MARKER).is_file()  # `harness data synth` output given as --data-root
    results, planned = [], []
    for card in cards:
        data = task_data(card, root, plan.profile)
        for protocol in plan.protocols:
            for seed in range(plan.seeds):
                if not plan.dry_run:
                    results.append(run_one(plan, env, card, data, base, protocol, seed, synthetic, named))
                    continue
                cfg = train_config(card, plan.profile, seed, plan.batch_size, loader_workers(plan, env), plan.precision,
                                   plan.accumulate)
                _finished(run_dir(plan.out, card.name, protocol, seed), card, base, plan, cfg, data, synthetic)  # as the run
                row = cell_plan(plan, card, data, protocol, seed)
                row["dry_run_s"] = dry_run_cell(plan, env, card, data, base, protocol, seed)
                planned.append(row)
    if plan.dry_run:
        if env.is_main:
            print(format_plan(planned))
            print("dry run: " + ", ".join(f"{r['task']}/{r['protocol']}/seed{r['seed']} {r['dry_run_s']:.0f} s"
                                          for r in planned) + f" ({DRY_RUN_ITERATIONS} steps, {DRY_RUN_IMAGES} "
                  "predictions each); no results written")
        return []
    summary = summarize(results)
    if env.is_main:
        write_results(Path(plan.out) / RESULTS_NAME, summary)
    return summary.runs if env.is_main else []


def run_cell(plan: EvalPlan, task: str, protocol: str, seed: int, stop_requested=None) -> Result:
    """Run one (task, protocol, seed) of the plan in this process group (a launched job's work);
    ``stop_requested`` as for ``engine.train`` (a stop raises ``engine.TrainingStopped``)."""
    card = task_card(task)
    card.profile(plan.profile)
    env = init_distributed(plan.device)
    base, named = load_eval_backbone(plan.backbone, plan.arch, plan.checkpoint_options, progress=False)
    root = resolve_data_root(plan, env)
    synthetic = plan.synthetic or (root / MARKER).is_file()
    data = task_data(card, root, plan.profile)
    return run_one(plan, env, card, data, base, protocol, seed, synthetic, named, stop_requested=stop_requested)
