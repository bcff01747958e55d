"""Where the cells of `harness eval` run: in this process (``inprocess``, today's loop), as parallel
jobs on this machine (``local``: submitit's LocalExecutor), or as one SLURM job array (``slurm``).

A launched cell is a ``CellJob`` (a submitit ``Checkpointable``). It holds ``<cell>/lock.json`` naming
its job while it runs; a stop signal (SIGTERM, SIGUSR1, or submitit's SIGUSR2 before the time limit)
makes the engine stop at the next step boundary and write its checkpoint, then submitit's checkpoint
hook requeues the job, which resumes from that checkpoint to the same final weights.
``<out>/launch.json`` records the plan and each cell's job, so `harness status` and a rerun of the
same command can show the table, resubmit failed cells and collect finished ones into results.json.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import submitit

from harness.cards import task_card
from harness.datasets.synthetic import write_synthetic_once
from harness.errors import HarnessError, one_line, one_line_warnings, user_message
from harness.files import sha256_file, write_json_atomic
from harness.plan import EvalPlan, check_plan, collect, run_dir, synthetic_data_dir

LAUNCHERS = ("inprocess", "local", "slurm")
LAUNCH_FILE = "launch.json"
LOCK_FILE = "lock.json"
FAILED_FILE = "failed.json"
JOBS_DIR = "jobs"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
MAX_TIMEOUTS = 50  # requeues after reaching the time limit (preemptions do not count)
PROGRESS_EVERY = 60.0  # seconds between lines on the running cells' progress while the table is unchanged
SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING",
               "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESV_DEL_HOLD"}


@dataclass
class LaunchOptions:
    """Where and how the cells run; ``None`` = the launcher's default."""

    launcher: str = "inprocess"
    max_parallel: int | None = None  # cells at once; local: GPUs // gpus_per_node, or 1 on the CPU
    partition: str | None = None
    nodes: int | None = None  # slurm: nodes per cell (default 1)
    gpus_per_node: int | None = None  # default: slurm 8, local 1 (0 on a CPU-only machine)
    cpus_per_gpu: int | None = None  # slurm: CPUs per training process (default 6: 4 loaders + 2)
    mem: str | None = None  # slurm: memory per node, e.g. 64G
    time: str | None = None  # a duration: 4h, 90m, 1-00:00:00 (slurm default 4h)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    signal_delay: int | None = None  # seconds between the stop signal and the kill (default 120)
    wait: bool = False
    poll: float | None = None  # slurm --wait: seconds between status checks (default 10)


SLURM_ONLY = ("partition", "nodes", "cpus_per_gpu", "mem", "account", "qos", "constraint")


# ----------------------------------------------------------------------------- options
def parse_duration(text: str) -> int:
    """Minutes in ``4h``, ``90m``, ``1h30m``, ``2d``, ``45s`` (rounded up), SLURM's ``1-00:00:00``,
    ``D-HH``, ``HH:MM:SS``, ``MM:SS`` or a bare number of minutes."""
    t = text.strip().lower()
    units = re.fullmatch(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m(?:in)?)?(?:(\d+)s)?", t)
    if units and any(units.groups()):
        d, h, m, s = (int(g or 0) for g in units.groups())
        minutes = d * 1440 + h * 60 + m + (s + 59) // 60
    else:
        clock = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", t)
        if not clock:
            raise HarnessError(f"--time {text!r} is not a duration (e.g. 4h, 90m, 1-00:00:00)")
        d, a, b, c = clock.groups()
        parts = [int(x) for x in (a, b, c) if x is not None]
        if d is not None:  # D-HH, D-HH:MM, D-HH:MM:SS
            h, m, s = (parts + [0, 0])[:3]
            minutes = int(d) * 1440 + h * 60 + m + (s + 59) // 60
        elif len(parts) == 3:
            minutes = parts[0] * 60 + parts[1] + (parts[2] + 59) // 60
        elif len(parts) == 2:
            minutes = parts[0] + (parts[1] + 59) // 60
        else:
            minutes = parts[0]
    if minutes < 1:
        raise HarnessError(f"--time {text!r} is shorter than a minute")
    return minutes


