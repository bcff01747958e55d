"""The `harness` command: one subcommand per capability; user errors print as one line."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

from harness import __version__
from harness.errors import HarnessError, one_line, one_line_warnings, user_message


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


# ----------------------------------------------------------------------------- score
def _cmd_score(args: argparse.Namespace) -> int:
    from harness.score import format_metrics_table, score_files

    metrics = score_files(args.task, gt=args.gt, pred=args.pred, split=args.split, year=args.year)
    if args.json:
        _print_json(metrics)
    else:
        print(format_metrics_table(args.task, metrics))
    return 0


# ----------------------------------------------------------------------------- eval
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _cmd_eval(args: argparse.Namespace) -> int:
    from harness.launch import LaunchOptions, launch
    from harness.plan import EvalPlan, format_table

    plan = EvalPlan(
        backbone=args.backbone, arch=args.arch, tasks=_csv(args.tasks), protocols=_csv(args.protocols),
        profile=args.profile, data_root=Path(args.data_root) if args.data_root else None, synthetic=args.synthetic,
        seeds=args.seeds, out=Path(args.out), device=args.device, batch_size=args.batch_size,
        workers=args.workers, progress=not args.no_progress, accumulate=args.accumulate, precision=args.precision,
        dry_run=args.dry_run, checkpoint_options=_checkpoint_opts(args),
    )
    opts = LaunchOptions(**{k: getattr(args, k) for k in (
        "launcher", "max_parallel", "partition", "nodes", "gpus_per_node", "cpus_per_gpu", "mem", "time", "account",
        "qos", "constraint", "signal_delay", "wait", "poll")})
    rows = launch(plan, opts)
    if rows:  # rank 0
        print(format_table(rows))
        print(f"results: {plan.out / 'results.json'}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from harness.launch import show_status
    from harness.plan import format_table

    if args.poll <= 0:
        raise HarnessError(f"--poll must be a positive number of seconds, got {args.poll}")
    rows = show_status(Path(args.out), watch=args.watch, poll=args.poll)
    if rows:  # every cell done: collected
        print(format_table(rows))
        print(f"results: {Path(args.out) / 'results.json'}")
    return 0


def _add_launch_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the cells run (one job per task x protocol x seed)")
    g.add_argument("--launcher", default="inprocess",
                   help="inprocess (one after another in this process group; default), local (parallel jobs on "
                   "this machine) or slurm (one job array)")
    g.add_argument("--max-parallel", type=int, default=None,
                   help="cells at once (local default: one per GPU, 1 on the CPU; slurm: the array's %%K)")
    g.add_argument("--partition", default=None, help="SLURM partition (required for slurm)")
    g.add_argument("--nodes", type=int, default=None, help="SLURM nodes per cell (default 1)")
    g.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs (one process each) per node and cell (default: slurm 8, local 1)")
    g.add_argument("--cpus-per-gpu", type=int, default=None, help="SLURM CPUs per GPU process (default 6)")
    g.add_argument("--mem", default=None, help="SLURM memory per node, e.g. 64G")
    g.add_argument("--time", default=None, help="time limit per job: 4h, 90m, 1-00:00:00 (slurm default 4h); "
                   "a cell reaching it is checkpointed and requeued")
    g.add_argument("--account", default=None, help="SLURM account")
    g.add_argument("--qos", default=None, help="SLURM quality of service")
    g.add_argument("--constraint", default=None, help="SLURM node constraint, e.g. a100")
    g.add_argument("--signal-delay", type=int, default=None,
                   help="seconds before the time limit at which a job checkpoints and requeues (default 120)")
    g.add_argument("--wait", action="store_true", help="slurm: show a live table of the cells until all end")
    g.add_argument("--poll", type=float, default=None, help="slurm --wait: seconds between status checks (default 10)")


# ----------------------------------------------------------------------------- data
def _cmd_data_synth(args: argparse.Namespace) -> int:
    from harness.datasets.synthetic import DEFAULT_SIZES, write_pretrain_synthetic, write_synthetic

    pretrain_only = {"--size": args.size, "--label-noise": args.label_noise, "--image-size": args.image_size}
    if args.pretrain:
        if args.sizes:
            raise HarnessError("--sizes sets the COCO/VOC sets; with --pretrain use --size and --image-size")
        manifest = write_pretrain_synthetic(Path(args.out), size=1000 if args.size is None else args.size,
                                            label_noise=args.label_noise or 0.0, seed=args.seed,
                                            image_size=128 if args.image_size is None else args.image_size)
        print(manifest)
        return 0
    given = [flag for flag, value in pretrain_only.items() if value is not None]
    if given:  # the COCO/VOC sets would be written as if they were not there
        raise HarnessError(f"{given[0]} is for --pretrain (a pretraining set); the COCO/VOC sets take --sizes")
    sizes = {}
    for item in _csv(args.sizes or ""):
        key, _, value = item.partition("=")
        if key not in DEFAULT_SIZES or not value.strip().isdigit():
            raise HarnessError(f"--sizes: bad entry {item!r}; use KEY=N with KEY in {', '.join(DEFAULT_SIZES)}")
        sizes[key] = int(value)
    summary = write_synthetic(Path(args.out), seed=args.seed, **sizes)
    _print_json(summary) if args.json else print(
        "\n".join(f"{name}: {info}" for name, info in summary.items())
    )
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from harness.datasets.roots import check_data_root, format_check

    rows = check_data_root(Path(args.root), registry=args.registry)
    if args.json:
        _print_json(rows)
    else:
        print(format_check(rows))
    wrong = [r["name"] for r in rows if r["wrong"]]
    if wrong:
        print(f"harness: error: wrong image counts in {', '.join(wrong)} (listed above)", file=sys.stderr)
        return 1
    if not any(r["present"] for r in rows):  # `harness data check && harness eval ...` must not go on
        print(f"harness: error: no standard dataset is complete under {args.root} (`harness data get`)", file=sys.stderr)
        return 1
    return 0


def _cmd_data_get(args: argparse.Namespace) -> int:
    from harness.datasets.get import get_data
    from harness.datasets.roots import check_data_root, format_check

    done = get_data(args.datasets, Path(args.root), mirrors=args.mirror, registry=args.registry,
                    progress=not args.no_progress)
    print(format_check(check_data_root(Path(args.root), registry=args.registry)))
    print(f"done: {', '.join(done)} under {args.root}")
    return 0


# ----------------------------------------------------------------------------- backbones
def _checkpoint_opts(args: argparse.Namespace) -> dict:
    """Options shared by inspect and export (see harness.checkpoints.match_checkpoint)."""
    return {
        "key": args.key,
        "prefix": args.prefix,
        "normalization": args.normalization,
        "allow_missing": args.allow_missing,
        "allow_unexpected": args.allow_unexpected,
        "unsafe_load": args.unsafe_load,
    }


def _checkpoint_file(spec: str) -> str:
    """``--backbone`` of inspect and export, which read a file: a backbone card's name is refused with
    where the card's file is (or will be, once `harness eval` has fetched it)."""
    from harness.cards import all_backbone_cards, is_card_name
    from harness.fetch import cache_dir

    card = all_backbone_cards().get(spec) if is_card_name(spec) else None
    if card is None:
        return spec
    path = cache_dir() / "backbones" / card.name / card.file_name
    where = f"its file is {path}" if path.is_file() else f"`harness eval --backbone {spec}` downloads its file to {path}"
    raise HarnessError(f"{spec} is a backbone card, not a checkpoint file; {where}")


