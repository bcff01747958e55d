"""Cells of `harness eval` as jobs: local parallel runs, preemption and requeue, SLURM arrays through a
fake sbatch, locks, and option errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from harness import launch
from harness.cli import main
from harness.launch import acquire_lock, cpu_threads, parse_duration
from harness.plan import EvalPlan, check_plan
from tests import fake_slurm
from tests.support import SMALL_ARCH, Toy, ToyData, run_cli, run_cli_fresh, tiny_cards, toy_config


def harness_env(cards: Path, threads: int = 2, **extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HARNESS_TASKS": str(cards), **extra}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def harness_here(capsys, monkeypatch, *args, env: dict, threads: int = 1) -> subprocess.CompletedProcess:
    """``harness ARGS`` in this process, under ``env`` (as ``harness_env`` gives it to a subprocess) and
    ``threads`` torch threads: for the runs a test compares with, and for the commands whose own
    process is not what is tested (jobs that they start still run in their own processes)."""
    for key, value in env.items():
        if os.environ.get(key) != value:
            monkeypatch.setenv(key, value)
    for var in set(os.environ) - set(env):
        monkeypatch.delenv(var)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        code, out, err = run_cli(capsys, *args)
    finally:
        torch.set_num_threads(before)
    return subprocess.CompletedProcess(args, code, out, err)


def eval_args(root, out, tasks="voc", protocols="frozen", seeds=1):
    return ["eval", "--backbone", f"random:{SMALL_ARCH}", "--tasks", tasks, "--protocols", protocols, "--profile", "smoke",
            "--data-root", root, "--seeds", seeds, "--out", out, "--no-progress", "--device", "cpu"]


def losses(run: Path) -> list[dict]:
    """The loss curve of a run, without its timings."""
    return [{k: v for k, v in json.loads(line).items() if k != "time"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def wait_for(predicate, timeout=900, what="condition", period=0.2):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    raise AssertionError(f"timed out waiting for {what}")


# ----------------------------------------------------------------------------- options
def test_durations():
    assert [parse_duration(t) for t in ("4h", "90m", "1h30m", "2d", "30s", "1-00:00:00", "2-12", "1:30:00", "5:30",
                                        "45")] == [240, 90, 90, 2880, 1, 1440, 3600, 90, 6, 45]


@pytest.mark.parametrize("args, message", [
    (["--launcher", "slurm", "--partition", "p", "--nodes", "0"], "--nodes must be at least 1"),
    (["--launcher", "slurm"], "--launcher slurm needs --partition"),
    (["--launcher", "pbs"], "unknown launcher 'pbs': use inprocess, local, slurm"),
    (["--launcher", "slurm", "--partition", "p", "--time", "4 hours"], "--time '4 hours' is not a duration"),
    (["--launcher", "slurm", "--partition", "p", "--time", "1h", "--mem", "lots"], "--mem 'lots' is not"),
    (["--launcher", "local", "--partition", "p"], "--partition only apply to --launcher slurm"),
    (["--max-parallel", "2"], "--max-parallel needs --launcher local or slurm"),
    (["--launcher", "slurm", "--partition", "p", "--poll", "1"], "--poll only applies with --launcher slurm --wait"),
    (["--launcher", "local", "--wait", "--poll", "1"], "--poll only applies with --launcher slurm --wait"),
    (["--launcher", "slurm", "--partition", "p", "--wait", "--poll", "0"], "--poll must be a positive number"),
])
def test_bad_launch_options_are_one_line_errors_and_submit_nothing(args, message, tmp_path, monkeypatch, capsys):
    for key, value in fake_slurm.install(tmp_path / "bin", tmp_path / "slurm").items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    code = main(["eval", "--backbone", "random:resnet18", "--tasks", "voc", "--synthetic", "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists() and not (tmp_path / "slurm").exists()  # nothing written, sbatch never called


def test_stale_lock_is_taken_over_and_a_live_one_is_respected(tmp_path, capsys):
    cell = tmp_path / "voc" / "frozen" / "seed0"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    me = {"launcher": "local", "job_id": "42", "host": socket.gethostname(), "pid": os.getpid(), "log": "x.log"}
    cell.mkdir(parents=True)
    (cell / "lock.json").write_text(json.dumps({**me, "job_id": dead.stdout.strip()}))
    assert acquire_lock(cell, me)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines == [f"{cell}: stale lock of job {dead.stdout.strip()} (no longer running) taken over by job 42"]
    assert json.loads((cell / "lock.json").read_text())["job_id"] == "42"
    other = {**me, "job_id": "43"}
    assert not acquire_lock(cell, other)  # job 42 is this (live) process
    assert "locked by live job 42, skipped" in capsys.readouterr().out
    assert json.loads((cell / "lock.json").read_text())["job_id"] == "42"


def test_train_stops_on_request_with_a_checkpoint_and_resumes_to_the_same_weights(tmp_path):
    from harness.engine import TrainingStopped, train

    def fresh():
        torch.manual_seed(0)
        return Toy()

    whole = fresh()
    train(whole, ToyData(), toy_config(), tmp_path / "whole", progress=False)
    polls = []
    stopped = fresh()
    with pytest.raises(TrainingStopped) as info:
        train(stopped, ToyData(), toy_config(), tmp_path / "stopped", progress=False,
              stop_requested=lambda: polls.append(1) or len(polls) >= 2)
    assert info.value.iteration == 2 and len(polls) == 2  # checked once per step, stopped after the 2nd
    assert torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["iteration"] == 2
    resumed = fresh()
    assert train(resumed, ToyData(), toy_config(), tmp_path / "stopped", progress=False).start_iteration == 2
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


# ----------------------------------------------------------------------------- local launcher
def test_local_pool_starts_the_longest_cells_first():
    """The smoke demo's cells by images trained (pose 800 x 4, coco 250 x 4, voc 200 x 4, seg 150 x 4);
    fine-tune before frozen; equal cells (the seeds) keep the plan's order."""
    plan = EvalPlan(backbone="random:resnet18", tasks=["seg", "coco", "voc", "pose"], profile="smoke", seeds=2)
    cards = check_plan(plan)
    assert [c.profile("smoke").iterations * c.profile("smoke").batch_size for c in cards] == [600, 1000, 800, 3200]
    order = launch.longest_first(launch.cells_of(plan), plan, cards)
    assert [launch.cell_name(c) for c in order] == [
        "pose/finetune/seed0", "pose/finetune/seed1", "pose/frozen/seed0", "pose/frozen/seed1",
        "coco/finetune/seed0", "coco/finetune/seed1", "coco/frozen/seed0", "coco/frozen/seed1",
        "voc/finetune/seed0", "voc/finetune/seed1", "voc/frozen/seed0", "voc/frozen/seed1",
        "seg/finetune/seed0", "seg/finetune/seed1", "seg/frozen/seed0", "seg/frozen/seed1"]
    # two tasks of equal images (voc and voc_fpn, 200 x 4) keep the plan's order, whichever it is
    for tasks in (["voc_fpn", "voc"], ["voc", "voc_fpn"]):
        plan = EvalPlan(backbone="random:resnet18", tasks=tasks, profile="smoke")
        order = launch.longest_first(launch.cells_of(plan), plan, check_plan(plan))
        assert [launch.cell_name(c) for c in order] == [f"{t}/{p}/seed0" for p in ("finetune", "frozen") for t in tasks]