def check_options(opts: LaunchOptions) -> None:
    """One-line errors for options that cannot work, before anything is submitted."""
    if opts.launcher not in LAUNCHERS:
        raise HarnessError(f"unknown launcher {opts.launcher!r}: use {', '.join(LAUNCHERS)}")
    if opts.launcher != "slurm":
        given = [f"--{n.replace('_', '-')}" for n in SLURM_ONLY if getattr(opts, n) is not None]
        if given:
            raise HarnessError(f"{', '.join(given)} only apply to --launcher slurm")
    if opts.launcher == "inprocess":
        given = [f for f, v in (("--max-parallel", opts.max_parallel), ("--gpus-per-node", opts.gpus_per_node),
                                ("--time", opts.time), ("--signal-delay", opts.signal_delay)) if v is not None]
        if opts.wait:
            given.append("--wait")
        if given:
            raise HarnessError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --launcher local or slurm")
    if opts.launcher == "slurm" and not opts.partition:
        raise HarnessError("--launcher slurm needs --partition")
    for flag, value, least in (("--nodes", opts.nodes, 1), ("--max-parallel", opts.max_parallel, 1),
                               ("--gpus-per-node", opts.gpus_per_node, 0), ("--cpus-per-gpu", opts.cpus_per_gpu, 1),
                               ("--signal-delay", opts.signal_delay, 1)):
        if value is not None and value < least:
            raise HarnessError(f"{flag} must be at least {least}")
    if opts.mem is not None and not re.fullmatch(r"\d+[KMGT]?", opts.mem.strip().upper()):
        raise HarnessError(f"--mem {opts.mem!r} is not a SLURM memory size (e.g. 64G, 500M)")
    if opts.time is not None:
        parse_duration(opts.time)
    if opts.poll is not None and not (opts.launcher == "slurm" and opts.wait):
        raise HarnessError("--poll only applies with --launcher slurm --wait")
    if opts.poll is not None and not opts.poll > 0:
        raise HarnessError(f"--poll must be a positive number of seconds, not {opts.poll}")


