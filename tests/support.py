"""Helpers shared by several test files: tiny models and datasets, shrunk task cards, the CLI
called in-process, and a headless-Chromium client for the leaderboard page.

Imported as ``tests.support`` (``tests`` is a package, so pytest puts the checkout on ``sys.path``;
the scripts some tests start run with the checkout on ``PYTHONPATH``)."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import Dataset

from harness.backbones import FeatureInfo, build_backbone
from harness.cards import cards_dir
from harness.cli import main
from harness.engine import TrainConfig
from harness.models.detection import build_detector

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the CLI, in-process
def run_cli(capsys, *args) -> tuple[int, str, str]:
    """``harness ARGS`` in this process: (exit code, stdout, stderr). argparse's own errors exit
    through ``SystemExit``; its code is returned like any other."""
    capsys.readouterr()  # what earlier steps printed is not this command's
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


_FRESH = ("import json, sys\nfrom harness.cli import main\n"
          "codes = [main(args) for args in json.loads(sys.argv[1])]\n"
          "print(json.dumps([codes, sorted(m for m in ('torch', 'torchvision', 'timm') if m in sys.modules)]))")


def run_cli_fresh(*commands, env: dict | None = None) -> tuple[list[int], list[str], str]:
    """Each ``harness`` command (a list of arguments) in turn, in one new interpreter: (their exit
    codes, which of torch, torchvision and timm got loaded, what they printed)."""
    args = json.dumps([[str(a) for a in command] for command in commands])
    done = subprocess.run([sys.executable, "-c", _FRESH, args], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    *printed, last = done.stdout.strip().splitlines()
    codes, modules = json.loads(last)
    return codes, modules, "\n".join(printed)


# ----------------------------------------------------------------------------- shrunk task cards
TINY = {"iterations": 3, "batch_size": 2, "lr": 0.01, "steps": [], "warmup_iters": 1, "train_images": 6,
        "checkpoint_period": 2}


def tiny_cards(folder: Path, tasks=None, **changes) -> Path:
    """Copies of the shipped cards (all, or those named in ``tasks``) whose smoke profile runs a few
    iterations (``TINY``, then ``changes``) on 6 training images; point ``HARNESS_TASKS`` at ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for path in cards_dir().glob("*.yaml"):
        if tasks is not None and path.stem not in tasks:
            continue
        card = yaml.safe_load(path.read_text())
        smoke = card["profiles"]["smoke"]
        smoke.update(TINY, **changes)
        if smoke.get("schedule") == "poly":
            smoke.pop("steps")
        (folder / path.name).write_text(yaml.safe_dump(card))
    return folder


# ----------------------------------------------------------------------------- tiny models and data
SMALL_ANCHORS = (8, 16, 32, 64, 128)
# timm's 0.37M-parameter ResNet (stages c2..c5 and a layer4, so the C4 head works; odd widths, c4 192 and
# c5 96, so heads must take channels from the backbone): for tests of what runs around the model
# (launchers, resume, seeds, torchrun). A tiny voc/seg cell costs about a quarter of ResNet-18's.
SMALL_ARCH = "timm:test_resnet"


def tiny_backbone(arch: str = "resnet18") -> nn.Module:
    return build_backbone(arch)


class PyramidStandIn(nn.Module):
    """A non-ResNet backbone honouring the contract (c2..c5 + feature_info) with no ``layer4``."""

    def __init__(self, widths=(8, 16, 24, 32)):
        super().__init__()
        self.arch = "pyramid-standin"
        self.stem = nn.Conv2d(3, widths[0], 4, stride=4)
        self.stages = nn.ModuleList(
            [nn.Identity()] + [nn.Conv2d(a, b, 2, stride=2) for a, b in zip(widths[:-1], widths[1:])]
        )
        self.norm = nn.GroupNorm(1, widths[-1])
        self.feature_info = [FeatureInfo(f"c{i + 2}", w, 4 * 2**i) for i, w in enumerate(widths)]

    def forward(self, x):
        x = self.stem(x - 0.5)
        out = OrderedDict()
        for i, stage in enumerate(self.stages):
            x = stage(x)
            out[f"c{i + 2}"] = self.norm(x) if i == 3 else x
        return out


class Shapes(Dataset):
    """``n`` deterministic images with one or two filled rectangles (label = colour, 1..2).

    kind "detection": COCO-style targets; "keypoints": + 17 keypoints inside each box (label 1);
    "segmentation": int64 mask (0 background, 255 on a one-pixel border of each rectangle).
    """

    def __init__(self, n: int = 8, size=(64, 80), seed: int = 0, kind: str = "detection"):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        h, w = size
        for i in range(n):
            image = torch.rand(3, h, w, generator=g) * 0.2
            mask = torch.zeros(h, w, dtype=torch.int64)
            boxes, labels, kps = [], [], []
            for _ in range(1 + i % 2):
                bw, bh = [int(torch.randint(16, 32, (), generator=g)) for _ in range(2)]
                x0, y0 = int(torch.randint(0, w - bw, (), generator=g)), int(torch.randint(0, h - bh, (), generator=g))
                label = int(torch.randint(1, 3, (), generator=g))
                image[label - 1, y0 : y0 + bh, x0 : x0 + bw] = 1.0
                mask[y0 : y0 + bh, x0 : x0 + bw] = label
                mask[y0, x0 : x0 + bw] = 255
                boxes.append([x0, y0, x0 + bw, y0 + bh])
                labels.append(label if kind != "keypoints" else 1)
                pts = torch.rand(17, 2, generator=g) * torch.tensor([bw, bh]) + torch.tensor([x0, y0])
                kps.append(torch.cat([pts, torch.full((17, 1), 2.0)], 1))
            if kind == "segmentation":
                self.items.append((image, mask))
                continue
            target = {
                "boxes": torch.tensor(boxes, dtype=torch.float32),
                "labels": torch.tensor(labels, dtype=torch.int64),
                "image_id": i,
                "iscrowd": torch.zeros(len(boxes), dtype=torch.int64),
            }
            if kind == "keypoints":
                target["keypoints"] = torch.stack(kps)
            self.items.append((image, target))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