def _cmd_inspect(args: argparse.Namespace) -> int:
    from harness.checkpoints import format_inspection, inspect_checkpoint

    report = inspect_checkpoint(_checkpoint_file(args.backbone), arch=args.arch, **_checkpoint_opts(args))
    if args.json:
        _print_json(report)
    else:
        print(format_inspection(report))
    if not report["ok"]:  # incomplete match: the lists are above, the one-line reason on stderr
        print(f"harness: error: {one_line(report['summary'])}", file=sys.stderr)
        return 2
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from harness.checkpoints import export_backbone

    out = export_backbone(_checkpoint_file(args.backbone), arch=args.arch, to=args.to, out=Path(args.out),
                          **_checkpoint_opts(args))
    print(f"wrote {out}")
    return 0


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", default=None, help="checkpoint entry holding the weights (e.g. student, model_ema; a/b if nested)")
    p.add_argument("--prefix", default=None, help="encoder key prefix, when several complete encoders are present")
    p.add_argument("--normalization", default=None,
                   help="override the input normalization: imagenet, caffe, inception, clip or a JSON object "
                        '{"mean": [...], "std": [...], "channel_order": "RGB"} in 0-255 pixel units')
    p.add_argument("--allow-missing", action="store_true",
                   help="deliberate partial load: architecture tensors absent from the checkpoint stay random")
    p.add_argument("--allow-unexpected", action="store_true",
                   help="deliberate partial load: checkpoint tensors that match nothing are not loaded")
    p.add_argument("--unsafe-load", action="store_true",
                   help="DANGEROUS: full pickle load of a file the safe loader refused; it can run arbitrary code "
                   "from the file. Only for files you trust")


