"""`harness eval`: tasks x protocols x seeds -> results; finished runs are skipped on rerun.

Every rank trains and predicts; rank 0 scores, writes `<out>/<task>/<protocol>/seed<k>/result.json`
and, at the end, `<out>/results.json` (mean ± std over seeds) and the printed table.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.backbones import Backbone, load_backbone
from harness.cards import TaskCard, task_card
from harness.datasets import roots
from harness.datasets.coco import CocoDetection
from harness.datasets.synthetic import DEFAULT_SIZES, MARKER, write_synthetic
from harness.datasets.voc import SEG_CLASSES, VOC_CLASSES, VOCDetection, VOCSegmentation, voc_year
from harness.distributed import DistEnv, barrier, init_distributed
from harness.engine import TrainConfig, predict, train
from harness.errors import HarnessError
from harness.metrics.coco import coco_box_metrics, coco_keypoint_metrics
from harness.metrics.segmentation import confusion_matrix, segmentation_metrics
from harness.metrics.voc import voc_detection_metrics
from harness.models import build_model, train_augment
from harness.protocols import apply_protocol
from harness.results import Result, aggregate, git_commit, read_result, write_json_atomic, write_result

TABLE_HEADERS = {"AP": "mAP@[.5,.95]"}


@dataclass
class EvalPlan:
    backbone: str
    arch: str | None = None
    tasks: list[str] = field(default_factory=lambda: ["coco", "voc", "seg", "pose"])
    protocols: list[str] = field(default_factory=lambda: ["finetune", "frozen"])
    profile: str = "smoke"
    data_root: Path | None = None
    synthetic: bool = False
    seeds: int = 1
    out: Path = Path("runs/default")
    device: str | None = None
    batch_size: int | None = None  # overrides the card's; lr scales linearly
    workers: int | None = None  # data-loading processes per training process; None: 4 on CUDA, 0 on the CPU
    progress: bool = True


# ----------------------------------------------------------------------------- data
@dataclass
class TaskData:
    train: torch.utils.data.Dataset
    test: torch.utils.data.Dataset
    train_split: str
    test_split: str


def _voc_sets(root: Path, sets) -> list[tuple[Path, str]]:
    devkit = Path(roots.check_data_root(root)[1]["where"]).parent
    return [(devkit / folder, split) for folder, split in sets]


def task_data(card: TaskCard, root: Path, profile_name: str) -> TaskData:
    """The card's train and test datasets under a data root; a missing dataset is a one-line error."""
    spec = card.dataset
    if spec.layout in ("coco", "coco_keypoints"):
        coco = roots.require_coco(root, [spec.train.annotations, spec.train.images, spec.test.annotations, spec.test.images])
        kp = spec.layout == "coco_keypoints"
        train_ds = CocoDetection(coco / spec.train.annotations, coco / spec.train.images, keypoints=kp, train=True)
        test_ds = CocoDetection(coco / spec.test.annotations, coco / spec.test.images, keypoints=kp, train=False)
        names = (spec.train.annotations, spec.test.annotations)
    elif spec.layout == "voc_detection":
        for folder, _ in spec.train.sets + spec.test.sets:
            roots.require(root, folder)
        train_ds = VOCDetection(_voc_sets(root, spec.train.sets))
        test_ds = VOCDetection(_voc_sets(root, spec.test.sets))
        names = ("+".join(f"{f}/{s}" for f, s in spec.train.sets), "+".join(f"{f}/{s}" for f, s in spec.test.sets))
    else:
        roots.require(root, "VOC2012")
        (voc12, train_split), (_, test_split) = _voc_sets(root, spec.train.sets)[0], _voc_sets(root, spec.test.sets)[0]
        sbd = None
        if train_split == "train_aug" and not (voc12 / "ImageSets/Segmentation/train_aug.txt").is_file():
            roots.require(root, "SBD (train_aug)")
            sbd = roots.sbd_dir(root)
        train_ds = VOCSegmentation(voc12, train_split, sbd_dir=sbd)
        test_ds = VOCSegmentation(voc12, test_split)
        names = (f"VOC2012/{train_split}", f"VOC2012/{test_split}")
    limit = card.profile(profile_name).train_images
    if limit is not None and limit < len(train_ds):
        train_ds = torch.utils.data.Subset(train_ds, range(limit))
    return TaskData(train_ds, test_ds, *names)


