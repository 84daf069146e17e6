"""Shape fidelity measures (`diffq.model.training.fidelity`) on synthetic images whose answer is known."""

import math

import numpy as np
from PIL import Image, ImageDraw

from diffq.model.training import fidelity, shapes_data
from diffq.model.training.evaluate import main as evaluate

BLUE, RED = shapes_data.COLOURS["blue"], shapes_data.COLOURS["red"]


def canvas(draw_on, background=BLUE) -> Image.Image:
    """A 64×64 scene drawn at the renderer's supersampling by `draw_on(draw, scale)`."""
    s = shapes_data.SUPERSAMPLE
    image = Image.new("RGB", (64 * s, 64 * s), background)
    draw_on(ImageDraw.Draw(image), s)
    return image.resize((64, 64), Image.Resampling.BOX)


def shape(kind: str, size: str = "large") -> shapes_data.Shape:
    return shapes_data.Shape("red", kind, "center", size)


def rendered(kind: str, size: str = "large", cx: float = 32.3, cy: float = 31.6) -> Image.Image:
    r = shapes_data.SIZE_RADII[size]
    return canvas(lambda d, s: shapes_data.draw_shape(d, kind, cx * s, cy * s, r * s, RED))


def test_the_renderers_shapes_score_near_one_and_pass_their_judgements():
    for size in shapes_data.SIZES:
        for kind in shapes_data.SHAPES:
            f = fidelity.measure(rendered(kind, size), shape(kind, size))
            assert f.iou > 0.9, (kind, size, f)
            assert f.strict in (True, None), (kind, size, f)
            assert f.speckle == 0.0
    square = fidelity.measure(rendered("square", "large", 32.0, 32.0), shape("square"))
    assert square.iou > 0.99 and square.strict and square.fill > 0.97


def test_a_rounded_square_fails_the_fill_rule_and_a_circle_is_not_a_square():
    h = shapes_data.SIZE_RADII["large"] * 0.88
    pillow = canvas(
        lambda d, s: d.rounded_rectangle([(32 - h) * s, (32 - h) * s, (32 + h) * s, (32 + h) * s], 9 * s, RED)
    )
    f = fidelity.measure(pillow, shape("square"))
    assert f.iou > 0.85  # close in area, yet
    assert not f.strict and f.fill < fidelity.SQUARE_FILL
    # a circle that came out a rounded square is too square; a true circle is not
    rounded = canvas(
        lambda d, s: d.rounded_rectangle([(32 - h) * s, (32 - h) * s, (32 + h) * s, (32 + h) * s], 5 * s, RED)
    )
    assert fidelity.measure(rounded, shape("circle")).strict is False
    assert fidelity.measure(rendered("circle"), shape("circle")).strict is True
    # and a square asked to be a circle scores badly on both counts
    as_circle = fidelity.measure(rendered("square"), shape("circle"))
    assert as_circle.strict is False and as_circle.iou < 0.9


def test_a_star_has_its_points_a_pentagon_and_a_blurred_star_do_not():
    for size in shapes_data.SIZES:
        r = shapes_data.SIZE_RADII[size] * 1.1
        pentagon = [
            (32 + r * math.cos(math.radians(-90 + 72 * i)), 32 + r * math.sin(math.radians(-90 + 72 * i)))
            for i in range(5)
        ]
        image = canvas(lambda d, s, p=pentagon: d.polygon([(x * s, y * s) for x, y in p], RED))
        f = fidelity.measure(image, shape("star", size))
        assert f.strict is False and f.solidity > fidelity.STAR_SOLIDITY, (size, f)
        star = fidelity.measure(rendered("star", size), shape("star", size))
        assert star.strict is True and star.points == 5, (size, star)
    # the star's points rounded off: each pixel mixed with its neighbours' (a 5×5 box blur), read back
    sharp = np.asarray(rendered("star", "small")).astype(np.float32)
    padded = np.pad(sharp, ((2, 2), (2, 2), (0, 0)), mode="edge")
    soft = sum(padded[dy : dy + 64, dx : dx + 64] for dy in range(5) for dx in range(5)) / 25
    blurred = fidelity.measure(Image.fromarray(soft.round().astype(np.uint8)), shape("star", "small"))
    assert blurred.strict is False, blurred


