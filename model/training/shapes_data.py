"""The procedural "shapes" world: captioned 64×64 images, and the checks that score them.

Everything about the default model's vocabulary lives here, so the generator that makes
training data and the evaluator that scores generated images cannot drift apart.

A scene is a background colour and one or two shapes. Each shape has a colour, a kind
(circle, square, triangle, star), a position (left, right, top, bottom, center) and a size
(small, large). Captions name some or all of these; whatever a caption leaves out is drawn
at random, so the model also learns short prompts such as "a red circle".
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 64
SUPERSAMPLE = 4  # draw at 4× and downsample: antialiased edges like a real photo's

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (245, 220, 30),
    "purple": (140, 40, 180),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star")
POSITIONS = ("left", "right", "top", "bottom", "center")
SIZES = ("small", "large")

# Pixel centres of each position and radii of each size, on the 64×64 canvas.
POSITION_CENTRES: dict[str, tuple[float, float]] = {
    "left": (17.0, 32.0),
    "right": (47.0, 32.0),
    "top": (32.0, 17.0),
    "bottom": (32.0, 47.0),
    "center": (32.0, 32.0),
}
SIZE_RADII: dict[str, float] = {"small": 7.5, "large": 13.0}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
# Two shapes always sit on opposite sides, so they never overlap.
PAIRS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
JITTER = 2.0  # pixels of random offset of a shape's centre

# The "stripes" style (the shipped LoRA adapter's, which the base model never draws): diagonal
# bands of a lighter or darker shade of the background, STRIPE_WIDTH of every STRIPE_PERIOD
# pixels along x + y. The shade stays nearest to its own palette colour, so the scorer reads a
# striped background as the colour asked for and colour/shape/position scores are unchanged.
STYLES = ("plain", "stripes")
STRIPE_PERIOD = 16
STRIPE_WIDTH = 6
STRIPE_THRESHOLD = 10.0  # `stripe_strength` above this reads as striped (RGB units)

VOCABULARY = sorted(
    set(COLOURS)
    | set(SHAPES)
    | set(SIZES)
    | {w for phrase in POSITION_PHRASES.values() for w in phrase.split()}
    | {"a", "and", "background", ","}
)


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    position: str
    size: str


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]
    # Which attributes the caption states; the others were chosen at random.
    mentions: frozenset[str] = field(default_factory=lambda: frozenset({"background", "position", "size"}))

    @property
    def caption(self) -> str:
        parts = [_shape_phrase(s, self.mentions) for s in self.shapes]
        text = " and ".join(parts)
        if "background" in self.mentions:
            text += f", {self.background} background"
        return text


def _shape_phrase(shape: Shape, mentions: frozenset[str]) -> str:
    words = ["a"]
    if "size" in mentions:
        words.append(shape.size)
    words += [shape.colour, shape.kind]
    if "position" in mentions:
        words.append(POSITION_PHRASES[shape.position])
    return " ".join(words)


def random_scene(rng: random.Random) -> Scene:
    """A scene and a caption of random detail: full captions half the time, shorter ones otherwise."""
    background = rng.choice(list(COLOURS))
    n_shapes = 1 if rng.random() < 0.6 else 2
    positions = (rng.choice(POSITIONS),) if n_shapes == 1 else rng.choice(PAIRS)
    shapes = []
    for position in positions:
        colour = rng.choice([c for c in COLOURS if c != background])
        shapes.append(Shape(colour, rng.choice(SHAPES), position, rng.choice(SIZES)))
    if rng.random() < 0.5:
        mentions = frozenset({"background", "position", "size"})
    else:
        mentions = frozenset(m for m in ("background", "position", "size") if rng.random() < 0.5)
    return Scene(background, tuple(shapes), mentions)


def _shape_polygon(kind: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if kind == "square":
        h = r * 0.88  # same visual weight as a circle of radius r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if kind == "triangle":
        return [
            (cx + r * math.cos(math.radians(a)), cy + r * 1.1 * math.sin(math.radians(a)) + r * 0.15)
            for a in (-90, 30, 150)
        ]
    if kind == "star":
        points = []
        for i in range(10):
            radius = r * 1.1 if i % 2 == 0 else r * 0.45
            angle = math.radians(-90 + 36 * i)
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    return None  # circle


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    """Draw one shape on a canvas whose coordinates are already scaled."""
    polygon = _shape_polygon(kind, cx, cy, r)
    if polygon is None:
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(polygon, fill=fill)


def stripe_shade(colour: str) -> tuple[int, int, int]:
    """The background's stripe colour: blended towards black or white (whichever moves it
    further), half as far as it may go before another palette colour becomes the nearest."""
    base = np.asarray(COLOURS[colour], np.float32)
    best, best_move = base, 0.0
    for target in (0.0, 255.0):
        alpha = 0.0
        while alpha < 0.95 and nearest_colour(base * (1 - alpha - 0.01) + target * (alpha + 0.01)) == colour:
            alpha += 0.01
        shade = base * (1 - alpha / 2) + target * (alpha / 2)
        if (move := float(np.abs(shade - base).sum())) > best_move:
            best, best_move = shade, move
    red, green, blue = (int(round(v)) for v in best)
    return red, green, blue


def draw_stripes(draw: ImageDraw.ImageDraw, colour: str, scale: int) -> None:
    """Diagonal bands where (x + y) mod STRIPE_PERIOD < STRIPE_WIDTH, on a canvas scaled by `scale`."""
    size, fill = IMAGE_SIZE * scale, stripe_shade(colour)
    for start in range(0, 2 * IMAGE_SIZE, STRIPE_PERIOD):
        a, b = start * scale, (start + STRIPE_WIDTH) * scale
        draw.polygon([(a, 0), (b, 0), (b - size, size), (a - size, size)], fill=fill)


def render(scene: Scene, rng: random.Random | None = None, style: str = "plain") -> Image.Image:
    """Render a scene to a 64×64 RGB image; `rng` adds a little jitter to each shape's place."""
    centres = []
    for shape in scene.shapes:
        cx, cy = POSITION_CENTRES[shape.position]
        if rng is not None:
            cx += rng.uniform(-JITTER, JITTER)
            cy += rng.uniform(-JITTER, JITTER)
        centres.append((cx, cy))
    return render_at(scene, centres, style)


