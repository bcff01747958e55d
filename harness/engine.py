"""Training and prediction loops shared by every task.

``train``: SGD with momentum (or AdamW, for pretraining), linear warmup + multi-step decay per
iteration (detectron2's WarmupMultiStepLR), AMP on CUDA (bf16 where supported, else fp16 with a GradScaler; fp32 on the
CPU), optional gradient clipping, a stop with ``HarnessError`` on a non-finite loss, periodic
atomic checkpoints that a rerun resumes from (bit-identical to an uninterrupted run on the CPU),
``metrics.jsonl`` and a tqdm bar on rank 0. DDP when the world size is above 1. It is a loop
over a ``TrainStep`` with a ``Checkpointer`` (``harness.checkpointer``: fingerprint, RNG states,
atomic save, resume) and a ``MetricsLog`` (the logging window, ``metrics.jsonl``).

Reproducibility: the data order of epoch ``e`` is a DistributedSampler permutation seeded by
``(seed, e)``; each sample's augmentation draws from a generator seeded by ``(seed, e, index)``;
everything else random (RPN/RoI sampling, multi-scale choice) uses the global RNGs, whose states
(python, numpy, torch, CUDA; per rank) are saved in every checkpoint. The data order and the
handoff from loader workers live in ``harness.batches``.

``predict``: this rank's shard ``range(rank, N, world_size)`` (no padding, no duplicate), gathered
on rank 0 in dataset order (``harness.distributed.gather_predictions``).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler
from tqdm import tqdm

from harness.batches import (IndexedSubset, ScheduleBatches, TrainView, collate_indexed, collate_pairs, loader_batches,
                             to_cpu, to_device)
from harness.checkpointer import Checkpointer
from harness.distributed import DistEnv, all_reduce_mean, current_env, gather_predictions, shard_indices
from harness.errors import HarnessError
from harness.protocols import is_norm

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("fp32", "bf16", "fp16")

# settings that do not change the trained weights; a resume may differ in them
NOT_FINGERPRINTED = ("checkpoint_period", "log_period", "num_workers")


@dataclass
class TrainConfig:
    """One training schedule. ``batch_size`` is the total over all processes; ``lr`` is used as
    given (scale it with the batch before, and record it). Iterations count optimizer steps."""

    iterations: int
    batch_size: int
    lr: float
    optimizer: str = "sgd"  # or "adamw" (betas 0.9, 0.999; decoupled weight decay)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 1e-4
    weight_decay_norm: float = 0.0  # detectron2's WEIGHT_DECAY_NORM
    warmup_iters: int = 1000
    warmup_factor: float = 0.001
    schedule: str = "multistep"  # or "poly" (segmentation: mmseg's PolyLR)
    steps: Sequence[int] = ()  # multistep: multiply by gamma at each
    gamma: float = 0.1
    poly_power: float = 0.9  # poly: (1 - it / iterations) ** poly_power, floored at poly_min_lr
    poly_min_lr: float = 0.0  # mmseg's PolyLR eta_min (0.x: lr_config min_lr)
    clip_grad_norm: float | None = None
    precision: str = "fp32"  # fp32 | bf16 (autocast; CPU too) | fp16 (CUDA autocast + GradScaler)
    tf32: bool = True  # fp32 matmuls/convs may use TF32 on Ampere+ GPUs (cuDNN's default for convs)
    accumulate: int = 1  # micro-batches per optimizer step (batch_size stays the total per step)
    precise_bn_iters: int = 0  # detectron2's PreciseBN: recompute BatchNorm statistics at the end
    seed: int = 0
    checkpoint_period: int = 1000
    log_period: int = 20
    num_workers: int = 0
    channels_last: bool = False
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        self.steps = tuple(int(s) for s in self.steps)
        problems = []
        if self.iterations < 1:
            problems.append(f"iterations={self.iterations} (must be >= 1)")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} (must be >= 1)")
        if not self.lr > 0:
            problems.append(f"lr={self.lr} (must be > 0)")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r} ({' or '.join(OPTIMIZERS)})")
        if self.schedule not in ("multistep", "poly"):
            problems.append(f"schedule={self.schedule!r} (multistep or poly)")
        if list(self.steps) != sorted(self.steps):
            problems.append(f"steps={list(self.steps)} (must be increasing)")
        if self.warmup_iters < 0 or self.checkpoint_period < 1 or self.log_period < 1:
            problems.append("warmup_iters >= 0, checkpoint_period >= 1 and log_period >= 1 are required")
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            problems.append(f"clip_grad_norm={self.clip_grad_norm} (must be > 0 or None)")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r} ({', '.join(PRECISIONS)})")
        if self.accumulate < 1 or self.precise_bn_iters < 0:
            problems.append("accumulate >= 1 and precise_bn_iters >= 0 are required")
        if problems:
            raise HarnessError("bad training schedule: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        """From a card's schedule section; unknown or missing keys are a user error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise HarnessError(f"unknown training setting(s): {', '.join(unknown)}")
        missing = sorted(n for n in ("iterations", "batch_size", "lr") if n not in values)
        if missing:
            raise HarnessError(f"training schedule lacks {', '.join(missing)}")
        return cls(**values)

    def as_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["steps"] = list(self.steps)
        return out


