"""Leaderboard: submit, validate, render (Markdown, CSV, and the HTML page in headless Chromium),
and the nightly reference check (the workflows themselves: test_workflows.py).

Run folders are fabricated here with the real Result record and `summarize`, in tmp dirs: made-up
numbers for tests only. The committed leaderboard/submissions/ stays empty.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from harness import __version__
from harness import leaderboard as lb
from harness import leaderboard_render, nightly
from harness.cards import all_cards
from harness.cli import main
from harness.datasets.get import load_registry
from harness.errors import HarnessError
from harness.results import MetricStats, Result, read_results, summarize, write_result, write_results
from tests.support import Browser, chromium

REPO = Path(__file__).resolve().parents[1]
CARDS = all_cards()
SHA = "ab" * 32
BASE = {"coco": 0.0, "voc": 40.0, "seg": 25.0, "pose": 20.0}  # offset of each task from the entry's level


# ----------------------------------------------------------------------------- fixtures
TEST_IMAGES = load_registry().test_images  # the standard test splits' image counts


def fabricate_run(out: Path, *, level: float = 40.0, profile: str = "full", offsets=(-0.3, 0.0, 0.3),
                  tasks=("coco", "voc", "seg", "pose"), shift: dict | None = None, synthetic: bool = False,
                  sha: str | None = SHA, ckpt: str = "r50.pth") -> Path:
    """A run folder as `harness eval` writes it: per-seed result.json files and results.json.

    Metric k of a task is level + BASE[task] + k + offsets[seed] (+ shift[(task, protocol, metric)]).
    """
    shift = shift or {}
    results = []
    for task in tasks:
        card = CARDS[task]
        for protocol in card.protocols:
            for seed, offset in enumerate(offsets):
                metrics = {m: level + BASE[task] + k + offset + shift.get((task, protocol, m), 0.0)
                           for k, m in enumerate(card.metric.columns)}
                if task == "voc":
                    metrics["AP50_per_class"] = [50.0] * 20  # not scalar: summarize leaves it out
                p = card.profile(profile)
                r = Result(
                    backbone={"name": ckpt, "arch": "resnet50", "sha256": sha, "layout": "torchvision",
                              "parameters": 23_508_032},
                    task=task, card_hash=card.card_hash, protocol=protocol, profile=profile, seed=seed,
                    dataset={"name": card.dataset.name, "train_split": card.dataset.train.name,
                             "test_split": card.dataset.test.name, "images_trained": 100,
                             "images_scored": TEST_IMAGES.get(card.dataset.test.name, 50), "synthetic": synthetic},
                    metrics=metrics,
                    training={"iterations": p.iterations, "batch_size": p.batch_size, "lr": p.lr, "world_size": 8,
                              "device": "cuda", "precision": p.precision, "wall_time_s": 12.5 + seed},
                    created="2026-01-01T00:00:00+00:00",
                )
                write_result(out / task / protocol / f"seed{seed}" / "result.json", r)
                results.append(r)
    write_results(out / "results.json", summarize(results))
    return out / "results.json"


@pytest.fixture
def board(tmp_path) -> Path:
    path = tmp_path / "leaderboard"
    (path / "submissions").mkdir(parents=True)
    return path


def submit(board: Path, results: Path, name: str, *extra: str) -> int:
    return main(["leaderboard", "submit", "--results", str(results), "--name", name, "--pretraining-data",
                 "ImageNet-1k", "--pretraining-images", "1281167", "--dir", str(board), *extra])


def add_entry(board: Path, tmp: Path, name: str, **run) -> Path:
    assert submit(board, fabricate_run(tmp / lb.slugify(name), **run), name) == 0
    return board / "submissions" / f"{lb.slugify(name)}.json"


# ----------------------------------------------------------------------------- committed files
def test_committed_schema_equals_a_fresh_export():
    assert (REPO / "leaderboard" / "schema.json").read_text() == lb.schema_json()
    schema = json.loads(lb.schema_json())
    assert {"backbone", "results", "harness_version", "submitted"} <= set(schema["required"])


def test_committed_leaderboard_equals_a_fresh_render(capsys):
    assert leaderboard_render.stale_files(REPO / "leaderboard") == []
    assert main(["leaderboard", "render", "--check", "--dir", str(REPO / "leaderboard")]) == 0
    assert main(["leaderboard", "validate", "--dir", str(REPO / "leaderboard")]) == 0


# ----------------------------------------------------------------------------- submit
def test_submit_writes_a_submission_that_validates(board, tmp_path, capsys):
    results = fabricate_run(tmp_path / "run")
    assert submit(board, results, "My R50 (800 ep)", "--paper", "https://example.org/paper",
                  "--checkpoint-url", "https://example.org/r50.pth", "--hardware", "1x GPU") == 0
    path = board / "submissions" / "my-r50-800-ep.json"
    sub = lb.Submission.model_validate_json(path.read_text())
    assert sub.backbone.name == "My R50 (800 ep)" and sub.backbone.checkpoint_sha256 == SHA
    assert sub.backbone.pretraining_images == 1281167 and sub.harness_version == __version__
    assert len(sub.results) == 8  # 4 tasks x 2 protocols
    coco = next(r for r in sub.results if (r.task, r.protocol) == ("coco", "finetune"))
    per_seed = [json.loads((tmp_path / "run" / "coco" / "finetune" / f"seed{s}" / "result.json").read_text())
                ["metrics"]["AP"] for s in range(3)]
    assert coco.metrics["AP"].values == per_seed
    assert coco.metrics["AP"].mean == pytest.approx(statistics.mean(per_seed))
    assert coco.metrics["AP"].std == pytest.approx(statistics.stdev(per_seed))
    assert coco.training.wall_time_s == [12.5, 13.5, 14.5] and coco.card_hash == CARDS["coco"].card_hash
    assert "AP50_per_class" not in next(r for r in sub.results if r.task == "voc").metrics
    assert main(["leaderboard", "validate", "--dir", str(board)]) == 0
    assert "1 submission(s) valid" in capsys.readouterr().out


def _break_results(kind: str, out: Path) -> Path:
    if kind == "synthetic":
        return fabricate_run(out, synthetic=True)
    if kind == "smoke":
        return fabricate_run(out, profile="smoke")
    if kind == "two seeds":
        return fabricate_run(out, offsets=(0.0, 0.5))
    results = fabricate_run(out)
    if kind == "missing seed":
        (out / "voc" / "frozen" / "seed2" / "result.json").unlink()
    if kind == "off protocol":
        path = out / "pose" / "finetune" / "seed1" / "result.json"
        data = json.loads(path.read_text())
        data["training"]["off_protocol"] = ["total batch 8 (card: 16)"]
        path.write_text(json.dumps(data))
    if kind == "edited value":
        data = json.loads(results.read_text())
        data["runs"][0]["metrics"]["AP"]["values"][1] += 1.0
        results.write_text(json.dumps(data))
    return results


@pytest.mark.parametrize("kind, message", [
    ("synthetic", "synthetic results cannot go on the leaderboard"),
    ("smoke", "smoke results cannot go on the leaderboard"),
    ("two seeds", "at least 3 seeds"),
    ("missing seed", "no result.json for voc/frozen/full seed 2"),
    ("edited value", "differs from its result.json"),
    ("off protocol", "pose/finetune/full seed 1 is off-protocol (total batch 8 (card: 16))"),
])
def test_submit_refuses(board, tmp_path, capsys, kind, message):
    results = _break_results(kind, tmp_path / "run")
    assert submit(board, results, "Refused") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and message in err, err
    assert list((board / "submissions").iterdir()) == []


def test_submit_refuses_taken_names_and_bad_urls(board, tmp_path, capsys):
    results = fabricate_run(tmp_path / "run")
    assert submit(board, results, "Taken") == 0
    assert submit(board, results, "taken!") == 2  # the same slug
    assert "exists" in capsys.readouterr().err
    assert submit(board, results, "Other", "--checkpoint-url", "ftp://x/y.pth") == 2
    assert "backbone.checkpoint_url" in capsys.readouterr().err
    assert sorted(p.name for p in (board / "submissions").iterdir()) == ["taken.json"]


# ----------------------------------------------------------------------------- validate
def _first(d: dict, task="coco", protocol="finetune") -> dict:
    return next(r for r in d["results"] if (r["task"], r["protocol"]) == (task, protocol))


def _drop_seed(d):
    r = _first(d)
    r["seeds"] = r["seeds"][:2]
    r["training"]["wall_time_s"] = r["training"]["wall_time_s"][:2]
    for m in r["metrics"].values():
        m["values"] = m["values"][:2]
        m["mean"] = statistics.mean(m["values"])
        m["std"] = statistics.stdev(m["values"])


def _set_value(d, value):
    m = _first(d)["metrics"]["AP50"]
    m["values"][0] = value
    m["mean"], m["std"] = statistics.mean(m["values"]), statistics.stdev(m["values"])


BREAKS = [  # (mutation, field, message): each must give exactly one error line
    (lambda d: _first(d)["metrics"]["AP"].update(mean=_first(d)["metrics"]["AP"]["mean"] + 0.05),
     "results[0].metrics.AP.mean", "is not the mean of the values"),
    (lambda d: _first(d)["metrics"]["AP"].update(std=_first(d)["metrics"]["AP"]["std"] * 2),
     "results[0].metrics.AP.std", "is not the sample std"),
    (lambda d: _set_value(d, 150.0), "results[0].metrics.AP50.values", "outside 0..100"),
    (lambda d: _set_value(d, -1.0), "results[0].metrics.AP50.values", "outside 0..100"),
    (_drop_seed, "results[0].seeds", "at least 3 seeds"),
    (lambda d: _first(d)["dataset"].update(synthetic=True), "results[0].dataset.synthetic", "synthetic"),
    (lambda d: _first(d).update(profile="smoke"), "results[0].profile", "smoke results"),
    (lambda d: _first(d)["training"].update(off_protocol=["precision bf16 (card: fp32)"]),
     "results[0].training.off_protocol", "off-protocol results cannot go on the leaderboard"),
    (lambda d: _first(d).update(task="imagenet"), "results[0].task", "unknown task 'imagenet'"),
    (lambda d: _first(d)["metrics"].pop("AP"), "results[0].metrics", "primary metric 'AP' is missing"),
    (lambda d: _first(d)["dataset"].update(name="coco2014"), "results[0].dataset.name", "is not the coco card"),
    (lambda d: d["results"].append(dict(_first(d))), "results[8]", "coco/finetune/full appears twice"),
    (lambda d: _first(d).update(protocol="linear"), "results[0].protocol", "Input should be"),
    (lambda d: d["backbone"].pop("arch"), "backbone.arch", "Field required"),
    (lambda d: d["backbone"].update(parameters="many"), "backbone.parameters", "valid integer"),
    (lambda d: d["backbone"].update(checkpoint_sha256="xyz"), "backbone.checkpoint_sha256", "pattern"),
    (lambda d: d.update(leaderboard_rank=1), "leaderboard_rank", "Extra inputs are not permitted"),
    # what the result says it ran must be the card's protocol (a submission's word was taken for it before)
    (lambda d: _first(d)["dataset"].update(images_scored=50), "results[0].dataset.images_scored",
     "50 images scored; annotations/instances_val2017.json has 5000"),
    (lambda d: _first(d)["dataset"].update(test_split="annotations/instances_train2017.json"),
     "results[0].dataset.test_split", "is not the coco card's test split 'annotations/instances_val2017.json'"),
    (lambda d: _first(d)["training"].update(batch_size=8), "results[0].training.batch_size",
     "8 is not the card's 16 (and off_protocol is empty)"),
    (lambda d: _first(d)["training"].update(iterations=10), "results[0].training.iterations", "is not the card's 90000"),
    (lambda d: _first(d)["training"].update(precision="fp16"), "results[0].training.precision", "is not the card's"),
    (lambda d: _first(d)["training"].update(world_size=3), "results[0].training.world_size",
     "3 processes cannot share a total batch of 16"),
    (lambda d: _first(d)["training"].update(wall_time_s=[-1.0, 1.0, 1.0]), "results[0].training.wall_time_s",
     "wall times are non-negative seconds"),
]


def test_validate_reports_each_failure_as_one_line_naming_file_and_field(board, tmp_path, capsys):
    good = json.loads(add_entry(board, tmp_path, "Good").read_text())
    expected = []
    for i, (mutate, where, message) in enumerate(BREAKS):
        d = json.loads(json.dumps(good))
        d["backbone"]["name"] = f"Bad {i}"
        mutate(d)
        path = board / "submissions" / f"bad-{i}.json"
        path.write_text(json.dumps(d))
        errors, _, _ = lb.validate([path], board, CARDS)
        assert [(e.field, message in e.message) for e in errors] == [(where, True)], (where, errors)
        expected.append((path, where))
    (board / "submissions" / "broken.json").write_text('{"backbone": ')
    expected.append((board / "submissions" / "broken.json", "(file)"))
    misnamed = dict(good, backbone=dict(good["backbone"], name="Good"))
    (board / "submissions" / "good-copy.json").write_text(json.dumps(misnamed))
    expected += [(board / "submissions" / "good-copy.json", "backbone.name")] * 2  # file name, name taken

    capsys.readouterr()
    assert main(["leaderboard", "validate", "--dir", str(board)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == f"{len(expected)} problem(s) in {len(BREAKS) + 3} file(s)"
    assert sorted(line.split(": ")[0:2] for line in lines[:-1]) == sorted([str(p), w] for p, w in expected)
    assert any("not valid JSON" in line for line in lines) and any("already taken by" in line for line in lines)


def test_validate_checks_a_pull_requests_files_against_the_board(board, tmp_path, capsys):
    add_entry(board, tmp_path, "Taken")
    pr = tmp_path / "pr" / "taken.json"
    pr.parent.mkdir()
    shutil.copy(board / "submissions" / "taken.json", pr)
    assert main(["leaderboard", "validate", "--dir", str(board), str(pr)]) == 1
    assert f"{pr}: backbone.name: 'Taken' is already taken by" in capsys.readouterr().err


def test_validate_and_render_read_json_only_without_torch(board, tmp_path):
    path = add_entry(board, tmp_path, "Plain")
    code = ("import sys; from harness.cli import main; "
            f"rc = main(['leaderboard', 'validate', '--dir', {str(board)!r}, {str(path)!r}]); "
            f"rc += main(['leaderboard', 'render', '--dir', {str(board)!r}]); "
            "print(rc, sorted(m for m in ('torch', 'torchvision', 'timm', 'harness.checkpoints') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "0 []"


def test_results_under_an_older_card_are_shown_apart(board, tmp_path, capsys):
    path = add_entry(board, tmp_path, "Old coco", level=45.0)
    d = json.loads(path.read_text())
    for r in d["results"]:
        if r["task"] == "coco":
            r["card_hash"] = "0" * 64
    path.write_text(json.dumps(d))
    add_entry(board, tmp_path, "Current", level=40.0)
    capsys.readouterr()
    assert main(["leaderboard", "validate", "--dir", str(board)]) == 0
    out = capsys.readouterr().out
    assert f"note: {path}: results[0].card_hash: made under an older coco card" in out
    files = leaderboard_render.render(board, CARDS)
    readme = files["README.md"]
    measured, older = readme.split("## Older card version (full schedule)")
    old_rows = [line for line in older.splitlines() if line.startswith("| Old coco")]
    assert len(old_rows) == 1 and "45.0 ± 0.3" in old_rows[0] and "coco:00000000" in old_rows[0]
    current = [line for line in measured.splitlines() if line.startswith("| Old coco")]
    cells = current[0].strip("|").split(" | ")
    assert cells[3:6] == ["—", "—", "85.0 ± 0.3"]  # COCO moved to the older section; VOC AP50 stays current
    rows = list(csv.DictReader(io.StringIO(files["leaderboard.csv"])))
    assert [(r["section"], r["name"]) for r in rows] == [("measured", "Current"), ("measured", "Old coco"),
                                                        ("older-full", "Old coco")]


# ----------------------------------------------------------------------------- render
HEADER = ("| Backbone | Arch | Pretraining data | COCO mAP@[.5,.95] fine-tune | COCO mAP@[.5,.95] frozen | VOC AP50 "
          "| VOC AP | Seg mIoU fine-tune | Seg mIoU frozen | Pose AP | Seeds |")


def _table(readme: str, title: str) -> list[list[str]]:
    part = readme.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [line for line in part.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines]


def test_render_sorts_by_coco_ap_and_shows_mean_and_std(board, tmp_path):
    add_entry(board, tmp_path, "Middle", level=38.0)
    add_entry(board, tmp_path, "Top", level=42.5, offsets=(-1.0, 0.0, 1.0, 2.0))
    add_entry(board, tmp_path, "Bottom", level=35.25)
    add_entry(board, tmp_path, "No COCO", tasks=("voc", "seg"), level=50.0)
    add_entry(board, tmp_path, "Short one", profile="short", offsets=(0.0,), level=55.0)
    files = leaderboard_render.render(board, CARDS)
    readme = files["README.md"]
    assert HEADER in readme
    table = _table(readme, "Measured (full schedule)")
    assert [row[0] for row in table[2:]] == ["Top", "Middle", "Bottom", "No COCO"]
    top = table[2]
    assert top[1:3] == ["resnet50", "ImageNet-1k (1.28M images)"]
    # Top's coco finetune AP values: 41.5, 42.5, 43.5, 44.5
    assert top[3] == f"{statistics.mean([41.5, 42.5, 43.5, 44.5]):.1f} ± {statistics.stdev([41.5, 42.5, 43.5, 44.5]):.1f}"
    assert top[5] == "83.0 ± 1.3" and top[6] == "84.0 ± 1.3"  # VOC AP50 = 42.5 + 40 + mean offset 0.5; AP one more
    assert top[-1] == "4" and table[5][3] == "—" and table[5][-1] == "3"
    short = _table(readme, "Measured, short schedule")
    assert [row[0] for row in short[2:]] == ["Short one"] and short[2][3] == "55.0"  # one seed: no ± std
    assert "Short one" not in "".join(map(str, table))
    rows = list(csv.DictReader(io.StringIO(files["leaderboard.csv"])))
    assert [r["name"] for r in rows] == ["Top", "Middle", "Bottom", "No COCO", "Short one"]
    assert float(rows[0]["coco_finetune_AP_mean"]) == json.loads(
        (board / "submissions" / "top.json").read_text())["results"][0]["metrics"]["AP"]["mean"]
    assert rows[0]["coco_finetune_AP_n"] == "4" and rows[3]["coco_finetune_AP_mean"] == ""
    assert rows[4]["section"] == "short"


def test_render_of_an_empty_board(board, capsys):
    assert main(["leaderboard", "render", "--dir", str(board)]) == 0
    readme = (board / "README.md").read_text()
    assert "## Measured (full schedule)" in readme and "No entries yet." in readme and "Reported" not in readme
    assert len((board / "leaderboard.csv").read_text().splitlines()) == 1
    page = (board / "index.html").read_text()
    assert "<tbody>" not in page and "No entries yet." in page
    assert main(["leaderboard", "render", "--check", "--dir", str(board)]) == 0


def test_render_check_finds_a_stale_table(board, tmp_path, capsys):
    assert main(["leaderboard", "render", "--dir", str(board)]) == 0
    add_entry(board, tmp_path, "Late")
    capsys.readouterr()
    assert main(["leaderboard", "render", "--check", "--dir", str(board)]) == 1
    err = capsys.readouterr().err
    assert f"{board / 'README.md'}: differs from a fresh render" in err and "schema.json" not in err


REPORTED = {"reported": [{
    "name": "Published R50", "arch": "resnet50", "pretraining_data": "ImageNet-1M", "citation": "Test et al. 2099, Table 9",
    "url": "https://example.org/paper", "results": [{"task": "coco", "protocol": "finetune", "trials": 5,
                                                     "metrics": {"AP": 99.0}}]}]}


def test_reported_rows_stay_apart_and_marked(board, tmp_path):
    (board / "reported.yaml").write_text(yaml.safe_dump(REPORTED))
    add_entry(board, tmp_path, "Measured", level=40.0)
    files = leaderboard_render.render(board, CARDS)
    readme = files["README.md"]
    measured = _table(readme, "Measured (full schedule)")
    assert [row[0] for row in measured[2:]] == ["Measured"]  # 99.0 would rank first if mixed in
    reported = _table(readme, "Reported (published numbers, not measured by harness)")
    assert reported[2][0] == "[Published R50](https://example.org/paper) (reported)"
    assert reported[2][3] == "99.0" and reported[2][-1] == "Test et al. 2099, Table 9" and reported[2][-2] == "5"
    rows = list(csv.DictReader(io.StringIO(files["leaderboard.csv"])))
    assert [(r["section"], r["name"]) for r in rows] == [("measured", "Measured"), ("reported", "Published R50")]
    assert '<table class="board reported">' in files["index.html"]
    bad = json.loads(json.dumps(REPORTED))
    bad["reported"][0]["results"][0]["metrics"]["AP"] = 120.0
    (board / "reported.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(HarnessError, match=r"reported\[0\]\.results\[0\]\.metrics\.AP: 120.0 is outside 0..100"):
        leaderboard_render.render(board, CARDS)


def test_the_committed_reported_rows_cite_a_source():
    data = yaml.safe_load((REPO / "leaderboard" / "reported.yaml").read_text())
    for entry in lb.ReportedFile.model_validate(data).reported:
        assert entry.url.startswith("https://") and entry.citation


def test_page_is_self_contained(board, tmp_path):
    (board / "reported.yaml").write_text(yaml.safe_dump(REPORTED))
    add_entry(board, tmp_path, "A <b>bold</b> & risky name", level=40.0)
    page = leaderboard_render.render(board, CARDS)["index.html"]
    assert "default-src 'none'" in page
    for needle in ("<link", " src=", "url(", "@import", "<img", "<iframe"):
        assert needle not in page
    assert "A &lt;b&gt;bold&lt;/b&gt; &amp; risky name" in page and "<b>bold" not in page


# ----------------------------------------------------------------------------- the page in Chromium
@pytest.fixture
def browser():
    exe = chromium()
    with tempfile.TemporaryDirectory(prefix="harness-chromium-") as profile:
        b = Browser(exe, Path(profile))
        try:
            yield b
        finally:
            b.close()


def _names(browser, section: str) -> list[str]:
    return browser.js(f"Array.from(document.querySelectorAll('#{section} tbody tr'))"
                      ".map(r => r.cells[0].textContent)")


def test_page_in_headless_chromium_shows_every_row_and_sorts(board, tmp_path, browser):
    (board / "reported.yaml").write_text(yaml.safe_dump(REPORTED))
    add_entry(board, tmp_path, "Middle", level=38.0)
    add_entry(board, tmp_path, "top", level=42.5)
    add_entry(board, tmp_path, "Bottom", level=35.25)
    add_entry(board, tmp_path, "No COCO", tasks=("voc", "seg"), level=50.0)
    assert main(["leaderboard", "render", "--dir", str(board)]) == 0
    browser.open((board / "index.html").as_uri())

    assert browser.js("document.title") == "harness leaderboard"
    visible = browser.js("Array.from(document.querySelectorAll('tbody tr'))"
                         ".map(r => [r.closest('section').id, r.cells[0].textContent,"
                         " r.getClientRects().length > 0 && r.offsetHeight > 0])")
    assert visible == [["measured", n, True] for n in ("top", "Middle", "Bottom", "No COCO")] + \
                      [["reported", "Published R50reported", True]]
    assert browser.js("performance.getEntriesByType('resource').length") == 0  # nothing loaded besides the page

    coco = "#measured th:nth-child(4)"
    assert browser.js(f"document.querySelector('{coco}').textContent") == "COCO mAP@[.5,.95] fine-tune"
    assert browser.js(f"document.querySelector('{coco}').getAttribute('aria-sort')") == "descending"
    browser.click(coco)
    assert _names(browser, "measured") == ["Bottom", "Middle", "top", "No COCO"]  # ascending, empty cells last
    assert browser.js(f"document.querySelector('{coco}').getAttribute('aria-sort')") == "ascending"
    browser.click(coco)
    assert _names(browser, "measured") == ["top", "Middle", "Bottom", "No COCO"]
    browser.click("#measured th:nth-child(1)")  # Backbone: text, case-insensitive
    assert _names(browser, "measured") == ["Bottom", "Middle", "No COCO", "top"]
    browser.click("#measured th:nth-child(6)")  # VOC AP50: No COCO (90.0) leads
    assert _names(browser, "measured")[0] == "No COCO"
    assert _names(browser, "reported") == ["Published R50reported"]  # sorting one table leaves the others
    assert not [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]


def test_empty_page_opens_in_headless_chromium(board, browser):
    assert main(["leaderboard", "render", "--dir", str(board)]) == 0
    browser.open((board / "index.html").as_uri())
    assert browser.js("document.querySelectorAll('tbody tr').length") == 0
    assert browser.js("document.querySelector('#measured p.empty').textContent") == "No entries yet."
    assert not [e for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]


# ----------------------------------------------------------------------------- nightly reference
def test_tolerance_comes_from_the_seed_spread():
    ref = MetricStats(mean=40.0, std=0.3, values=[39.7, 40.0, 40.3])
    assert nightly.tolerance(ref, 1, 3.0, 0.2) == pytest.approx(3 * 0.3 * (1 / 3 + 1) ** 0.5)
    assert nightly.tolerance(ref, 3, 3.0, 0.2) == pytest.approx(3 * 0.3 * (2 / 3) ** 0.5)
    assert nightly.tolerance(MetricStats(mean=40.0, std=0.0, values=[40.0] * 3), 1, 3.0, 0.2) == 0.2


def test_reference_check_passes_within_and_fails_outside_the_tolerance(tmp_path, capsys):
    ref_results = fabricate_run(tmp_path / "ref", profile="short")  # per-seed std 0.3 everywhere
    ref_path = tmp_path / "reference" / "r50.json"
    assert main(["leaderboard", "make-reference", "--results", str(ref_results), "--out", str(ref_path)]) == 0
    ref = nightly.load_reference(ref_path)
    assert len(ref.runs) == 8 and set(ref.runs[0].metrics) == set(CARDS[ref.runs[0].task].metric.columns)
    tol = 3 * 0.3 * (1 / 3 + 1) ** 0.5  # about 1.04 for one nightly seed

    def nightly_run(name, **shift):
        shifts = {("coco", "finetune", "AP"): shift.get("coco", 0.0), ("seg", "frozen", "mIoU"): shift.get("seg", 0.0)}
        return fabricate_run(tmp_path / name, profile="short", offsets=(0.0,), shift=shifts)

    capsys.readouterr()
    same = nightly_run("same", coco=-0.9, seg=0.9)  # inside the tolerance both ways
    assert main(["leaderboard", "check-reference", "--results", str(same), "--reference", str(ref_path)]) == 0
    assert "all " in capsys.readouterr().out
    worse = nightly_run("worse", coco=-(tol + 0.1))
    assert main(["leaderboard", "check-reference", "--results", str(worse), "--reference", str(ref_path)]) == 1
    out = capsys.readouterr()
    failed = [line for line in out.out.splitlines() if not line.endswith(" ok")]
    assert len(failed) == 1 and failed[0].startswith("coco/finetune/short") and failed[0].endswith("below")
    n_checks = sum(len(CARDS[t].metric.columns) * len(CARDS[t].protocols) for t in ("coco", "voc", "seg", "pose"))
    assert " AP " in failed[0] and f"1 of {n_checks} check(s) outside" in out.err
    better = nightly_run("better", seg=tol + 0.1)
    assert main(["leaderboard", "check-reference", "--results", str(better), "--reference", str(ref_path)]) == 1
    assert [c.status for c in nightly.check_reference(better, ref) if c.failed] == ["above"]


def test_reference_check_fails_on_missing_runs_changed_cards_and_other_backbones(tmp_path):
    ref = nightly.make_reference(fabricate_run(tmp_path / "ref", profile="short"))
    partial = fabricate_run(tmp_path / "partial", profile="short", offsets=(0.0,), tasks=("coco", "voc", "seg"))
    assert sorted(c.run for c in nightly.check_reference(partial, ref) if c.failed) == ["pose/finetune/short",
                                                                                  "pose/frozen/short"]
    changed = fabricate_run(tmp_path / "changed", profile="short", offsets=(0.0,))
    data = json.loads(changed.read_text())
    data["runs"][0]["card_hash"] = "1" * 64
    changed.write_text(json.dumps(data))
    assert [c.status for c in nightly.check_reference(changed, ref) if c.failed] == ["card changed: re-record the reference"]
    other = fabricate_run(tmp_path / "other", profile="short", offsets=(0.0,), sha="cd" * 32)
    with pytest.raises(HarnessError, match="is not the reference's"):
        nightly.check_reference(other, ref)


@pytest.mark.parametrize("kind, message", [
    ("one seed", "a reference needs at least 3"),
    ("smoke", "smoke run"),
    ("synthetic", "synthetic results cannot be a reference"),
])
def test_make_reference_refuses(tmp_path, kind, message):
    run = {"one seed": dict(offsets=(0.0,)), "smoke": dict(profile="smoke"), "synthetic": dict(synthetic=True)}[kind]
    with pytest.raises(HarnessError, match=message):
        nightly.make_reference(fabricate_run(tmp_path / "run", **run))


# ----------------------------------------------------------------------------- results.json versions
def test_results_json_without_a_schema_version_reads_and_submits_the_same(board, tmp_path):
    """A results.json written before it recorded schema_version (that layout is version 1) still reads:
    the same submission and the same reference check as a current file."""
    current = fabricate_run(tmp_path / "current", profile="short")
    data = json.loads(current.read_text())
    assert data.pop("schema_version") == 1 and set(data) == {"backbone", "synthetic", "runs"}
    old = fabricate_run(tmp_path / "old", profile="short")
    old.write_text(json.dumps(data, indent=2))
    assert read_results(old) == read_results(current)
    day = dt.date(2026, 1, 2)
    subs = [lb.build_submission(p, name="R50", pretraining_data="IN-1k", today=day) for p in (old, current)]
    assert subs[0] == subs[1] and subs[0].results[0].metrics["AP"].values == data["runs"][0]["metrics"]["AP"]["values"]
    ref = nightly.make_reference(current)
    assert [str(c) for c in nightly.check_reference(old, ref)] == [str(c) for c in nightly.check_reference(current, ref)]


def test_results_json_of_a_newer_harness_or_another_file_is_a_one_line_error(tmp_path):
    path = fabricate_run(tmp_path / "run", profile="short")
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, "schema_version": 2}))
    with pytest.raises(HarnessError, match=r"schema version 2 is newer than this harness reads \(1\)"):
        read_results(path)
    seed = tmp_path / "run" / "coco" / "finetune" / "seed0" / "result.json"
    with pytest.raises(HarnessError, match="not a harness results.json \\(needs backbone and runs\\)"):
        nightly.make_reference(seed)
    path.write_text(json.dumps({**data, "runs": [{**data["runs"][0], "seeds": "0,1,2"}]}))
    with pytest.raises(HarnessError, match=r"not a harness results.json \(runs\[0\].seeds: "):
        read_results(path)
