"""Synthetic datasets in the real COCO and VOC layouts, and a multi-label pretraining set.

Every image is a *scene*: a cluttered, textured background and objects drawn back to front from
one shape vocabulary (the 20 VOC categories; people are articulated stick figures with the 17
COCO keypoints).  Each category has its own silhouette and a texture cue, while colours are random,
so colour alone never tells the class.  The label map and the image come from the same geometry:
boxes are the tight bounds of the visible pixels and masks are exactly those pixels.

Everything is deterministic by seed: each image has its own random stream keyed by (seed,
dataset, image key), JPEGs use a fixed quality and JSON is written with sorted keys.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw

from harness.datasets.roots import MARKER
from harness.datasets.voc_devkit import VOC_CLASSES, voc_colormap
from harness.errors import HarnessError

JPEG_QUALITY = 90

# ----------------------------------------------------------------------------- vocabulary
COCO_KEYPOINTS = (
    "nose", "left_eye", "right_eye", "left_ear", "right_ear", "left_shoulder", "right_shoulder",
    "left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hip", "right_hip",
    "left_knee", "right_knee", "left_ankle", "right_ankle",
)
COCO_SKELETON = (
    (16, 14), (14, 12), (17, 15), (15, 13), (12, 13), (6, 12), (7, 13), (6, 7), (6, 8), (7, 9),
    (8, 10), (9, 11), (2, 3), (1, 2), (1, 3), (2, 4), (3, 5), (4, 6), (5, 7),
)
TEXTURES = ("stripes", "checker", "dots", "rings", "plain", "speckle")


@dataclass(frozen=True)
class Category:
    """One entry of the shape vocabulary: its VOC name and its real COCO id, name, supercategory."""

    name: str
    coco_id: int
    coco_name: str
    supercategory: str
    side_view: bool = False  # drawn facing right; VOC pose Left/Right follows the flip


VOCAB = (
    Category("aeroplane", 5, "airplane", "vehicle"),
    Category("bicycle", 2, "bicycle", "vehicle", True),
    Category("bird", 16, "bird", "animal", True),
    Category("boat", 9, "boat", "vehicle", True),
    Category("bottle", 44, "bottle", "kitchen"),
    Category("bus", 6, "bus", "vehicle", True),
    Category("car", 3, "car", "vehicle", True),
    Category("cat", 17, "cat", "animal", True),
    Category("chair", 62, "chair", "furniture", True),
    Category("cow", 21, "cow", "animal", True),
    Category("diningtable", 67, "dining table", "furniture"),
    Category("dog", 18, "dog", "animal", True),
    Category("horse", 19, "horse", "animal", True),
    Category("motorbike", 4, "motorcycle", "vehicle", True),
    Category("person", 1, "person", "person"),
    Category("pottedplant", 64, "potted plant", "furniture"),
    Category("sheep", 20, "sheep", "animal", True),
    Category("sofa", 63, "couch", "furniture"),
    Category("train", 7, "train", "vehicle", True),
    Category("tvmonitor", 72, "tv", "electronic"),
)
CATEGORY = {c.name: c for c in VOCAB}
# ten COCO categories with COCO's real, non-contiguous ids (1..72)
COCO_CLASSES = ("person", "bicycle", "car", "aeroplane", "boat", "bird", "dog", "bottle", "chair",
                "tvmonitor")
# people are about a third of COCO's objects, as in the real set (the pose task trains on them)
COCO_WEIGHTS = np.array([4.0 if c == "person" else 1.0 for c in COCO_CLASSES])
CROWD_CLASSES = ("person", "sheep", "bird", "bottle", "car")
# the classes drawn in the synthetic VOC sets: half of VOC's 20, so that the smoke schedule (about
# one epoch) can learn them; the other ten have no ground truth and drop out of the VOC mean.
VOC_SCENE_CLASSES = ("aeroplane", "bicycle", "bird", "bottle", "car", "chair", "cow", "person", "train",
                     "tvmonitor")
VOC_SCENE_WEIGHTS = np.array([2.0 if c == "person" else 1.0 for c in VOC_SCENE_CLASSES])
VOC_CLASS_INDEX = {c: k + 1 for k, c in enumerate(VOC_CLASSES)}  # segmentation label of each class
# texture cue per class: shared by a few classes each, so it helps but does not decide
TEXTURE = {c.name: (TEXTURES[i % 6], 45.0 * (i // 6)) for i, c in enumerate(VOCAB)}

# coco_train 600 gives the pose smoke run about 560 people with keypoints to learn from (200 gave
# 180); training time does not grow with the image count, only generation (a few seconds)
DEFAULT_SIZES = {
    "coco_train": 600, "coco_val": 50,
    "voc07_trainval": 200, "voc07_test": 100,
    "voc12_train": 150, "voc12_val": 50, "voc12_aug_extra": 100,
    "min_side": 128, "max_side": 192,
}


def _rng(seed: int, *keys: object) -> np.random.Generator:
    """An independent random stream for (seed, keys...)."""
    return np.random.default_rng([int(seed)] + [zlib.crc32(str(k).encode()) for k in keys])


# ----------------------------------------------------------------------------- shapes
Poly = list  # [(x, y), ...] in the unit frame of a shape (largest half-extent about 1)


def _ell(cx: float, cy: float, rx: float, ry: float, rot: float = 0.0, n: int = 20) -> Poly:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(rot), math.sin(rot)
    return list(zip(cx + c * x - s * y, cy + s * x + c * y))


def _bar(x0: float, y0: float, x1: float, y1: float, w: float) -> Poly:
    """A thick segment as a quadrilateral."""
    dx, dy = x1 - x0, y1 - y0
    n = math.hypot(dx, dy) or 1.0
    ox, oy = -dy / n * w / 2, dx / n * w / 2
    return [(x0 + ox, y0 + oy), (x1 + ox, y1 + oy), (x1 - ox, y1 - oy), (x0 - ox, y0 - oy)]


def _rect(x0: float, y0: float, x1: float, y1: float) -> Poly:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _j(rng: np.random.Generator, v: float, amount: float = 0.08) -> float:
    """Jitter a shape parameter, so instances of a class vary."""
    return v + rng.uniform(-amount, amount)


def _aeroplane(r):
    wing = _j(r, 0.85)
    return [_ell(0, 0, 0.98, _j(r, 0.15, 0.03)),
            [(-0.1, -0.05), (0.25, -0.05), (-0.35, -wing), (-0.5, -wing)],
            [(-0.1, 0.05), (0.25, 0.05), (-0.35, wing), (-0.5, wing)],
            [(-0.7, 0.0), (-0.95, -0.35), (-1.0, -0.35), (-0.92, 0.0), (-1.0, 0.35), (-0.95, 0.35)]]


def _bicycle(r):
    wr = _j(r, 0.36, 0.04)
    return [_ell(-0.6, 0.45, wr, wr), _ell(0.6, 0.45, wr, wr),
            _bar(-0.6, 0.45, -0.15, -0.2, 0.09), _bar(-0.15, -0.2, 0.45, -0.2, 0.09),
            _bar(0.45, -0.2, 0.6, 0.45, 0.09), _bar(0.45, -0.2, 0.55, -0.55, 0.08),
            _bar(-0.3, -0.27, -0.02, -0.27, 0.08)]


def _bird(r):
    tip = _j(r, -0.6, 0.15)
    return [_ell(0, 0.1, 0.45, 0.18),
            [(-0.2, 0.0), (0.1, 0.0), (-0.55, tip), (-0.85, tip - 0.05)],
            _ell(0.5, 0.0, 0.16, 0.16), [(0.6, -0.06), (0.6, 0.07), (0.88, 0.02)],
            [(-0.4, 0.1), (-0.78, -0.08), (-0.78, 0.3)]]


def _boat(r):
    return [[(-1, 0.35), (1, 0.35), (0.7, 0.75), (-0.7, 0.75)], _bar(0, 0.4, 0, -0.95, 0.06),
            [(0.05, -0.9), (0.05, 0.37), (_j(r, 0.75), 0.37)],
            [(-0.05, -0.7), (-0.05, 0.37), (_j(r, -0.55), 0.37)]]


def _bottle(r):
    w = _j(r, 0.34, 0.05)
    return [_rect(-w, -0.2, w, 1.0), [(-w, -0.2), (w, -0.2), (0.13, -0.55), (-0.13, -0.55)],
            _rect(-0.13, -0.56, 0.13, -0.9), _rect(-0.17, -0.88, 0.17, -1.0)]


def _bus(r):
    return [_rect(-1, -0.45, 1, 0.45), _ell(-0.6, 0.45, 0.18, 0.18), _ell(0.6, 0.45, 0.18, 0.18),
            _rect(0.88, -0.1, 1.02, 0.3)]


def _car(r):
    top = _j(r, -0.5)
    return [_rect(-1, -0.05, 1, 0.35), [(-0.55, -0.04), (0.5, -0.04), (0.3, top), (-0.35, top)],
            _ell(-0.6, 0.38, 0.22, 0.22), _ell(0.6, 0.38, 0.22, 0.22)]


def _cat(r):
    return [_ell(0, 0.35, 0.45, 0.55), _ell(0.05, -0.45, 0.3, 0.3),
            [(-0.24, -0.6), (-0.04, -0.7), (-0.2, -0.98)], [(0.14, -0.7), (0.34, -0.6), (0.3, -0.98)],
            _bar(0.35, 0.8, 0.75, 0.55, 0.1), _bar(0.75, 0.55, 0.82, 0.1, 0.1)]


def _chair(r):
    back = _j(r, -1.0, 0.1)
    return [_bar(-0.45, back, -0.45, 0.1, 0.14), _bar(-0.52, 0.05, 0.5, 0.05, 0.14),
            _bar(0.45, 0.05, 0.45, 1.0, 0.1), _bar(-0.45, 0.05, -0.5, 1.0, 0.1)]


def _cow(r):
    legs = [_bar(x, 0.2, x, 0.8, 0.13) for x in (-0.7, -0.45, 0.3, 0.5)]
    return [[(-0.8, -0.35), (0.55, -0.4), (0.6, 0.25), (-0.8, 0.25)], *legs,
            [(0.5, -0.45), (0.95, -0.3), (0.95, 0.05), (0.6, 0.05)],
            _bar(0.62, -0.4, 0.55, -0.75, 0.06), _bar(0.82, -0.35, 0.9, -0.7, 0.06),
            _bar(-0.8, -0.3, -0.95, 0.3, 0.05)]


def _diningtable(r):
    leg = _j(r, 0.85, 0.08)
    return [_rect(-1, -0.4, 1, -0.15), _bar(-leg, -0.2, -leg, 0.8, 0.12),
            _bar(leg, -0.2, leg, 0.8, 0.12), _rect(-0.9, -0.17, 0.9, -0.05)]


def _dog(r):
    legs = [_bar(x0, 0.1, x1, 0.65, 0.08) for x0, x1 in ((-0.5, -0.55), (-0.35, -0.3), (0.2, 0.15),
                                                          (0.35, 0.4))]
    return [_ell(-0.1, 0.0, 0.55, 0.22), *legs, _bar(0.35, -0.05, 0.55, -0.35, 0.16),
            _ell(0.62, -0.42, 0.18, 0.14), [(0.7, -0.48), (0.98, -0.4), (0.98, -0.3), (0.7, -0.32)],
            [(0.52, -0.5), (0.64, -0.5), (0.5, -0.2)], _bar(-0.62, -0.05, -0.9, _j(r, -0.45), 0.06)]


def _horse(r):
    legs = [_bar(x, 0.0, x + _j(r, 0.0, 0.06), 0.95, 0.08) for x in (-0.5, -0.35, 0.15, 0.3)]
    return [_ell(-0.1, -0.05, 0.5, 0.2), *legs, [(0.22, -0.15), (0.42, -0.22), (0.72, -0.75),
                                                    (0.55, -0.82)],
            [(0.55, -0.88), (0.7, -0.92), (0.98, -0.62), (0.88, -0.52)], _bar(-0.6, -0.1, -0.8, 0.5, 0.09)]


def _motorbike(r):
    return [_ell(-0.62, 0.45, 0.33, 0.33), _ell(0.62, 0.45, 0.33, 0.33),
            [(-0.6, 0.3), (-0.3, -0.15), (0.35, -0.2), (0.55, 0.05), (0.2, 0.35), (-0.3, 0.35)],
            _bar(0.45, -0.2, 0.62, 0.45, 0.08), _bar(0.35, -0.2, 0.5, -0.55, 0.07),
            [(-0.55, -0.1), (-0.05, -0.28), (-0.5, -0.3)]]


def _pottedplant(r):
    n = int(r.integers(4, 7))
    leaves = []
    for a in np.linspace(-1.2, 1.2, n) + r.uniform(-0.1, 0.1, n):
        ln = _j(r, 0.45, 0.08)
        leaves.append(_ell(0.9 * ln * math.sin(a), 0.2 - 0.9 * ln * math.cos(a), ln, 0.14,
                           rot=a - math.pi / 2, n=14))
    return [[(-0.4, 0.3), (0.4, 0.3), (0.28, 1.0), (-0.28, 1.0)], _rect(-0.45, 0.2, 0.45, 0.32), *leaves]


def _sheep(r):
    wool = [_ell(x, y, 0.3, 0.3, n=16) for x, y in ((-0.5, -0.1), (-0.2, -0.3), (0.15, -0.3), (0.4, -0.1),
                                                     (0.1, 0.1), (-0.3, 0.1), (-0.05, -0.1))]
    legs = [_bar(x, 0.3, x, 0.75, 0.07) for x in (-0.4, -0.15, 0.15, 0.35)]
    return [*wool, _ell(0.68, -0.15, 0.17, 0.13), *legs]


def _sofa(r):
    return [_rect(-1, 0.0, 1, 0.5), _rect(-0.85, _j(r, -0.55), 0.85, 0.05), _rect(-1, -0.25, -0.75, 0.5),
            _rect(0.75, -0.25, 1, 0.5), _rect(-0.9, 0.45, -0.78, 0.62), _rect(0.78, 0.45, 0.9, 0.62)]


def _train(r):
    wheels = [_ell(x, 0.48, 0.13, 0.13, n=12) for x in (-0.8, -0.45, -0.1, 0.25, 0.6)]
    return [[(-1, -0.55), (0.55, -0.55), (1, _j(r, -0.05)), (1, 0.45), (-1, 0.45)], *wheels]


def _tvmonitor(r):
    return [_rect(-1, -0.75, 1, _j(r, 0.5)), _rect(-0.1, 0.45, 0.1, 0.75), _rect(-0.45, 0.72, 0.45, 0.85)]


SHAPES: dict[str, Callable[[np.random.Generator], list]] = {
    "aeroplane": _aeroplane, "bicycle": _bicycle, "bird": _bird, "boat": _boat, "bottle": _bottle,
    "bus": _bus, "car": _car, "cat": _cat, "chair": _chair, "cow": _cow, "diningtable": _diningtable,
    "dog": _dog, "horse": _horse, "motorbike": _motorbike, "pottedplant": _pottedplant,
    "sheep": _sheep, "sofa": _sofa, "train": _train, "tvmonitor": _tvmonitor,
}


def _figure(rng: np.random.Generator, cx: float, cy: float, height: float):
    """An articulated stick figure (pelvis at cx, cy) in pixel coordinates.

    Returns (body polygons, mark polygons, keypoints (17, 2), labelled (17,) bool, pose) with pose one
    of Frontal/Left/Right
    (VOC's sense: the way the figure faces).  In profile the far eye and ear are not labelled.
    """
    h = height
    profile = rng.random() < 0.3
    facing = (1 if rng.random() < 0.5 else -1) if profile else 0
    lw = max(3.0, 0.06 * h)  # limb width
    hr = max(3.0, 0.075 * h)  # head radius
    lean = math.radians(rng.normal(0, 8))
    up = np.array([math.sin(lean), -math.cos(lean)])
    side = np.array([-up[1], up[0]])  # image-right when upright
    pelvis = np.array([cx, cy])
    neck = pelvis + up * 0.3 * h
    head = neck + up * (hr * 1.1)
    sw, hw = (0.03 * h, 0.02 * h) if profile else (0.11 * h, 0.07 * h)
    # a frontal figure has its left on image right; in profile the far (hidden) side is its left
    # when it faces image right
    lr = 1.0 if facing == 0 else -float(facing)
    l_sh, r_sh = neck + side * sw * lr, neck - side * sw * lr
    l_hip, r_hip = pelvis + side * hw * lr, pelvis - side * hw * lr

    def vec(a: float) -> np.ndarray:  # angle from "down", positive towards image right
        return np.array([math.sin(a + lean), math.cos(a + lean)])

    def limb(root, sgn, a1_lo, a1_hi, bend_lo, bend_hi, l1, l2):
        a1 = sgn * math.radians(rng.uniform(a1_lo, a1_hi))
        a2 = a1 + sgn * math.radians(rng.uniform(bend_lo, bend_hi))
        mid = root + vec(a1) * l1
        return mid, mid + vec(a2) * l2

    arms, legs = [], []
    for shoulder, hip, sgn in ((l_sh, l_hip, lr), (r_sh, r_hip, -lr)):
        if facing:
            sgn = float(facing) * (1 if rng.random() < 0.5 else -1)
            arms.append(limb(shoulder, sgn, -20, 80, -10, 100, 0.16 * h, 0.15 * h))
            k = limb(hip, sgn, -5, 35, -75, 0, 0.23 * h, 0.22 * h)
        else:
            arms.append(limb(shoulder, sgn, 10, 165, -120, 20, 0.16 * h, 0.15 * h))
            k = limb(hip, sgn, -8, 30, -25, 15, 0.23 * h, 0.22 * h)
        legs.append(k)
    (l_el, l_wr), (r_el, r_wr) = arms
    (l_kn, l_an), (r_kn, r_an) = legs

    f = float(facing)
    if facing == 0:
        nose = head + up * -0.25 * hr
        eyes = (head + side * 0.38 * hr + up * 0.15 * hr, head - side * 0.38 * hr + up * 0.15 * hr)
        ears = (head + side * 0.72 * hr, head - side * 0.72 * hr)
    else:
        nose = head + side * f * 0.6 * hr - up * 0.1 * hr
        eyes = (head + side * f * 0.3 * hr + up * 0.2 * hr,) * 2
        ears = (head - side * f * 0.15 * hr,) * 2
    kps = np.array([nose, eyes[0], eyes[1], ears[0], ears[1], l_sh, r_sh, l_el, r_el, l_wr, r_wr,
                    l_hip, r_hip, l_kn, r_kn, l_an, r_an], float)
    labelled = np.ones(17, bool)
    if facing:  # facing image right shows the right side: the left eye and ear are hidden
        labelled[[1, 3] if facing > 0 else [2, 4]] = False

    polys = [_ell(head[0], head[1], hr, hr), [tuple(l_sh), tuple(r_sh), tuple(r_hip), tuple(l_hip)],
             _bar(*neck, *pelvis, max(lw * 1.3, 2 * sw))]
    for a, b in ((l_sh, l_el), (l_el, l_wr), (r_sh, r_el), (r_el, r_wr), (l_hip, l_kn), (l_kn, l_an),
                 (r_hip, r_kn), (r_kn, r_an)):
        polys.append(_bar(*a, *b, lw))
    for p in kps[5:]:
        polys.append(_ell(p[0], p[1], lw / 2 + 0.3, lw / 2 + 0.3, n=10))
    # the parts a keypoint annotator clicks on look like something, as in photographs: eyes, nose
    # and ears on the head, hands at the wrists, feet at the ankles (painted in their own colour)
    marks = [_ell(*kps[0], max(1.0, 0.14 * hr), max(1.0, 0.14 * hr), n=8)]
    marks += [_ell(*kps[j], max(1.0, 0.13 * hr), max(1.0, 0.13 * hr), n=8) for j in (1, 2) if labelled[j]]
    marks += [_ell(*kps[j], max(1.2, 0.2 * hr), max(1.5, 0.3 * hr), n=8) for j in (3, 4) if labelled[j]]
    marks += [_ell(*kps[j], 0.8 * lw, 0.8 * lw, n=10) for j in (9, 10)]
    for j, sgn in ((15, lr), (16, -lr)):
        toe = float(facing) if facing else sgn
        marks.append(_ell(kps[j][0] + toe * 0.5 * lw, kps[j][1], 1.1 * lw, 0.55 * lw, n=10))
    pose = "Frontal" if facing == 0 else ("Right" if facing > 0 else "Left")
    return polys, marks, kps, labelled, pose


# ----------------------------------------------------------------------------- scenes
@dataclass
class Part:
    """Polygons (pixel coords) painted with one texture, oriented by (cx, cy, angle, scale)."""

    polys: list
    cx: float
    cy: float
    angle: float
    scale: float
    texture: tuple[str, float] | None = None  # (kind, angle); None: the class's texture


@dataclass
class SceneObject:
    """An object of a scene: its drawn pixels before later objects cover some of them."""

    cls: str
    mask: np.ndarray  # bool (H, W): pixels drawn in the image
    shape_area: int  # pixels of the whole shape, inside the image or not
    crowd: bool = False
    pose: str = "Unspecified"
    keypoints: np.ndarray | None = None  # (17, 2) pixel coords (persons)
    labelled: np.ndarray | None = None  # (17,) bool


@dataclass
class Scene:
    """An image, its objects back to front, and the map of which object shows at each pixel."""

    image: np.ndarray  # (H, W, 3) uint8
    objects: list[SceneObject] = field(default_factory=list)
    inst: np.ndarray | None = None  # (H, W) int16: 0 background, i + 1 = objects[i]

    def visible(self, i: int) -> np.ndarray:
        return self.inst == i + 1


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, period: float, rng: np.random.Generator):
    if kind == "stripes":
        return (np.floor(u / period) % 2).astype(float)
    if kind == "checker":
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(float)
    if kind == "dots":
        du, dv = (u / period) % 2 - 1, (v / period) % 2 - 1
        return (du * du + dv * dv < 0.45).astype(float)
    if kind == "rings":
        return (np.floor(np.hypot(u, v) / period) % 2).astype(float)
    if kind == "speckle":
        return (rng.random(np.broadcast(u, v).shape) < 0.3).astype(float)
    return np.zeros(np.broadcast(u, v).shape)


def _paint(img: np.ndarray, mask: np.ndarray, part: Part, kind: str, tex_angle: float,
           rng: np.random.Generator) -> None:
    """Fill img under mask with a two-colour texture that moves and turns with the object."""
    if not mask.any():
        return
    m, x0, y0 = _crop(mask)
    y1, x1 = y0 + m.shape[0], x0 + m.shape[1]
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(float)
    a = part.angle + math.radians(tex_angle)
    dx, dy = xx - part.cx, yy - part.cy
    u, v = dx * math.cos(a) + dy * math.sin(a), -dx * math.sin(a) + dy * math.cos(a)
    period = rng.uniform(2.5, 5.0)
    p = _pattern(kind, u, v, period, rng)[..., None]
    c1 = _colour(rng)
    c2 = c1 + rng.choice([-1, 1], 3) * rng.uniform(50, 110, 3)
    b = rng.uniform(0, 2 * np.pi)
    shade = 1 + 0.25 * (dx * math.cos(b) + dy * math.sin(b)) / max(part.scale, 1.0)
    col = np.clip((c1 * (1 - p) + c2 * p) * shade[..., None], 0, 255)
    img[y0:y1, x0:x1][m] = col[m]


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Gradient, low-frequency blotches, a textured ground region and thin distractor strokes."""
    yy, xx = np.ogrid[0:h, 0:w]
    yy, xx = yy.astype(np.float32), xx.astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    u, v = xx * math.cos(a) + yy * math.sin(a), yy * math.cos(a) - xx * math.sin(a)
    t = ((u / max(w, h) + 1) / 2)[..., None]
    c1, c2 = _colour(rng).astype(np.float32), _colour(rng).astype(np.float32)
    small = rng.normal(0, 1, (int(rng.integers(3, 8)), int(rng.integers(3, 8)), 3))
    lo = np.asarray(Image.fromarray(((small + 4) * 32).clip(0, 255).astype(np.uint8)).resize(
        (w, h), Image.Resampling.BILINEAR), np.float32)
    img = (c1 + (c2 - c1) * t) * 0.75 + lo * 0.5 - 32
    if rng.random() < 0.6:  # a textured "ground" below a random horizon
        ground = yy > rng.uniform(0.3, 0.9) * h + rng.uniform(-0.3, 0.3) * (xx - w / 2)
        kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
        p = _pattern(kind, u, v, rng.uniform(2, 6), rng)
        g = _colour(rng).astype(np.float32) * (1 - 0.35 * p[..., None])
        img[ground] = 0.5 * img[ground] + 0.5 * g[ground]
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(int(rng.integers(6, 18))):
        col = tuple(int(c) for c in _colour(rng))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        kind = rng.random()
        if kind < 0.5:
            pts = [(x, y)]
            for _ in range(int(rng.integers(1, 4))):
                x, y = x + rng.normal(0, 12), y + rng.normal(0, 12)
                pts.append((x, y))
            draw.line(pts, fill=col, width=int(rng.integers(1, 3)))
        elif kind < 0.8:
            r = rng.uniform(1, 3)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=col)
        else:
            r = rng.uniform(4, 12)
            draw.arc([x - r, y - r, x + r, y + r], rng.uniform(0, 360), rng.uniform(0, 360), fill=col)
    return np.asarray(pil, np.float32)


