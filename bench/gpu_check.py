"""GPU check: the harness training step against a bare torchvision loop for every card's `full` settings.

    python bench/gpu_check.py [--out gpu_check.json] [--steps 4] [--warmup 2] [--tasks coco voc ...]
    python bench/gpu_check.py --tiny --out /tmp/gpu_check.json          # CPU, tiny images: kept working by the tests

For each task card (tasks/*.yaml) with its `full` model settings (sizes, heads; random-init
ResNet-50, finetune protocol) at a per-GPU batch of 2, and for each precision setting (fp32, TF32,
bf16 autocast; each with and without channels_last), it times:
  * the harness: `harness.engine.train` (data order, augmentation, loss all-reduce and NaN check,
    logging), seconds per step from its metrics.jsonl after `--warmup` steps;
  * a bare loop: forward, sum of losses, backward, SGD step on the same model and the same batches
    (the engine's shuffle and augmentation for the seed, prepared before its clock starts), under
    the same autocast and memory format;
  * peak memory (torch.cuda.max_memory_allocated of each side; --tiny: the process's peak RSS, which
    only grows) and prediction images/s (`harness.engine.predict`, batch 1, at the card's test size).
Data: `harness data synth` images with 480..640 px sides. Writes a table and a JSON file with one row
per card x setting. Aimed at finishing within 8 minutes on one H100 (about 30 settings of a few
steps each; not yet run on one).

--tiny runs on the CPU with one torch thread: tiny images (64..96 px, short side 64), timm's test_resnet
(a 0.37M-parameter ResNet with a res5 stage, so the C4 card's structure holds), 8 sampled RoIs per image
and 16 test proposals, 1 warm-up and 1 timed step, 2 prediction images, fp32 and bf16 autocast (the bare
loop inside an outer CPU torch.autocast, the engine with its own precision setting), channels_last on
and off. On a CPU without native bf16 (AVX512-BF16/AMX; an AMD EPYC here) bf16 convolutions take
torch's slow reference path: with ResNet-18 the --tiny run took 223 s there, with test_resnet 18 s.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DistributedSampler, Subset

from harness.backbones import build_backbone
from harness.cards import all_cards, task_card
from harness.datasets.synthetic import write_synthetic
from harness.batches import collate_pairs, sample_seed
from harness.engine import TrainConfig, predict, seed_everything, train
from harness.kinds import KINDS
from harness.protocols import apply_protocol
from harness.runner import task_data

BATCH = 2
SETTINGS_GPU = [(p, cl) for p in ("fp32", "tf32", "bf16") for cl in (False, True)]
SETTINGS_CPU = [(p, cl) for p in ("fp32", "bf16") for cl in (False, True)]


def tiny_settings(kind: str, model_kw: dict, aug_kw: dict) -> tuple[dict, dict]:
    """The card's model with tiny images and narrow heads (the structure stays the card's)."""
    if kind == "segmentation":
        return ({**model_kw, "neck_channels": 32, "aux_channels": 32, "test_min_size": 64, "max_size": 96},
                {**aug_kw, "crop_size": 64, "scale": (96, 64)})
    # few RoIs: the C4 card's box head is res5, run once per RoI; at the full 512 per image (and 1000 test
    # proposals) its 4 tiny rows took 100 of the 130 s of the whole --tiny run, at 32 and 50 still 36 of 49 s
    tiny = {**model_kw, "min_size": [64], "max_size": 96, "test_min_size": 64,
            "anchor_sizes": [16, 32, 64, 128, 256], "roi_batch_per_image": 8, "proposals_test": 16}
    if "neck_channels" in model_kw:  # an FPN card (the C4 model has no neck and its box head is res5)
        tiny.update(neck_channels=32, representation_size=64)
    if kind == "keypoints":
        tiny["keypoint_head_channels"] = 32
    return tiny, aug_kw


@contextlib.contextmanager
def precision(name: str, device: torch.device):
    """TF32 on or off for matmul and cuDNN; on the CPU, bf16 as an outer autocast around both sides."""
    if device.type == "cuda":
        old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = name == "tf32"
        try:
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    elif name == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def engine_batches(dataset, augment, steps: int, seed: int) -> list:
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(0)
    order = list(sampler)[: steps * BATCH]
    samples = [augment(*dataset[i], torch.Generator().manual_seed(sample_seed(seed, 0, i))) for i in order]
    return [collate_pairs(samples[s * BATCH:(s + 1) * BATCH]) for s in range(steps)]


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bare_seconds_per_step(model, batches, device, prec: str, channels_last: bool, warmup: int, seed: int) -> float:
    """Mean seconds per step after `warmup` steps: forward, sum of losses, backward, SGD step."""
    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9,
                                weight_decay=1e-4)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if prec == "bf16" and device.type == "cuda" else contextlib.nullcontext()
    seed_everything(seed)
    model.train()
    times = []
    for images, targets in batches:
        began = time.perf_counter()
        images = [im.to(device, non_blocking=True) for im in images]
        targets = [{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in t.items()} if isinstance(t, dict)
                   else t.to(device) for t in targets]
        with autocast:
            losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        float(loss.detach())  # the engine reads the losses every step too
        times.append(time.perf_counter() - began)
    return statistics.mean(times[warmup:])


def harness_seconds_per_step(model, dataset, augment, device, prec: str, channels_last: bool, steps: int,
                             warmup: int, seed: int, out: Path) -> tuple[float, str]:
    cfg = TrainConfig(iterations=steps, batch_size=BATCH, lr=0.01, warmup_iters=0, clip_grad_norm=None,
                      precision=_engine_precision(prec), tf32=prec == "tf32", channels_last=channels_last,
                      checkpoint_period=10**9, log_period=1, seed=seed)
    result = train(model, dataset, cfg, out, augment=augment, progress=False, desc="harness")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return statistics.mean(line["time"] for line in lines[warmup:]), result.precision


def _engine_precision(prec: str) -> str:
    """The engine's precision setting of a row (TF32 is fp32 with TF32 allowed)."""
    return "bf16" if prec == "bf16" else "fp32"