def _cmd_backbones_list(args: argparse.Namespace) -> int:
    from harness.cards import all_backbone_cards, backbone_cards_dir

    cards = all_backbone_cards()
    if args.json:
        _print_json({name: card.model_dump(mode="json") for name, card in cards.items()})
        return 0
    rows = [("name", "arch", "layout", "pretraining", "images", "checksum", "licence")]
    for card in cards.values():
        p = card.pretraining
        rows.append((card.name, card.arch, card.layout, f"{p.method} on {p.data}", f"{p.images:,}",
                     card.checksum or "pinned on first download", card.licence))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    print(f"{len(cards)} backbone card(s) in {backbone_cards_dir()}")
    return 0


def _cmd_tasks_list(args: argparse.Namespace) -> int:
    from harness.cards import all_cards, cards_dir

    cards = all_cards()
    for name, card in cards.items():
        print(f"{name:<10} {card.card_hash[:12]}  {', '.join(card.profiles)}  {card.description}")
    print(f"{len(cards)} task card(s) in {cards_dir()}")
    return 0


# ----------------------------------------------------------------------------- pretrain / scaling
def _pretrain_config(args: argparse.Namespace, out: str):
    from harness.pretrain import PretrainConfig

    if args.epochs is None and args.iterations is None:
        args.epochs = 1.0
    return PretrainConfig(
        data=args.data, arch=args.arch, out=out, loss=args.loss, fraction=getattr(args, "fraction", 1.0),
        subset_seed=args.subset_seed, data_format=args.format, hierarchy=args.hierarchy, classes=args.classes,
        epochs=args.epochs, iterations=args.iterations, batch_size=args.pretrain_batch_size,
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, warmup_iters=args.warmup_iters,
        image_size=args.image_size,
        min_scale=args.min_scale, seed=args.pretrain_seed, workers=args.workers, checkpoint_period=args.checkpoint_period,
        device=args.device, progress=not args.no_progress, normalization=args.normalization,
    )


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from harness.distributed import is_main_process
    from harness.pretrain import pretrain

    cfg = _pretrain_config(args, args.out)
    if args.work_dir:
        cfg.work_dir = args.work_dir
    record = pretrain(cfg)
    if is_main_process():
        t = record["training"]
        print(f"{args.out}: {record['arch']} on {record['images']} of {record['total_images']} images "
              f"(fraction {record['fraction']:g}), {record['num_classes']} labels, {record['loss']} loss, "
              f"{t['iterations']} iterations of batch {t['batch_size']}, final loss "
              f"{t['final_losses'].get('loss', float('nan')):.4f}")
    return 0


def _cmd_scaling(args: argparse.Namespace) -> int:
    from harness.scaling import ScalingPlan, parse_checkpoints, parse_fractions, run_scaling

    plan = ScalingPlan(
        arch=args.arch, fractions=parse_fractions(args.fractions), out=Path(args.out), data=args.data,
        tasks=_csv(args.tasks), protocols=_csv(args.protocols), profile=args.profile, seeds=args.seeds,
        synthetic=args.synthetic, data_root=Path(args.data_root) if args.data_root else None, device=args.device,
        batch_size=args.batch_size, checkpoints=parse_checkpoints(args.checkpoints),
        pretrain=_pretrain_config(args, "") if args.data else None, confidence=args.confidence,
        progress=not args.no_progress,
    )
    summary = run_scaling(plan)
    if "table" in summary:  # rank 0
        print(summary["table"])
        print(f"study: {plan.out / 'scaling.json'}, {plan.out / 'scaling.md'}, {plan.out / 'scaling.png'}")
    return 0