# ----------------------------------------------------------------------------- model + schedule
def model_settings(card: TaskCard, profile_name: str) -> tuple[dict, dict]:
    """Keyword arguments of the model builder and of the training augmentation."""
    p = card.profile(profile_name)
    kind, head = card.model.kind, card.model.head
    if kind == "segmentation":
        model = {"num_classes": card.dataset.num_classes + 1, "aspp_channels": p.neck_channels, "output_stride": 16}
        aug = {"crop_size": p.crop_size, "scale_range": tuple(p.scale_range), "base_size": p.min_size[0],
               "flip_prob": 0.5 if p.flip else 0.0}
        return model, aug
    sizes = {"min_size": list(p.min_size), "max_size": p.max_size, "test_min_size": p.test_min_size,
             "fpn_channels": p.neck_channels}
    if p.anchor_sizes:
        sizes["anchor_sizes"] = list(p.anchor_sizes)
    sizes["box_batch_size_per_image"] = p.roi_batch_per_image
    sizes["representation_size"] = p.representation_size
    sizes["head_norm"] = p.head_norm
    flip = {"flip_prob": 0.5 if p.flip else 0.0}
    if kind == "keypoints":
        return {**sizes, "keypoint_head_layers": p.keypoint_head_layers,
                "keypoint_head_channels": p.keypoint_head_channels, "keypoint_pool_size": p.keypoint_pool_size}, flip
    detector = {"num_classes": card.dataset.num_classes, "head": head, "proposals_test": p.proposals_test, **sizes}
    if head == "c4":
        detector["c4_pool_size"] = p.c4_pool_size
    return detector, flip


def train_config(card: TaskCard, profile_name: str, seed: int, batch_size: int | None,
                 workers: int = 0) -> TrainConfig:
    """The card's schedule; a different total batch scales the learning rate linearly."""
    p = card.profile(profile_name)
    batch = batch_size or p.batch_size
    return TrainConfig(
        iterations=p.iterations, batch_size=batch, lr=p.lr * batch / p.batch_size, momentum=p.momentum,
        weight_decay=p.weight_decay, warmup_iters=p.warmup_iters, warmup_factor=p.warmup_factor,
        steps=p.steps, schedule=p.schedule, poly_power=p.poly_power, clip_grad_norm=p.clip_grad_norm,
        seed=seed, checkpoint_period=p.checkpoint_period, num_workers=workers,
    )


