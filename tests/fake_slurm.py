"""A stand-in for SLURM's client tools, for tests on a machine without SLURM.

``install(bin_dir, state_dir)`` writes ``sbatch``, ``srun``, ``squeue`` and ``scontrol`` into
``bin_dir`` (put it first on PATH). ``sbatch SCRIPT`` copies the script it is given to
``state_dir/submitted_<job>.sh``, prints ``Submitted batch job <job>`` and, unless
``FAKE_SLURM_RUN=0``, runs the script's array elements one after another in a detached process,
with the variables SLURM sets (job and array ids, rank 0 of 1 task on 1 node). ``srun`` runs its
command with ``--output``/``--error`` patterns expanded as SLURM does. ``squeue -h -r -o "%i %T" -j
IDS`` prints the pending and running elements recorded in ``state_dir/jobs.json``.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

SBATCH = r'''
import json, os, re, shutil, subprocess, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM_DIR"]); state.mkdir(parents=True, exist_ok=True)
script = Path(sys.argv[-1]).read_text()
counter = state / "counter"
job = int(counter.read_text()) + 1 if counter.exists() else 1000
counter.write_text(str(job))
(state / f"submitted_{job}.sh").write_text(script)
array = re.search(r"^#SBATCH --array=0-(\d+)", script, re.M)
elements = [f"{job}_{i}" for i in range(int(array.group(1)) + 1)] if array else [str(job)]
jobs_file = state / "jobs.json"
jobs = json.loads(jobs_file.read_text()) if jobs_file.exists() else {}
jobs.update({e: "PENDING" for e in elements})
jobs_file.write_text(json.dumps(jobs))
print(f"Submitted batch job {job}")
if os.environ.get("FAKE_SLURM_RUN", "1") != "0":
    subprocess.Popen([sys.executable, str(Path(__file__).with_name("fake_slurm_run")), str(job), json.dumps(elements),
                      str(state / f"submitted_{job}.sh")], start_new_session=True,
                     stdout=subprocess.DEVNULL, stderr=open(state / f"runner_{job}.err", "w"))
'''

RUN = r'''
import json, os, subprocess, sys
from pathlib import Path
job, elements, script = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
state = Path(os.environ["FAKE_SLURM_DIR"])

def mark(element, value):
    path = state / "jobs.json"
    jobs = json.loads(path.read_text())
    jobs[element] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(jobs))
    os.replace(tmp, path)

for i, element in enumerate(elements):
    env = dict(os.environ, SLURM_JOB_ID=str(int(job) + i), SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0",
               SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost")
    if "_" in element:
        env.update(SLURM_ARRAY_JOB_ID=job, SLURM_ARRAY_TASK_ID=element.split("_")[1])
    mark(element, "RUNNING")
    code = subprocess.run(["bash", script], env=env).returncode
    mark(element, "COMPLETED" if code == 0 else "FAILED")
'''

SRUN = r'''
import os, subprocess, sys
args = sys.argv[1:]
out = err = None
while args and args[0].startswith("--"):
    flag = args.pop(0)
    if flag in ("--output", "--error"):
        value = args.pop(0)
        for key, var in (("%A", "SLURM_ARRAY_JOB_ID"), ("%a", "SLURM_ARRAY_TASK_ID"), ("%j", "SLURM_JOB_ID")):
            value = value.replace(key, os.environ.get(var, os.environ["SLURM_JOB_ID"]))
        value = value.replace("%t", "0")
        if flag == "--output":
            out = value
        else:
            err = value
stdout = open(out, "a") if out else None
stderr = open(err, "a") if err else subprocess.STDOUT
sys.exit(subprocess.run(args, stdout=stdout, stderr=stderr).returncode)
'''

SQUEUE = r'''
import json, os, sys
from pathlib import Path
args = sys.argv[1:]
ids = set(args[args.index("-j") + 1].split(",")) if "-j" in args else None
path = Path(os.environ["FAKE_SLURM_DIR"]) / "jobs.json"
jobs = json.loads(path.read_text()) if path.exists() else {}
for element, value in jobs.items():
    if value in ("PENDING", "RUNNING") and (ids is None or element.split("_")[0] in ids):
        print(element, value)
'''

SCONTROL = r'''
import os, sys
from pathlib import Path
with open(Path(os.environ["FAKE_SLURM_DIR"]) / "scontrol.log", "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\n")
'''


def install(bin_dir: Path, state_dir: Path) -> dict:
    """Write the fake tools; returns the environment variables that put them to use."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name, body in (("sbatch", SBATCH), ("fake_slurm_run", RUN), ("srun", SRUN), ("squeue", SQUEUE),
                       ("scontrol", SCONTROL)):
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(state_dir)}


def jobs(state_dir: Path) -> dict:
    path = state_dir / "jobs.json"
    return json.loads(path.read_text()) if path.exists() else {}