def _shape_part(rng: np.random.Generator, cls: str, cx: float, cy: float, s: float):
    """A vocabulary shape placed at (cx, cy) with half-extent s: (Part, flipped)."""
    polys = SHAPES[cls](rng)
    flip = rng.random() < 0.5
    rot_range = 35.0 if cls in ("aeroplane", "bird") else 10.0
    ang = math.radians(rng.uniform(-rot_range, rot_range))
    sx, sy = s * math.exp(rng.uniform(-0.12, 0.12)), s * math.exp(rng.uniform(-0.12, 0.12))
    c, si = math.cos(ang), math.sin(ang)
    out = []
    for poly in polys:
        q = np.asarray(poly, float) * (sx, sy)
        if flip:
            q[:, 0] = -q[:, 0]
        out.append(np.stack([cx + c * q[:, 0] - si * q[:, 1], cy + si * q[:, 0] + c * q[:, 1]], 1))
    return Part(out, cx, cy, ang, s), flip


def _raster(polys: list, w: int, h: int, margin: int) -> np.ndarray:
    """Rasterise polygons on a canvas with a margin around the image (pixel coords unchanged)."""
    canvas = Image.new("1", (w + 2 * margin, h + 2 * margin), 0)
    draw = ImageDraw.Draw(canvas)
    for poly in polys:
        pts = (np.asarray(poly, float) + margin).ravel().tolist()
        draw.polygon(pts, fill=1)
    return np.asarray(canvas, bool)