# ----------------------------------------------------------------------------- predictions -> metrics
def _box_records(output: dict, image_id, category_of_label) -> list[dict]:
    boxes = output["boxes"].tolist()
    records = []
    for (x1, y1, x2, y2), label, score in zip(boxes, output["labels"].tolist(), output["scores"].tolist()):
        records.append({"image_id": image_id, "category_id": category_of_label(int(label)),
                        "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)})
    return records


def postprocess_for(card: TaskCard, test_ds):
    """Turn one image's model output into the small picklable record gathered on rank 0."""
    kind = card.model.kind
    if kind == "segmentation":
        k = card.dataset.num_classes + 1

        def seg(output, target):
            labels = output.argmax(0).cpu().numpy()
            return confusion_matrix(target.cpu().numpy(), labels, k)

        return seg
    if isinstance(test_ds, VOCDetection):
        return lambda output, target: _box_records(output, target["image_id"], int)
    if kind == "keypoints":
        person = test_ds.category_ids[0]

        def keypoints(output, target):
            boxes = _box_records(output, target["image_id"], lambda _: person)
            kps = output["keypoints"].tolist()
            return {"boxes": boxes, "keypoints": [
                {"image_id": target["image_id"], "category_id": person, "score": b["score"],
                 "keypoints": [v for point in k for v in point]} for b, k in zip(boxes, kps)]}

        return keypoints
    return lambda output, target: _box_records(output, target["image_id"], test_ds.category_id)


def score_predictions(card: TaskCard, test_ds, records: list) -> dict:
    """Metrics (percent) of the gathered per-image records, with the metric code `harness score` uses."""
    if len(records) != len(test_ds):
        raise RuntimeError(f"{len(records)} predictions for {len(test_ds)} test images")
    kind = card.model.kind
    if kind == "segmentation":
        return segmentation_metrics(sum(records), SEG_CLASSES)
    if isinstance(test_ds, VOCDetection):
        voc_dir = test_ds.items[0][0]
        preds = [p for r in records for p in r]
        return voc_detection_metrics([ann for _, ann in test_ds.items], preds, voc_year(voc_dir) < 2010, VOC_CLASSES)
    if kind == "keypoints":
        metrics = coco_keypoint_metrics(test_ds.gt, [p for r in records for p in r["keypoints"]])
        boxes = coco_box_metrics(test_ds.gt, [p for r in records for p in r["boxes"]])
        return {**metrics, **{f"box_{k}": v for k, v in boxes.items()}}
    return coco_box_metrics(test_ds.gt, [p for r in records for p in r])


# ----------------------------------------------------------------------------- runs
def run_dir(out: Path, task: str, protocol: str, seed: int) -> Path:
    return Path(out) / task / protocol / f"seed{seed}"


def _finished(path: Path, card: TaskCard, backbone: Backbone, profile: str) -> Result | None:
    """A finished run's result, when it was made with this card, backbone and profile."""
    result_path = path / "result.json"
    if not result_path.is_file():
        return None
    result = read_result(result_path)
    made = (result.card_hash, result.backbone.sha256, result.backbone.arch, result.profile)
    if made != (card.card_hash, backbone.checkpoint["sha256"], backbone.arch, profile):
        raise HarnessError(
            f"{result_path} was made with another task card, backbone or profile; use another --out"
        )
    return result


def loader_workers(plan: EvalPlan, env: DistEnv) -> int:
    """Data-loading worker processes per training process: ``plan.workers``, else 4 on CUDA (the GPU
    must not wait for JPEG decoding) and 0 on the CPU (the model already uses every core)."""
    if plan.workers is not None:
        return plan.workers
    return 4 if env.device.type == "cuda" else 0


def run_one(plan: EvalPlan, env: DistEnv, card: TaskCard, data: TaskData, base: Backbone, protocol: str,
            seed: int, synthetic: bool, stop_requested=None) -> Result:
    path = run_dir(plan.out, card.name, protocol, seed)
    done = _finished(path, card, base, plan.profile)
    if done is not None:
        if env.is_main:
            print(f"{card.name}/{protocol}/seed{seed}: done earlier, skipped")
        return done
    torch.manual_seed(seed)  # the heads' initialisation depends on the seed
    backbone = copy.deepcopy(base)
    model_kwargs, aug_kwargs = model_settings(card, plan.profile)
    model = build_model(card.model.kind, backbone, **model_kwargs)
    info = apply_protocol(model, backbone, protocol, world_size=env.world_size, device=env.device)
    workers = loader_workers(plan, env)
    cfg = train_config(card, plan.profile, seed, plan.batch_size, workers)
    identity = {"task": card.name, "card_hash": card.card_hash, "protocol": protocol, "profile": plan.profile,
                "backbone": base.checkpoint["sha256"] or plan.backbone, "arch": base.arch}
    trained = train(model, data.train, cfg, path, augment=train_augment(card.model.kind, **aug_kwargs), env=env,
                    progress=plan.progress, desc=f"{card.name}/{protocol}/seed{seed}", identity=identity,
                    stop_requested=stop_requested)
    records = predict(model, data.test, env=env, postprocess=postprocess_for(card, data.test), num_workers=workers,
                      progress=plan.progress, desc=f"{card.name} predict")
    result = None
    if env.is_main:
        metrics = score_predictions(card, data.test, records)
        description = backbone.describe()
        result = Result(
            git_commit=git_commit(),
            backbone={"name": plan.backbone if base.checkpoint["path"] is None else Path(plan.backbone).name,
                      "arch": base.arch, "sha256": base.checkpoint["sha256"], "layout": base.checkpoint["layout"],
                      "parameters": description["parameters"], "normalization": description["normalization"]},
            task=card.name, card_hash=card.card_hash, protocol=protocol, profile=plan.profile, seed=seed,
            dataset={"name": card.dataset.name, "train_split": data.train_split, "test_split": data.test_split,
                     "images_trained": len(data.train), "images_scored": len(records), "synthetic": synthetic},
            metrics=metrics,
            training={"iterations": cfg.iterations, "batch_size": cfg.batch_size, "lr": cfg.lr,
                      "world_size": env.world_size, "device": str(env.device), "precision": trained.precision,
                      "wall_time_s": trained.wall_time, "per_process_batch": trained.per_process_batch,
                      "data_workers": workers},
            protocol_info=info.as_dict(),
            created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        )
        write_result(path / "result.json", result)
    barrier()
    return result if env.is_main else read_result(path / "result.json")


def resolve_data_root(plan: EvalPlan, env: DistEnv) -> Path:
    if plan.synthetic:
        root = Path(plan.out) / "synthetic-data"
        if env.is_main and not (root / ".complete").is_file():
            write_synthetic(root, seed=0)
            (root / ".complete").write_text("")
        barrier()
        made = json.loads((root / MARKER).read_text())
        if (made.get("seed"), made.get("sizes")) != (0, DEFAULT_SIZES):
            raise HarnessError(f"{root} was generated with other settings than this version's "
                               f"`harness data synth` ({made.get('sizes')}); use another --out")
        return root
    root = plan.data_root or (Path(os.environ[roots.DATA_ROOT_ENV]) if os.environ.get(roots.DATA_ROOT_ENV) else None)
    if root is None:
        raise HarnessError(f"no data root: pass --data-root DIR, set {roots.DATA_ROOT_ENV}, or use --synthetic")
    if not Path(root).is_dir():
        raise HarnessError(f"data root not found: {root}")
    return Path(root)


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
    cards = [task_card(t) for t in plan.tasks]
    for card in cards:
        card.profile(plan.profile)
        for protocol in plan.protocols:
            if protocol not in card.protocols:
                raise HarnessError(f"task {card.name} has no protocol {protocol!r}")
    if plan.seeds < 1:
        raise HarnessError("--seeds must be at least 1")
    if plan.workers is not None and plan.workers < 0:
        raise HarnessError("--workers must be 0 or more")
    return cards


def run_eval(plan: EvalPlan) -> list[dict]:
    """Run every (task, protocol, seed) of the plan; returns the aggregated rows on rank 0, [] elsewhere."""
    cards = check_plan(plan)
    env = init_distributed(plan.device)
    sync_bn = env.world_size > 1 and env.device.type == "cuda"
    for card in cards:
        batch = plan.batch_size or card.profile(plan.profile).batch_size
        if card.model.kind == "segmentation" and batch // env.world_size < 2 and not sync_bn:
            raise HarnessError(f"{card.name}: the ASPP head's BatchNorm needs at least 2 images per process; "
                               f"a total batch of {batch} on {env.world_size} process(es) gives fewer")
    base = load_backbone(plan.backbone, arch=plan.arch)
    root = resolve_data_root(plan, env)
    synthetic = plan.synthetic or (root / MARKER).is_file()  # `harness data synth` output given as --data-root
    results = []
    for card in cards:
        data = task_data(card, root, plan.profile)
        for protocol in plan.protocols:
            for seed in range(plan.seeds):
                results.append(run_one(plan, env, card, data, base, protocol, seed, synthetic))
    rows = aggregate(results)
    if env.is_main:
        write_json_atomic(Path(plan.out) / "results.json", {"backbone": results[0].backbone.model_dump(mode="json"),
                                                            "synthetic": synthetic, "runs": rows})
    return rows if env.is_main else []


def run_cell(plan: EvalPlan, task: str, protocol: str, seed: int, stop_requested=None) -> Result:
    """Run one (task, protocol, seed) of the plan in this process group (a launched job's work);
    ``stop_requested`` as for ``engine.train`` (a stop raises ``engine.TrainingStopped``)."""
    card = task_card(task)
    card.profile(plan.profile)
    env = init_distributed(plan.device)
    base = load_backbone(plan.backbone, arch=plan.arch)
    root = resolve_data_root(plan, env)
    synthetic = plan.synthetic or (root / MARKER).is_file()
    data = task_data(card, root, plan.profile)
    return run_one(plan, env, card, data, base, protocol, seed, synthetic, stop_requested=stop_requested)


def collect(plan: EvalPlan) -> list[dict]:
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
    rows = aggregate(results)
    synthetic = any(r.dataset.synthetic for r in results)
    write_json_atomic(Path(plan.out) / "results.json", {"backbone": results[0].backbone.model_dump(mode="json"),
                                                        "synthetic": synthetic, "runs": rows})
    return rows


def format_table(rows: list[dict]) -> str:
    """One block per task: protocol, seeds, then the card's columns as mean ± std (detection and
    keypoint AP headed mAP@[.5,.95])."""
    blocks = []
    for task in dict.fromkeys(r["task"] for r in rows):
        columns = task_card(task).metric.columns
        headers = ["task", "protocol", "seeds"] + [TABLE_HEADERS.get(c, c) for c in columns]
        lines = []
        for row in (r for r in rows if r["task"] == task):
            cells = [task, row["protocol"], str(len(row["seeds"]))]
            for key in columns:
                m = row["metrics"].get(key)
                if m is None:
                    cells.append("-")
                else:
                    cells.append(f"{m['mean']:.1f} ± {m['std']:.1f}" if len(row["seeds"]) > 1 else f"{m['mean']:.1f}")
            lines.append(cells)
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
        fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        blocks.append("\n".join([fmt(headers)] + [fmt(line) for line in lines]))
    return "\n\n".join(blocks)