@dataclass
class TrainResult:
    """What a ``train`` call did (for the result record)."""

    iterations: int
    start_iteration: int
    batch_size: int
    per_process_batch: int
    world_size: int
    device: str
    precision: str
    wall_time: float  # seconds spent training in this call
    accumulate: int = 1
    precise_bn_iters: int = 0
    final_losses: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- small pieces
def default_loader_workers(device: torch.device) -> int:
    """Data-loading processes per training process when none are given: 4 on CUDA (the GPU must not
    wait for JPEG decoding), 0 on the CPU (the model already uses every core)."""
    return 4 if device.type == "cuda" else 0


def lr_factor(cfg: TrainConfig, iteration: int) -> float:
    """Multiplier of ``cfg.lr`` at 0-based ``iteration``: linear warmup from ``warmup_factor`` times
    either ``gamma`` per passed step (detectron2's WarmupMultiStepLR) or the poly decay
    ``(1 - it/iterations)**poly_power`` from ``lr`` to ``poly_min_lr`` (mmsegmentation's PolyLR)."""
    if cfg.schedule == "poly":
        decay = (1 - min(iteration, cfg.iterations) / cfg.iterations) ** cfg.poly_power
        factor = ((cfg.lr - cfg.poly_min_lr) * decay + cfg.poly_min_lr) / cfg.lr
    else:
        factor = cfg.gamma ** bisect.bisect_right(cfg.steps, iteration)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over :func:`param_groups` (weight decay per group)."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr)
    return torch.optim.SGD(param_groups(model, cfg), lr=cfg.lr, momentum=cfg.momentum)


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Trainable parameters (each once): norm-layer parameters get ``weight_decay_norm``."""
    norm_ids = {id(p) for m in model.modules() if is_norm(m) for p in m.parameters(recurse=False)}
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if id(p) in norm_ids else decay).append(p)
    if not decay and not no_decay:
        raise HarnessError("nothing to train: every parameter of the model is frozen")
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": cfg.weight_decay_norm})
    return [g for g in groups if g["params"]]


def native_bf16() -> bool:
    """True when the CUDA device computes in bf16 natively (Ampere and later); older GPUs only
    emulate it, slowly, so they get fp16 with a gradient scaler instead."""
    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch < 2.3 has no emulation and no argument
        return torch.cuda.is_bf16_supported()


def default_precision(device: torch.device) -> str:
    """Mixed precision where it pays: bf16 on GPUs that compute it natively, else fp16 on CUDA;
    fp32 on the CPU (used by pretraining; the task cards set their own precision)."""
    if device.type != "cuda":
        return "fp32"
    return "bf16" if native_bf16() else "fp16"


def amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on ``device`` (None: fp32, no autocast). bf16 runs
    on the CPU too (PyTorch's CPU autocast); fp16 needs CUDA; bf16 on a GPU without native bf16 is
    refused rather than emulated slowly."""
    if precision not in PRECISIONS:
        raise HarnessError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return None
    if precision == "fp16" and device.type != "cuda":
        raise HarnessError("precision fp16 needs a CUDA device (use bf16 or fp32 on the CPU)")
    if precision == "bf16" and device.type == "cuda" and not native_bf16():
        raise HarnessError("this GPU has no native bf16: use --precision fp16 or fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


def set_tf32(allowed: bool) -> None:
    """Let fp32 matmuls and convolutions use TF32 tensor cores (Ampere and later) or not."""
    torch.backends.cuda.matmul.allow_tf32 = allowed
    torch.backends.cudnn.allow_tf32 = allowed


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _fingerprint(cfg: TrainConfig, world_size: int, num_images: int) -> dict:
    fp = {k: v for k, v in cfg.as_dict().items() if k not in NOT_FINGERPRINTED}
    fp.update(world_size=world_size, dataset_size=num_images)
    return fp


class TrainingStopped(Exception):
    """``train`` stopped early on request at ``iteration``, its checkpoint written (a rerun resumes)."""

    def __init__(self, iteration: int, checkpoint: Path):
        super().__init__(f"training stopped at iteration {iteration}; checkpoint {checkpoint}")
        self.iteration, self.checkpoint = iteration, checkpoint


def _any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any (ranks must stop at the same step)."""
    return all_reduce_mean(torch.tensor([float(flag)], device=device)).item() > 0


class MetricsLog:
    """``metrics.jsonl``: every ``period`` iterations and at the ``last``, one line with the mean of each
    loss over the window since the previous line, the learning rate and the seconds per iteration.
    The open ``window`` goes into the checkpoint, so a resumed run writes the lines an uninterrupted
    one does. Only ``write=True`` (rank 0) touches the file."""

    def __init__(self, path: Path, period: int, last: int, window: dict | None = None, write: bool = True):
        self.path, self.period, self.last, self.write = path, period, last, write
        self.window = window or {"sums": {}, "count": 0, "time": 0.0}
        self._file, self._tick = None, 0.0

    def truncate(self, upto: int) -> None:
        """Keep only the lines of iterations <= ``upto`` (a killed run may have logged past its checkpoint)."""
        if not self.write:
            return
        keep = []
        if upto > 0 and self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    if json.loads(line)["iter"] <= upto:
                        keep.append(line)
                except (ValueError, KeyError, TypeError):
                    continue
        self.path.write_text("".join(line + "\n" for line in keep))

    def open(self) -> None:
        self._tick = time.perf_counter()
        if self.write:
            self._file = open(self.path, "a", buffering=1)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def record(self, iteration: int, losses: dict[str, float], lr: float) -> None:
        now = time.perf_counter()
        window = self.window
        for k, v in losses.items():
            window["sums"][k] = window["sums"].get(k, 0.0) + v
        window["count"] += 1
        window["time"] += now - self._tick
        self._tick = now
        if iteration % self.period == 0 or iteration == self.last:
            n = window["count"]
            line = {"iter": iteration, **{k: s / n for k, s in window["sums"].items()}, "lr": lr,
                    "time": window["time"] / n}
            if self._file is not None:
                self._file.write(json.dumps(line) + "\n")
            self.window = {"sums": {}, "count": 0, "time": 0.0}


@dataclass
class TrainStep:
    """One optimizer step on one per-process batch: forward and backward (``cfg.accumulate`` micro-batches),
    the losses averaged over ranks (every rank sees the same values, so all stop together on a
    non-finite one), clipping, then the optimizer, scaler and scheduler steps."""

    net: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    cfg: TrainConfig
    device: torch.device
    dtype: torch.dtype | None

    def __call__(self, images: list, targets: list, iteration: int) -> dict[str, float]:
        """Returns ``{"loss": total, name: value, ...}``; ``iteration`` (1-based) names a divergence."""
        self.optimizer.zero_grad(set_to_none=True)
        losses = accumulate_gradients(self.net, images, targets, self.cfg.accumulate, self.device, self.dtype,
                                      self.scaler)
        loss = sum(losses.values())
        stats = torch.stack([loss.float()] + [v.float() for v in losses.values()])
        named = dict(zip(["loss", *losses.keys()], all_reduce_mean(stats).tolist()))
        bad = {k: v for k, v in named.items() if not math.isfinite(v)}
        if bad:
            terms = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise HarnessError(
                f"training diverged at iteration {iteration}: non-finite loss ({terms}); no result written "
                "(lower the learning rate, set clip_grad_norm, or check the backbone checkpoint)"
            )
        if self.cfg.clip_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return named


def _sampler(dataset: Dataset, cfg: TrainConfig, env: DistEnv) -> tuple[DistributedSampler, int, int]:
    """This rank's sampler, its batch size and the batches per epoch; an impossible split is a user error."""
    world = env.world_size
    if cfg.batch_size % (world * cfg.accumulate):
        raise HarnessError(f"batch size {cfg.batch_size} is not divisible by the world size {world} "
                           f"x {cfg.accumulate} accumulation step(s)")
    per_rank = cfg.batch_size // world
    sampler = DistributedSampler(dataset, num_replicas=world, rank=env.rank, shuffle=True, seed=cfg.seed)
    batches_per_epoch = len(sampler) // per_rank
    if batches_per_epoch == 0:
        raise HarnessError(f"the training set has {len(dataset)} images, fewer than one batch per process ({per_rank})")
    return sampler, per_rank, batches_per_epoch


def _loader(view: TrainView, batches: ScheduleBatches, num_workers: int, pin_memory: bool = False) -> Iterable:
    return loader_batches(view, collate_pairs, num_workers, batch_sampler=batches, pin_memory=pin_memory,
                    generator=torch.Generator())  # keeps the DataLoader off the global RNG


def _distributed(model: nn.Module, cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """``model`` in DistributedDataParallel when there is more than one process."""
    if env.world_size == 1:
        return model
    return DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
                                   find_unused_parameters=cfg.find_unused_parameters)


# ----------------------------------------------------------------------------- train
def train(
    model: nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    augment: Callable | None = None,
    env: DistEnv | None = None,
    progress: bool = True,
    desc: str = "train",
    identity: dict | None = None,
    groups: Sequence[int] | None = None,
    stop_requested: Callable[[], bool] | None = None,
    batches: Callable[[int], Iterable] | None = None,
) -> TrainResult:
    """Train ``model`` (in place; call ``apply_protocol`` first) on ``dataset`` for ``cfg.iterations``.

    ``dataset[i]`` is ``(image, target)``; ``augment(image, target, generator)`` runs per sample.
    ``out_dir/checkpoint.pt`` is written every ``checkpoint_period`` iterations and at the end; if it
    exists when ``train`` starts, training resumes from it (or returns at once when it is complete).
    A checkpoint made under other settings (schedule, seed, world size, dataset size, and what
    ``identity`` names: the runner passes task card, protocol, profile and backbone) is refused.
    ``groups`` (one id per dataset index) batches images of one group together (aspect ratio).
    ``stop_requested()`` (e.g. set by a preemption signal) is polled after every step; when it is true on
    any rank, every rank stops at that step, the checkpoint is written and ``TrainingStopped`` is raised.
    ``batches(start)`` (streamed data) gives this rank's ``(images, targets)`` batches of iterations
    ``start`` .. ``cfg.iterations``, augmented, instead of the schedule's batches of ``dataset``.
    """
    env = env or current_env()
    device, out = env.device, Path(out_dir)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
    sampler, per_rank, batches_per_epoch = _sampler(dataset, cfg, env)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(cfg, it))
    autocast_dtype = amp_dtype(cfg.precision, device)
    if device.type == "cuda":
        set_tf32(cfg.tf32)
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype == torch.float16)
    fingerprint = {**_fingerprint(cfg, env.world_size, len(dataset)), **(identity or {}), "grouped": groups is not None}
    checkpointer = Checkpointer(out / CHECKPOINT_NAME, fingerprint, env, model=model, optimizer=optimizer,
                                scheduler=scheduler, scaler=scaler)

    state = checkpointer.resume()
    if state is None:
        seed_everything(cfg.seed + env.rank)
    start = state["iteration"] if state else 0
    metrics = MetricsLog(out / METRICS_NAME, cfg.log_period, cfg.iterations, state and state["window"], env.is_main)
    metrics.truncate(start)
    result = TrainResult(
        iterations=cfg.iterations, start_iteration=start, batch_size=cfg.batch_size, per_process_batch=per_rank,
        world_size=env.world_size, device=str(device), precision=cfg.precision, wall_time=0.0,
        accumulate=cfg.accumulate, precise_bn_iters=cfg.precise_bn_iters,
    )
    if start >= cfg.iterations:
        return result

    net = _distributed(model, cfg, env)
    step = TrainStep(net, optimizer, scheduler, scaler, cfg, device, autocast_dtype)
    model.train()
    view = TrainView(dataset, augment, cfg.seed)
    loader = batches(start) if batches is not None else _loader(
        view, ScheduleBatches(sampler, per_rank, start, cfg.iterations, groups), cfg.num_workers,
        pin_memory=device.type == "cuda")
    began = time.perf_counter()
    bar = tqdm(total=cfg.iterations, initial=start, desc=desc, disable=not (progress and env.is_main),
               dynamic_ncols=True, smoothing=0.05)
    metrics.open()
    try:
        for it, (images, targets) in enumerate(loader, start + 1):
            lr = optimizer.param_groups[0]["lr"]
            result.final_losses = losses = step(images, targets, it)
            metrics.record(it, losses, lr)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            if it == cfg.iterations and cfg.precise_bn_iters:
                bn_batches = ScheduleBatches(sampler, per_rank, it, it + cfg.precise_bn_iters, groups)
                precise_bn(net, _loader(view, bn_batches, cfg.num_workers), device, autocast_dtype)
            stop = stop_requested is not None and _any_rank(stop_requested(), device)
            if it % cfg.checkpoint_period == 0 or it == cfg.iterations or stop:
                checkpointer.save(it, batches_per_epoch, metrics.window)
            if stop and it < cfg.iterations:
                raise TrainingStopped(it, checkpointer.path)
    finally:
        bar.close()
        metrics.close()
    result.wall_time = time.perf_counter() - began
    return result


