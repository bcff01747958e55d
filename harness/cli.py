"""The `harness` command: one subcommand per capability; user errors print as one line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import __version__
from harness.errors import HarnessError


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


# ----------------------------------------------------------------------------- data
def _cmd_data_synth(args: argparse.Namespace) -> int:
    from harness.datasets.synthetic import write_synthetic

    summary = write_synthetic(Path(args.out), seed=args.seed)
    _print_json(summary) if args.json else print(
        "\n".join(f"{name}: {info}" for name, info in summary.items())
    )
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from harness.datasets.roots import check_data_root, format_check

    rows = check_data_root(Path(args.root))
    if args.json:
        _print_json(rows)
    else:
        print(format_check(rows))
    return 0


# ----------------------------------------------------------------------------- backbones
def _cmd_inspect(args: argparse.Namespace) -> int:
    from harness.checkpoints import format_inspection, inspect_checkpoint

    report = inspect_checkpoint(args.backbone, arch=args.arch)
    if args.json:
        _print_json(report)
    else:
        print(format_inspection(report))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from harness.checkpoints import export_backbone

    out = export_backbone(args.backbone, arch=args.arch, to=args.to, out=Path(args.out))
    print(f"wrote {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="harness", description=__doc__)
    parser.add_argument("--version", action="version", version=f"harness {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score predictions made anywhere against ground truth")
    p.add_argument("--task", required=True, choices=["coco", "voc", "seg", "pose"])
    p.add_argument("--gt", required=True, help="ground truth: COCO JSON, or a VOCdevkit/VOC20xx folder")
    p.add_argument("--pred", required=True, help="predictions: COCO results JSON, or a folder of PNGs (seg)")
    p.add_argument("--split", default=None, help="VOC split (ImageSets list), e.g. test or val")
    p.add_argument("--year", default=None, help="VOC year when the --gt folder name does not say it")
    p.add_argument("--json", action="store_true", help="print one JSON object of metrics (percent)")
    p.set_defaults(func=_cmd_score)

    data = sub.add_parser("data", help="synthetic datasets and data-root checks")
    dsub = data.add_subparsers(dest="data_command", required=True)
    p = dsub.add_parser("synth", help="write small synthetic datasets in the real COCO/VOC layouts")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_data_synth)
    p = dsub.add_parser("check", help="report which standard datasets are present under a data root")
    p.add_argument("--root", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_data_check)

    p = sub.add_parser("inspect", help="detect a checkpoint's layout and account for every tensor")
    p.add_argument("--backbone", required=True, help="checkpoint file")
    p.add_argument("--arch", default=None, help="architecture, when the checkpoint does not name it")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("export", help="write a backbone checkpoint in another framework's layout")
    p.add_argument("--backbone", required=True)
    p.add_argument("--arch", default=None)
    p.add_argument("--to", required=True, choices=["detectron2", "torchvision", "mmdet"])
    p.add_argument("out")
    p.set_defaults(func=_cmd_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HarnessError as exc:
        message = " ".join(str(exc).split())  # always one line
        print(f"harness: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("harness: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
