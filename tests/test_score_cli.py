"""`harness score` end to end: JSON and table output, one-line errors with a non-zero exit (in this
process; one test runs `python -m harness` itself)."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from harness.errors import HarnessError
from tests.support import run_cli, run_cli_fresh


@pytest.fixture
def run(capsys):
    """``harness ARGS`` in-process, as (returncode, stdout, stderr) like a finished subprocess."""
    def run(*args):
        code, out, err = run_cli(capsys, *args)
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return run


GT = {"images": [{"id": 7, "width": 100, "height": 80, "file_name": "a.jpg"}, {"id": 9, "width": 100, "height": 80, "file_name": "b.jpg"}],
      "annotations": [{"id": 1, "image_id": 7, "category_id": 18, "bbox": [10, 10, 40, 30], "area": 1200, "iscrowd": 0}],
      "categories": [{"id": 18, "name": "dog"}]}


@pytest.fixture
def gt_file(tmp_path):
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(GT))
    return path


def test_json_and_table_output(run, gt_file, tmp_path):
    pred = tmp_path / "dets.json"
    pred.write_text(json.dumps([{"image_id": 7, "category_id": 18, "bbox": [10, 10, 40, 30], "score": 0.9}]))
    out = run("score", "--task", "coco", "--gt", gt_file, "--pred", pred, "--json")
    assert out.returncode == 0, out.stderr
    metrics = json.loads(out.stdout)
    assert metrics["AP"] == pytest.approx(100.0) and metrics["APs"] is None
    table = run("score", "--task", "coco", "--gt", gt_file, "--pred", pred)
    assert "AP50" in table.stdout and "100.000" in table.stdout


@pytest.mark.parametrize(
    "content, message",
    [
        ("[{\"image_id\": 7,", "not valid JSON"),
        (json.dumps([{"image_id": 8, "category_id": 18, "bbox": [0, 0, 1, 1], "score": 1}]), "image_id 8, which is not in the ground truth"),
        (json.dumps([{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 1}]), "category_id 1, which is not in the ground truth"),
        ("[{\"image_id\": 7, \"category_id\": 18, \"bbox\": [0, NaN, 1, 1], \"score\": 1}]", "NaN or infinite"),
        (json.dumps([{"image_id": 7, "category_id": 18, "bbox": [0, 0, -1, 1], "score": 1}]), "negative-size bbox"),
        (json.dumps({"annotations": []}), "expected a JSON list"),
    ],
)
def test_bad_prediction_files(run, gt_file, tmp_path, content, message):
    pred = tmp_path / "dets.json"
    pred.write_text(content)
    out = run("score", "--task", "coco", "--gt", gt_file, "--pred", pred, "--json")
    assert out.returncode == 2
    assert out.stdout == ""
    line = out.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    assert message in line and str(pred) in line


KEYPOINT_GT = {"images": [{"id": 1}], "categories": [{"id": 1, "name": "person", "keypoints": ["nose", "eye"]}],
               "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 200, 200], "area": 40000,
                                "iscrowd": 0, "keypoints": [50, 50, 2, 60, 40, 1], "num_keypoints": 2}]}


def _without(gt: dict, key: str) -> dict:
    return {**gt, "annotations": [{k: v for k, v in a.items() if k != key} for a in gt["annotations"]]}


@pytest.mark.parametrize(
    "task, gt, message",
    [
        # pycocotools refuses these (KeyError); scoring them as 0 gave a 200x200 object as small (APs 100, APl None)
        ("coco", _without(GT, "area"), "annotations[0] has no 'area'"),
        ("coco", _without(GT, "id"), "annotations[0] has no 'id'"),
        ("pose", _without(KEYPOINT_GT, "num_keypoints"), "needs 'keypoints' (6 numbers"),  # was: every metric None
        ("pose", _without(KEYPOINT_GT, "keypoints"), "needs 'keypoints' (6 numbers"),  # was: a KeyError traceback
        ("pose", {**KEYPOINT_GT, "annotations": [{**KEYPOINT_GT["annotations"][0], "keypoints": [50, 50, 2]}]},
         "needs 'keypoints' (6 numbers"),
        ("coco", {**GT, "images": [{**GT["images"][0], "id": "a"}, GT["images"][1]]},
         "images[0] has id 'a': COCO ids are integers"),  # was: a ValueError traceback from the evaluator
        ("coco", {**GT, "categories": [{"id": 18.0, "name": "dog"}]}, "categories[0] has id 18.0: COCO ids are integers"),
        ("coco", {**GT, "annotations": GT["annotations"] * 2}, "annotations[1] repeats annotation id 1"),
        ("coco", {**GT, "annotations": [{**GT["annotations"][0], "id": [1]}]}, "annotations[0] has id [1]: COCO ids are"),
        ("coco", {**GT, "images": GT["images"] + GT["images"][:1]}, "images[2] repeats id 7"),
        ("coco", {**GT, "annotations": []}, "no annotations: nothing to train on or score against"),  # was: all null
        ("coco", {**GT, "annotations": [{**GT["annotations"][0], "bbox": [10, float("nan"), 40, 30]}]},
         "annotations[0] has a NaN, infinite or negative-size bbox"),  # was: scored, the AP changed
        ("coco", {**GT, "annotations": [{**GT["annotations"][0], "bbox": [10, 10, 40]}]}, "needs a 'bbox' of 4 numbers"),
        ("coco", {**GT, "annotations": [{**GT["annotations"][0], "bbox": "10 10 40 30"}]}, "needs a 'bbox' of 4 numbers"),
        ("coco", {**GT, "annotations": [{**GT["annotations"][0], "image_id": [7]}]}, "names image_id [7], not in 'images'"),
        ("coco", {**GT, "annotations": [{**GT["annotations"][0], "iscrowd": "0"}]}, "has iscrowd '0'; COCO's is 0 or 1"),
    ],
)
def test_ground_truth_that_pycocotools_refuses_is_refused_in_one_line(run, tmp_path, task, gt, message):
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "p.json").write_text("[]")
    out = run("score", "--task", task, "--gt", tmp_path / "gt.json", "--pred", tmp_path / "p.json", "--json")
    line = out.stderr.strip()
    assert out.returncode == 2 and out.stdout == "" and "\n" not in line and "Traceback" not in line
    assert message in line and str(tmp_path / "gt.json") in line


def test_missing_files_and_empty_predictions(run, gt_file, tmp_path, recwarn):
    out = run("score", "--task", "coco", "--gt", tmp_path / "nope.json", "--pred", tmp_path / "x.json")
    assert out.returncode == 2 and "COCO ground-truth file not found" in out.stderr
    out = run("score", "--task", "coco", "--gt", gt_file, "--pred", tmp_path / "x.json")
    assert out.returncode == 2 and "prediction file not found" in out.stderr
    (tmp_path / "empty.json").write_text("[]")
    out = run("score", "--task", "coco", "--gt", gt_file, "--pred", tmp_path / "empty.json", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["AP"] == 0.0
    told = out.stderr + "".join(str(w.message) for w in recwarn)  # in-process, a warning is recorded, not printed
    assert "empty prediction list" in told
    out = run("score", "--task", "voc", "--gt", tmp_path / "VOC2007", "--pred", tmp_path / "empty.json", "--split", "test")
    assert out.returncode == 2 and "VOC folder not found" in out.stderr


def test_voc_folder_with_a_missing_annotation(run, tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2007"
    (voc / "ImageSets/Main").mkdir(parents=True)
    (voc / "Annotations").mkdir()
    (voc / "ImageSets/Main/test.txt").write_text("000001\n")
    (tmp_path / "p.json").write_text("[]")
    out = run("score", "--task", "voc", "--gt", voc, "--split", "test", "--pred", tmp_path / "p.json")
    assert out.returncode == 2 and "VOC annotation not found" in out.stderr and "000001.xml" in out.stderr
    out = run("score", "--task", "voc", "--gt", voc, "--split", "val", "--pred", tmp_path / "p.json")
    assert out.returncode == 2 and "VOC split list not found" in out.stderr


def test_voc_year_must_be_a_year_and_agree_with_the_folder(run, tmp_path):
    """--year picks the AP definition (11-point before 2010): it may not silently overrule the folder's name."""
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    voc.mkdir(parents=True)
    (tmp_path / "p.json").write_text("[]")
    for year, message in [("abc", "--year 'abc': a VOC year such as 2007 or 2012"),
                          ("12", "--year '12': VOC ran from 2005 to 2012"),
                          ("2007", "--year 2007 contradicts the folder VOC2012; leave --year out")]:
        out = run("score", "--task", "voc", "--gt", voc, "--split", "val", "--pred", tmp_path / "p.json", "--year", year)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr


