"""Synthetic shapes data: determinism, splits, twins, and that the pixels say what the captions say.

Pixel checks parse the rendered image on their own (colour masks, centroids, fill ratios) rather
than trusting the scene's stored positions.
"""

from collections import Counter

import numpy as np
import pytest
from PIL import Image

from unime_jax.demo import shapes
from unime_jax.demo.shapes import (
    ALL_SHAPES,
    COLORS,
    DEFAULT_BACKGROUND,
    INVERSE_RELATION,
    TWIN_KINDS,
    Clause,
    Description,
    ShapesConfig,
    build,
    captions,
    content_ids,
    distill_texts,
    equivalent,
    holds,
    image_array,
    make_scene,
    make_scenes,
    render,
    split_of,
    twin_candidates,
    twin_captions,
)

CONFIGS = {
    "two": ShapesConfig(),
    "three_stars": ShapesConfig(num_objects=3, shapes=ALL_SHAPES),
}


def _scenes(name, n=150, seed=0, split="train"):
    return make_scenes(n, seed=seed, split=split, config=CONFIGS[name])


# --- pixel parsing, independent of the scene's stored geometry --------------------------------


def _mask(pixels, color):
    return (pixels == np.asarray(COLORS[color], dtype=pixels.dtype)).all(axis=-1)


def _centroid(pixels, color):
    ys, xs = np.nonzero(_mask(pixels, color))
    assert len(xs) > 0, f"no {color} pixels"
    return xs.mean(), ys.mean()


def _pixel_relation(pixels, subject_color, object_color):
    (sx, sy), (ox, oy) = _centroid(pixels, subject_color), _centroid(pixels, object_color)
    dx, dy = sx - ox, sy - oy
    if abs(dx) > abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def _pixel_shape(pixels, color):
    """Fill ratio of the colour's bounding box: square 1, circle ~0.78, triangle ~0.52, star ~0.4."""
    mask = _mask(pixels, color)
    ys, xs = np.nonzero(mask)
    ratio = mask.sum() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1))
    if ratio > 0.95:
        return "square"
    if ratio > 0.68:
        return "circle"
    if ratio > 0.49:
        return "triangle"
    return "star"


# --- determinism --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_same_seed_same_scenes_pixels_and_captions(name):
    a, b = _scenes(name, 40, seed=7), _scenes(name, 40, seed=7)
    assert a == b
    assert captions(a) == captions(b)
    assert twin_captions(a) == twin_captions(b)
    np.testing.assert_array_equal(image_array(a), image_array(b))


def test_scene_depends_only_on_seed_split_index():
    config = CONFIGS["two"]
    window = make_scenes(5, seed=3, config=config, start=10)
    assert window == [make_scene(i, seed=3, config=config) for i in range(10, 15)]
    assert window[0] == make_scenes(11, seed=3, config=config)[10]


def test_different_seeds_differ():
    a, b = _scenes("two", 50, seed=0), _scenes("two", 50, seed=1)
    assert captions(a) != captions(b)
    assert not np.array_equal(image_array(a), image_array(b))


# --- splits ------------------------------------------------------------------------------------


def _layout(scene):
    return tuple(sorted((o.color, o.shape, o.cell) for o in scene.objects))


def _meaning(description):
    return (frozenset(description.objects), description.facts())


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_and_eval_layouts_are_disjoint(name):
    train = _scenes(name, 300, seed=0, split="train")
    held = _scenes(name, 300, seed=0, split="eval")
    assert {s.split for s in train} == {"train"} and {s.split for s in held} == {"eval"}
    assert all(split_of(s, CONFIGS[name]) == "train" for s in train)
    assert all(split_of(s, CONFIGS[name]) == "eval" for s in held)
    assert not {_layout(s) for s in train} & {_layout(s) for s in held}
    # different streams: the same index is not the same scene
    assert sum(a.objects == b.objects for a, b in zip(train, held, strict=True)) == 0
    # ...and eval images never repeat a train image, whatever seeds either side uses
    other_train = _scenes(name, 300, seed=9, split="train")
    train_pixels = {image.tobytes() for image in image_array(train + other_train)}
    assert not train_pixels & {image.tobytes() for image in image_array(held)}


def test_caption_split_keeps_eval_captions_out_of_train_texts():
    config = ShapesConfig(split_by="caption", eval_fraction=0.3)
    train = make_scenes(300, seed=0, split="train", config=config)
    held = make_scenes(150, seed=4, split="eval", config=config)
    eval_meanings = {_meaning(s.description) for s in held}
    train_meanings = {_meaning(s.description) for s in train} | {_meaning(s.twin.description) for s in train}
    assert not eval_meanings & train_meanings
    assert not set(captions(held)) & set(distill_texts(train))


