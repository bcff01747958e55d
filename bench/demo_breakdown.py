"""Where a finished demo's time went, cell by cell: training steps, checkpoint writes, prediction, scoring.

    python bench/demo_breakdown.py runs/demo [--repeat 3] [--threads 1]

Reads each cell of a finished `harness eval` output folder (`<task>/<protocol>/seed<N>/` with
`result.json`, `metrics.jsonl` and `checkpoint.pt`) and measures, in this process at `--threads`
torch threads (README's demo runs its two cells at once with one thread each):

- training: the cell's recorded wall time and the mean logged seconds per step (`metrics.jsonl`);
- checkpoint writes: how many the schedule made (every `checkpoint_period` iterations and the last)
  and the median time of writing the cell's final checkpoint again as the engine does (the whole
  resumable payload, `torch.save` into an atomic, fsynced file); they are part of the training time;
- prediction: the cell's model rebuilt from its card and checkpoint, predicting the whole test split
  through the kind's records code (the demo's path, batch 1);
- scoring: the kind's scorer on those records, whose metrics must equal the ones in `result.json`
  (to the last digit: same code, same thread count, so `--threads 2` for a demo run without the
  launcher); a cell that does not reproduce is flagged and the exit status is 1;
- start-up: importing what a cell process imports (`harness.runner`, torch, torchvision, timm), once.

Only random-initialised backbones (`random:<arch>`, the demo's) are rebuilt: a checkpoint's build
options are not in the result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def logged_step_seconds(metrics_path: Path) -> tuple[float, int]:
    """(seconds logged, iterations logged) from ``metrics.jsonl``: each line holds its window's mean."""
    total, previous, steps = 0.0, 0, 0
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        n = row["iter"] - previous
        total += row["time"] * n
        steps += n
        previous = row["iter"]
    return total, steps


def checkpoint_write_seconds(checkpoint: Path, repeat: int) -> tuple[float, float]:
    """(median seconds, MB) of writing ``checkpoint``'s payload again as the engine's checkpointer does."""
    import torch

    from harness.files import atomic_write

    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    times = []
    with tempfile.TemporaryDirectory(prefix="demo-breakdown-") as tmp:
        target = Path(tmp) / "checkpoint.pt"
        for _ in range(repeat):
            began = time.perf_counter()
            atomic_write(target, lambda f: torch.save(payload, f))
            times.append(time.perf_counter() - began)
        size = target.stat().st_size / 1e6
    return statistics.median(times), size


def predict_and_score(cell: Path, data_root: Path) -> dict:
    """Rebuild the cell's model, predict its test split and score it, timing both."""
    import torch

    from harness.cards import task_card
    from harness.checkpoints import load_backbone
    from harness.engine import predict
    from harness.kinds import KINDS
    from harness.protocols import apply_protocol
    from harness.results import read_result
    from harness.runner import score_predictions, task_data

    result = read_result(cell / "result.json")
    card = task_card(result.task)
    if card.card_hash != result.card_hash:
        raise SystemExit(f"error: {cell} was made with another {result.task} card than the installed one")
    if result.backbone.layout != "random":
        raise SystemExit(f"error: {cell} used a checkpoint backbone; only random:<arch> cells are rebuilt")
    kind = KINDS[card.model.kind]
    base = load_backbone(result.backbone.name, arch=result.backbone.arch)
    model_kwargs, _ = kind.settings(card, result.profile)
    model = kind.build_model(base, **model_kwargs)
    apply_protocol(model, base, result.protocol, world_size=1, device=torch.device("cpu"),
                   frozen_stages=card.model.frozen_stages)
    model.load_state_dict(torch.load(cell / "checkpoint.pt", map_location="cpu", weights_only=True)["model"])
    test = task_data(card, data_root, result.profile).test
    began = time.perf_counter()
    records = predict(model.eval(), test, postprocess=kind.postprocess(card, test), progress=False)
    predicted = time.perf_counter() - began
    began = time.perf_counter()
    metrics = score_predictions(card, test, records)
    scored = time.perf_counter() - began
    return {"result": result, "card": card, "images": len(test), "predict_s": predicted, "score_s": scored,
            "reproduced": metrics == result.metrics}