def _metrics_lines(run: Path, rows: list[dict], tail: str = "") -> None:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_progress_line_gives_each_running_cell_its_iteration_pace_and_training_time_left(tmp_path):
    from harness.cards import task_card
    from harness.runner import train_config

    for batch in (None, 8):  # the totals are what the cells train, also at another batch
        plan = EvalPlan(backbone="random:resnet18", tasks=["voc", "pose"], profile="smoke", out=tmp_path, batch_size=batch)
        assert launch.cell_iterations(plan) == {t: train_config(task_card(t), "smoke", 0, batch).iterations
                                                for t in plan.tasks}
    assert launch.cell_iterations(plan)["pose"] == task_card("pose").profile("smoke").iterations // 2
    _metrics_lines(launch.run_dir(tmp_path, "pose", "finetune", 0),
                   [{"iter": 20, "loss": 2.0, "lr": 0.02, "time": 0.5}, {"iter": 40, "loss": 1.5, "lr": 0.02, "time": 0.6}],
                   tail='{"iter": 60, "lo')  # a line being written
    statuses = [launch.CellStatus(("pose", "finetune", 0), "running", "7"),
                launch.CellStatus(("pose", "frozen", 0), "running", "8"),
                launch.CellStatus(("voc", "finetune", 0), "done", "9"),
                launch.CellStatus(("voc", "frozen", 0), "pending", "10")]
    assert launch.format_progress(plan, statuses, {"pose": 800, "voc": 200}) == (
        "running: pose/finetune/seed0 iteration 40/800 (0.60 s/it, about 8 min of training left); "
        "pose/frozen/seed0 starting")
    assert launch.format_progress(plan, statuses, {}) == (  # a card no longer installed: no total
        "running: pose/finetune/seed0 iteration 40 (0.60 s/it); pose/frozen/seed0 starting")
    assert launch.format_progress(plan, statuses[2:], {"pose": 800}) is None


