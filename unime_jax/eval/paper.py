"""Published numbers to compare a run against (percent), from the UniME paper (arXiv 2504.17432 v4).

- ``MMEB``: Table 1 (meta-task, IND/OOD and "Overall" columns). UniME's "Overall" is the mean of
  the four meta-task scores for every row except LLaVA-OneVision, whose Overall is the standard
  mean over the 36 datasets; both aggregates are derived here for every row (``paper_summary``).
- ``MMEB_DATASETS``: Table 9's per-dataset numbers of the LLaVA-1.6 models.
- ``RETRIEVAL``: Table 2, R@1, text→image before image→text (the v4 column order), and
  SugarCrepe's Replace/Swap/Add accuracies.
"""

from __future__ import annotations

from dataclasses import dataclass

from unime_jax.eval.mmeb_tasks import MMEB_DATASETS as _TASKS

__all__ = ["MMEB", "MMEB_DATASETS", "RETRIEVAL", "MmebRow", "paper_summary"]


@dataclass(frozen=True)
class MmebRow:
    label: str
    classification: float
    vqa: float
    retrieval: float
    grounding: float
    ind: float
    ood: float
    overall: float  # as printed in Table 1 (see the module docstring for its definition)


MMEB: dict[str, MmebRow] = {
    row.label.split(" ", 1)[0]: row
    for row in (
        MmebRow("clip-vitl CLIP (ViT-L), zero-shot", 42.8, 9.1, 53.0, 51.8, 37.1, 38.7, 39.2),
        MmebRow("openclip-vitl OpenCLIP (ViT-L), zero-shot", 41.5, 6.9, 44.6, 53.5, 32.8, 36.0, 36.6),
        MmebRow("siglip SigLIP (So/14), zero-shot", 40.3, 8.4, 31.6, 59.5, 32.3, 38.0, 35.0),
        MmebRow("clip-bigg CLIP (ViT-BigG/14), zero-shot", 52.3, 14.0, 50.5, 60.3, 38.9, 45.8, 44.3),
        MmebRow("eva-clip EVA-CLIP (8B), zero-shot", 56.0, 10.4, 49.2, 58.9, 38.1, 45.6, 43.7),
        MmebRow("e5v-phi35v E5-V (Phi3.5-V)", 39.1, 9.6, 38.0, 57.6, 33.1, 31.9, 36.1),
        MmebRow("e5v-llava16 E5-V (LLaVA-1.6)", 39.7, 10.8, 39.4, 60.2, 34.2, 33.4, 37.5),
        MmebRow(
            "unime-stage1-phi35v UniME stage 1 only (Phi3.5-V)", 42.5, 18.3, 40.5, 59.9, 36.0, 38.3, 40.3
        ),
        MmebRow(
            "unime-stage1-llava16 UniME stage 1 only (LLaVA-1.6)", 43.0, 17.7, 42.5, 63.2, 37.6, 38.6, 41.6
        ),
        MmebRow("vlm2vec-phi35v VLM2Vec (Phi3.5-V)", 54.8, 54.9, 62.3, 79.5, 66.5, 52.0, 62.9),
        MmebRow(
            "vlm2vec-llava16 VLM2Vec (LLaVA-1.6), low-res re-run", 56.8, 50.4, 63.3, 82.6, 64.9, 53.9, 63.3
        ),
        MmebRow("unime-phi35v UniME (Phi3.5-V)", 54.8, 55.9, 64.5, 81.8, 68.2, 52.7, 64.2),
        MmebRow("unime-llava16 UniME (LLaVA-1.6)", 60.6, 52.9, 67.9, 85.1, 68.4, 57.9, 66.6),
        MmebRow("unime-llava-ov UniME (LLaVA-OneVision)", 66.8, 66.6, 70.6, 90.9, 74.6, 65.8, 70.7),
    )
}


def _per_dataset(values: str) -> dict[str, float]:
    numbers = [float(v) for v in values.split()]
    assert len(numbers) == len(_TASKS)
    return dict(zip(_TASKS, numbers, strict=True))