def _make_object(rng, cls: str, w: int, h: int, s: float, margin: int, crowd: bool, spread: float | None = None):
    """Draw one object (or a crowd of small ones) at a random place: (SceneObject, parts).

    Its centre lies within ``spread`` times the image's size around the middle (by default large
    objects stay nearer the middle)."""
    if spread is None:
        spread = 1.1 - 0.6 * min(1.0, s / (0.5 * min(w, h)))
    cx, cy = w * (0.5 + spread * rng.uniform(-0.5, 0.5)), h * (0.5 + spread * rng.uniform(-0.5, 0.5))
    obj = SceneObject(cls, None, 0, crowd=crowd)  # type: ignore[arg-type]
    parts: list[Part] = []
    if crowd:
        for _ in range(int(rng.integers(5, 10))):
            ss = rng.uniform(4, 8)
            px, py = cx + rng.normal(0, 2.2 * ss), cy + rng.normal(0, 1.2 * ss)
            if cls == "person":
                body, marks = _figure(rng, px, py, 2 * ss)[:2]
                parts.append(Part(body + marks, px, py, 0.0, ss))
            else:
                parts.append(_shape_part(rng, cls, px, py, ss)[0])
    elif cls == "person":
        body, marks, kps, labelled, pose = _figure(rng, cx, cy, 2 * s)
        parts += [Part(body, cx, cy, 0.0, s), Part(marks, cx, cy, 0.0, s, texture=("plain", 0.0))]
        obj.keypoints, obj.labelled, obj.pose = kps, labelled, pose
    else:
        part, flip = _shape_part(rng, cls, cx, cy, s)
        parts.append(part)
        if CATEGORY[cls].side_view:
            obj.pose = "Left" if flip else "Right"
    full = np.zeros((h + 2 * margin, w + 2 * margin), bool)
    part_masks = []
    for part in parts:
        pm = _raster(part.polys, w, h, margin)
        part_masks.append(pm[margin:margin + h, margin:margin + w])
        full |= pm
    obj.shape_area = int(full.sum())
    obj.mask = full[margin:margin + h, margin:margin + w].copy()
    return obj, list(zip(parts, part_masks))