def accumulate_gradients(net: nn.Module, images: list, targets: list, steps: int, device: torch.device,
                         dtype: torch.dtype | None, scaler) -> dict:
    """Forward and backward one per-process batch as ``steps`` equal micro-batches (gradient
    accumulation: each loss is divided by ``steps``; DDP synchronises on the last one only).
    Returns the detached losses averaged over the micro-batches."""
    size = len(images) // steps
    totals: dict = {}
    for k in range(steps):
        chunk = slice(k * size, (k + 1) * size)
        sync = k == steps - 1 or not isinstance(net, DistributedDataParallel)
        with contextlib.nullcontext() if sync else net.no_sync():
            with _autocast(device, dtype):
                losses = net([im.to(device, non_blocking=True) for im in images[chunk]],
                             [to_device(t, device) for t in targets[chunk]])
            scaler.scale(sum(losses.values()) / steps).backward()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + value.detach() / steps
    return totals


@torch.no_grad()
def precise_bn(net: nn.Module, loader: Iterable, device: torch.device, dtype: torch.dtype | None) -> int:
    """detectron2's PreciseBN: replace the running statistics of every BatchNorm that trains (in
    training mode) by their average over the batches of ``loader`` (forward passes in training
    mode, no gradient). Frozen BatchNorms (eval mode) are untouched. Returns how many it set."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    try:
        for images, targets in loader:
            with _autocast(device, dtype):
                net([im.to(device) for im in images], [to_device(t, device) for t in targets])
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
    return len(norms)


# ----------------------------------------------------------------------------- predict
def default_postprocess(output: Any, target: Any) -> Any:
    """The output on the CPU (a task kind passes its own ``postprocess``: harness.kinds)."""
    return to_cpu(output)


@torch.inference_mode()
def predict(
    model: nn.Module,
    dataset: Dataset,
    *,
    env: DistEnv | None = None,
    batch_size: int = 1,
    postprocess: Callable[[Any, Any], Any] | None = None,
    num_workers: int = 0,
    precision: str = "fp32",
    progress: bool = True,
    desc: str = "predict",
) -> list | None:
    """Predictions for every image of ``dataset``, in dataset order, on rank 0 (``None`` elsewhere).

    Each rank runs its shard ``range(rank, N, world_size)``; ``postprocess(output, target)`` turns one
    image's output into a picklable record (default: ``default_postprocess``). ``batch_size`` 1 (the
    default, detectron2's) makes every prediction independent of the world size: batching pads images
    to a common size, which changes the features near the border.
    """
    env = env or current_env()
    if isinstance(model, DistributedDataParallel):
        model = model.module
    postprocess = postprocess or default_postprocess
    was_training = model.training
    model.to(env.device).eval()
    indices = shard_indices(len(dataset), env.rank, env.world_size)
    loader = loader_batches(IndexedSubset(dataset, indices), collate_indexed, num_workers, batch_size=batch_size, shuffle=False,
                      pin_memory=env.device.type == "cuda")
    records = []
    autocast_dtype = amp_dtype(precision, env.device)
    try:
        with tqdm(total=len(indices), desc=desc, disable=not (progress and env.is_main), dynamic_ncols=True) as bar:
            for idxs, images, targets in loader:
                with _autocast(env.device, autocast_dtype):
                    outputs = model([im.to(env.device, non_blocking=True) for im in images])
                for index, output, target in zip(idxs, outputs, targets):
                    records.append((index, postprocess(output, target)))
                bar.update(len(idxs))
    finally:
        model.train(was_training)
    return gather_predictions(records, num_items=len(dataset))