def test_python_m_harness_exits_with_the_code_and_one_line(tmp_path):
    """The module entry point: a user mistake is one line on stderr and exit code 2, no traceback
    (a command that needs no torch, so the process starts quickly)."""
    out = subprocess.run([sys.executable, "-m", "harness", "data", "check", "--root", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"harness: error: data root not found: {tmp_path / 'none'}"]


def test_commands_that_read_cards_and_folders_import_no_torch(synthetic_root, tmp_path):
    """`harness data synth` draws and writes images; `data check`, `tasks list` and `backbones list`
    read folders and cards: none loads torch, so each starts in well under a second (with it, 2-4 s).
    (`harness status` and SLURM submission: tests/test_launch.py.)"""
    sizes = "coco_train=1,coco_val=1,voc07_trainval=1,voc07_test=1,voc12_train=1,voc12_val=1,voc12_aug_extra=0"
    codes, modules, printed = run_cli_fresh(["data", "synth", "--out", tmp_path / "synth", "--sizes", sizes],
                                            ["data", "check", "--root", synthetic_root], ["tasks", "list"],
                                            ["backbones", "list"])
    assert codes == [0, 0, 0, 0] and modules == []
    assert "present" in printed and "backbone card(s) in" in printed and "task card(s) in" in printed
    assert (tmp_path / "synth" / "VOCdevkit" / "VOC2012" / "SegmentationClass").is_dir()


def test_options_that_would_be_ignored_are_refused(run, gt_file, tmp_path, capsys):
    """An option the command would not use is a mistake to report, not to drop (the score or data were made without it)."""
    (tmp_path / "p.json").write_text("[]")
    out = run("score", "--task", "coco", "--gt", gt_file, "--pred", tmp_path / "p.json", "--split", "test")
    assert out.returncode == 2 and "--split and --year are for VOC folders" in out.stderr
    out = run("score", "--task", "pose", "--gt", gt_file, "--pred", tmp_path / "p.json", "--year", "2007")
    assert out.returncode == 2 and "--split and --year are for VOC folders" in out.stderr
    out = run("score", "--task", "pose", "--gt", gt_file, "--pred", tmp_path / "p.json")  # an instances file
    assert out.returncode == 2 and "ground truth has no category with keypoints" in out.stderr
    out = run("score", "--task", "coco", "--gt", tmp_path, "--pred", tmp_path / "p.json")
    assert out.returncode == 2 and f"COCO ground-truth file expected, got a folder: {tmp_path}" in out.stderr
    out = run("data", "synth", "--out", tmp_path / "d", "--size", "5", "--label-noise", "0.5")
    assert out.returncode == 2 and "--size is for --pretrain" in out.stderr and not (tmp_path / "d").exists()
    out = run("eval", "--backbone", "random:resnet18", "--key", "student", "--tasks", "voc", "--synthetic",
              "--out", tmp_path / "e", "--dry-run")
    assert out.returncode == 2 and "--key reads a checkpoint file; random:resnet18 has none" in out.stderr
    out = run("status", "--out", tmp_path, "--poll", "-5")
    assert out.returncode == 2 and "--poll must be a positive number of seconds" in out.stderr


def test_mistakes_are_found_early_and_named_as_given(run, tmp_path):
    """--dry-run finds what the cell would refuse; an error names the option given; a list in it stays short."""
    out = run("eval", "--backbone", "random:resnet18", "--tasks", "voc", "--batch-size", "3", "--accumulate", "2",
              "--synthetic", "--out", tmp_path / "e", "--dry-run")
    assert out.returncode == 2 and "a total batch of 3 does not split into --accumulate 2" in out.stderr
    out = run("scaling", "--data", tmp_path, "--arch", "resnet18", "--fractions", "0.1,2", "--tasks", "voc",
              "--out", tmp_path / "s")
    assert out.returncode == 2 and "--fractions: 2.0 is not in (0, 1]" in out.stderr
    import torch
    torch.save({f"head{i}.weight": torch.zeros(1) for i in range(500)}, tmp_path / "many.pth")
    out = run("inspect", "--backbone", tmp_path / "many.pth", "--arch", "resnet18", "--key", "bogus")
    assert out.returncode == 2 and "checkpoint has no entry 'bogus'" in out.stderr and "(500 in all)" in out.stderr
    assert len(out.stderr) < 400
    # a launcher checks the backbone exists before any job (each job failed on it, after the queue)
    out = run("eval", "--backbone", tmp_path / "nope.pth", "--tasks", "voc", "--synthetic", "--out", tmp_path / "l",
              "--launcher", "local")
    assert out.returncode == 2 and "nope.pth: no such checkpoint file" in out.stderr and not (tmp_path / "l").exists()


def test_usage_mistakes_and_library_warnings_are_one_line(capsys):
    """argparse's own errors name the help to read instead of printing the usage block; a warning
    from a library prints as one line with its category and origin, without a source line under it."""
    import warnings

    from harness.errors import one_line_warnings

    for args, message in [((), "the following arguments are required: command (see `harness --help`)"),
                          (("eval", "--profile", "smok"), "argument --profile: invalid choice: 'smok' (choose from "
                           "'full', 'short', 'smoke') (see `harness eval --help`)")]:
        code, out, err = run_cli(capsys, *args)
        assert code == 2 and out == "" and err.splitlines() == [f"harness: error: {message}"]
    with one_line_warnings():
        warnings.warn_explicit("two\nlines", UserWarning, "/x/site-packages/torch/utils/data/dataloader.py", 627)
    assert capsys.readouterr().err.splitlines() == [
        "harness: warning: two lines (UserWarning at torch/utils/data/dataloader.py:627)"]


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`harness ... | head`: the reader gone before anything is printed, no error line and exit 141."""
    proc = subprocess.Popen([sys.executable, "-m", "harness", "tasks", "list"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # long before the new interpreter prints: its writes find no reader
    assert proc.wait(timeout=60) == 141 and proc.stderr.read() == ""


class _Broken(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, index):
        raise HarnessError("/data/x.jpg: not a readable image (truncated)")


def test_an_error_in_a_data_loader_worker_reads_as_its_own_message():
    """torch re-raises a worker's error as "Caught HarnessError in DataLoader worker process 0.
    Original Traceback ...": the user sees the error's own line (every GPU run loads in workers)."""
    from harness.errors import user_message

    with pytest.raises(HarnessError) as caught:
        next(iter(torch.utils.data.DataLoader(_Broken(), num_workers=1)))
    assert "Original Traceback" in str(caught.value)
    assert user_message(caught.value) == "/data/x.jpg: not a readable image (truncated)"
    assert user_message(HarnessError("plain\nmessage")) == "plain message"