def test_watch_prints_progress_while_the_table_stands_still(tmp_path, monkeypatch, capsys):
    plan = EvalPlan(backbone="random:resnet18", tasks=["pose"], profile="smoke", out=tmp_path)
    _metrics_lines(launch.run_dir(tmp_path, "pose", "finetune", 0), [{"iter": 780, "loss": 1.0, "lr": 0.002, "time": 0.5}])
    running = [launch.CellStatus(("pose", "finetune", 0), "running", "7"),
               launch.CellStatus(("pose", "frozen", 0), "pending", "8")]
    rounds = iter([running, running, running, [launch.CellStatus(c.cell, "done", c.job_id) for c in running]])
    monkeypatch.setattr(launch, "cell_states", lambda plan, record: next(rounds))
    monkeypatch.setattr(launch, "_finish", lambda plan, statuses: [{"collected": True}])
    monkeypatch.setattr(launch, "PROGRESS_EVERY", 0.0)
    assert launch._watch(plan, {}, 0.0) == [{"collected": True}]
    lines = capsys.readouterr().out.splitlines()
    progress = [line for line in lines if "] running: " in line]
    assert len(progress) == 2 and all(line.endswith(
        "running: pose/finetune/seed0 iteration 780/800 (0.50 s/it, about 10 s of training left)") for line in progress)
    assert lines.count("1 running, 1 pending") == 1 and lines.count("2 done") == 1  # the table when it changed
    monkeypatch.setattr(launch, "cell_states", lambda plan, record: running)
    launch._show_once(plan, {})  # `harness status`: the table, then the progress line
    assert capsys.readouterr().out.splitlines()[-2:] == [
        "1 running, 1 pending", "running: pose/finetune/seed0 iteration 780/800 (0.50 s/it, about 10 s of training left)"]


@pytest.mark.slow
def test_local_launcher_two_in_parallel_equals_the_serial_run(synthetic_root, tmp_path, capsys, monkeypatch):
    cards = tiny_cards(tmp_path / "tasks")
    threads = cpu_threads(2)  # each of 2 parallel cells gets this share of the cores; the serial run the same
    serial = harness_here(capsys, monkeypatch, *eval_args(synthetic_root, tmp_path / "serial", "voc,seg"),
                          env=harness_env(cards, threads), threads=threads)
    assert serial.returncode == 0, serial.stderr[-3000:]
    local = harness_here(capsys, monkeypatch, *eval_args(synthetic_root, tmp_path / "local", "voc,seg"), "--launcher",
                         "local", "--max-parallel", "2", env=harness_env(cards))
    assert local.returncode == 0, local.stdout[-3000:] + local.stderr[-3000:]
    assert "started as local job" in local.stdout and f"on {threads} thread(s)" in local.stdout
    assert "2 running" in local.stdout  # two cells ran at the same time
    logs = "".join(p.read_text() for p in (tmp_path / "local" / "jobs").glob("*_log.out"))
    assert "harness: warning: no non-difficult ground truth for" in logs  # one line, as the CLI prints it
    assert "HarnessWarning" not in logs and "voc_detection_metrics(" not in logs  # no source line under it
    assert json.loads((tmp_path / "local/results.json").read_text()) == json.loads((tmp_path / "serial/results.json").read_text())
    assert local.stdout.split("2 done\n")[-1].split("results:")[0] == serial.stdout.split("results:")[0]
    for task in ("voc", "seg"):
        a, b = tmp_path / "local" / task / "frozen" / "seed0", tmp_path / "serial" / task / "frozen" / "seed0"
        assert losses(a) == losses(b)
        assert json.loads((a / "result.json").read_text())["metrics"] == json.loads((b / "result.json").read_text())["metrics"]
        assert not (a / "lock.json").exists()
    again = harness_here(capsys, monkeypatch, *eval_args(synthetic_root, tmp_path / "local", "voc,seg"),
                         "--launcher", "local", "--max-parallel", "2", env=harness_env(cards))
    assert again.returncode == 0 and "started as local job" not in again.stdout and "2 done" in again.stdout


