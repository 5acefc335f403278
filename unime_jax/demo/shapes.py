"""Seeded compositional synthetic image–caption data ("shapes") for the CPU demo.

A scene holds 2 (optionally 3) coloured shapes on a plain light background, laid out on a 3×3 grid
(with a little jitter) so that every described relation is unambiguous in pixel coordinates::

    scene = make_scene(0, seed=0)          # or make_scenes(n, seed=..., split="train" | "eval")
    scene.caption                          # "a red circle to the left of a blue square"
    scene.twin.caption, scene.twin.kind    # "a red circle to the right of a blue square", "relation_flip"
    render(scene, size=56)                 # PIL RGB image

Vocabulary: colours ``COLORS`` (6 distinct RGB values), shapes ``SHAPES`` (``"star"`` is also
available through ``ShapesConfig(shapes=ALL_SHAPES)``), relations ``RELATIONS``. The colours of
the objects of one scene are distinct, so a (colour, shape) pair names one object.

Captions are noun phrases, one clause per described relation (3-object scenes have two clauses
that share an anchor object, later mentions use "the"): "a red circle to the left of a blue
square", "an orange star above a green circle and a yellow triangle to the right of the green
circle".

Hard-negative twins (``Scene.twin``) change exactly one thing, and are always false for the image:

- ``color_swap``: the two objects of a clause exchange colours;
- ``color_change``: one object takes a colour that is not in the scene;
- ``shape_swap``: the two objects of a clause exchange shapes (only when they differ);
- ``shape_change``: one object takes another shape;
- ``relation_flip``: one clause's relation is inverted (left of ↔ right of, above ↔ below), the
  objects staying in place: "A left of B" → "A right of B", never "B right of A" (which is the
  same fact).

Every twin candidate is checked against the scene geometry (:func:`holds` is False) and against
the true description (:func:`equivalent` is False).

Determinism and splits: scene ``index`` of ``(seed, split)`` comes from its own numpy Generator
seeded with ``SeedSequence([DOMAIN, seed, split, index])``, so train and eval streams never share
seeds, and scenes do not depend on how many were drawn before. On top of that, membership is a
property of the content, not of the seed: a scene is an eval scene iff it shows a held-out
(colour, shape) combination (``ShapesConfig.held_out_combos``) or its content key hashes into the
eval bucket (``eval_fraction``). The key is the layout (objects with their grid cells) for
``split_by="layout"`` (eval images never repeat a train layout; captions may recur) or the
caption's meaning for ``split_by="caption"`` (eval captions never occur in train). Each split
draws from its stream until a scene of its own side comes up. Train twins also avoid held-out
combos (and, with ``split_by="caption"``, eval captions), so stage-1 texts do not leak eval
content.

The module is neutral about prompts: it returns raw captions and images; instruction templates
(MMEB-style ``<|image_1|>`` queries) belong to the featurizer side.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "ALL_SHAPES",
    "COLORS",
    "DEFAULT_BACKGROUND",
    "INVERSE_RELATION",
    "RELATIONS",
    "SHAPES",
    "SPLITS",
    "TWIN_KINDS",
    "Clause",
    "Description",
    "Scene",
    "ShapeObject",
    "ShapesConfig",
    "ShapesData",
    "Twin",
    "build",
    "captions",
    "content_ids",
    "distill_texts",
    "equivalent",
    "holds",
    "image_array",
    "images",
    "make_scene",
    "make_scenes",
    "paraphrase",
    "relation_holds",
    "render",
    "split_of",
    "twin_candidates",
    "twin_captions",
    "twins",
]

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 50, 190),
    "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle")
ALL_SHAPES = (*SHAPES, "star")
RELATIONS = ("left of", "right of", "above", "below")
INVERSE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_PHRASE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
TWIN_KINDS = ("color_swap", "color_change", "shape_swap", "shape_change", "relation_flip")
SPLITS = ("train", "eval")
DEFAULT_BACKGROUND = (245, 245, 240)

_DOMAIN = 0x5A4E5  # separates these streams from any other SeedSequence use of the same seed
_GRID = 3
_JITTER = 0.03  # max centre offset, in image widths
_RADIUS = (0.10, 0.13)  # object radius range, in image widths (< half the cell minus jitter)
_MAX_DRAWS = 10_000


# ---------------------------------------------------------------------------------------------
# Data model
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeObject:
    """One drawn object. Positions are resolution-free: fractions of the image width/height."""

    color: str
    shape: str
    x: float  # centre, 0 = left edge, 1 = right edge
    y: float  # centre, 0 = top edge, 1 = bottom edge
    radius: float  # circumradius, in image widths
    cell: tuple[int, int]  # (row, col) in the 3×3 layout grid

    @property
    def attrs(self) -> tuple[str, str]:
        return (self.color, self.shape)


class Clause(NamedTuple):
    """``objects[subject] <relation> objects[object]``."""

    subject: int
    relation: str
    object: int


def _noun_phrase(color: str, shape: str, first: bool) -> str:
    if not first:
        return f"the {color} {shape}"
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape}"


@dataclass(frozen=True)
class Description:
    """What a caption says: object attributes (by index) and relation clauses between them."""

    objects: tuple[tuple[str, str], ...]  # (colour, shape) per object
    clauses: tuple[Clause, ...]

    @property
    def caption(self) -> str:
        mentioned: set[int] = set()
        parts = []
        for clause in self.clauses:
            words = []
            for role, index in (("s", clause.subject), ("o", clause.object)):
                words.append(_noun_phrase(*self.objects[index], first=index not in mentioned))
                mentioned.add(index)
                if role == "s":
                    words.append(_PHRASE[clause.relation])
            parts.append(" ".join(words))
        return " and ".join(parts)

    def facts(self) -> frozenset[tuple[tuple[str, str], str, tuple[str, str]]]:
        """Meaning, independent of wording: each clause as ``(A, "left of" | "above", B)``."""
        out = set()
        for s, rel, o in self.clauses:
            a, b = self.objects[s], self.objects[o]
            if rel in ("right of", "below"):
                a, b, rel = b, a, INVERSE_RELATION[rel]
            out.add((a, rel, b))
        return frozenset(out)


@dataclass(frozen=True)
class Twin:
    """A hard-negative description: the truth with one attribute or relation changed."""

    kind: str  # one of TWIN_KINDS
    description: Description

    @property
    def caption(self) -> str:
        return self.description.caption


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    clauses: tuple[Clause, ...]
    twin: Twin
    seed: int
    split: str
    index: int

    @property
    def description(self) -> Description:
        return Description(tuple(o.attrs for o in self.objects), self.clauses)

    @property
    def caption(self) -> str:
        return self.description.caption


@dataclass(frozen=True)
class ShapesConfig:
    """Generation settings. Scenes are resolution-free; the image size is a rendering argument."""

    num_objects: int = 2  # 2 or 3
    colors: tuple[str, ...] = tuple(COLORS)
    shapes: tuple[str, ...] = SHAPES
    twin_kinds: tuple[str, ...] = TWIN_KINDS  # kinds a twin is drawn from (uniformly among those possible)
    split_by: Literal["layout", "caption"] = "layout"
    eval_fraction: float = 0.2  # share of content keys reserved for eval
    held_out_combos: tuple[tuple[str, str], ...] = ()  # (colour, shape) pairs only eval scenes show
    hash_salt: str = ""  # changes which keys are eval, independently of the seeds

    def __post_init__(self) -> None:
        if self.num_objects not in (2, 3):
            raise ValueError(f"num_objects must be 2 or 3, got {self.num_objects}")
        if unknown := set(self.colors) - set(COLORS):
            raise ValueError(f"unknown colours {sorted(unknown)}; known: {list(COLORS)}")
        if unknown := set(self.shapes) - set(ALL_SHAPES):
            raise ValueError(f"unknown shapes {sorted(unknown)}; known: {list(ALL_SHAPES)}")
        if len(set(self.colors)) < self.num_objects + 1:
            raise ValueError("need at least num_objects + 1 distinct colours (one spare for colour changes)")
        if len(set(self.shapes)) < 2:
            raise ValueError("need at least 2 shapes")
        if unknown := set(self.twin_kinds) - set(TWIN_KINDS):
            raise ValueError(f"unknown twin kinds {sorted(unknown)}; known: {list(TWIN_KINDS)}")
        if not self.twin_kinds:
            raise ValueError("twin_kinds is empty")
        if self.split_by not in ("layout", "caption"):
            raise ValueError(f"split_by must be 'layout' or 'caption', got {self.split_by!r}")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.eval_fraction == 0.0 and not self.held_out_combos:
            raise ValueError("eval_fraction = 0 and no held_out_combos: the eval split would be empty")
        for combo in self.held_out_combos:
            if len(combo) != 2 or combo[0] not in COLORS or combo[1] not in ALL_SHAPES:
                raise ValueError(f"held-out combo {combo!r} is not a (colour, shape) pair")


# ---------------------------------------------------------------------------------------------
# Semantics
# ---------------------------------------------------------------------------------------------


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """Whether ``a <relation> b`` in image coordinates (y grows downwards).

    The displacement must point the right way along the dominant axis: "left of" needs
    ``a.x < b.x`` and ``|dx| > |dy|``.
    """
    dx, dy = a.x - b.x, a.y - b.y
    if relation == "left of":
        return dx < 0 and abs(dx) > abs(dy)
    if relation == "right of":
        return dx > 0 and abs(dx) > abs(dy)
    if relation == "above":
        return dy < 0 and abs(dy) > abs(dx)
    if relation == "below":
        return dy > 0 and abs(dy) > abs(dx)
    raise ValueError(f"unknown relation {relation!r}")


def holds(scene: Scene, description: Description) -> bool:
    """Whether ``description`` is true of the scene: every object it names (by colour and shape)
    is present, and every clause holds between them."""
    by_attrs = {o.attrs: o for o in scene.objects}
    found = [by_attrs.get(attrs) for attrs in description.objects]
    if any(o is None for o in found):
        return False
    return all(relation_holds(found[s], found[o], rel) for s, rel, o in description.clauses)  # type: ignore[arg-type]


def equivalent(a: Description, b: Description) -> bool:
    """Same meaning, whatever the wording ("A left of B" ≡ "B right of A")."""
    return set(a.objects) == set(b.objects) and a.facts() == b.facts()


def _canonical_key(description: Description) -> str:
    return repr((sorted(description.objects), sorted(description.facts())))


def content_ids(items: Iterable[Scene | Description | Twin]) -> np.ndarray:
    """Int32 ids, equal ⇔ equivalent descriptions (first-seen order), for retrieval group ids.

    Two images with equivalent captions are interchangeable targets for either caption.
    """
    ids: dict[str, int] = {}
    out = []
    for item in items:
        desc = item.description if isinstance(item, Scene | Twin) else item
        out.append(ids.setdefault(_canonical_key(desc), len(ids)))
    return np.asarray(out, dtype=np.int32)


def _bucket(key: str, salt: str) -> float:
    digest = hashlib.blake2b(f"{salt}|{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def _layout_key(objects: Sequence[ShapeObject]) -> str:
    return repr(sorted((o.color, o.shape, o.cell) for o in objects))


def _is_eval_description(description: Description, config: ShapesConfig) -> bool:
    held = set(config.held_out_combos)
    if any(attrs in held for attrs in description.objects):
        return True
    return (
        config.split_by == "caption"
        and _bucket(_canonical_key(description), config.hash_salt) < config.eval_fraction
    )


def split_of(scene: Scene, config: ShapesConfig | None = None) -> str:
    """The split that a scene's content belongs to ("train" or "eval"), whatever stream drew it."""
    config = config or ShapesConfig()
    if _is_eval_description(scene.description, config):
        return "eval"
    if (
        config.split_by == "layout"
        and _bucket(_layout_key(scene.objects), config.hash_salt) < config.eval_fraction
    ):
        return "eval"
    return "train"