def _add_pretrain_args(p: argparse.ArgumentParser, prefix: str = "") -> None:
    """Pretraining options; ``prefix`` (scaling: "pretrain-") keeps --batch-size/--seed for evaluation."""
    g = p.add_argument_group("pretraining")
    g.add_argument("--format", default=None, choices=["imagefolder", "manifest", "wds"],
                   help="data format (default: detected from --data)")
    g.add_argument("--loss", default="auto", choices=["auto", "sigmoid", "softmax"],
                   help="auto: softmax for an ImageFolder tree, per-label sigmoid otherwise")
    g.add_argument("--hierarchy", default=None, help='label hierarchy JSON {"child": "parent" or [parents]}')
    g.add_argument("--classes", default=None, help="class names, one per line (fixes the order; .cls indices)")
    g.add_argument("--subset-seed", type=int, default=0, help="salt of the subset hash (subsets stay nested)")
    sched = g.add_mutually_exclusive_group()
    sched.add_argument("--epochs", type=float, default=None, help="passes over the subset (default 1)")
    sched.add_argument("--iterations", type=int, default=None, help="optimizer steps (same for every fraction)")
    g.add_argument(f"--{prefix}batch-size", dest="pretrain_batch_size", type=int, default=256,
                   help="total pretraining batch (default 256)")
    g.add_argument("--optimizer", choices=("sgd", "adamw"), default="sgd",
                   help="SGD with momentum 0.9 (the paper's) or AdamW")
    g.add_argument("--lr", type=float, default=None, help="default: sgd 0.1 x batch / 256, adamw 1e-3")
    g.add_argument("--weight-decay", type=float, default=None, help="default: sgd 1e-4, adamw 0.05")
    g.add_argument("--warmup-iters", type=int, default=None, help="default 5%% of the iterations, at most 1000")
    g.add_argument("--image-size", type=int, default=224, help="training crop side")
    g.add_argument("--min-scale", type=float, default=0.35, help="smallest crop area of the random resized crop")
    g.add_argument("--normalization", default=None, help="input normalization recorded in the checkpoint (default imagenet)")
    g.add_argument(f"--{prefix}seed", dest="pretrain_seed", type=int, default=0, help="initialisation and data-order seed")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers that decode and augment (with shards, "
                   "each streams its own shards; default: 4 on CUDA, 0 on the CPU)")
    g.add_argument("--checkpoint-period", type=int, default=1000, help="iterations between resumable checkpoints")


# ----------------------------------------------------------------------------- leaderboard
def _cmd_leaderboard_submit(args: argparse.Namespace) -> int:
    from harness.leaderboard import leaderboard_dir, submit

    path, notes = submit(args.results, leaderboard_dir(args.dir), force=args.force, name=args.name,
                         pretraining_data=args.pretraining_data, pretraining_images=args.pretraining_images,
                         paper=args.paper, checkpoint_url=args.checkpoint_url, code=args.code, hardware=args.hardware)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {path}")
    return 0


def _cmd_leaderboard_validate(args: argparse.Namespace) -> int:
    from harness.leaderboard import leaderboard_dir, submission_files, validate

    board = leaderboard_dir(args.dir)
    files = [Path(f) for f in args.files] or submission_files(board)
    errors, notes, subs = validate(files, board)
    for note in notes:
        print(f"note: {note}")
    for error in errors:
        print(error, file=sys.stderr)
    if errors:
        print(f"{len(errors)} problem(s) in {len(files)} file(s)", file=sys.stderr)
        return 1
    print(f"{len(subs)} submission(s) valid")
    return 0