def test_speckles_inside_the_shape_are_counted_its_antialiased_rim_is_not():
    clean = rendered("square")
    assert fidelity.measure(clean, shape("square")).speckle == 0.0  # the rim's blended pixels are not speckle
    pixels = np.asarray(clean).copy()
    pixels[28:31, 28:31] = shapes_data.COLOURS["yellow"]  # 9 off-colour pixels inside
    pixels[35, 35] = (195, 45, 40)  # a slightly darker red (30 units off): near enough, not a speckle
    f = fidelity.measure(Image.fromarray(pixels), shape("square"))
    interior = fidelity.erode(fidelity.largest_region(fidelity.shape_pixels(np.asarray(clean), "red")))
    assert 350 < interior.sum() < 450  # a 23-pixel square less its rim
    assert math.isclose(f.speckle, 9 / interior.sum()), (f.speckle, interior.sum())
    assert f.speckle > fidelity.SPECKLE_ALLOWED and f.iou < 0.99  # the hole costs IoU too
    results = [(shape("square"), fidelity.measure(clean, shape("square"))), (shape("square"), f)]
    summary = fidelity.summarise(results)
    assert summary["speckle_at_most_1pct"] == 0.5 and summary["speckle_free"] == 0.5


def test_the_largest_region_is_the_shape_and_nothing_drawn_scores_zero():
    def two(d, s):
        shapes_data.draw_shape(d, "square", 20 * s, 32 * s, shapes_data.SIZE_RADII["large"] * s, RED)
        shapes_data.draw_shape(d, "square", 50 * s, 32 * s, 3 * s, RED)

    f = fidelity.measure(canvas(two), shapes_data.Shape("red", "square", "left", "large"))
    assert f.iou > 0.95 and f.strict  # the stray small square is not part of the shape
    empty = fidelity.measure(canvas(lambda d, s: None), shape("star"))
    assert (empty.iou, empty.strict, empty.speckle) == (0.0, False, 1.0)


def test_summary_groups_by_size_and_kind_and_checks_the_targets():
    good = [
        (shape(k, z), fidelity.measure(rendered(k, z), shape(k, z)))
        for k in shapes_data.SHAPES
        for z in ("small", "large")
    ]
    summary = fidelity.summarise(good)
    assert set(summary["iou"]) == {f"{z} {k}" for k in shapes_data.SHAPES for z in ("small", "large")}
    assert all(fidelity.targets_met(summary).values())
    bad = good + [(shape("star"), fidelity.measure(rendered("circle"), shape("star")))] * 3
    worse = fidelity.summarise(bad)
    assert worse["iou"]["large star"]["median"] < 0.88 and not fidelity.targets_met(worse)["smallest_median"]


def test_evaluate_reports_fidelity_of_the_renderers_own_images(tmp_path, capsys):
    report = evaluate(["--source", "truth", "-n", "24", "--prompts", "one-shape", "--worst", str(tmp_path / "w.png")])
    assert report["fidelity"]["n"] == 24 and report["one shape, full"]["shape"] == 1.0
    assert report["fidelity"]["smallest_median"] > 0.9 and report["fidelity"]["speckle_free"] == 1.0
    assert "shape fidelity" in capsys.readouterr().out
    assert Image.open(tmp_path / "w.png").size[0] > 64


def test_a_caption_without_a_size_is_held_to_the_size_that_fits():
    small = rendered("square", "small")
    asked_large = shape("square", "large")
    held = fidelity.measure(small, asked_large)
    free = fidelity.measure(small, asked_large, any_size=True)
    assert held.iou < 0.5 and held.size == "large"
    assert free.iou > 0.95 and free.size == "small"
    assert set(fidelity.summarise([(asked_large, free)])["iou"]) == {"small square"}