@pytest.mark.slow
def test_signals_mid_training_requeue_and_resume_to_the_same_weights(synthetic_root, tmp_path, capsys, monkeypatch):
    """SIGUSR1, then SIGTERM after the requeue: each stops training at a step boundary with a checkpoint,
    submitit's checkpoint hook requeues the job, and the final weights and metrics equal an uninterrupted run's.
    The launcher runs in this process; a thread signals its job (a process of its own) as a scheduler would."""
    iterations = 10  # a job stops at the first step boundary after a signal (iterations 1 and 2 here)
    cards = tiny_cards(tmp_path / "tasks", iterations=iterations, checkpoint_period=100)
    out, ref = tmp_path / "preempted", tmp_path / "reference"
    args = eval_args(synthetic_root, out, "voc", "frozen")
    lock = out / "voc" / "frozen" / "seed0" / "lock.json"

    def pid():
        try:
            return json.loads(lock.read_text())["pid"]
        except (OSError, ValueError, KeyError):
            return None

    signalled = []

    def preempt():
        first = wait_for(pid, what="the cell's lock", period=0.05)
        os.kill(first, signal.SIGUSR1)
        second = wait_for(lambda: (p := pid()) not in (None, first) and p, what="the requeued job", period=0.05)
        os.kill(second, signal.SIGTERM)
        signalled.extend([first, second])

    scheduler = threading.Thread(target=preempt, daemon=True)
    scheduler.start()
    launched = harness_here(capsys, monkeypatch, *args, "--launcher", "local", env=harness_env(cards))
    scheduler.join(timeout=60)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert len(signalled) == 2, "the job ended before both signals were sent"
    log = Path(json.loads((out / "launch.json").read_text())["cells"]["voc/frozen/seed0"]["log"]).read_text()
    assert "caught SIGUSR1" in log and "caught SIGTERM" in log and log.count("Requeued job") == 2
    stops = [int(line.split("stopped at iteration ")[1].split(",")[0]) for line in log.splitlines()
             if "stopped at iteration" in line]
    assert len(stops) == 2 and 0 < stops[0] <= stops[1] < iterations, stops
    serial = harness_here(capsys, monkeypatch, *eval_args(synthetic_root, ref, "voc", "frozen"),
                          env=harness_env(cards, cpu_threads(1)), threads=cpu_threads(1))  # the job's threads
    assert serial.returncode == 0, serial.stderr[-3000:]
    run, uninterrupted = out / "voc/frozen/seed0", ref / "voc/frozen/seed0"
    mine, theirs = (torch.load(p / "checkpoint.pt", weights_only=True)["model"] for p in (run, uninterrupted))
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert json.loads((run / "result.json").read_text())["metrics"] == json.loads((uninterrupted / "result.json").read_text())["metrics"]
    assert losses(run) == losses(uninterrupted)