def _half_extent(rng: np.random.Generator, lo: float, side: int) -> float:
    """Object half-size: 40% small (log-uniform), the rest medium to large (learnable in a CPU smoke run)."""
    if rng.random() < 0.4:
        return math.exp(rng.uniform(math.log(lo), math.log(max(lo, 0.3 * side))))
    return rng.uniform(0.3, 0.75) * side


def render_scene(rng: np.random.Generator, width: int, height: int, classes: tuple[str, ...],
                 n_objects: int, *, crowd: bool = False, checks: bool = True,
                 min_half: float = 5.0, weights: np.ndarray | None = None,
                 half_range: tuple[float, float] | None = None) -> Scene:
    """Draw a scene with up to n_objects objects of the given classes (plus a crowd if asked).

    Object half-sizes follow ``_half_extent`` (scenes as COCO's), or with ``half_range`` are
    uniform in that range times the shorter side, centred in the middle half of the image
    (object-centric photos, as ImageNet's or JFT's).

    With checks, a new object is rejected (and redrawn elsewhere) when it would leave an earlier
    object less than half visible or with a hole, or when its own mask has a hole (so COCO
    polygons of the visible pixels are exact).
    """
    w, h = width, height
    img = _background(rng, w, h)
    inst = np.zeros((h, w), np.int16)
    scene = Scene(img, [], inst)
    margin = max(w, h) // 2
    crowd_classes = [c for c in CROWD_CLASSES if c in classes]
    todo = [(str(rng.choice(crowd_classes)), True, 0.0)] if crowd and crowd_classes else []
    p = None if weights is None else weights / weights.sum()
    objs = []
    for _ in range(n_objects):
        cls = str(rng.choice(classes, p=p))
        s = (_half_extent(rng, min_half, min(w, h)) if half_range is None
             else rng.uniform(*half_range) * min(w, h))
        objs.append((cls, False, max(s, 10.0) if cls == "person" else s))
    todo += sorted(objs, key=lambda t: -t[2])  # large objects behind small ones
    for cls, is_crowd, s in todo:
        for attempt in range(12):
            if attempt >= 6:  # a large shape may keep a hole or cover too much: try it smaller
                s = max(min_half, 0.85 * s)
            obj, parts = _make_object(rng, cls, w, h, s, margin, is_crowd, None if half_range is None else 0.5)
            if obj.mask.sum() < 12:
                continue
            k = len(scene.objects) + 1
            new = np.where(obj.mask, k, inst).astype(np.int16)
            if checks and not _acceptable(scene, obj, new):
                continue
            for part, pm in parts:
                _paint(img, pm, part, *(part.texture or TEXTURE[cls]), rng)
            scene.objects.append(obj)
            inst = scene.inst = new
            break
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(3, 9))
    scene.image = img.clip(0, 255).astype(np.uint8)
    return scene