def render_at(scene: Scene, centres: list[tuple[float, float]], style: str = "plain") -> Image.Image:
    """`scene` rendered with each shape centred at the given point (64×64 pixel coordinates)."""
    s = SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * s, IMAGE_SIZE * s), COLOURS[scene.background])
    draw = ImageDraw.Draw(canvas)
    if style == "stripes":
        draw_stripes(draw, scene.background, s)
    for shape, (cx, cy) in zip(scene.shapes, centres, strict=True):
        draw_shape(draw, shape.kind, cx * s, cy * s, SIZE_RADII[shape.size] * s, COLOURS[shape.colour])
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def sample(seed: int, style: str = "plain") -> tuple[Image.Image, str, Scene]:
    """The training example number `seed`: deterministic, so a data set is just a range of seeds."""
    rng = random.Random(seed)
    scene = random_scene(rng)
    return render(scene, rng, style), scene.caption, scene


def batch(seeds, *, as_uint8: bool = False, style: str = "plain") -> tuple[np.ndarray, list[str]]:
    """Images as an (N, 3, 64, 64) array in [-1, 1] (or uint8), with their captions."""
    images, captions = [], []
    for seed in seeds:
        image, caption, _ = sample(int(seed), style)
        images.append(np.asarray(image))
        captions.append(caption)
    array = np.stack(images).transpose(0, 3, 1, 2)
    if as_uint8:
        return array, captions
    return array.astype(np.float32) / 127.5 - 1.0, captions


# --------------------------------------------------------------------------------------
# Scoring generated images against a scene


def nearest_colour(rgb) -> str:
    rgb = np.asarray(rgb, dtype=np.float32)
    return min(COLOURS, key=lambda c: float(np.sum((rgb - np.asarray(COLOURS[c], np.float32)) ** 2)))


def _palette_labels(pixels: np.ndarray) -> np.ndarray:
    """Index into COLOURS of the nearest palette colour of every pixel (H, W, 3) → (H, W)."""
    palette = np.asarray(list(COLOURS.values()), np.float32)
    d = ((pixels[..., None, :].astype(np.float32) - palette) ** 2).sum(-1)
    return d.argmin(-1)


@dataclass
class Analysis:
    background: str
    shapes: list[dict]  # per expected shape: colour, kind, position found (or None)


def _shape_template(kind: str, cx: float, cy: float, r: float) -> np.ndarray:
    s = 2
    canvas = Image.new("L", (IMAGE_SIZE * s, IMAGE_SIZE * s), 0)
    draw_shape(ImageDraw.Draw(canvas), kind, cx * s, cy * s, r * s, 255)
    return np.asarray(canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)) > 127