# Table 9, in the paper's (and MMEB_DATASETS') column order.
MMEB_DATASETS: dict[str, dict[str, float]] = {
    "e5v-llava16": _per_dataset(
        "40.5 31.5 49.3 76.7 52.3 32.0 18.2 56.7 34.2 5.9 "
        "15.1 4.7 9.1 8.7 4.2 4.5 9.6 8.6 34.1 9.5 "
        "57.6 41.0 43.9 46.8 68.6 54.8 0.1 33.7 11.2 61.0 0.5 53.8 "
        "41.7 62.2 74.9 61.8"
    ),
    "vlm2vec-llava16": _per_dataset(
        "66.5 76.4 60.9 84.0 73.2 42.1 39.9 74.6 34.3 16.1 "
        "66.5 54.9 64.4 34.8 33.1 49.8 37.3 39.9 57.3 65.7 "
        "75.3 51.3 70.7 75.2 69.9 67.7 63.3 83.6 15.2 63.4 49.6 73.7 "
        "77.0 85.9 83.8 83.6"
    ),
    "unime-llava16": _per_dataset(
        "71.3 79.5 64.6 90.4 75.9 45.6 45.5 78.4 36.4 18.7 "
        "68.3 58.7 67.6 37.0 33.4 51.7 40.5 42.7 63.6 65.2 "
        "79.7 52.2 74.8 78.8 74.9 73.8 66.2 89.8 16.5 66.6 55.7 86.2 "
        "76.5 89.3 90.6 84.1"
    ),
}

RETRIEVAL_KEYS = (
    "flickr30k/t2i_r1", "flickr30k/i2t_r1", "coco/t2i_r1", "coco/i2t_r1",
    "sharegpt4v/t2i_r1", "sharegpt4v/i2t_r1", "urban1k/t2i_r1", "urban1k/i2t_r1",
    "sugarcrepe/replace", "sugarcrepe/swap", "sugarcrepe/add",
)  # fmt: skip


def _retrieval(values: str) -> dict[str, float]:
    numbers = [float(v) for v in values.split()]
    assert len(numbers) == len(RETRIEVAL_KEYS)
    return dict(zip(RETRIEVAL_KEYS, numbers, strict=True))


RETRIEVAL: dict[str, dict[str, float]] = {
    "openclip-vitl": _retrieval("67.3 87.2 37.0 58.1 81.8 84.0 47.0 47.0 79.5 62.7 74.9"),
    "clip-bigg": _retrieval("79.5 92.9 51.3 67.3 90.1 93.6 77.8 80.7 86.5 68.9 88.4"),
    "eva-clip": _retrieval("80.3 94.5 52.0 70.1 93.1 91.2 80.4 77.8 85.9 70.3 86.7"),
    "e5v-phi35v": _retrieval("72.2 79.6 44.7 53.4 86.0 88.5 83.8 83.6 88.2 66.6 75.3"),
    "e5v-llava16": _retrieval("77.3 85.7 49.1 57.6 85.1 82.1 88.9 83.2 86.3 68.7 66.9"),
    "unime-stage1-phi35v": _retrieval("72.0 80.6 44.9 57.2 86.8 92.3 85.1 86.9 90.2 67.6 91.2"),
    "unime-stage1-llava16": _retrieval("77.2 84.6 51.0 56.4 89.8 86.9 91.3 82.4 89.5 64.8 94.2"),
    "vlm2vec-phi35v": _retrieval("68.7 83.0 43.7 59.8 90.1 92.0 87.9 86.8 86.2 66.7 84.2"),
    "vlm2vec-llava16": _retrieval("76.0 90.6 46.8 66.6 85.8 90.7 84.7 90.8 85.8 66.3 86.5"),
    "unime-phi35v": _retrieval("77.0 88.2 49.8 66.8 92.1 96.4 92.7 95.1 90.1 70.9 93.3"),
    "unime-llava16": _retrieval("81.9 93.4 53.7 70.1 93.9 97.2 95.2 95.9 89.0 71.5 94.4"),
    "unime-llava-ov": _retrieval("83.3 94.4 54.8 74.0 93.9 89.3 94.3 95.5 80.5 65.5 82.2"),
}


def paper_summary(name: str) -> dict[str, float]:
    """A Table 1 row in the keys of :func:`unime_jax.eval.summary.summarize`, both overalls derived.

    ``overall_36`` comes from Table 9 where it has the row's per-dataset numbers, else from the
    IND/OOD means ((20·IND + 16·OOD) / 36, exact up to their rounding); ``overall_meta_mean`` is
    the mean of the four meta-task scores.
    """
    if name not in MMEB:
        raise ValueError(f"no published MMEB row {name!r}; known: {', '.join(MMEB)}")
    row = MMEB[name]
    metas = (row.classification, row.vqa, row.retrieval, row.grounding)
    if name in MMEB_DATASETS:
        values = MMEB_DATASETS[name].values()
        overall_36 = sum(values) / len(values)
    else:
        overall_36 = (20 * row.ind + 16 * row.ood) / 36
    return {
        "overall_36": overall_36,
        "overall_meta_mean": sum(metas) / 4,
        "ind": row.ind,
        "ood": row.ood,
        "classification": row.classification,
        "vqa": row.vqa,
        "retrieval": row.retrieval,
        "grounding": row.grounding,
    }