def cpu_threads(parallel: int) -> int:
    """Threads per cell when ``parallel`` cells share this machine's cores."""
    return max(1, len(os.sched_getaffinity(0)) // parallel)


# ----------------------------------------------------------------------------- cells, jobs, locks
def cells_of(plan: EvalPlan) -> list[tuple[str, str, int]]:
    return [(t, p, s) for t in plan.tasks for p in plan.protocols for s in range(plan.seeds)]


def cell_name(cell) -> str:
    return f"{cell[0]}/{cell[1]}/seed{cell[2]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie has ended
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def slurm_states(job_ids) -> dict[str, str]:
    """SLURM state of each listed job that squeue still knows (array elements one by one)."""
    bases = sorted({str(j).split("_")[0] for j in job_ids})
    if not bases:
        return {}
    if shutil.which("squeue") is None:
        raise HarnessError("squeue not found: the state of SLURM jobs needs SLURM's client tools on PATH")
    done = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", ",".join(bases)], capture_output=True, text=True)
    if done.returncode != 0 and "invalid job id" not in done.stderr.lower():
        raise HarnessError(f"squeue failed: {one_line(done.stderr) or done.returncode}")
    states = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2:
            states[parts[0]] = parts[1].upper()
    return states


def job_alive(launcher: str, job_id: str, host: str | None, states: dict | None = None) -> bool:
    """Whether a job is pending or running: a local job's controller process, a SLURM job in squeue."""
    if launcher == "local":
        if host not in (None, socket.gethostname()):
            return True  # another machine's process: cannot be checked from here, so not taken over
        return _pid_alive(int(job_id))
    states = slurm_states([job_id]) if states is None else states
    return states.get(str(job_id)) in SLURM_ALIVE


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def acquire_lock(cell_dir: Path, me: dict) -> bool:
    """Take ``cell_dir/lock.json`` for job ``me`` (launcher, job_id, host, log). False when another live
    job holds it; a dead job's lock is taken over with one line saying so; our own (a requeued job) is kept."""
    cell_dir.mkdir(parents=True, exist_ok=True)
    path = cell_dir / LOCK_FILE
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            held = _read_json(path)
            if held is None:
                time.sleep(0.2)  # being written
                held = _read_json(path) or {}
            if held.get("job_id") == me["job_id"] and held.get("launcher") == me["launcher"]:
                write_json_atomic(path, me)  # our own job, requeued: now in this process
                return True
            if held and job_alive(held.get("launcher", "slurm"), str(held.get("job_id")), held.get("host")):
                print(f"{cell_dir}: locked by live job {held.get('job_id')}, skipped", flush=True)
                return False
            print(f"{cell_dir}: stale lock of job {held.get('job_id')} (no longer running) taken over by job "
                  f"{me['job_id']}", flush=True)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return True
    return False


def release_lock(cell_dir: Path, job_id: str) -> None:
    held = _read_json(cell_dir / LOCK_FILE)
    if held is not None and held.get("job_id") == job_id:
        (cell_dir / LOCK_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- the job
def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {user_message(exc)}"[:500]


class CellJob(submitit.helpers.Checkpointable):
    """One cell as a submitit job; ``checkpoint`` (submitit's hook) resubmits it unchanged, and the
    resubmitted job resumes from the engine's checkpoint."""

    def __init__(self, plan: EvalPlan, task: str, protocol: str, seed: int, threads: int | None = None):
        self.plan, self.task, self.protocol, self.seed, self.threads = plan, task, protocol, seed, threads

    def checkpoint(self, *args, **kwargs):
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)

    def __call__(self) -> str:
        from harness.engine import TrainingStopped
        from harness.runner import run_cell

        job = submitit.JobEnvironment()
        if self.threads:
            import torch

            os.environ["OMP_NUM_THREADS"] = str(self.threads)
            torch.set_num_threads(self.threads)
        if job.num_tasks > 1:  # rank, world size and master address from the job for init_distributed
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        name = f"{self.task}/{self.protocol}/seed{self.seed}"
        cell_dir = run_dir(self.plan.out, self.task, self.protocol, self.seed)
        me = {"launcher": "local" if job.cluster == "local" else "slurm", "job_id": job.job_id,
              "host": socket.gethostname(), "pid": os.getpid(), "log": str(job.paths.stdout),
              "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        stop = threading.Event()
        previous = {}

        def request_stop(signum, frame):
            print(f"{name}: caught {signal.Signals(signum).name}; stopping at the next step boundary", flush=True)
            stop.set()

        for sig in STOP_SIGNALS:  # before the lock: a signal from then on is never lost
            previous[sig] = signal.signal(sig, request_stop)
        if job.global_rank == 0:
            if not acquire_lock(cell_dir, me):
                return "skipped"
            (cell_dir / FAILED_FILE).unlink(missing_ok=True)
        try:
            with one_line_warnings():  # the job's log shows them as the CLI does
                run_cell(self.plan, self.task, self.protocol, self.seed, stop_requested=stop.is_set)
        except TrainingStopped as stopped:
            print(f"{name}: stopped at iteration {stopped.iteration}, checkpoint written; requeueing job "
                  f"{job.job_id}", flush=True)
            usr = job._usr_sig()
            hook = previous.get(usr)
            if not callable(hook):
                raise
            hook(usr, None)  # submitit's handler: calls self.checkpoint(), requeues and exits (rank 0)
            return "stopped"  # other ranks: the requeue restarts them
        except Exception as exc:
            if job.global_rank == 0:
                write_json_atomic(cell_dir / FAILED_FILE, {"job_id": job.job_id, "error": _one_line(exc), "log": me["log"]})
                release_lock(cell_dir, job.job_id)
            raise
        if job.global_rank == 0:
            release_lock(cell_dir, job.job_id)
        return "done"


# ----------------------------------------------------------------------------- status
@dataclass
class CellStatus:
    cell: tuple[str, str, int]
    state: str  # done, running, pending, failed, not submitted
    job_id: str | None = None
    log: str | None = None
    error: str | None = None


def read_launch(out: Path) -> dict:
    path = Path(out) / LAUNCH_FILE
    if not path.is_file():
        raise HarnessError(f"{path} not found: no launched eval in {out}")
    record = _read_json(path)
    if not (isinstance(record, dict) and isinstance(record.get("plan"), dict) and isinstance(record.get("cells"), dict)):
        raise HarnessError(f"{path} is not a launch record (JSON with 'plan' and 'cells'): written by another tool?")
    return record


def plan_of(record: dict) -> EvalPlan:
    fields = dict(record["plan"])
    for key in ("out", "data_root"):
        if fields.get(key) is not None:
            fields[key] = Path(fields[key])
    return EvalPlan(**fields)


def cell_states(plan: EvalPlan, record: dict | None) -> list[CellStatus]:
    """The state of every cell of the plan, from its files and the jobs of ``record`` (launch.json)."""
    jobs = (record or {}).get("cells", {})
    launcher = (record or {}).get("launcher", "slurm")
    locks = {c: _read_json(run_dir(plan.out, *c) / LOCK_FILE) for c in cells_of(plan)}
    ids = [j["job_id"] for j in jobs.values()] + [lk["job_id"] for lk in locks.values() if lk and lk.get("launcher") == "slurm"]
    states = slurm_states(ids) if launcher == "slurm" or any(lk and lk.get("launcher") == "slurm" for lk in locks.values()) else {}
    out = []
    for cell in cells_of(plan):
        folder = run_dir(plan.out, *cell)
        job = jobs.get(cell_name(cell))
        lock = locks[cell]
        if (folder / "result.json").is_file():
            out.append(CellStatus(cell, "done", job and job["job_id"], job and job.get("log")))
            continue
        if lock and job_alive(lock.get("launcher", "slurm"), str(lock["job_id"]), lock.get("host"), states):
            queued = states.get(str(lock["job_id"])) in ("PENDING", "REQUEUED", "REQUEUE_HOLD")  # requeued
            out.append(CellStatus(cell, "pending" if queued else "running", str(lock["job_id"]), lock.get("log")))
            continue
        failed = _read_json(folder / FAILED_FILE)
        if job is not None:
            alive = job_alive(launcher, job["job_id"], job.get("host"), states)
            if alive:
                queued = launcher == "slurm" and states.get(job["job_id"]) in ("PENDING", "REQUEUED", "REQUEUE_HOLD")
                out.append(CellStatus(cell, "pending" if queued else "running", job["job_id"], job.get("log")))
                continue
            error = failed["error"] if failed and failed.get("job_id") == job["job_id"] else "job ended without a result"
            out.append(CellStatus(cell, "failed", job["job_id"], job.get("log"), error))
            continue
        if failed:
            out.append(CellStatus(cell, "failed", failed.get("job_id"), failed.get("log"), failed.get("error")))
        elif lock:
            out.append(CellStatus(cell, "failed", str(lock["job_id"]), lock.get("log"), "its job ended without a result"))
        else:
            out.append(CellStatus(cell, "not submitted"))
    return out


def format_status(statuses: list[CellStatus]) -> str:
    headers = ["cell", "state", "job", "log"]
    rows = [[cell_name(s.cell), s.state, s.job_id or "-", s.log or "-"] for s in statuses]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [headers] + rows]
    counts = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    lines.append(", ".join(f"{n} {state}" for state, n in counts.items()))
    for s in statuses:
        if s.state == "failed":
            lines.append(f"{cell_name(s.cell)} failed in job {s.job_id}: {s.error} (log: {s.log})")
    return "\n".join(lines)


def cell_iterations(plan: EvalPlan) -> dict[str, int]:
    """Training iterations of each task's cells under the plan's profile and total batch (tasks whose
    card is no longer installed are left out: their progress shows without a total)."""
    out = {}
    for task in plan.tasks:
        try:
            p = task_card(task).profile(plan.profile)
        except HarnessError:
            continue
        out[task] = max(1, p.rescaled(p.iterations, plan.batch_size))
    return out


def last_logged(metrics: Path) -> tuple[int, float] | None:
    """(iteration, seconds per iteration) of the last complete line of a cell's ``metrics.jsonl``;
    None before its first line."""
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):  # the last line may be half written
        try:
            row = json.loads(line)
            return int(row["iter"]), float(row["time"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def format_progress(plan: EvalPlan, statuses: list[CellStatus], iterations: dict[str, int]) -> str | None:
    """One line on the running cells: each one's last logged iteration, pace and training time left."""
    parts = []
    for s in statuses:
        if s.state != "running":
            continue
        logged = last_logged(run_dir(plan.out, *s.cell) / "metrics.jsonl")
        if logged is None:
            parts.append(f"{cell_name(s.cell)} starting")
            continue
        done, pace = logged
        total = iterations.get(s.cell[0])
        if total is None:
            parts.append(f"{cell_name(s.cell)} iteration {done} ({pace:.2f} s/it)")
            continue
        left = max(total - done, 0) * pace
        parts.append(f"{cell_name(s.cell)} iteration {done}/{total} ({pace:.2f} s/it, about "
                     f"{_duration(left)} of training left)")
    return "running: " + "; ".join(parts) if parts else None


def _duration(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes >= 1 else f"{max(1, round(seconds))} s"


def _finish(plan: EvalPlan, statuses: list[CellStatus]) -> list[dict]:
    """Collect when every cell is done (results.json + the rows); [] otherwise."""
    if all(s.state == "done" for s in statuses):
        return collect(plan)
    return []


def show_status(out: Path, watch: bool = False, poll: float = 10.0) -> list[dict]:
    """Print the table of `harness status`; collect into results.json when every cell is done."""
    record = read_launch(out)
    plan = plan_of(record)
    return _watch(plan, record, poll) if watch else _show_once(plan, record)


def _show_once(plan, record) -> list[dict]:
    """Print the table once; a failed cell is then an error (exit 2, as `--watch` and `--wait` end)."""
    statuses = cell_states(plan, record)
    progress = format_progress(plan, statuses, cell_iterations(plan))
    print(format_status(statuses) + (f"\n{progress}" if progress else ""), flush=True)
    failed = [cell_name(s.cell) for s in statuses if s.state == "failed"]
    if failed:
        raise HarnessError(f"{len(failed)} cell(s) failed ({', '.join(failed)}); see the table above, then rerun "
                           "the same eval command to resubmit them")
    return _finish(plan, statuses)


def _watch(plan: EvalPlan, record: dict, poll: float, step=None) -> list[dict]:
    """Print the table whenever it changes, and between changes a line on the running cells' progress
    every PROGRESS_EVERY seconds, until no cell is pending or running; ``step()`` runs first in every
    round (the local launcher starts its next cells there)."""
    shown, iterations = None, cell_iterations(plan)
    last = time.monotonic()
    while True:
        if step is not None:
            step()
        statuses = cell_states(plan, record)
        table = format_status(statuses)
        now = dt.datetime.now().strftime('%H:%M:%S')
        if table != shown:
            print(f"[{now}]\n{table}", flush=True)
            shown, last = table, time.monotonic()
        elif time.monotonic() - last >= PROGRESS_EVERY:
            progress = format_progress(plan, statuses, iterations)
            if progress:
                print(f"[{now}] {progress}", flush=True)
            last = time.monotonic()
        if not any(s.state in ("pending", "running") for s in statuses) and (step is None or step.idle()):
            break
        time.sleep(poll)
    rows = _finish(plan, statuses)
    if not rows:
        bad = [cell_name(s.cell) for s in statuses if s.state != "done"]
        raise HarnessError(f"{len(bad)} cell(s) did not finish ({', '.join(bad)}); see the logs above, "
                           "then rerun the same command to resubmit them")
    return rows


# ----------------------------------------------------------------------------- launching
def _plan_record(plan: EvalPlan) -> dict:
    fields = dataclasses.asdict(plan)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in fields.items()}


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _check_seg_batch(plan: EvalPlan, cards, world: int, cuda: bool) -> None:
    for card in cards:
        batch = plan.batch_size or card.profile(plan.profile).batch_size
        if card.model.kind == "segmentation" and batch // world < 2 and not (cuda and world > 1):
            raise HarnessError(f"{card.name}: the ASPP head's BatchNorm needs at least 2 images per process; "
                               f"a total batch of {batch} on {world} process(es) gives fewer")


def launch(plan: EvalPlan, opts: LaunchOptions) -> list[dict]:
    """Run the plan's cells where ``opts`` says; returns the aggregated rows once every cell is done
    (results.json written), else [] (jobs submitted, not waited for)."""
    check_options(opts)
    if opts.launcher == "inprocess" or plan.dry_run:  # a dry run is a plan and seconds of work: here
        from harness.runner import run_eval

        return run_eval(plan)
    cards = check_plan(plan)
    plan = dataclasses.replace(plan, out=Path(plan.out).resolve(),
                               data_root=Path(plan.data_root).resolve() if plan.data_root else None)
    if plan.synthetic:  # written here, once: parallel cells would each start writing it
        write_synthetic_once(synthetic_data_dir(plan.out))
    if opts.launcher == "local":
        return _launch_local(plan, opts, cards)
    return _launch_slurm(plan, opts, cards)


def _previous(plan: EvalPlan, launcher: str) -> dict:
    """launch.json of an earlier launch into the same folder (its jobs), now with this plan; a cell made
    with another card, profile or backbone is refused by the cell itself, as in-process."""
    path = Path(plan.out) / LAUNCH_FILE
    record = _read_json(path)
    _check_done_cells_match(plan, (record or {}).get("plan") or {})
    if record is None:
        return {"launcher": launcher, "plan": _plan_record(plan), "cells": {}}
    if record.get("launcher") != launcher:
        live = [c for c in cell_states(plan_of(record), record) if c.state in ("pending", "running")]
        if live:
            raise HarnessError(f"{len(live)} cell(s) of {plan.out} still run under --launcher {record['launcher']}; "
                               "wait for them or cancel them first")
        record = {"launcher": launcher, "cells": {}}
    record["plan"] = _plan_record(plan)
    return record


# What a cell's result depends on besides its task, protocol and seed (the in-process runner checks the same, the
# data by what each result recorded: synthetic or not, its splits and their sizes).
RESULT_SETTINGS = ("backbone", "arch", "profile", "data_root", "synthetic", "batch_size", "accumulate", "precision",
                   "checkpoint_options")


def _check_done_cells_match(plan: EvalPlan, earlier: dict) -> None:
    """Refuse a launch into a folder whose finished cells were made with other settings or another
    backbone file: they would be collected as this plan's results, and never be rerun."""
    done = [p for p in Path(plan.out).glob("*/*/seed*/result.json")]
    if not done:
        return
    now = _plan_record(plan)
    for key in RESULT_SETTINGS:
        if key in earlier and earlier[key] != now[key]:
            raise HarnessError(f"{plan.out} holds results made with {key} {earlier[key]!r} (now {now[key]!r}); "
                               "use another --out")
    random = plan.backbone.startswith("random:")
    sha = sha256_file(plan.backbone) if not random and Path(plan.backbone).is_file() else None
    for path in done:
        made = (_read_json(path) or {}).get("backbone", {})
        if (random and made.get("name") != plan.backbone) or (sha and made.get("sha256") != sha):
            raise HarnessError(f"{path} was made with another backbone ({made.get('name')}, sha256 {made.get('sha256')}); "
                               "use another --out")


def _to_submit(plan: EvalPlan, record: dict) -> list:
    """Cells to submit now: failed ones (their log printed) and those never submitted."""
    todo = []
    for s in cell_states(plan, record):
        if s.state == "failed":
            print(f"{cell_name(s.cell)}: failed in job {s.job_id} ({s.error}); resubmitting (log: {s.log})", flush=True)
            todo.append(s.cell)
        elif s.state == "not submitted":
            todo.append(s.cell)
    return todo


def longest_first(cells: list, plan: EvalPlan, cards) -> list:
    """Cells in the order that lets a local pool finish soonest: most images trained first (the
    profile's iterations x batch), fine-tune before frozen (which has no backbone backward), otherwise
    the plan's order. Started last, the longest cell would run alone while the other slots idle."""
    profiles = {task: card.profile(plan.profile) for task, card in zip(plan.tasks, cards)}
    images = {task: p.iterations * p.batch_size for task, p in profiles.items()}
    return sorted(cells, key=lambda cell: (-images[cell[0]], cell[1] == "frozen"))


def _save(plan: EvalPlan, record: dict) -> None:
    Path(plan.out).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(plan.out) / LAUNCH_FILE, record)


def _launch_slurm(plan: EvalPlan, opts: LaunchOptions, cards) -> list[dict]:
    nodes = opts.nodes or 1
    gpus = 8 if opts.gpus_per_node is None else opts.gpus_per_node
    tasks = max(1, gpus)
    _check_seg_batch(plan, cards, nodes * tasks, gpus > 0)
    if shutil.which("sbatch") is None or shutil.which("srun") is None:
        raise HarnessError("sbatch/srun not found: --launcher slurm needs SLURM's client tools on PATH")
    record = _previous(plan, "slurm")
    todo = _to_submit(plan, record)
    if todo:
        executor = submitit.SlurmExecutor(folder=Path(plan.out) / JOBS_DIR, max_num_timeout=MAX_TIMEOUTS)
        params = {"job_name": f"harness-{Path(plan.out).name}", "partition": opts.partition,
                  "time": parse_duration(opts.time or "4h"), "nodes": nodes, "ntasks_per_node": tasks,
                  "cpus_per_task": opts.cpus_per_gpu or 6, "signal_delay_s": opts.signal_delay or 120,
                  "array_parallelism": opts.max_parallel or len(todo), "stderr_to_stdout": True,
                  "additional_parameters": {"requeue": True, **({"mem": opts.mem.strip().upper()} if opts.mem else {})}}
        if gpus:
            params["gpus_per_node"] = gpus
        params.update({k: v for k, v in (("account", opts.account), ("qos", opts.qos),
                                         ("constraint", opts.constraint)) if v})
        executor.update_parameters(**params)
        try:
            with executor.batch():
                jobs = [executor.submit(CellJob(plan, *cell)) for cell in todo]
        except (subprocess.CalledProcessError, submitit.core.utils.FailedJobError) as err:
            raise HarnessError(f"sbatch refused the job array: {one_line(err)[:400]}") from None
        for cell, job in zip(todo, jobs):
            record["cells"][cell_name(cell)] = {"job_id": str(job.job_id), "log": str(job.paths.stdout),
                                                "host": None}
        _save(plan, record)
        print(f"submitted {len(jobs)} cell(s) as SLURM job {str(jobs[0].job_id).split('_')[0]}: "
              f"{', '.join(str(j.job_id) for j in jobs)}", flush=True)
    else:
        _save(plan, record)
    if opts.wait:
        return _watch(plan, record, opts.poll or 10.0)
    return _show_once(plan, record)


class _LocalPool:
    """Starts queued cells as LocalExecutor jobs, at most ``parallel`` at once, each with its own GPUs
    (``CUDA_VISIBLE_DEVICES``) or its share of the CPU cores."""

    def __init__(self, plan, record, todo, parallel, gpus_per_cell, threads, timeout_min, signal_delay):
        self.plan, self.record, self.queue = plan, record, list(todo)
        self.executor = submitit.LocalExecutor(folder=Path(plan.out) / JOBS_DIR, max_num_timeout=MAX_TIMEOUTS)
        self.parallel, self.gpus, self.threads = parallel, gpus_per_cell, threads
        self.slots = [list(range(i * gpus_per_cell, (i + 1) * gpus_per_cell)) for i in range(parallel)]
        self.running: dict = {}  # slot index -> job
        self.timeout_min, self.signal_delay = timeout_min, signal_delay

    def idle(self) -> bool:
        return not self.queue and not self.running

    def __call__(self) -> None:
        for slot, job in list(self.running.items()):
            if job.done():
                del self.running[slot]
        for slot in range(self.parallel):
            if not self.queue:
                break
            if slot in self.running:
                continue
            cell = self.queue.pop(0)
            self.executor.update_parameters(
                timeout_min=self.timeout_min, signal_delay_s=self.signal_delay, stderr_to_stdout=True,
                tasks_per_node=max(1, self.gpus), gpus_per_node=self.gpus, visible_gpus=self.slots[slot])
            job = self.executor.submit(CellJob(self.plan, *cell, threads=None if self.gpus else self.threads))
            self.running[slot] = job
            self.record["cells"][cell_name(cell)] = {"job_id": str(job.job_id), "log": str(job.paths.stdout),
                                                     "host": socket.gethostname()}
            _save(self.plan, self.record)
            where = f"GPU {','.join(map(str, self.slots[slot]))}" if self.gpus else f"{self.threads} thread(s)"
            print(f"{cell_name(cell)}: started as local job {job.job_id} on {where} (log: {job.paths.stdout})",
                  flush=True)


def _launch_local(plan: EvalPlan, opts: LaunchOptions, cards) -> list[dict]:
    visible = 0 if plan.device == "cpu" else _gpu_count()
    if plan.device == "cuda" and not visible:
        raise HarnessError("device 'cuda' was asked for but no CUDA device is visible (use --device cpu)")
    gpus = (1 if visible else 0) if opts.gpus_per_node is None else opts.gpus_per_node
    if gpus > visible:
        raise HarnessError(f"--gpus-per-node {gpus} but this machine has {visible} visible GPU(s)")
    parallel = opts.max_parallel or (visible // gpus if gpus else 1)
    if gpus and parallel * gpus > visible:
        raise HarnessError(f"--max-parallel {parallel} x {gpus} GPU(s) per cell needs {parallel * gpus} GPUs; "
                           f"{visible} are visible")
    _check_seg_batch(plan, cards, max(1, gpus), gpus > 0)
    record = _previous(plan, "local")
    todo = longest_first(_to_submit(plan, record), plan, cards)
    _save(plan, record)
    timeout = parse_duration(opts.time) if opts.time else 30 * 1440
    pool = _LocalPool(plan, record, todo, parallel, gpus, cpu_threads(parallel), timeout, opts.signal_delay or 120)
    return _watch(plan, record, 1.0, step=pool)  # each round also starts queued cells