def predict_rate(model, test, device, prec: str, images: int) -> float:
    subset = Subset(test, range(min(images, len(test))))
    predict(model, Subset(test, [0]), batch_size=1, progress=False, precision=_engine_precision(prec))  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    began = time.perf_counter()
    predict(model, subset, batch_size=1, progress=False, precision=_engine_precision(prec))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return len(subset) / (time.perf_counter() - began)


def check(args) -> dict:
    device = torch.device("cpu" if args.tiny else "cuda")
    if args.tiny:
        torch.set_num_threads(1)  # on a shared CPU, two threads made each tiny step 6x slower
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device; use --tiny for the CPU check")
    tasks = args.tasks or list(all_cards())
    settings = SETTINGS_CPU if args.tiny else SETTINGS_GPU
    steps, warmup = (2, 1) if args.tiny else (args.warmup + args.steps, args.warmup)
    arch = "timm:test_resnet" if args.tiny else "resnet50"
    predict_images = 2 if args.tiny else args.predict_images
    began = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        n = BATCH * steps + 4  # spare images: training splits drop images without usable objects
        sides = {"min_side": 64, "max_side": 96} if args.tiny else {"min_side": 480, "max_side": 640}
        write_synthetic(root, seed=0, coco_train=n, coco_val=predict_images, voc07_trainval=n,
                        voc07_test=predict_images, voc12_train=n, voc12_val=predict_images,
                        voc12_aug_extra=0, **sides)
        for task in tasks:
            card = task_card(task)
            data = task_data(card, root, "full")
            kind = KINDS[card.model.kind]
            model_kw, aug_kw = kind.settings(card, "full")
            if args.tiny:
                model_kw, aug_kw = tiny_settings(card.model.kind, model_kw, aug_kw)
            torch.manual_seed(0)
            backbone = build_backbone(arch)
            base = kind.build_model(backbone, **model_kw)
            augment = kind.train_augment(backbone, **aug_kw)
            batches = engine_batches(data.train, augment, steps, seed=0)
            apply_protocol(base, base.backbone, "finetune", world_size=1, device=device)
            for prec, channels_last in settings:
                with precision(prec, device):
                    reset_peak(device)
                    bare = bare_seconds_per_step(copy.deepcopy(base), batches, device, prec, channels_last, warmup, 0)
                    bare_mem = peak_memory_mb(device)
                    model = copy.deepcopy(base)
                    reset_peak(device)
                    ours, reported = harness_seconds_per_step(model, data.train, augment, device, prec, channels_last,
                                                              steps, warmup, 0, Path(tmp) / f"{task}-{prec}-{channels_last}")
                    ours_mem = peak_memory_mb(device)
                    rate = predict_rate(model, data.test, device, prec, predict_images)
                del model
                row = {"task": task, "precision": prec, "channels_last": channels_last, "engine_precision": reported,
                       "harness_s_per_step": ours, "bare_s_per_step": bare,
                       "harness_images_per_s": BATCH / ours, "bare_images_per_s": BATCH / bare,
                       "harness_over_bare": bare / ours, "harness_peak_mb": ours_mem, "bare_peak_mb": bare_mem,
                       "predict_images_per_s": rate}
                rows.append(row)
                print(format_row(row), flush=True)
    return {
        "mode": "tiny (CPU)" if args.tiny else "full",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "python": sys.version.split()[0], "backbone": arch, "per_gpu_batch": BATCH,
        "timed_steps": steps - warmup, "warmup_steps": warmup,
        "memory": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS of the process (grows only)",
        "wall_time_s": time.perf_counter() - began, "rows": rows,
    }


HEADER = (f"{'task':<8} {'precision':<9} {'ch_last':<7} {'harness img/s':>13} {'bare img/s':>10} {'ratio':>6} "
          f"{'harness MB':>10} {'bare MB':>8} {'predict img/s':>13}")


def format_row(row: dict) -> str:
    return (f"{row['task']:<8} {row['precision']:<9} {str(row['channels_last']):<7} {row['harness_images_per_s']:>13.2f} "
            f"{row['bare_images_per_s']:>10.2f} {row['harness_over_bare']:>6.3f} {row['harness_peak_mb']:>10.0f} "
            f"{row['bare_peak_mb']:>8.0f} {row['predict_images_per_s']:>13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per setting (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--predict-images", type=int, default=4)
    parser.add_argument("--tasks", nargs="+", help="card names (default: every card in tasks/)")
    parser.add_argument("--tiny", action="store_true", help="CPU, tiny images, timm's test_resnet: checks the script runs")
    args = parser.parse_args()
    print(HEADER, flush=True)
    report = check(args)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"{len(report['rows'])} rows in {report['wall_time_s']:.0f} s on {report['device']}; written to {args.out}")


if __name__ == "__main__":
    main()