def tiny_detector(backbone: nn.Module | None = None, head: str = "fpn", num_classes: int = 2, **kw) -> nn.Module:
    backbone = backbone if backbone is not None else tiny_backbone()
    # 64x96 images need neither 512 sampled RoIs nor 1000 test proposals; C4's box head is res5, run per RoI
    rois = 16 if head == "c4" else 64
    opts = dict(min_size=64, max_size=96, anchor_sizes=SMALL_ANCHORS, roi_batch_per_image=rois,
                rpn_batch_size_per_image=64, proposals_test=rois)
    if head == "fpn":
        opts.update(neck_channels=32, representation_size=64)
    opts.update(kw)
    return build_detector(backbone, num_classes, head=head, **opts)


class Toy(nn.Module):
    """Linear regression with two loss terms; the loss turns NaN from forward call ``nan_at`` on."""

    def __init__(self, nan_at: int | None = None):
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.bn = nn.BatchNorm1d(1)
        self.calls, self.nan_at = 0, nan_at

    def forward(self, images, targets=None):
        self.calls += 1
        x = torch.stack([im.flatten()[:4] for im in images])
        pred = self.bn(self.lin(x)).squeeze(1)
        if targets is None:
            return [{"value": p} for p in pred]
        loss = ((pred - torch.stack(targets)) ** 2).mean()
        if self.nan_at is not None and self.calls >= self.nan_at:
            loss = loss * float("nan")
        return {"loss_a": loss, "loss_b": 0.5 * loss}


class ToyData(Dataset):
    def __init__(self, n: int = 10):
        g = torch.Generator().manual_seed(0)
        self.items = [(torch.rand(3, 2, 2, generator=g) * 10, torch.rand((), generator=g)) for _ in range(n)]
        self.seen: list[int] = []

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        self.seen.append(i)
        return self.items[i]


def toy_config(**kw) -> TrainConfig:
    """The Toy's schedule: 6 iterations of 2, warmup 2, a step at 4, checkpoints every 3 (``kw`` overrides)."""
    base = dict(iterations=6, batch_size=2, lr=0.01, warmup_iters=2, steps=(4,), checkpoint_period=3, log_period=2)
    base.update(kw)
    return TrainConfig(**base)


# ----------------------------------------------------------------------------- headless Chromium
def chromium() -> str:
    """The Chromium executable (``HARNESS_CHROMIUM`` or ``chromium`` on PATH); skips the test without one."""
    exe = os.environ.get("HARNESS_CHROMIUM") or shutil.which("chromium")
    if not exe:
        pytest.skip("chromium not found (Debian: apt-get install -y chromium; or set HARNESS_CHROMIUM)")
    return exe


class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe)."""

    def __init__(self, exe: str, profile: Path):
        to_browser, self._w = os.pipe()
        self._r, from_browser = os.pipe()
        # the browser reads fd 3 and writes fd 4: move its ends out of the way before the launcher dup2s them there
        for fd in (to_browser, from_browser):
            os.dup2(fd, fd + 100)
            os.close(fd)
        to_browser, from_browser = to_browser + 100, from_browser + 100
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1400,1000", "--remote-debugging-pipe", "about:blank"]
        launch = f"import os, sys; os.dup2({to_browser}, 3); os.dup2({from_browser}, 4); os.execv(sys.argv[1], sys.argv[1:])"
        self.proc = subprocess.Popen([sys.executable, "-c", launch, exe, *flags], pass_fds=(to_browser, from_browser),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buf, self._id, self.events, self.session = b"", 0, [], None

    def _read(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError("no answer from chromium")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit {self.proc.poll()})")
            self._buf += chunk
        msg, self._buf = self._buf.split(b"\0", 1)
        return json.loads(msg)

    def send(self, method: str, timeout: float = 20.0, **params):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)

    def wait_event(self, method: str, timeout: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, e in enumerate(self.events):
                if e.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read(deadline))

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Page.navigate", url=url)
        self.wait_event("Page.loadEventFired")

    def js(self, expression: str):
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in out:
            raise RuntimeError(out["exceptionDetails"])
        return out["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click at the centre of the element (input events, not element.click())."""
        x, y = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); e.scrollIntoView();"
                       " const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._w)
        os.close(self._r)
