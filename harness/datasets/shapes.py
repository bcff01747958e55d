"""The synthetic scenes' shape vocabulary: the 20 VOC categories as polygon silhouettes in a unit
frame, each with a texture cue, and people as articulated stick figures with the 17 COCO keypoints
(``harness.datasets.scenes`` draws them, ``harness.datasets.synthetic`` writes the datasets)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np


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
# texture cue per class: shared by a few classes each, so it helps but does not decide
TEXTURE = {c.name: (TEXTURES[i % 6], 45.0 * (i // 6)) for i, c in enumerate(VOCAB)}


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


def stick_figure(rng: np.random.Generator, cx: float, cy: float, height: float):
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