# Area of each shape's template per unit radius², measured once.
_UNIT_AREAS = {kind: float(_shape_template(kind, 32, 32, 10).sum()) / 100.0 for kind in SHAPES}


def classify_kind(mask: np.ndarray) -> str | None:
    """The shape whose template, placed at the mask's centre and size, overlaps it best (IoU)."""
    if mask.sum() < 6:
        return None
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    area = float(mask.sum())
    best, best_iou = None, -1.0
    for kind in SHAPES:
        # radius whose template has the mask's area, then a few scales around it
        unit = _UNIT_AREAS[kind]
        for scale in (0.8, 0.9, 1.0, 1.1, 1.25):
            r = math.sqrt(area / max(unit, 1e-6)) * scale
            for dy in (-1.0, 0.0, 1.0):
                template = _shape_template(kind, cx, cy + dy, r)
                iou = float((template & mask).sum()) / float((template | mask).sum() or 1)
                if iou > best_iou:
                    best, best_iou = kind, iou
    return best


def position_of(cx: float, cy: float) -> str:
    return min(POSITION_CENTRES, key=lambda p: (POSITION_CENTRES[p][0] - cx) ** 2 + (POSITION_CENTRES[p][1] - cy) ** 2)


def half_region(position: str) -> np.ndarray:
    """The half of the canvas a two-shape scene's shape at `position` is read from (left, right,
    top; any other: the bottom)."""
    region = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    half = IMAGE_SIZE // 2
    cut = {"left": np.s_[:, :half], "right": np.s_[:, half:], "top": np.s_[:half, :]}
    region[cut.get(position, np.s_[half:, :])] = True
    return region


def analyse(image: Image.Image, scene: Scene) -> Analysis:
    """Read back background colour and, for each shape the scene asks for, its colour, kind and place.

    The background is the most common palette colour on the image border. Non-background
    pixels are the shapes; with two shapes they are split along the axis the scene uses
    (left/right or top/bottom), so each half is scored against the shape asked for there.
    """
    pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE)))
    labels = _palette_labels(pixels)
    names = list(COLOURS)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = names[int(np.bincount(border, minlength=len(names)).argmax())]
    foreground = labels != names.index(background)

    regions: list[np.ndarray] = []
    if len(scene.shapes) == 1:
        regions.append(foreground)
    else:
        regions += [foreground & half_region(shape.position) for shape in scene.shapes]

    found: list[dict[str, str | None]] = []
    for region in regions:
        if region.sum() < 6:
            found.append({"colour": None, "kind": None, "position": None})
            continue
        counts = np.bincount(labels[region], minlength=len(names))
        colour = names[int(counts.argmax())]
        mask = region & (labels == names.index(colour))
        ys, xs = np.nonzero(mask)
        found.append(
            {
                "colour": colour,
                "kind": classify_kind(mask),
                "position": position_of(xs.mean() + 0.5, ys.mean() + 0.5),
            }
        )
    return Analysis(background, found)


def stripe_strength(image: Image.Image) -> float:
    """How strongly the background varies with period STRIPE_PERIOD along x + y (RGB units).

    Background pixels (the border's palette colour) are binned by their phase (x + y) mod
    STRIPE_PERIOD; the answer is the amplitude of the first harmonic of the bins' mean
    colours. Rendered plain scenes give at most about 1 whatever the shapes; striped ones 24 to 40.
    """
    pixels = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE))).astype(np.float32)
    labels = _palette_labels(pixels)
    border = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    background = labels == np.bincount(border).argmax()
    ys, xs = np.indices(labels.shape)
    phase = (xs + ys) % STRIPE_PERIOD
    means = []
    for k in range(STRIPE_PERIOD):
        bin_pixels = pixels[background & (phase == k)]
        if len(bin_pixels) < 8:  # a bin all covered by shapes: no evidence either way
            return 0.0
        means.append(bin_pixels.mean(0))
    harmonic = np.exp(-2j * np.pi * np.arange(STRIPE_PERIOD) / STRIPE_PERIOD)
    return float(np.linalg.norm(2 * np.abs(harmonic @ np.stack(means)) / STRIPE_PERIOD))


def has_stripes(image: Image.Image) -> bool:
    return stripe_strength(image) > STRIPE_THRESHOLD