def _acceptable(scene: Scene, obj: SceneObject, new: np.ndarray) -> bool:
    if not obj.crowd and _has_hole(obj.mask):
        return False
    covered = np.unique(scene.inst[obj.mask])
    for j in covered[covered > 0] - 1:
        prev = scene.objects[j]
        vis = new == j + 1
        if vis.sum() < max(12, 0.5 * prev.mask.sum()):
            return False
        if not prev.crowd and _has_hole(vis):
            return False
    return True


# ----------------------------------------------------------------------------- mask geometry
def _edges(mask: np.ndarray):
    """The boundary of a mask as directed pixel edges, foreground on the right (y down).

    Returns (start, end, succ, vw): vertex ids y * vw + x on a grid padded by one pixel, and the
    next edge along each closed boundary.  Where two pixels touch only diagonally the boundary
    turns right, keeping to the same pixel, so 4-connected parts get separate loops.
    """
    h, w = mask.shape
    m = np.zeros((h + 2, w + 2), bool)
    m[1:-1, 1:-1] = mask
    vw = w + 3
    inner = m[1:-1, 1:-1]
    starts, ends = [], []
    for nb, (s0, s1, e0, e1) in ((m[:-2, 1:-1], (0, 0, 0, 1)), (m[1:-1, 2:], (0, 1, 1, 1)),
                                 (m[2:, 1:-1], (1, 1, 1, 0)), (m[1:-1, :-2], (1, 0, 0, 0))):
        r, c = np.nonzero(inner & ~nb)  # top, right, bottom, left edges, walked clockwise
        starts.append((r + 1 + s0) * vw + c + 1 + s1)
        ends.append((r + 1 + e0) * vw + c + 1 + e1)
    start, end = np.concatenate(starts), np.concatenate(ends)
    order = np.argsort(start, kind="stable")
    first = np.searchsorted(start[order], end)
    two = np.searchsorted(start[order], end, side="right") - first == 2
    succ = order[first]
    alt = order[np.minimum(first + 1, len(order) - 1)]
    d = end - start
    right = np.select([d == 1, d == vw, d == -1], [vw, -1, -vw], 1)
    pick = two & (end[alt] - start[alt] == right)
    succ[pick] = alt[pick]
    return start, end, succ, vw


def _loop_areas(start: np.ndarray, end: np.ndarray, succ: np.ndarray, vw: int):
    """Label each edge with its loop (the loop's smallest edge index); signed area per label."""
    label, nxt = np.arange(len(succ)), succ.copy()
    for _ in range(max(1, int(np.ceil(np.log2(max(len(succ), 2)))) + 1)):  # pointer jumping
        label = np.minimum(label, label[nxt])
        nxt = nxt[nxt]
    xs, ys, xe, ye = start % vw, start // vw, end % vw, end // vw
    area = np.bincount(label, xs * ye - xe * ys, minlength=len(succ)) / 2
    return label, area


def _crop(mask: np.ndarray) -> tuple[np.ndarray, int, int]:
    """The mask cut to its bounding box (non-empty mask), with the box's top-left corner."""
    cols, rows = np.flatnonzero(mask.any(0)), np.flatnonzero(mask.any(1))
    return mask[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1], int(cols[0]), int(rows[0])


def _has_hole(mask: np.ndarray) -> bool:
    """Whether some background pixels are enclosed by the mask (a loop with negative area)."""
    if not mask.any():
        return False
    _, area = _loop_areas(*_edges(_crop(mask)[0]))
    return bool((area < 0).any())


