"""Drawing one synthetic scene and reading its annotations off the drawn pixels.

A scene is a cluttered, textured background and objects from the shape vocabulary
(``harness.datasets.shapes``) drawn back to front. Each category has its own silhouette and a
texture cue, while colours are random, so colour alone never tells the class. The label map and
the image come from the same geometry: boxes are the tight bounds of the visible pixels, masks are
exactly those pixels, and their polygons trace the pixel edges."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from harness.datasets.shapes import CATEGORY, SHAPES, TEXTURE, TEXTURES, stick_figure

CROWD_CLASSES = ("person", "sheep", "bird", "bottle", "car")


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
                body, marks = stick_figure(rng, px, py, 2 * ss)[:2]
                parts.append(Part(body + marks, px, py, 0.0, ss))
            else:
                parts.append(_shape_part(rng, cls, px, py, ss)[0])
    elif cls == "person":
        body, marks, kps, labelled, pose = stick_figure(rng, cx, cy, 2 * s)
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
