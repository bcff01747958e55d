"""Measurement validity on the CPU (issue 5, point 6): does `harness pretrain` help, and does more
pretraining data help more?

    python bench/pretraining_validity.py --out /tmp/validity          # about 55 min on 2 idle cores

1. writes a multi-label pretraining set with `write_pretrain_synthetic` (same shape vocabulary as the
   synthetic downstream sets; label noise 0.1);
2. runs a scaling study (`harness.scaling.run_scaling`): ResNet-18 pretrained (AdamW, sigmoid loss) on
   nested fractions of it for the SAME number of iterations (only the data size changes), each evaluated on the scaling
   tasks with the smoke profile on `--synthetic` data, fit metric = a + b log10(images);
3. evaluates the fraction-1 backbone and a random initialisation on the comparison tasks (voc and
   seg, smoke profile, synthetic data, `--protocol`) and prints pretrained vs random on each primary
   metric. Figures: bench/README.md.

Everything is resumable (rerun the same command after an interruption). Prints the figures and
writes `<out>/validity.json`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pretraining-validity")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--images", type=int, default=4000, help="pretraining images written")
    ap.add_argument("--label-noise", type=float, default=0.1)
    ap.add_argument("--iterations", type=int, default=3000, help="pretraining iterations, the same at every fraction")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--optimizer", default="adamw", choices=("sgd", "adamw"))
    ap.add_argument("--lr", type=float, default=0.002)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--fractions", default="0.1,0.3,1")
    ap.add_argument("--scaling-tasks", default="seg")
    ap.add_argument("--compare-tasks", default="voc,seg")
    ap.add_argument("--protocol", default="frozen")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)

    from harness.cards import task_card
    from harness.datasets.synthetic import write_pretrain_synthetic
    from harness.pretrain import PretrainConfig
    from harness.plan import EvalPlan
    from harness.runner import run_eval
    from harness.scaling import ScalingPlan, parse_fractions, run_scaling

    out = Path(args.out)
    began = time.time()
    data = out / "pretrain-data"
    if not (data / "manifest.jsonl").is_file():
        write_pretrain_synthetic(data, size=args.images, label_noise=args.label_noise, seed=0,
                                 image_size=args.image_size)
    fractions = parse_fractions(args.fractions)
    template = PretrainConfig(data=str(data), arch=args.arch, out="", iterations=args.iterations,
                              batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, image_size=args.image_size,
                              workers=args.workers, checkpoint_period=100, device="cpu", progress=False)
    study = run_scaling(ScalingPlan(
        arch=args.arch, fractions=fractions, out=out / "study", data=str(data),
        tasks=[t for t in args.scaling_tasks.split(",") if t], protocols=[args.protocol], profile="smoke",
        seeds=args.seeds, synthetic=True, device="cpu", pretrain=template, progress=False,
    ))
    t_study = time.time() - began

    full = max(fractions)
    ckpt = out / "study" / "pretrain" / f"f{full:g}" / "backbone.safetensors"
    tasks = [t for t in args.compare_tasks.split(",") if t]
    compare = {}
    for name, backbone, folder in (("random", f"random:{args.arch}", out / "random"),
                                   ("pretrained", str(ckpt), out / "study" / "eval" / f"f{full:g}")):
        rows = run_eval(EvalPlan(backbone=backbone, arch=args.arch, tasks=tasks, protocols=[args.protocol],
                                 profile="smoke", synthetic=True, seeds=args.seeds, out=folder, device="cpu",
                                 progress=False))
        for row in rows:
            primary = task_card(row["task"]).metric.primary
            compare.setdefault(row["task"], {"metric": primary})[name] = row["metrics"][primary]

    print(f"\n== pretrained ({args.arch}, {study['points'][-1]['images']} images, {args.iterations} iterations) "
          f"vs random init: smoke profile, synthetic data, {args.protocol}, {args.seeds} seed(s)")
    for task, c in compare.items():
        r, p = c["random"]["mean"], c["pretrained"]["mean"]
        print(f"{task:<6} {c['metric']:<5} random {r:6.2f}   pretrained {p:6.2f}   difference {p - r:+6.2f}")
    print("\n== scaling study (same iterations at every fraction)")
    print(study["table"])
    print(f"\nwall time: study {t_study / 60:.1f} min, total {(time.time() - began) / 60:.1f} min")
    (out / "validity.json").write_text(json.dumps({
        "args": vars(args), "compare": compare, "points": study["points"], "fits": study["fits"],
        "wall_time_s": time.time() - began}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