def test_held_out_combos_only_in_eval():
    combos = (("red", "circle"), ("blue", "triangle"))
    config = ShapesConfig(held_out_combos=combos, eval_fraction=0.0)
    train = make_scenes(300, seed=0, split="train", config=config)
    held = make_scenes(60, seed=0, split="eval", config=config)
    train_attrs = {a for s in train for a in s.description.objects + s.twin.description.objects}
    assert not train_attrs & set(combos)
    assert all(set(s.description.objects) & set(combos) for s in held)


# --- captions and twins ------------------------------------------------------------------------


def _one_change(truth: Description, twin: Description, kind: str) -> None:
    """Independent check that ``twin`` is ``truth`` with exactly one change of the given kind."""
    assert len(truth.objects) == len(twin.objects) and len(truth.clauses) == len(twin.clauses)
    colors = [i for i, (a, b) in enumerate(zip(truth.objects, twin.objects, strict=True)) if a[0] != b[0]]
    shape_diff = [i for i, (a, b) in enumerate(zip(truth.objects, twin.objects, strict=True)) if a[1] != b[1]]
    clauses = [j for j, (a, b) in enumerate(zip(truth.clauses, twin.clauses, strict=True)) if a != b]
    t, w = truth.objects, twin.objects
    if kind == "color_swap":
        assert not shape_diff and not clauses and len(colors) == 2
        i, j = colors
        assert (w[i][0], w[j][0]) == (t[j][0], t[i][0])
        assert any({c.subject, c.object} == {i, j} for c in truth.clauses)
    elif kind == "color_change":
        assert not shape_diff and not clauses and len(colors) == 1
        assert w[colors[0]][0] not in {c for c, _ in t}
    elif kind == "shape_swap":
        assert not colors and not clauses and len(shape_diff) == 2
        i, j = shape_diff
        assert (w[i][1], w[j][1]) == (t[j][1], t[i][1])
    elif kind == "shape_change":
        assert not colors and not clauses and len(shape_diff) == 1
    elif kind == "relation_flip":
        assert not colors and not shape_diff and len(clauses) == 1
        a, b = truth.clauses[clauses[0]], twin.clauses[clauses[0]]
        assert (a.subject, a.object) == (b.subject, b.object)  # objects not swapped
        assert b.relation == INVERSE_RELATION[a.relation]
    else:
        raise AssertionError(f"unknown twin kind {kind}")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_twin_differs_in_exactly_one_thing_and_is_false(name):
    scenes = _scenes(name, 300)
    assert Counter(s.twin.kind for s in scenes).keys() == set(TWIN_KINDS)
    for s in scenes:
        truth, twin = s.description, s.twin.description
        _one_change(truth, twin, s.twin.kind)
        assert s.twin.caption != s.caption
        assert holds(s, truth)
        assert not holds(s, twin)
        assert not equivalent(truth, twin)
        assert _meaning(truth) != _meaning(twin)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_all_twin_candidates_are_single_changes_and_false(name):
    for s in _scenes(name, 60, seed=2):
        candidates = twin_candidates(s, CONFIGS[name])
        assert candidates["relation_flip"] and candidates["color_swap"] and candidates["color_change"]
        for kind, twins in candidates.items():
            for twin in twins:
                assert twin.kind == kind
                _one_change(s.description, twin.description, kind)
                assert not holds(s, twin.description)
                assert _meaning(twin.description) != _meaning(s.description)


def test_reworded_truth_is_equivalent_but_a_flip_is_not():
    s = _scenes("two", 1)[0]
    (subject, relation, obj) = s.clauses[0]
    reworded = Description(s.description.objects, (Clause(obj, INVERSE_RELATION[relation], subject),))
    flipped = Description(s.description.objects, (Clause(subject, INVERSE_RELATION[relation], obj),))
    assert reworded.caption != s.caption
    assert equivalent(reworded, s.description) and holds(s, reworded)
    assert not equivalent(flipped, s.description) and not holds(s, flipped)
    assert content_ids([s.description, reworded, flipped]).tolist() == [0, 0, 1]


def test_caption_wording():
    s = _scenes("three_stars", 1)[0]
    scene = shapes.Scene(
        objects=(
            shapes.ShapeObject("red", "circle", 0.2, 0.5, 0.1, (1, 0)),
            shapes.ShapeObject("orange", "square", 0.5, 0.5, 0.1, (1, 1)),
            shapes.ShapeObject("blue", "star", 0.5, 0.8, 0.1, (2, 1)),
        ),
        clauses=(Clause(0, "left of", 1), Clause(2, "below", 1)),
        twin=s.twin,
        seed=0,
        split="train",
        index=0,
    )
    assert (
        scene.caption
        == "a red circle to the left of an orange square and a blue star below the orange square"
    )
    assert holds(scene, scene.description)
    for text in captions(_scenes("two", 300)) + twin_captions(_scenes("two", 300)):
        assert " a orange" not in text and not text.startswith("a orange")


