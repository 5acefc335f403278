"""MMEB's 36 image datasets: meta-task, in/out of distribution, and how MMEB-V2 stores each.

The order is the papers' column order (UniME Table 9, VLM2Vec Table 2): classification, VQA,
retrieval, grounding, each with its 20 in-distribution (IND, they have MMEB-train subsets) before
its out-of-distribution (OOD, eval only) datasets. Sources: VLM2Vec ``experiments/report_score.py``
and ``experiments/public/eval/image.yaml``; the IND list is VLM2Vec v1's training command.

``parser`` is the MMEB-V2 instruct layout parser (``ziyjiang/MMEB_Test_Instruct``) that rebuilds the
dataset's V1 strings from its separate instruction columns (:mod:`unime_jax.eval.mmeb_data`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["META_TASKS", "MMEB_DATASETS", "MmebTask", "Parser", "task"]

MetaTask = Literal["classification", "vqa", "retrieval", "grounding"]
Parser = Literal["image_cls", "image_qa", "image_t2i", "image_i2t", "image_i2i_vg"]

META_TASKS: tuple[MetaTask, ...] = ("classification", "vqa", "retrieval", "grounding")


@dataclass(frozen=True)
class MmebTask:
    name: str
    meta: MetaTask
    ind: bool  # in-distribution: the dataset has an MMEB-train subset
    parser: Parser


def _tasks(meta: MetaTask, ind: bool, parser: Parser, *names: str) -> list[MmebTask]:
    return [MmebTask(name, meta, ind, parser) for name in names]


_ALL = [
    *_tasks("classification", True, "image_cls", "ImageNet-1K", "N24News", "HatefulMemes", "VOC2007", "SUN397"),
    *_tasks("classification", False, "image_cls", "Place365", "ImageNet-A", "ImageNet-R", "ObjectNet", "Country211"),
    *_tasks("vqa", True, "image_qa", "OK-VQA", "A-OKVQA", "DocVQA", "InfographicsVQA", "ChartQA", "Visual7W"),
    *_tasks("vqa", False, "image_qa", "ScienceQA", "VizWiz", "GQA", "TextVQA"),
    MmebTask("VisDial", "retrieval", True, "image_t2i"),
    MmebTask("CIRR", "retrieval", True, "image_i2i_vg"),
    MmebTask("VisualNews_t2i", "retrieval", True, "image_t2i"),
    MmebTask("VisualNews_i2t", "retrieval", True, "image_i2t"),
    MmebTask("MSCOCO_t2i", "retrieval", True, "image_t2i"),
    MmebTask("MSCOCO_i2t", "retrieval", True, "image_i2t"),
    MmebTask("NIGHTS", "retrieval", True, "image_i2i_vg"),
    MmebTask("WebQA", "retrieval", True, "image_t2i"),
    MmebTask("FashionIQ", "retrieval", False, "image_i2i_vg"),
    MmebTask("Wiki-SS-NQ", "retrieval", False, "image_t2i"),
    MmebTask("OVEN", "retrieval", False, "image_i2i_vg"),
    MmebTask("EDIS", "retrieval", False, "image_t2i"),
    MmebTask("MSCOCO", "grounding", True, "image_i2i_vg"),
    *_tasks("grounding", False, "image_i2i_vg", "RefCOCO", "RefCOCO-Matching", "Visual7W-Pointing"),
]  # fmt: skip

MMEB_DATASETS: dict[str, MmebTask] = {t.name: t for t in _ALL}
assert len(MMEB_DATASETS) == 36 and sum(t.ind for t in _ALL) == 20


def task(name: str) -> MmebTask | None:
    """The MMEB task of a dataset directory name; None for datasets outside the 36 (e.g. the demo's)."""
    return MMEB_DATASETS.get(name)