def mask_polygons(mask: np.ndarray) -> list[list[float]]:
    """COCO polygons tracing the pixel edges of a hole-free mask (one per 4-connected part)."""
    mask, x0, y0 = _crop(mask)
    start, end, succ, vw = _edges(mask)
    _, area = _loop_areas(start, end, succ, vw)
    nxt = succ.tolist()
    out = []
    for root in np.flatnonzero(area > 0).tolist():
        path, e = [root], nxt[root]
        while e != root:
            path.append(e)
            e = nxt[e]
        v = start[path]
        xy = np.stack([v % vw - 1 + x0, v // vw - 1 + y0], 1)
        corner = np.any(xy - np.roll(xy, 1, 0) != np.roll(xy, -1, 0) - xy, 1)
        out.append([float(t) for t in xy[corner].ravel()])
    return out


def mask_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE (column-major runs starting with zeros)."""
    flat = mask.T.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0]:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight inclusive pixel bounds (x0, y0, x1, y1) of a non-empty mask."""
    crop, x0, y0 = _crop(mask)
    return x0, y0, x0 + crop.shape[1] - 1, y0 + crop.shape[0] - 1


@dataclass
class Annotation:
    """What the writers need about one visible object."""

    cls: str
    mask: np.ndarray
    box: tuple[int, int, int, int]  # inclusive pixel bounds
    area: int
    crowd: bool
    truncated: bool
    occluded: bool
    difficult: bool
    pose: str
    keypoints: list[int] | None = None  # 17 x [x, y, v]
    num_keypoints: int = 0


def annotate(scene: Scene) -> list[Annotation]:
    """Visible masks, tight boxes, flags and keypoints (with visibility) of a scene's objects."""
    h, w = scene.inst.shape
    out = []
    for i, obj in enumerate(scene.objects):
        vis = scene.visible(i)
        area = int(vis.sum())
        if area == 0:
            continue
        box = mask_box(vis)
        bw, bh = box[2] - box[0] + 1, box[3] - box[1] + 1
        drawn = int(obj.mask.sum())
        truncated = drawn < obj.shape_area
        ann = Annotation(obj.cls, vis, box, area, obj.crowd, truncated, area < 0.95 * drawn,
                         min(bw, bh) < 8 or area < 0.4 * obj.shape_area, obj.pose)
        if obj.cls == "person" and not obj.crowd:
            kps = []
            small = bw * bh < 16 * 16
            for (x, y), lab in zip(obj.keypoints, obj.labelled):
                xi, yi = int(math.floor(x)), int(math.floor(y))
                if small or not lab or not (0 <= xi < w and 0 <= yi < h):
                    kps += [0, 0, 0]
                else:
                    kps += [xi, yi, 2 if vis[yi, xi] else 1]
            ann.keypoints, ann.num_keypoints = kps, sum(1 for v in kps[2::3] if v > 0)
        elif obj.cls == "person":
            ann.keypoints = [0] * 51
        out.append(ann)
    return out


# ----------------------------------------------------------------------------- writers
def _save_jpeg(image: np.ndarray, path: Path) -> None:
    Image.fromarray(image).save(path, format="JPEG", quality=JPEG_QUALITY)


def _size(rng: np.random.Generator, sizes: dict) -> tuple[int, int]:
    lo, hi = int(sizes["min_side"]), int(sizes["max_side"])
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def _write_json(obj: object, path: Path) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, separators=(",", ":")))


def _coco_image(job: tuple) -> tuple[dict, list[tuple[dict, dict | None]]]:
    """Render, save and annotate one COCO image: its image record and, per object, its annotation
    (without the id) and its keypoint fields (people only). Its own rng: any process gives the same file."""
    seed, split, idx, image_id, sizes, img_dir = job
    rng = _rng(seed, "coco", split, idx)
    w, h = _size(rng, sizes)
    n_obj = 0 if idx % 12 == 5 else int(rng.integers(1, 7))
    scene = render_scene(rng, w, h, COCO_CLASSES, n_obj, crowd=idx % 10 == 2, weights=COCO_WEIGHTS)
    name = f"{image_id:012d}.jpg"
    _save_jpeg(scene.image, img_dir / name)
    image = {"id": image_id, "file_name": name, "width": w, "height": h, "license": 1,
             "coco_url": "", "flickr_url": "", "date_captured": "2017-01-01 00:00:00"}
    objects = []
    for a in annotate(scene):
        x0, y0, x1, y1 = a.box
        rec = {"image_id": image_id, "category_id": CATEGORY[a.cls].coco_id,
               "bbox": [float(x0), float(y0), float(x1 - x0 + 1), float(y1 - y0 + 1)],
               "area": float(a.area), "iscrowd": int(a.crowd),
               "segmentation": mask_rle(a.mask) if a.crowd else mask_polygons(a.mask)}
        keypoints = {"keypoints": a.keypoints, "num_keypoints": a.num_keypoints} if a.cls == "person" else None
        objects.append((rec, keypoints))
    return image, objects


def _run_jobs(fn: Callable, jobs: list, workers: int) -> list:
    """``[fn(job) for job in jobs]``, spread over ``workers`` processes when that many are asked for and
    there are enough jobs (results in order; every job draws from its own rng, so the files are the same)."""
    if workers <= 1 or len(jobs) < 4 * workers:
        return [fn(job) for job in jobs]
    start = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(start)) as pool:
        return list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))))


def _write_coco(root: Path, seed: int, sizes: dict, workers: int = 1) -> dict:
    """COCO 2017 layout: instances_* and person_keypoints_* JSON, images %012d.jpg."""
    ann_dir = root / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    cats = sorted((CATEGORY[n] for n in COCO_CLASSES), key=lambda c: c.coco_id)
    categories = [{"id": c.coco_id, "name": c.coco_name, "supercategory": c.supercategory} for c in cats]
    kp_category = {"id": 1, "name": "person", "supercategory": "person",
                   "keypoints": list(COCO_KEYPOINTS), "skeleton": [list(s) for s in COCO_SKELETON]}
    info = {"description": "harness synthetic data in the COCO 2017 layout", "url": "", "version": "1.0",
            "year": 2017, "contributor": "harness", "date_created": "2017/09/01"}
    licenses = [{"id": 1, "name": "synthetic", "url": ""}]
    splits = (("train2017", sizes["coco_train"]), ("val2017", sizes["coco_val"]))
    id_rng = _rng(seed, "coco", "ids")
    all_ids = id_rng.choice(600_000, sum(n for _, n in splits), replace=False) + 1
    summary, ann_id, offset = {}, 1, 0
    for split, n in splits:
        img_dir = root / split
        img_dir.mkdir(parents=True, exist_ok=True)
        ids = sorted(all_ids[offset: offset + n].tolist())
        offset += n
        images, anns, kp_anns = [], [], []
        jobs = [(seed, split, idx, image_id, sizes, img_dir) for idx, image_id in enumerate(ids)]
        for image, objects in _run_jobs(_coco_image, jobs, workers):
            images.append(image)
            for rec, keypoints in objects:
                rec = {"id": ann_id, **rec}
                anns.append(rec)
                if keypoints is not None:
                    kp_anns.append({**rec, **keypoints})
                ann_id += 1
        base = {"info": info, "licenses": licenses, "images": images}
        _write_json({**base, "annotations": anns, "categories": categories},
                    ann_dir / f"instances_{split}.json")
        _write_json({**base, "annotations": kp_anns, "categories": [kp_category]},
                    ann_dir / f"person_keypoints_{split}.json")
        summary[split] = {"images": len(images), "objects": len(anns),
                          "crowd": sum(a["iscrowd"] for a in anns),
                          "empty_images": len(images) - len({a["image_id"] for a in anns}),
                          "persons_with_keypoints": sum(a["num_keypoints"] > 0 for a in kp_anns)}
    return summary


