"""Shape fidelity of one-shape images: how close the drawn shape is to the renderer's own.

`model.evaluate` reads back what kind of shape an image shows; this module measures how
well it is drawn, against the geometry the training data is rendered with
(`shapes_data.draw_shape`):

- IoU: the generated shape is the largest 8-connected region of pixels of the asked colour
  (nearest to it of the palette, or a blend of it and the background at least half of it);
  it is compared with the ideal shape of the asked kind and size (rendered like the data,
  covered ≥ 50% counts), placed on the region's centroid and then at the best quarter-pixel
  offset within a pixel of it; a caption that does not say the size is held to the size that
  fits better. The renderer's own images score medians of 0.96 (small stars) to 1.00, 10th
  percentiles ≥ 0.94.
- stricter judgements (the scorer's nearest-template reading lets a pillow pass as a square):
  a square fills ≥ 90% of its bounding box; a circle fills < 83% of it (the renderer's
  circles fill 72-80%, a regular octagon 82.8%); a star has its points: five or more (rays
  from the centroid to the outline peak where a point rises at least 20% of the longest ray
  above the valleys beside it; a pixel step may split a tip in two) and deep valleys between
  them (it covers at most 70% of its convex hull: the renderer's stars 52-63%, a pentagon
  90%, a small star blurred by a pixel 74%).
- speckle: the share of the shape's interior (the region with its holes filled, less its
  one-pixel rim) whose colour is more than SPECKLE_DISTANCE from the asked colour.

numpy and PIL only; every function takes a 64×64 image or boolean mask.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from diffq.model.training import shapes_data

SQUARE_FILL = 0.90  # a square fills at least this share of its bounding box
CIRCLE_FILL = 0.83  # a circle fills less (the renderer's: 0.72-0.80; a regular octagon: 0.828)
STAR_POINTS = 5
STAR_PROMINENCE = 0.2  # a point rises this share of the longest ray above the valleys beside it
STAR_SOLIDITY = 0.70  # a star covers at most this share of its convex hull (drawn: 0.52-0.63; a pentagon 0.9)
SPECKLE_DISTANCE = 48.0  # RGB units (Euclidean) from the asked colour that count as a speckle
BLEND_DISTANCE = 24.0  # RGB units off the background-to-colour line that still count as a blend
SPECKLE_ALLOWED = 0.01  # the bar: speckle ≤ 1% of the shape's pixels
OFFSETS = tuple(k / 4 for k in range(-4, 5))  # quarter-pixel search within a pixel of the centroid alignment


@dataclass(frozen=True)
class Fidelity:
    size: str  # the size measured against: the one asked for, or the better fit if none was
    iou: float
    strict: bool | None  # the stricter judgement for its kind; None for triangles (no rule)
    fill: float  # area / bounding-box area of the region, holes filled
    points: int  # points counted on the outline (stars' rule; reported for every kind)
    solidity: float  # area / convex-hull area, holes filled (stars' rule)
    speckle: float  # share of the interior far from the asked colour (1.0 when nothing was drawn)


_NEIGHBOURS_8 = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_NEIGHBOURS_4 = ((-1, 0), (1, 0), (0, -1), (0, 1))


def _flood(mask: np.ndarray, seeds: list[tuple[int, int]], neighbours) -> np.ndarray:
    """The pixels of `mask` connected to any of `seeds` (breadth-first)."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    queue = deque((y, x) for y, x in seeds if mask[y, x])
    for y, x in queue:
        seen[y, x] = True
    while queue:
        y, x = queue.popleft()
        for dy, dx in neighbours:
            ny, nx = y + dy, x + dx
            if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                seen[ny, nx] = True
                queue.append((ny, nx))
    return seen


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a boolean mask (all False when it is empty)."""
    left = mask.copy()
    best = np.zeros_like(mask, dtype=bool)
    while left.any():
        y, x = np.argwhere(left)[0]
        component = _flood(left, [(int(y), int(x))], _NEIGHBOURS_8)
        if component.sum() > best.sum():
            best = component
        left &= ~component
    return best


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask with every hole (4-connected background not reaching the border) filled."""
    h, w = mask.shape
    border = [(y, x) for y in range(h) for x in (0, w - 1)] + [(y, x) for x in range(w) for y in (0, h - 1)]
    outside = _flood(~mask, border, _NEIGHBOURS_4)
    return ~outside


def erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of the mask whose four neighbours are all in it."""
    padded = np.pad(mask, 1)
    return mask & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean() + 0.5), float(ys.mean() + 0.5)


@lru_cache(maxsize=4096)
def ideal_mask(kind: str, size: str, cx: float, cy: float) -> np.ndarray:
    """The renderer's shape of this kind and size centred (as `render` places it) at (cx, cy):
    drawn at SUPERSAMPLE×, box-downsampled, pixels covered at least half."""
    s = shapes_data.SUPERSAMPLE
    side = shapes_data.IMAGE_SIZE * s
    canvas = Image.new("L", (side, side), 0)
    shapes_data.draw_shape(ImageDraw.Draw(canvas), kind, cx * s, cy * s, shapes_data.SIZE_RADII[size] * s, 255)
    small = canvas.resize((shapes_data.IMAGE_SIZE, shapes_data.IMAGE_SIZE), Image.Resampling.BOX)
    return np.asarray(small) >= 128


@lru_cache(maxsize=64)
def centroid_offset(kind: str, size: str) -> tuple[float, float]:
    """Where the ideal mask's centroid lies relative to the centre it is drawn at (a triangle's is lower)."""
    mid = shapes_data.IMAGE_SIZE / 2
    x, y = centroid(ideal_mask(kind, size, mid, mid))
    return x - mid, y - mid


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = float((a | b).sum())
    return float((a & b).sum()) / union if union else 0.0


def best_iou(region: np.ndarray, kind: str, size: str) -> float:
    """IoU of `region` with the ideal shape placed on its centroid, at the best sub-pixel offset."""
    if not region.any():
        return 0.0
    gx, gy = centroid(region)
    ox, oy = centroid_offset(kind, size)
    cx, cy = gx - ox, gy - oy
    cx, cy = round(cx * 4) / 4, round(cy * 4) / 4  # quarter pixels: the ideal masks' cache is reused
    return max(iou(region, ideal_mask(kind, size, cx + dx, cy + dy)) for dx in OFFSETS for dy in OFFSETS)


def bbox_fill(mask: np.ndarray) -> float:
    if not mask.any():
        return 0.0
    ys, xs = np.nonzero(mask)
    return float(mask.sum()) / float((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))


def ray_lengths(mask: np.ndarray, n_angles: int = 180, step: float = 0.25) -> np.ndarray:
    """Distance from the centroid to where each of `n_angles` rays leaves the mask."""
    cx, cy = centroid(mask)
    h, w = mask.shape
    angles = np.linspace(0, 2 * math.pi, n_angles, endpoint=False)
    radii = np.arange(0, max(h, w), step)
    xs = (cx + np.cos(angles)[:, None] * radii).astype(int)  # pixel x holds [x, x + 1)
    ys = (cy + np.sin(angles)[:, None] * radii).astype(int)
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    hit = np.zeros_like(inside)
    hit[inside] = mask[ys[inside], xs[inside]]
    leaving = ~hit
    leaving[:, -1] = True
    return radii[leaving.argmax(1)]


def count_points(mask: np.ndarray) -> int:
    """Points on the outline: peaks of the rays' lengths from the centroid whose prominence
    (how far the ray falls on both sides before a longer one) is at least STAR_PROMINENCE of
    the longest ray. A star's points rise ~60% above its valleys, a pentagon's corners 19%."""
    if mask.sum() < 6:
        return 0
    r = ray_lengths(mask)
    r = (np.roll(r, 1) + r + np.roll(r, -1)) / 3  # light smoothing of pixel steps
    n, needed = len(r), STAR_PROMINENCE * float(r.max())
    points = 0
    for i in range(n):
        if not (r[i] > r[i - 1] and r[i] >= r[(i + 1) % n]):
            continue  # not a local maximum (a plateau counts once, at its first sample)
        lowest = []
        for direction in (-1, 1):  # walk each way until a longer ray, keeping the lowest seen
            low, j = float(r[i]), i
            for _ in range(n - 1):
                j = (j + direction) % n
                if r[j] > r[i]:
                    break
                low = min(low, float(r[j]))
            lowest.append(low)
        if r[i] - max(lowest) >= needed:
            points += 1
    return points


def solidity(mask: np.ndarray) -> float:
    """Area of the mask over the area of its convex hull (of the pixels' corners)."""
    if not mask.any():
        return 0.0
    ys, xs = np.nonzero(mask)
    corners = sorted(
        {(x + dx, y + dy) for x, y in zip(xs.tolist(), ys.tolist(), strict=True) for dx in (0, 1) for dy in (0, 1)}
    )

    def cross(o, a, b) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[int, int]] = []
    upper: list[tuple[int, int]] = []
    for chain, points in ((lower, corners), (upper, corners[::-1])):  # Andrew's monotone chain
        for p in points:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
    hull = lower[:-1] + upper[:-1]
    area = 0.5 * abs(sum(hull[i][0] * hull[i - 1][1] - hull[i - 1][0] * hull[i][1] for i in range(len(hull))))
    return float(mask.sum()) / area if area else 0.0


def strict_judgement(kind: str, filled: np.ndarray) -> bool | None:
    if kind == "square":
        return bbox_fill(filled) >= SQUARE_FILL
    if kind == "circle":
        return 0 < bbox_fill(filled) < CIRCLE_FILL
    if kind == "star":
        return count_points(filled) >= STAR_POINTS and solidity(filled) <= STAR_SOLIDITY
    return None


