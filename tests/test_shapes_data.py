"""The procedural data set and the scorer that the evaluation relies on."""

import numpy as np

from diffq.model.training import shapes_data
from diffq.model.training.evaluate import score
from diffq.model.training.tokenizer import UNK, build_tokenizer


def test_samples_are_deterministic_per_seed():
    a, caption_a, _ = shapes_data.sample(123)
    b, caption_b, _ = shapes_data.sample(123)
    assert caption_a == caption_b
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert shapes_data.sample(124)[1] != caption_a or not np.array_equal(np.asarray(a), np.asarray(shapes_data.sample(124)[0]))


def test_images_are_64px_rgb_with_the_palette_background():
    image, _, scene = shapes_data.sample(7)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert tuple(np.asarray(image)[0, 0]) == shapes_data.COLOURS[scene.background]


def test_captions_use_only_the_vocabulary_and_every_kind_occurs():
    kinds = set()
    for seed in range(400):
        _, caption, scene = shapes_data.sample(seed)
        assert set(caption.replace(",", " ,").split()) <= set(shapes_data.VOCABULARY)
        kinds.add((len(scene.shapes), "position" in scene.mentions))
        for shape in scene.shapes:
            assert shape.colour != scene.background
    assert kinds == {(1, True), (1, False), (2, True), (2, False)}


def test_scorer_reads_true_images_perfectly():
    for seed in range(120):
        image, _, scene = shapes_data.sample(seed)
        assert all(score(image, scene).values()), (seed, scene, score(image, scene))


def test_scorer_catches_a_wrong_image():
    image, _, scene = shapes_data.sample(3)
    other = next(s for s in range(100) if shapes_data.sample(s)[2].background != scene.background)
    wrong = shapes_data.sample(other)[0]
    assert not all(score(wrong, scene).values())


def test_both_colours_holds_a_caption_to_the_places_it_names_and_no_others():
    from PIL import Image

    def first(positioned: bool) -> tuple:
        """The first two-shape scene side by side, in two colours, with or without places named."""
        for seed in range(1000):
            image, caption, scene = shapes_data.sample(seed)
            if (len(scene.shapes) == 2 and ("position" in scene.mentions) == positioned
                    and scene.shapes[0].position in ("left", "right")
                    and scene.shapes[0].colour != scene.shapes[1].colour):
                return image, caption, scene
        raise AssertionError("no such scene")

    for positioned in (True, False):
        image, caption, scene = first(positioned)
        assert score(image, scene)["both_colours"]
        mirrored = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # the two shapes swap places
        rotated = image.transpose(Image.Transpose.ROTATE_90)  # side by side -> one above the other
        # "… on the left and … on the right" is wrong mirrored; "a red circle and a blue star" is not
        assert score(mirrored, scene)["both_colours"] is not positioned, caption
        assert score(rotated, scene)["both_colours"] is not positioned, caption
        # one colour twice is wrong however the caption reads
        pixels = np.asarray(image).copy()
        first_colour, second_colour = (shapes_data.COLOURS[s.colour] for s in scene.shapes)
        pixels[(pixels == second_colour).all(-1)] = first_colour
        assert not score(Image.fromarray(pixels), scene)["both_colours"], caption


def test_classify_kind_tells_the_four_shapes_apart():
    for kind in shapes_data.SHAPES:
        for size in shapes_data.SIZES:
            scene = shapes_data.Scene("black", (shapes_data.Shape("white", kind, "center", size),))
            mask = np.asarray(shapes_data.render(scene))[..., 0] > 128
            assert shapes_data.classify_kind(mask) == kind


def test_tokenizer_knows_the_vocabulary_and_marks_other_words_unknown():
    tokenizer = build_tokenizer()
    ids = tokenizer("a small red circle on the left, blue background").input_ids
    assert tokenizer.unk_token_id not in ids
    ids = tokenizer("a red cat").input_ids
    assert tokenizer.convert_ids_to_tokens(ids).count(UNK) == 1
    assert tokenizer("A RED Circle").input_ids == tokenizer("a red circle").input_ids