def _voc_xml(year: str, image_id: str, w: int, h: int, segmented: bool, anns: list[Annotation]) -> str:
    """An annotation file laid out like the devkit's (tabs, 1-based integer boxes)."""
    src_year = image_id[:4] if "_" in image_id else "2007"
    lines = ["<annotation>", f"\t<folder>VOC{year}</folder>", f"\t<filename>{image_id}.jpg</filename>",
             "\t<source>", f"\t\t<database>The VOC{src_year} Database</database>",
             f"\t\t<annotation>PASCAL VOC{src_year}</annotation>", "\t\t<image>flickr</image>",
             "\t</source>", "\t<size>", f"\t\t<width>{w}</width>", f"\t\t<height>{h}</height>",
             "\t\t<depth>3</depth>", "\t</size>", f"\t<segmented>{int(segmented)}</segmented>"]
    for a in anns:
        x0, y0, x1, y1 = a.box
        lines += ["\t<object>", f"\t\t<name>{a.cls}</name>", f"\t\t<pose>{a.pose}</pose>",
                  f"\t\t<truncated>{int(a.truncated)}</truncated>"]
        if year != "2007":
            lines.append(f"\t\t<occluded>{int(a.occluded)}</occluded>")
        lines += [f"\t\t<difficult>{int(a.difficult)}</difficult>", "\t\t<bndbox>",
                  f"\t\t\t<xmin>{x0 + 1}</xmin>", f"\t\t\t<ymin>{y0 + 1}</ymin>",
                  f"\t\t\t<xmax>{x1 + 1}</xmax>", f"\t\t\t<ymax>{y1 + 1}</ymax>", "\t\t</bndbox>",
                  "\t</object>"]
    lines.append("</annotation>")
    return "\n".join(lines) + "\n"


def _voc_ids(rng: np.random.Generator, n: int, year: str) -> list[str]:
    if year == "2007":
        return [f"{i:06d}" for i in sorted(rng.choice(max(9963, 2 * n), n, replace=False) + 1)]
    nums = rng.choice(5 * max(9000, 2 * n), n, replace=False)
    return sorted(f"{2007 + k // max(9000, 2 * n)}_{k % max(9000, 2 * n):06d}" for k in nums)


def _write_list(path: Path, ids: list[str]) -> None:
    path.write_text("".join(f"{i}\n" for i in sorted(ids)))


def _voc_image(job: tuple) -> list[tuple[str, bool]]:
    """Render one VOC image and write its JPEG, XML and (segmentation sets) PNGs; returns (class,
    difficult) per object. Its own rng: any process gives the same files."""
    seed, year, image_id, sizes, dirs, segmented, augmented, palette = job
    rng = _rng(seed, "voc", year, image_id)
    w, h = _size(rng, sizes)
    scene = render_scene(rng, w, h, VOC_SCENE_CLASSES, int(rng.integers(1, 5)), weights=VOC_SCENE_WEIGHTS)
    anns = annotate(scene)
    _save_jpeg(scene.image, dirs["JPEGImages"] / f"{image_id}.jpg")
    (dirs["Annotations"] / f"{image_id}.xml").write_text(_voc_xml(year, image_id, w, h, segmented, anns))
    if segmented or augmented:
        cls_map = np.zeros((h, w), np.uint8)
        obj_map = np.zeros((h, w), np.uint8)
        for k, a in enumerate(anns):
            cls_map[a.mask] = VOC_CLASS_INDEX[a.cls]
            obj_map[a.mask] = k + 1
        if augmented:
            Image.fromarray(cls_map).save(dirs["SegmentationClassAug"] / f"{image_id}.png")
        if segmented:
            void = _boundary(obj_map)
            for a in anns:
                if a.difficult:
                    void |= a.mask
            for arr, sub in ((cls_map, "SegmentationClass"), (obj_map, "SegmentationObject")):
                arr = np.where(void, 255, arr).astype(np.uint8)
                png = Image.fromarray(arr)
                png.putpalette(palette)  # an 'L' image with a palette becomes 'P'
                png.save(dirs[sub] / f"{image_id}.png")
    return [(a.cls, a.difficult) for a in anns]


def _write_voc(root: Path, year: str, seed: int, splits: dict[str, list[str]], seg: set[str],
               aug: set[str], sizes: dict, workers: int = 1) -> dict:
    """One VOCdevkit/VOC<year> folder; splits maps Main split name -> ids (all images written)."""
    palette = voc_colormap().ravel().tolist()
    dirs = {k: root / k for k in ("Annotations", "JPEGImages", "ImageSets/Main")}
    if seg:
        dirs.update({k: root / k for k in ("ImageSets/Segmentation", "SegmentationClass",
                                           "SegmentationObject")})
    if aug:
        dirs["SegmentationClassAug"] = root / "SegmentationClassAug"
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    ids = sorted({i for ids in splits.values() for i in ids})
    jobs = [(seed, year, image_id, sizes, dirs, image_id in seg, image_id in aug, palette) for image_id in ids]
    labels = dict(zip(ids, _run_jobs(_voc_image, jobs, workers)))
    for split, split_ids in splits.items():
        _write_list(dirs["ImageSets/Main"] / f"{split}.txt", split_ids)
        for c in VOC_CLASSES:  # per-class lists: 1 present, 0 only difficult, -1 absent
            rows = []
            for i in sorted(split_ids):
                found = [difficult for cls, difficult in labels[i] if cls == c]
                flag = -1 if not found else (0 if all(found) else 1)
                rows.append(f"{i} {flag:2d}\n")
            (dirs["ImageSets/Main"] / f"{c}_{split}.txt").write_text("".join(rows))
    summary = {split: {"images": len(s), "objects": sum(len(labels[i]) for i in s),
                       "difficult": sum(difficult for i in s for _, difficult in labels[i])}
               for split, s in splits.items()}
    return summary


def _boundary(obj_map: np.ndarray) -> np.ndarray:
    """VOC's void band: pixels whose 3 x 3 neighbourhood holds another object (or background)."""
    h, w = obj_map.shape
    p = np.pad(obj_map, 1, mode="edge")
    band = np.zeros((h, w), bool)
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            band |= p[dy: dy + h, dx: dx + w] != obj_map
    return band