# ---------------------------------------------------------------------------------------------
# Twins
# ---------------------------------------------------------------------------------------------


def _with(
    objects: tuple[tuple[str, str], ...], changes: dict[int, tuple[str, str]]
) -> tuple[tuple[str, str], ...]:
    return tuple(changes.get(i, attrs) for i, attrs in enumerate(objects))


def twin_candidates(scene: Scene, config: ShapesConfig | None = None) -> dict[str, list[Twin]]:
    """Every valid one-change twin of the scene's description, by kind (kinds in ``config.twin_kinds``).

    Valid: false for the scene (:func:`holds`) and not equivalent to the truth. Twins never
    reorder objects or clauses, so a twin's caption differs from the truth's only in the changed words.
    """
    config = config or ShapesConfig()
    truth = scene.description
    objs, clauses = truth.objects, truth.clauses
    used_colors = {c for c, _ in objs}
    raw: dict[str, list[Description]] = {kind: [] for kind in config.twin_kinds}

    def add(kind: str, desc: Description) -> None:
        if kind in raw:
            raw[kind].append(desc)

    pairs = list(dict.fromkeys(tuple(sorted((c.subject, c.object))) for c in clauses))
    for a, b in pairs:
        (ca, sa), (cb, sb) = objs[a], objs[b]
        add("color_swap", Description(_with(objs, {a: (cb, sa), b: (ca, sb)}), clauses))
        if sa != sb:
            add("shape_swap", Description(_with(objs, {a: (ca, sb), b: (cb, sa)}), clauses))
    for i, (color, shape) in enumerate(objs):
        for new in config.colors:
            if new not in used_colors:
                add("color_change", Description(_with(objs, {i: (new, shape)}), clauses))
        for new in config.shapes:
            if new != shape:
                add("shape_change", Description(_with(objs, {i: (color, new)}), clauses))
    for j, clause in enumerate(clauses):
        flipped = clause._replace(relation=INVERSE_RELATION[clause.relation])
        add("relation_flip", Description(objs, (*clauses[:j], flipped, *clauses[j + 1 :])))

    out: dict[str, list[Twin]] = {}
    for kind, descs in raw.items():
        out[kind] = [
            Twin(kind, d) for d in dict.fromkeys(descs) if not holds(scene, d) and not equivalent(d, truth)
        ]
    return out