# ----------------------------------------------------------------------------- slurm through a fake sbatch
def test_slurm_script_array_resources_signal_and_requeue(tmp_path, monkeypatch, capsys):
    for key, value in fake_slurm.install(tmp_path / "bin", tmp_path / "slurm").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("FAKE_SLURM_RUN", "0")  # record the script, run nothing
    written = []  # --synthetic data is written before the submission, not by parallel jobs
    monkeypatch.setattr(launch, "write_synthetic_once",
                        lambda root: written.append((root, list((tmp_path / "slurm").glob("submitted_*")))))
    out = tmp_path / "run"
    cmd = ["eval", "--backbone", "random:resnet18", "--tasks", "voc,seg", "--protocols", "frozen", "--profile", "smoke",
           "--synthetic", "--seeds", "2", "--out", str(out), "--launcher", "slurm", "--partition", "gpu",
           "--nodes", "2", "--gpus-per-node", "4", "--cpus-per-gpu", "8", "--mem", "64G", "--time", "1-00:00:00",
           "--max-parallel", "3", "--signal-delay", "300", "--account", "acc", "--qos", "high", "--constraint", "a100"]
    assert main(cmd) == 0
    printed = capsys.readouterr().out
    assert "submitted 4 cell(s) as SLURM job 1000: 1000_0, 1000_1, 1000_2, 1000_3" in printed
    assert written == [(out / "synthetic-data", [])]
    script = (tmp_path / "slurm" / "submitted_1000.sh").read_text().splitlines()
    for line in ("--array=0-3%3", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4", "--cpus-per-task=8",
                 "--mem=64G", "--time=1440", "--signal=USR2@300", "--requeue", "--partition=gpu", "--account=acc",
                 "--qos=high", "--constraint=a100"):
        assert f"#SBATCH {line}" in script, line
    assert any(line.startswith("srun ") and "submitit.core._submit" in line for line in script)
    assert "4 pending" in printed and f"seg/frozen/seed1  pending  1000_3  {out / 'jobs' / '1000_3_0_log.out'}" in printed
    assert main(cmd) == 0  # queued cells are not submitted twice
    printed = capsys.readouterr().out
    assert "submitted" not in printed and "4 pending" in printed
    assert sorted(p.name for p in (tmp_path / "slurm").glob("submitted_*")) == ["submitted_1000.sh"]
    assert main(["status", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "4 pending" in printed and "results.json" not in printed


def test_slurm_submission_and_status_load_no_torch(tmp_path):
    """On a login node `import torch` can take tens of seconds (a network filesystem): submitting an
    array and `harness status` read cards and folders only (measured here: status 4.1 s -> 0.5 s)."""
    env = {**os.environ, **fake_slurm.install(tmp_path / "bin", tmp_path / "slurm"), "FAKE_SLURM_RUN": "0"}
    out = tmp_path / "run"
    codes, modules, printed = run_cli_fresh(
        ["eval", "--backbone", "random:resnet18", "--tasks", "voc,seg", "--profile", "smoke", "--data-root", tmp_path,
         "--out", out, "--launcher", "slurm", "--partition", "gpu", "--gpus-per-node", "2"],
        ["status", "--out", out], env=env)
    assert codes == [0, 0] and modules == []
    assert "submitted 4 cell(s) as SLURM job 1000: 1000_0, 1000_1, 1000_2, 1000_3" in printed
    assert printed.splitlines().count("4 pending") == 2, printed


@pytest.mark.slow
def test_slurm_array_runs_status_resubmits_the_failed_cell_and_collects(synthetic_root, tmp_path, capsys, monkeypatch):
    # one thread per job: the jobs run beside the other tests, and two threads would spin-wait for each other
    env = harness_env(tiny_cards(tmp_path / "tasks"), 1, **fake_slurm.install(tmp_path / "bin", tmp_path / "slurm"))

    def harness(*args, env):  # in this process: the jobs of the array are the subprocesses here
        return harness_here(capsys, monkeypatch, *args, env=env)

    out = tmp_path / "run"
    cmd = [*eval_args(synthetic_root, out, "voc", seeds=2), "--launcher", "slurm", "--partition", "cpu",
           "--gpus-per-node", "0", "--time", "90m"]
    broken = out / "voc" / "frozen" / "seed1" / "checkpoint.pt"
    broken.parent.mkdir(parents=True)
    broken.write_text("not a checkpoint")  # this cell fails
    first = harness(*cmd, env=env)
    assert first.returncode == 0 and "submitted 2 cell(s) as SLURM job 1000" in first.stdout, first.stderr[-3000:]
    wait_for(lambda: all(s in ("COMPLETED", "FAILED") for s in fake_slurm.jobs(tmp_path / "slurm").values()),
             what="the array")
    status = harness("status", "--out", out, env=env)
    assert status.returncode == 2 and status.stderr.strip().splitlines() == [
        "harness: error: 1 cell(s) failed (voc/frozen/seed1); see the table above, then rerun the same eval command "
        "to resubmit them"], status.stderr
    log = out / "jobs" / "1000_1_0_log.out"
    assert "voc/frozen/seed0  done    1000_0" in status.stdout and "1 done, 1 failed" in status.stdout
    assert "voc/frozen/seed1 failed in job 1000_1: HarnessError: cannot read the training checkpoint" in status.stdout
    assert f"(log: {log})" in status.stdout and "cannot read the training checkpoint" in log.read_text()
    broken.unlink()
    second = harness(*cmd, "--wait", "--poll", "0.2", env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "voc/frozen/seed1: failed in job 1000_1" in second.stdout and f"resubmitting (log: {log})" in second.stdout
    assert "submitted 1 cell(s) as SLURM job 1001: 1001" in second.stdout
    assert "#SBATCH --array" not in (tmp_path / "slurm" / "submitted_1001.sh").read_text()
    assert "2 done" in second.stdout and "mAP@[.5,.95]" in second.stdout
    summary = json.loads((out / "results.json").read_text())
    ap50 = [json.loads((out / "voc/frozen" / f"seed{s}/result.json").read_text())["metrics"]["AP50"] for s in (0, 1)]
    assert summary["runs"][0]["metrics"]["AP50"]["values"] == ap50 and summary["synthetic"] is True
    third = harness(*cmd, env=env)  # finished cells are never submitted again; the status collects
    assert third.returncode == 0 and "submitted" not in third.stdout and "mAP@[.5,.95]" in third.stdout
    assert sorted(p.name for p in (tmp_path / "slurm").glob("submitted_*")) == ["submitted_1000.sh", "submitted_1001.sh"]


def test_status_of_a_folder_whose_launch_json_is_not_a_launch_record(tmp_path, capsys):
    """A launch.json another tool wrote, or one cut short: one line, not a KeyError traceback."""
    for name, text, message in [("empty", "{}", "is not a launch record"), ("list", "[1, 2]", "is not a launch record"),
                                ("cut", '{"plan": {', "is not a launch record"), ("none", None, "not found")]:
        folder = tmp_path / name
        folder.mkdir()
        if text is not None:
            (folder / "launch.json").write_text(text)
        code, out, err = run_cli(capsys, "status", "--out", folder)
        assert code == 2 and message in err and "\n" not in err.strip()


def test_a_launch_into_a_folder_of_other_results_is_refused_before_any_job(synthetic_root, tmp_path, capsys):
    """Finished cells are collected, never rerun: made with another backbone or settings they would be
    reported as this plan's results (the in-process runner refuses them the same way)."""
    out = tmp_path / "run"
    cell = out / "voc" / "frozen" / "seed0"
    cell.mkdir(parents=True)
    (cell / "result.json").write_text(json.dumps({"backbone": {"name": "random:resnet18", "sha256": None}}))
    args = ["eval", "--tasks", "voc", "--protocols", "frozen", "--profile", "smoke", "--data-root", synthetic_root,
            "--out", out, "--launcher", "local", "--device", "cpu", "--no-progress"]
    code, _, err = run_cli(capsys, *args, "--backbone", "random:resnet50")
    assert code == 2 and "was made with another backbone (random:resnet18, sha256 None); use another --out" in err
    weights = tmp_path / "r18.pth"
    weights.write_bytes(b"not the weights the result was made with")
    code, _, err = run_cli(capsys, *args, "--backbone", weights, "--arch", "resnet18")
    assert code == 2 and "was made with another backbone" in err
    plan = EvalPlan(backbone="random:resnet18", tasks=["voc"], protocols=["frozen"], data_root=synthetic_root, out=out)
    (out / "launch.json").write_text(json.dumps({"launcher": "local", "plan": launch._plan_record(plan), "cells": {}}))
    code, _, err = run_cli(capsys, *args, "--backbone", "random:resnet18", "--batch-size", "8")
    assert code == 2 and "holds results made with batch_size None (now 8); use another --out" in err
    assert not (out / "jobs").exists()