def write_synthetic(out: Path, seed: int = 0, workers: int | None = None, **sizes: int) -> dict:
    """Write COCO 2017 and VOCdevkit (VOC2007, VOC2012 with SBD-style train_aug) under out.

    sizes overrides DEFAULT_SIZES (image counts per split, min_side/max_side in pixels). Images are
    rendered in ``workers`` processes (default: one per available core); the files do not depend on it.  A
    `SYNTHETIC.json` marker is written at the root; an existing coco/ or VOCdevkit/ folder is
    replaced only when that marker shows it is synthetic.  Returns a JSON-able summary: per
    dataset, split -> counts.
    """
    unknown = set(sizes) - set(DEFAULT_SIZES)
    if unknown:
        raise TypeError(f"write_synthetic: unknown size keyword(s) {sorted(unknown)}; "
                        f"known: {sorted(DEFAULT_SIZES)}")
    cfg = {**DEFAULT_SIZES, **{k: int(v) for k, v in sizes.items()}}
    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if any(v < 0 for v in cfg.values()) or not 16 <= cfg["min_side"] <= cfg["max_side"]:
        raise HarnessError(f"synthetic data: bad sizes {cfg} (counts >= 0, 16 <= min_side <= max_side)")
    out = Path(out)
    coco, voc = out / "coco", out / "VOCdevkit"
    if (coco.exists() or voc.exists()) and not (out / MARKER).exists():
        raise HarnessError(f"{out} already holds coco/ or VOCdevkit/ that is not synthetic "
                           f"(no {MARKER}); refusing to overwrite it")
    for d in (coco, voc):
        if d.exists():
            shutil.rmtree(d)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"generator": __name__, "seed": seed, "sizes": cfg}))

    summary: dict = {"coco": _write_coco(coco, seed, cfg, workers)}

    rng = _rng(seed, "voc2007", "ids")
    n_tv, n_test = cfg["voc07_trainval"], cfg["voc07_test"]
    ids = list(rng.permutation(_voc_ids(rng, n_tv + n_test, "2007")))
    trainval, test = sorted(ids[:n_tv]), sorted(ids[n_tv:])
    train = sorted(rng.permutation(trainval)[: n_tv // 2].tolist())
    val = sorted(set(trainval) - set(train))
    summary["voc2007"] = _write_voc(voc / "VOC2007", "2007", seed,
                                    {"train": train, "val": val, "trainval": trainval, "test": test},
                                    set(), set(), cfg, workers)

    rng = _rng(seed, "voc2012", "ids")
    n_tr, n_va, n_ex = cfg["voc12_train"], cfg["voc12_val"], cfg["voc12_aug_extra"]
    ids = list(rng.permutation(_voc_ids(rng, n_tr + n_va + n_ex, "2012")))
    seg_train, seg_val, extra = sorted(ids[:n_tr]), sorted(ids[n_tr:n_tr + n_va]), sorted(ids[n_tr + n_va:])
    train_aug = sorted(seg_train + extra)  # SBD-style: more images than train, none from val
    summary["voc2012"] = _write_voc(voc / "VOC2012", "2012", seed,
                                    {"train": train_aug, "val": seg_val, "trainval": sorted(train_aug + seg_val)},
                                    set(seg_train + seg_val), set(train_aug + seg_val), cfg, workers)
    seg_dir = voc / "VOC2012" / "ImageSets" / "Segmentation"
    seg_dir.mkdir(parents=True, exist_ok=True)
    for name, split_ids in (("train", seg_train), ("val", seg_val), ("trainval", seg_train + seg_val),
                            ("train_aug", train_aug)):
        _write_list(seg_dir / f"{name}.txt", split_ids)
    summary["voc2012"].update({"seg_train": {"images": len(seg_train)}, "seg_val": {"images": len(seg_val)},
                               "train_aug": {"images": len(train_aug)}})
    marker = json.loads((out / MARKER).read_text())
    marker["expected"] = {  # the counts `harness data check` expects of this root
        "COCO 2017": {"train": cfg["coco_train"], "val": cfg["coco_val"]},
        "VOC2007": {"trainval": len(trainval), "test": len(test)},
        "VOC2012": {"main/trainval": len(train_aug) + len(seg_val), "segmentation/train": len(seg_train),
                    "segmentation/val": len(seg_val)},
        "SBD (train_aug)": {"train_aug": len(train_aug)},
    }
    (out / MARKER).write_text(json.dumps(marker))
    return summary


COMPLETE = ".complete"  # written after a whole `write_synthetic` call: a killed write is redone


def write_synthetic_once(root: Path) -> Path:
    """The default synthetic data (seed 0, ``DEFAULT_SIZES``) at ``root``, written unless a finished
    write is there (``harness eval --synthetic`` and the scaling study share it; call on one rank)."""
    root = Path(root)
    if not (root / COMPLETE).is_file():
        write_synthetic(root, seed=0)
        (root / COMPLETE).write_text("")
    return root


def check_default_synthetic(root: Path) -> Path:
    """``root`` when its marker says it holds this version's default synthetic data, else a one-line error."""
    made = json.loads((Path(root) / MARKER).read_text())
    if (made.get("seed"), made.get("sizes")) != (0, DEFAULT_SIZES):
        raise HarnessError(f"{root} was generated with other settings than this version's "
                           f"`harness data synth` ({made.get('sizes')}); use another --out")
    return Path(root)


# ----------------------------------------------------------------------------- pretraining
def write_pretrain_synthetic(out: Path, size: int, label_noise: float, seed: int = 0,
                             image_size: int = 128) -> Path:
    """A multi-label pretraining set drawn from the same shape vocabulary as the downstream sets.

    Images are object-centric (one or two objects of a fifth to nearly half the image's side, on the
    downstream sets' cluttered backgrounds).

    Writes `out/images/%07d.jpg` and `out/manifest.jsonl` ({"path": relative path, "labels": [names]}
    per line).  Labels are the classes of the objects at least 40% visible in an image; then
    round(label_noise * #labels) of them, chosen deterministically, are corrupted: dropped or
    swapped for a class the image lacks.
    The images do not depend on label_noise.  Returns the manifest path.
    """
    if size < 1 or not 0.0 <= label_noise <= 1.0:
        raise HarnessError(f"pretraining data: need size >= 1 and 0 <= label_noise <= 1, "
                           f"got size={size}, label_noise={label_noise}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    labels: list[list[str]] = []
    paths: list[str] = []
    for i in range(size):
        rng = _rng(seed, "pretrain", i)
        # object-centric, as the photos of ImageNet or JFT: one main object, sometimes a second
        scene = render_scene(rng, image_size, image_size, VOC_CLASSES, 1 if rng.random() < 0.6 else 2,
                             checks=False, half_range=(0.2, 0.45))
        rel = f"images/{i:07d}.jpg"
        _save_jpeg(scene.image, out / rel)
        paths.append(rel)
        # the classes an annotator would tag: an object at least 40% visible, not a sliver (VOC's "difficult")
        labels.append(sorted({a.cls for a in annotate(scene) if not a.difficult}))
    noise_rng = _rng(seed, "pretrain", "noise")
    slots = [(i, k) for i, ls in enumerate(labels) for k in range(len(ls))]
    n_bad = int(round(label_noise * len(slots)))
    chosen = sorted(noise_rng.choice(len(slots), n_bad, replace=False).tolist()) if n_bad else []
    noisy = [list(ls) for ls in labels]
    for s in chosen:
        i, k = slots[s]
        if noise_rng.random() < 0.5:
            noisy[i][k] = None  # dropped
        else:
            others = [c for c in VOC_CLASSES if c not in labels[i] and c not in noisy[i]]
            noisy[i][k] = str(noise_rng.choice(others))
    manifest = out / "manifest.jsonl"
    manifest.write_text("".join(
        json.dumps({"path": p, "labels": sorted(c for c in ls if c is not None)}, sort_keys=True) + "\n"
        for p, ls in zip(paths, noisy)))
    return manifest