def _cmd_leaderboard_render(args: argparse.Namespace) -> int:
    from harness.leaderboard import leaderboard_dir
    from harness.leaderboard_render import stale_files, write_render

    board = leaderboard_dir(args.dir)
    if args.check:
        stale = stale_files(board)
        for path in stale:
            print(f"{path}: differs from a fresh render", file=sys.stderr)
        if stale:
            print("run `harness leaderboard render` and commit the result", file=sys.stderr)
            return 1
        print("leaderboard is up to date")
        return 0
    for path in write_render(board):
        print(f"wrote {path}")
    return 0


def _cmd_leaderboard_make_reference(args: argparse.Namespace) -> int:
    from harness.nightly import make_reference

    ref = make_reference(Path(args.results), sigmas=args.sigmas, floor=args.floor)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(ref.model_dump_json(indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def _cmd_leaderboard_check_reference(args: argparse.Namespace) -> int:
    from harness.nightly import check_reference, load_reference

    checks = check_reference(Path(args.results), load_reference(Path(args.reference)))
    for check in checks:
        print(check)
    failed = [c for c in checks if c.failed]
    if failed:
        print(f"{len(failed)} of {len(checks)} check(s) outside the reference ({args.reference})", file=sys.stderr)
        return 1
    print(f"all {len(checks)} check(s) within tolerance of {args.reference}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a usage mistake as one line that names the help to read, not the usage block."""

    def error(self, message):
        self.exit(2, f"harness: error: {one_line(message)} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="harness", description=__doc__)
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score predictions made anywhere against ground truth")
    p.add_argument("--task", required=True,
                   help="a task card's name (tasks/*.yaml, `harness tasks list`); it is scored as its kind scores")
    p.add_argument("--gt", required=True, help="ground truth: COCO JSON, or a VOCdevkit/VOC20xx folder")
    p.add_argument("--pred", required=True, help="predictions: COCO results JSON, or a folder of PNGs (seg)")
    p.add_argument("--split", default=None, help="VOC split (ImageSets list), e.g. test or val")
    p.add_argument("--year", default=None, help="VOC year when the --gt folder name does not say it")
    p.add_argument("--json", action="store_true", help="print one JSON object of metrics (percent)")
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("eval", help="transfer a backbone to the task cards' tasks and score it")
    p.add_argument("--backbone", required=True,
                   help="checkpoint file, a known backbone's name (`harness backbones list`), or random:<arch>")
    p.add_argument("--arch", default=None, help="architecture, when the checkpoint does not name it")
    p.add_argument("--tasks", default="coco,voc,seg,pose",
                   help="comma-separated task cards (tasks/*.yaml; default: coco,voc,seg,pose)")
    p.add_argument("--protocols", default="finetune,frozen", help="finetune, frozen, or both (default: both)")
    p.add_argument("--profile", default="full", choices=["full", "short", "smoke"],
                   help="the cards' schedule: full (the public config; default), short or smoke")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--data-root", default=None, help="folder with coco/, VOCdevkit/, SBD/ (default: $HARNESS_DATA)")
    where.add_argument("--synthetic", action="store_true", help="use `harness data synth` data (not for the leaderboard)")
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (0..N-1; default 1); mean ± std is reported")
    p.add_argument("--out", default="runs/default", help="run folder (default: runs/default); finished runs in it are skipped")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--batch-size", type=int, default=None,
                   help="total batch; keeps the card's epochs: iterations, steps and warmup scale inversely, lr "
                        "linearly (the result is marked off-protocol)")
    p.add_argument("--accumulate", type=int, default=1,
                   help="micro-batches per step (gradient accumulation): the card's total batch in less memory")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16", "fp16"],
                   help="default: the card's (fp32 for full profiles; another one is marked off-protocol)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved plan, then train 2 steps and predict 2 images per cell; writes no results")
    p.add_argument("--workers", type=int, default=None,
                   help="data-loading processes per training process (default: 4 on CUDA, 0 on the CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_checkpoint_args(p)
    _add_launch_args(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("status", help="the cells of a launched eval: pending, running, done, failed; collects when done",
                       description="The table of an eval's cells; collects results.json when all are done. "
                       "Exits 2 when a cell failed.")
    p.add_argument("--out", required=True, help="the eval's run folder")
    p.add_argument("--watch", action="store_true", help="refresh until no cell is pending or running")
    p.add_argument("--poll", type=float, default=10.0, help="seconds between refreshes with --watch")
    p.set_defaults(func=_cmd_status)

    data = sub.add_parser("data", help="get the standard datasets, synthetic datasets, data-root checks")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("synth", help="write small synthetic datasets in the real COCO/VOC layouts")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", default=None, help="overrides, e.g. coco_train=400,voc07_trainval=100,max_side=256")
    p.add_argument("--pretrain", action="store_true", help="write a multi-label pretraining set (manifest.jsonl)")
    p.add_argument("--size", type=int, default=None, help="pretraining images (with --pretrain; default 1000)")
    p.add_argument("--label-noise", type=float, default=None, help="fraction of corrupted labels (with --pretrain; default 0)")
    p.add_argument("--image-size", type=int, default=None, help="pretraining image side (with --pretrain; default 128)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_data_synth)
    p = dsub.add_parser("check", help="report which standard datasets are present under a data root")
    p.add_argument("--root", required=True)
    p.add_argument("--registry", default=None, help="data registry YAML (default: the shipped one, or $HARNESS_DATA_REGISTRY)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_data_check)
    p = dsub.add_parser("get", help="download, verify and unpack standard datasets into a data root")
    p.add_argument("datasets", nargs="+", help="coco, coco-keypoints, voc2007, voc2012, sbd (needs voc2012), or all")
    p.add_argument("--root", required=True, help="data root (then --data-root or $HARNESS_DATA for eval)")
    p.add_argument("--mirror", action="append", default=[], metavar="BASE_URL",
                   help="try BASE_URL/<archive name> before the registry's sources (repeatable)")
    p.add_argument("--registry", default=None, help="data registry YAML (default: the shipped one, or $HARNESS_DATA_REGISTRY)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_data_get)

    p = sub.add_parser("inspect", help="detect a checkpoint's layout and account for every tensor")
    p.add_argument("--backbone", required=True, help="checkpoint file (or random:ARCH)")
    p.add_argument("--arch", default=None, help="architecture, when the checkpoint does not name it")
    p.add_argument("--json", action="store_true")
    _add_checkpoint_args(p)
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export", help="write a backbone checkpoint in another framework's layout")
    p.add_argument("--backbone", required=True, help="checkpoint file (or random:ARCH)")
    p.add_argument("--arch", default=None)
    p.add_argument("--to", required=True, choices=["detectron2", "torchvision", "mmdet"])
    p.add_argument("out")
    _add_checkpoint_args(p)
    p.set_defaults(func=_cmd_export)

    bsub = sub.add_parser("backbones", help="known public checkpoints (backbone cards)").add_subparsers(
        dest="backbones_command", required=True)
    p = bsub.add_parser("list", help="list the backbone cards (`harness eval --backbone NAME`)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_backbones_list)
    tsub = sub.add_parser("tasks", help="task cards").add_subparsers(dest="tasks_command", required=True)
    p = tsub.add_parser("list", help="list the task cards (name, card hash, profiles)")
    p.set_defaults(func=_cmd_tasks_list)

    p = sub.add_parser("pretrain", help="pretrain a backbone on labelled images (ImageFolder, manifest, WebDataset)")
    p.add_argument("--data", required=True, help="ImageFolder root, .jsonl/.csv manifest (or its folder), or .tar shards")
    p.add_argument("--arch", required=True, help="architecture, e.g. resnet50")
    p.add_argument("--fraction", type=float, default=1.0, help="hash subset of the images (nested: 0.1 inside 0.3)")
    p.add_argument("--out", required=True, help="output checkpoint (harness format, e.g. ckpt.safetensors)")
    p.add_argument("--work-dir", default=None, help="resumable training folder (default: <out stem>.run/)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_pretrain_args(p)
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("scaling", help="pretraining-data size -> transfer metric: pretrain, evaluate, fit, plot")
    p.add_argument("--data", default=None, help="pretraining data (as for pretrain); needed unless --checkpoints covers all")
    p.add_argument("--arch", required=True)
    p.add_argument("--fractions", required=True, help="e.g. 0.01,0.03,0.1,0.3,1")
    p.add_argument("--checkpoints", default=None, help="given checkpoints: FRACTION=PATH,... (pretrain the rest)")
    p.add_argument("--tasks", default="voc,seg", help="comma-separated task cards (default: voc,seg)")
    p.add_argument("--protocols", default="finetune,frozen", help="finetune, frozen, or both (default: both)")
    p.add_argument("--profile", default="short", choices=["full", "short", "smoke"],
                   help="the cards' schedule (default: short)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--data-root", default=None, help="downstream data root (default: $HARNESS_DATA)")
    where.add_argument("--synthetic", action="store_true", help="downstream on `harness data synth` data")
    p.add_argument("--seeds", type=int, default=1, help="evaluation seeds per fraction (error bars, fit over all)")
    p.add_argument("--batch-size", type=int, default=None, help="evaluation batch; the learning rate scales linearly")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence level of the interval on the slope")
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"], help="default: cuda when available")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_pretrain_args(p, prefix="pretrain-")
    p.set_defaults(func=_cmd_scaling)

    board = sub.add_parser("leaderboard", help="submissions -> validated table (Markdown, CSV, HTML); nightly reference")
    lsub = board.add_subparsers(dest="leaderboard_command", required=True)
    p = lsub.add_parser("submit", help="write leaderboard/submissions/<name>.json from a run's results.json")
    p.add_argument("--results", required=True, help="runs/NAME/results.json (its per-seed result.json files beside it)")
    p.add_argument("--name", required=True, help="display name, unique on the leaderboard")
    p.add_argument("--pretraining-data", required=True, help="pretraining data set, e.g. ImageNet-1k, JFT-300M")
    p.add_argument("--pretraining-images", type=int, default=None, help="pretraining data size in images")
    p.add_argument("--paper", default=None, help="URL of the paper")
    p.add_argument("--checkpoint-url", default=None, help="URL the checkpoint can be downloaded from")
    p.add_argument("--code", default=None, help="URL of the pretraining code")
    p.add_argument("--hardware", default=None, help="free text, e.g. '8x A100 40GB'")
    p.add_argument("--dir", default="leaderboard", help="leaderboard folder (default: ./leaderboard)")
    p.add_argument("--force", action="store_true", help="replace an existing submission of the same name")
    p.set_defaults(func=_cmd_leaderboard_submit)
    p = lsub.add_parser("validate", help="check submissions (reads JSON only; never loads a checkpoint)")
    p.add_argument("files", nargs="*", help="submission files (default: every leaderboard/submissions/*.json)")
    p.add_argument("--dir", default="leaderboard")
    p.set_defaults(func=_cmd_leaderboard_validate)
    p = lsub.add_parser("render", help="write README.md, leaderboard.csv, index.html and schema.json")
    p.add_argument("--dir", default="leaderboard")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 when the committed files are stale")
    p.set_defaults(func=_cmd_leaderboard_render)
    p = lsub.add_parser("make-reference", help="record a >=3-seed run as the nightly reference")
    p.add_argument("--results", required=True)
    p.add_argument("--out", required=True, help="e.g. leaderboard/reference/resnet50.json")
    p.add_argument("--sigmas", type=float, default=3.0, help="tolerance in standard errors of the difference")
    p.add_argument("--floor", type=float, default=0.2, help="smallest tolerance, in metric points")
    p.set_defaults(func=_cmd_leaderboard_make_reference)
    p = lsub.add_parser("check-reference", help="compare a run with a reference; exit 1 outside the tolerances")
    p.add_argument("--results", required=True)
    p.add_argument("--reference", required=True)
    p.set_defaults(func=_cmd_leaderboard_check_reference)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with one_line_warnings():
            return args.func(args)
    except HarnessError as exc:
        print(f"harness: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `harness ... | head`: the reader has had what it wanted
        with contextlib.suppress(OSError, ValueError):  # the interpreter's last flush of stdout must not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports a program stopped by a closed pipe
    except OSError as exc:  # a path that is a file where a folder is needed, a read-only place, a full disk
        print(f"harness: error: {user_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