def _draw_twin(scene: Scene, config: ShapesConfig, rng: np.random.Generator) -> Twin | None:
    candidates = twin_candidates(scene, config)
    if scene.split == "train":  # keep eval content out of training texts
        candidates = {
            k: [t for t in ts if not _is_eval_description(t.description, config)]
            for k, ts in candidates.items()
        }
    kinds = [k for k in config.twin_kinds if candidates[k]]
    if not kinds:
        return None
    chosen = candidates[kinds[int(rng.integers(len(kinds)))]]
    return chosen[int(rng.integers(len(chosen)))]


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def _layout(
    num_objects: int, rng: np.random.Generator
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Grid cells per object and the (a, b) index pairs that share a row or column (the clauses)."""
    row, col = (int(v) for v in rng.integers(_GRID, size=2))
    if num_objects == 2:
        line, first = row, col
        second = int(rng.choice([v for v in range(_GRID) if v != first]))
        if rng.random() < 0.5:  # horizontal pair: same row
            return [(line, first), (line, second)], [(0, 1)]
        return [(first, line), (second, line)], [(0, 1)]  # vertical pair: same column
    # 3 objects: an anchor, one partner in its row, one in its column.
    other_col = int(rng.choice([v for v in range(_GRID) if v != col]))
    other_row = int(rng.choice([v for v in range(_GRID) if v != row]))
    cells = [(row, other_col), (row, col), (other_row, col)]
    pairs = [(0, 1), (2, 1)]
    if rng.random() < 0.5:
        pairs = pairs[::-1]
    return cells, pairs


def _draw_scene(seed: int, split: str, index: int, config: ShapesConfig, rng: np.random.Generator) -> Scene:
    n = config.num_objects
    colors = [config.colors[i] for i in rng.choice(len(config.colors), size=n, replace=False)]
    shapes = [config.shapes[i] for i in rng.integers(len(config.shapes), size=n)]
    cells, pairs = _layout(n, rng)
    objects = []
    for color, shape, (r, c) in zip(colors, shapes, cells, strict=True):
        jx, jy = rng.uniform(-_JITTER, _JITTER, size=2)
        objects.append(
            ShapeObject(
                color=color,
                shape=shape,
                x=float((c + 0.5) / _GRID + jx),
                y=float((r + 0.5) / _GRID + jy),
                radius=float(rng.uniform(*_RADIUS)),
                cell=(r, c),
            )
        )
    clauses = []
    for a, b in pairs:
        if rng.random() < 0.5:  # which of the two is the subject
            a, b = b, a
        relation = next(rel for rel in RELATIONS if relation_holds(objects[a], objects[b], rel))
        clauses.append(Clause(a, relation, b))
    placeholder = Twin("relation_flip", Description((), ()))
    return Scene(tuple(objects), tuple(clauses), placeholder, seed, split, index)


def make_scene(index: int, seed: int = 0, split: str = "train", config: ShapesConfig | None = None) -> Scene:
    """Scene ``index`` of the ``(seed, split)`` stream; a pure function of its arguments."""
    config = config or ShapesConfig()
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if index < 0 or seed < 0:
        raise ValueError("seed and index must be non-negative")
    rng = np.random.default_rng(np.random.SeedSequence([_DOMAIN, seed, SPLITS.index(split), index]))
    for _ in range(_MAX_DRAWS):
        scene = _draw_scene(seed, split, index, config, rng)
        if split_of(scene, config) != split:
            continue
        twin = _draw_twin(scene, config, rng)
        if twin is not None:
            return replace(scene, twin=twin)
    raise RuntimeError(f"no {split} scene in {_MAX_DRAWS} draws: check eval_fraction / held_out_combos")


def make_scenes(
    n: int, seed: int = 0, split: str = "train", config: ShapesConfig | None = None, start: int = 0
) -> list[Scene]:
    """Scenes ``start .. start + n - 1`` of the ``(seed, split)`` stream."""
    return [make_scene(i, seed, split, config) for i in range(start, start + n)]


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        h = 0.8 * r  # half side: a little inside the circumcircle, so squares do not look oversized
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # pointing up, centroid at the centre
        angles = np.deg2rad([-90.0, 30.0, 150.0])
        return [(cx + r * np.cos(t), cy + r * np.sin(t)) for t in angles]
    if shape == "star":
        angles = np.deg2rad(-90.0 + 36.0 * np.arange(10))
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + q * np.cos(t), cy + q * np.sin(t)) for q, t in zip(radii, angles, strict=True)]
    raise ValueError(f"unknown shape {shape!r}")


def render(
    scene: Scene, size: int = 56, background: tuple[int, int, int] = DEFAULT_BACKGROUND
) -> Image.Image:
    """The scene as a ``size``×``size`` RGB image (flat colours, no antialiasing)."""
    if size < 16:
        raise ValueError(f"image size {size} is too small to draw the shapes")
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        cx, cy, r = obj.x * size, obj.y * size, obj.radius * size
        fill = COLORS[obj.color]
        if obj.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=fill)
    return image


def images(scenes: Iterable[Scene], size: int = 56) -> list[Image.Image]:
    return [render(s, size) for s in scenes]


def image_array(scenes: Iterable[Scene], size: int = 56) -> np.ndarray:
    """uint8 array (N, size, size, 3)."""
    arrays = [np.asarray(render(s, size)) for s in scenes]
    if not arrays:
        return np.zeros((0, size, size, 3), np.uint8)
    return np.stack(arrays)


# ---------------------------------------------------------------------------------------------
# Texts
# ---------------------------------------------------------------------------------------------


def captions(scenes: Iterable[Scene]) -> list[str]:
    return [s.caption for s in scenes]


def twins(scenes: Iterable[Scene]) -> list[Twin]:
    return [s.twin for s in scenes]


def twin_captions(scenes: Iterable[Scene]) -> list[str]:
    return [s.twin.caption for s in scenes]


def paraphrase(item: Scene | Description) -> Description:
    """The same facts worded the other way round: every clause is read from its other object
    ("a red circle to the left of a blue square" → "a blue square to the right of a red circle").

    :func:`equivalent` to the input, and never the same caption: each clause names a different
    object first (the objects of a scene have distinct colours). Stage-1 positives.
    """
    desc = item.description if isinstance(item, Scene) else item
    return Description(desc.objects, tuple(Clause(o, INVERSE_RELATION[rel], s) for s, rel, o in desc.clauses))


def distill_texts(scenes: Iterable[Scene], include_twins: bool = True) -> list[str]:
    """Stage-1 (text-only distillation) texts: captions and twins, deduplicated, first-seen order."""
    out: dict[str, None] = {}
    for s in scenes:
        out[s.caption] = None
        if include_twins:
            out[s.twin.caption] = None
    return list(out)


@dataclass(frozen=True)
class ShapesData:
    """A split, materialised: what the demo trains and evaluates on."""

    scenes: list[Scene]
    images: np.ndarray  # uint8 (N, S, S, 3)
    captions: list[str]
    twin_captions: list[str]
    twin_kinds: list[str]
    caption_ids: np.ndarray  # int32 (N,), equal ⇔ equivalent captions (retrieval group ids)


def build(
    n: int, seed: int = 0, split: str = "train", config: ShapesConfig | None = None, image_size: int = 56
) -> ShapesData:
    scenes = make_scenes(n, seed, split, config)
    return ShapesData(
        scenes=scenes,
        images=image_array(scenes, image_size),
        captions=captions(scenes),
        twin_captions=twin_captions(scenes),
        twin_kinds=[s.twin.kind for s in scenes],
        caption_ids=content_ids(scenes),
    )