def startup_seconds() -> float:
    """Seconds for a fresh interpreter to import what a cell process imports."""
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import harness.runner, harness.kinds, timm"], check=True)
    return time.perf_counter() - began


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="a finished `harness eval` output folder (README's demo: runs/demo)")
    ap.add_argument("--data", type=Path, help="the data root (default: <out>/synthetic-data)")
    ap.add_argument("--repeat", type=int, default=3, help="checkpoint writes timed per cell (median)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (README's demo: one per cell)")
    ap.add_argument("--no-startup", action="store_true", help="skip timing a fresh interpreter's imports")
    args = ap.parse_args(argv)
    import torch

    from harness.errors import one_line_warnings

    torch.set_num_threads(args.threads)
    with one_line_warnings():
        return _breakdown(args)


def _breakdown(args: argparse.Namespace) -> int:
    from harness.runner import train_config

    data_root = args.data or args.out / "synthetic-data"
    cells = sorted(p.parent for p in args.out.glob("*/*/seed*/result.json"))
    if not cells:
        raise SystemExit(f"error: no finished cells (<task>/<protocol>/seed<N>/result.json) under {args.out}")
    rows, totals = [], {"training": 0.0, "checkpoints": 0.0, "predict": 0.0, "score": 0.0}
    for cell in cells:
        measured = predict_and_score(cell, data_root)
        result, card = measured["result"], measured["card"]
        iterations = result.training.iterations
        logged, logged_steps = logged_step_seconds(cell / "metrics.jsonl")
        period = train_config(card, result.profile, result.seed, result.training.batch_size).checkpoint_period
        writes = iterations // period + (iterations % period != 0)
        write_s, size = checkpoint_write_seconds(cell / "checkpoint.pt", args.repeat)
        name = "/".join(cell.parts[-3:])
        wall = result.training.wall_time_s
        rows.append((name, iterations, wall, logged / max(logged_steps, 1), writes, write_s, size,
                     measured["images"], measured["predict_s"], measured["score_s"], measured["reproduced"]))
        totals["training"] += wall
        totals["checkpoints"] += writes * write_s
        totals["predict"] += measured["predict_s"]
        totals["score"] += measured["score_s"]
        print(f"{name}: measured", flush=True)
    print("\n| cell | iterations | training s (recorded) | s per step (logged) | checkpoint writes | "
          "predict (test images, s) | score s | metrics reproduced |\n|---|---|---|---|---|---|---|---|")
    for (name, its, wall, step, writes, write_s, size, images, pred, score, same) in rows:
        print(f"| {name} | {its} | {wall:.0f} | {step:.3f} | {writes} x {write_s:.2f} s ({size:.0f} MB) = "
              f"{writes * write_s:.1f} s | {images}: {pred:.1f} s | {score:.2f} | {'yes' if same else 'NO'} |")
    start = 0.0 if args.no_startup else startup_seconds()
    cell_seconds = sum(totals.values()) - totals["checkpoints"] + len(rows) * start
    startup = "not timed" if args.no_startup else f"{start:.1f} s per cell process ({len(rows) * start:.0f} s)"
    print(f"\ntotals over {len(rows)} cells ({args.threads} thread(s)): training {totals['training']:.0f} s "
          f"(of which checkpoint writes {totals['checkpoints']:.1f} s), prediction {totals['predict']:.1f} s, "
          f"scoring {totals['score']:.1f} s, start-up {startup}; cell-seconds {cell_seconds:.0f}, of which "
          f"training {100 * totals['training'] / cell_seconds:.0f}%")
    return 0 if all(row[-1] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