def speckle(pixels: np.ndarray, filled: np.ndarray, colour: str) -> float:
    """Share of the interior of `filled` (its one-pixel rim left out: that is antialiasing)
    more than SPECKLE_DISTANCE from the palette colour asked for."""
    interior = erode(filled)
    if not interior.any():
        interior = filled
    if not interior.any():
        return 1.0
    distance = np.linalg.norm(pixels[interior].astype(np.float32) - np.asarray(shapes_data.COLOURS[colour]), axis=-1)
    return float((distance > SPECKLE_DISTANCE).mean())


def shape_pixels(pixels: np.ndarray, colour: str) -> np.ndarray:
    """Pixels of the asked colour: nearest to it of the palette, or an antialiased blend of it
    and the background at least half of it (red over blue at 50% is nearest to purple, yet it
    is half red: the renderer's own rims would otherwise read as missing)."""
    labels = shapes_data._palette_labels(pixels)
    names = list(shapes_data.COLOURS)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = np.asarray(list(shapes_data.COLOURS.values())[int(np.bincount(border).argmax())], np.float32)
    asked = np.asarray(shapes_data.COLOURS[colour], np.float32)
    span = asked - background
    if not span.any():
        return labels == names.index(colour)
    offset = pixels.astype(np.float32) - background
    t = offset @ span / float(span @ span)  # 0 at the background, 1 at the asked colour
    off_line = np.linalg.norm(offset - t[..., None] * span, axis=-1)
    blend = (t >= 0.5) & (t <= 1.25) & (off_line < BLEND_DISTANCE)
    return (labels == names.index(colour)) | blend


def measure(image: Image.Image, shape: shapes_data.Shape, any_size: bool = False) -> Fidelity:
    """Fidelity of the one shape `shape` asks for, as drawn in `image` (`any_size`: the
    caption did not say its size, so the IoU is the better of the two sizes')."""
    pixels = np.asarray(image.convert("RGB").resize((shapes_data.IMAGE_SIZE, shapes_data.IMAGE_SIZE)))
    region = largest_region(shape_pixels(pixels, shape.colour))
    filled = fill_holes(region)
    sizes = shapes_data.SIZES if any_size else (shape.size,)
    size = max(sizes, key=lambda z: best_iou(region, shape.kind, z))
    return Fidelity(
        size=size,
        iou=best_iou(region, shape.kind, size),
        strict=strict_judgement(shape.kind, filled),
        fill=bbox_fill(filled),
        points=count_points(filled),
        solidity=solidity(filled),
        speckle=speckle(pixels, filled, shape.colour) if region.any() else 1.0,
    )


def summarise(results: list[tuple[shapes_data.Shape, Fidelity]]) -> dict:
    """Median and 10th-percentile IoU per (size, kind) and over all; stricter judgements per
    kind and over all; speckle: share of images at most SPECKLE_ALLOWED, and speckle-free."""
    groups: dict[str, list[float]] = {}
    for shape, f in results:
        groups.setdefault(f"{f.size} {shape.kind}", []).append(f.iou)
    ious = [f.iou for _, f in results]
    strict = {
        kind: [f.strict for s, f in results if s.kind == kind and f.strict is not None]
        for kind in ("square", "circle", "star")
    }
    judged = [ok for oks in strict.values() for ok in oks]
    speckles = [f.speckle for _, f in results]
    return {
        "n": len(results),
        "iou": {
            group: {"n": len(v), "median": float(np.median(v)), "p10": float(np.percentile(v, 10))}
            for group, v in sorted(groups.items())
        },
        "iou_all": {
            "median": float(np.median(ious)) if ious else 0.0,
            "p10": float(np.percentile(ious, 10)) if ious else 0.0,
        },
        "smallest_median": min((float(np.median(v)) for v in groups.values()), default=0.0),
        "strict": {kind: float(np.mean(oks)) if oks else None for kind, oks in strict.items()},
        "strict_all": float(np.mean(judged)) if judged else 0.0,
        "speckle_at_most_1pct": float(np.mean([s <= SPECKLE_ALLOWED for s in speckles])) if speckles else 0.0,
        "speckle_free": float(np.mean([s == 0 for s in speckles])) if speckles else 0.0,
    }


TARGETS = {"smallest_median": 0.88, "iou_p10": 0.85, "strict_all": 0.92, "speckle_at_most_1pct": 0.95}


def targets_met(summary: dict) -> dict[str, bool]:
    values = {
        "smallest_median": summary["smallest_median"],
        "iou_p10": summary["iou_all"]["p10"],
        "strict_all": summary["strict_all"],
        "speckle_at_most_1pct": summary["speckle_at_most_1pct"],
    }
    return {k: values[k] >= t for k, t in TARGETS.items()}