def test_distill_texts_are_captions_and_twins_deduplicated():
    scenes = _scenes("two", 300)
    texts = distill_texts(scenes)
    assert len(texts) == len(set(texts))
    assert set(texts) == set(captions(scenes)) | set(twin_captions(scenes))
    assert len(texts) < 2 * len(scenes)  # 2-object captions recur in 300 scenes: dedup did something
    assert texts[0] == scenes[0].caption
    assert set(distill_texts(scenes, include_twins=False)) == set(captions(scenes))


def test_content_ids_group_equivalent_captions():
    scenes = _scenes("two", 300)
    ids = content_ids(scenes)
    assert ids.dtype == np.int32 and ids.shape == (300,)
    by_id = {}
    for i, s in zip(ids.tolist(), scenes, strict=True):
        by_id.setdefault(i, set()).add(_meaning(s.description))
    assert all(len(m) == 1 for m in by_id.values())
    assert len(by_id) == len({_meaning(s.description) for s in scenes}) < 300


# --- pixels ------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [28, 56, 112])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_colours_rendered_at_object_positions(name, size):
    scenes = _scenes(name, 40, seed=1)
    pixels = image_array(scenes, size)
    assert pixels.shape == (40, size, size, 3) and pixels.dtype == np.uint8
    background = np.asarray(DEFAULT_BACKGROUND, np.uint8)
    for s, image in zip(scenes, pixels, strict=True):
        for o in s.objects:
            centre = image[int(o.y * size), int(o.x * size)]
            assert tuple(centre) == COLORS[o.color]
        palette = {tuple(background)} | {COLORS[o.color] for o in s.objects}
        drawn = {tuple(p) for p in np.unique(image.reshape(-1, 3), axis=0).tolist()}
        assert drawn == palette  # nothing else drawn, all drawn
        assert (image == background).all(-1).mean() > 0.5  # plain light background dominates
        assert background.min() > 200


@pytest.mark.parametrize("size", [28, 56, 112])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_relations_true_in_pixel_coordinates(name, size):
    for s in _scenes(name, 60, seed=2):
        image = np.asarray(render(s, size))
        description = s.description
        for subject, relation, obj in description.clauses:
            colors = description.objects[subject][0], description.objects[obj][0]
            assert _pixel_relation(image, *colors) == relation, s.caption
        if s.twin.kind == "relation_flip":  # and the flipped clause is false in the pixels
            flips = [
                c for c, t in zip(description.clauses, s.twin.description.clauses, strict=True) if c != t
            ]
            (subject, relation, obj) = flips[0]
            colors = description.objects[subject][0], description.objects[obj][0]
            assert _pixel_relation(image, *colors) != INVERSE_RELATION[relation]


@pytest.mark.parametrize("size", [56, 112])
def test_shapes_recognisable_in_pixels(size):
    scenes = _scenes("three_stars", 60, seed=3)
    seen = set()
    for s in scenes:
        image = np.asarray(render(s, size))
        for o in s.objects:
            assert _pixel_shape(image, o.color) == o.shape
            seen.add(o.shape)
    assert seen == set(ALL_SHAPES)


def test_images_and_build():
    scenes = _scenes("two", 5)
    pil = shapes.images(scenes, 64)
    assert all(isinstance(im, Image.Image) and im.size == (64, 64) and im.mode == "RGB" for im in pil)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in pil]), image_array(scenes, 64))
    data = build(20, seed=5, split="eval", image_size=32)
    assert data.images.shape == (20, 32, 32, 3)
    assert data.captions == captions(data.scenes)
    assert data.twin_captions == twin_captions(data.scenes)
    assert data.twin_kinds == [s.twin.kind for s in data.scenes]
    assert data.caption_ids.tolist() == content_ids(data.scenes).tolist()
    assert image_array([], 28).shape == (0, 28, 28, 3)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_objects": 4},
        {"colors": ("red", "pink", "blue")},
        {"shapes": ("circle", "hexagon")},
        {"shapes": ("circle",)},
        {"colors": ("red", "blue")},
        {"twin_kinds": ("colour_swap",)},
        {"twin_kinds": ()},
        {"eval_fraction": 1.0},
        {"eval_fraction": 0.0},
        {"split_by": "seed"},
        {"held_out_combos": (("red", "hexagon"),)},
    ],
)
def test_bad_config_rejected(kwargs):
    with pytest.raises(ValueError):
        ShapesConfig(**kwargs)


def test_bad_arguments_rejected():
    with pytest.raises(ValueError):
        make_scene(0, split="test")
    with pytest.raises(ValueError):
        make_scene(-1)
    with pytest.raises(ValueError):
        render(make_scene(0), 8)


def test_restricted_twin_kinds():
    config = ShapesConfig(twin_kinds=("relation_flip",))
    assert {s.twin.kind for s in make_scenes(50, config=config)} == {"relation_flip"}
