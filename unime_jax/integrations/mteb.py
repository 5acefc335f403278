"""UniME models in mteb (MTEB, and MIEB for images) through mteb's v2 model interface.

    import mteb
    from unime_jax.integrations.mteb import UniMEEncoder

    model = UniMEEncoder.load("ckpt/unime-llava16", dtype="bfloat16")   # any path UniME.load takes
    results = mteb.evaluate(model, mteb.get_benchmark("MIEB(lite)"), cache=mteb.ResultCache("results/mteb"))

:class:`UniMEEncoder` is an ``mteb`` encoder (``AbsEncoder``, with a ``ModelMeta``): mteb hands
its ``encode`` a DataLoader of batches with ``text`` and/or ``image`` columns, and it returns
``UniME.encode``'s embeddings (L2-normalised float32; cosine similarity). Each row is prompted as
UniME prompts it:

- **a text or an image alone:** UniME's "in one word" templates, as in its zero-shot retrieval
  evaluation (``UniME.encode``'s default);
- **with a task instruction:** where the task gives one for this side (``TaskMetadata.prompt``: a
  string for the queries, or a dict per prompt type), MMEB style, ``<instruction> <text>``, with
  the image placeholder first on rows with an image (``UniME.encode(..., instruction=...)``);
  ``use_instructions=False`` keeps the templates everywhere;
- **an image with a text and no instruction:** the text as given, the image placeholder first
  (MMEB's layout; UniME's templates cover one modality).

mteb is an optional dependency: ``pip install "unime-jax[mteb]"``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from unime_jax.embedder import UniME
from unime_jax.progress import progress_bar

try:
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta, ScoringFunction
    from mteb.types import PromptType
except ImportError as e:  # the optional extra
    raise ImportError(
        'unime_jax.integrations.mteb needs the mteb package: pip install "unime-jax[mteb]"'
    ) from e

if TYPE_CHECKING:
    from mteb.abstasks.task_metadata import TaskMetadata
    from torch.utils.data import DataLoader

__all__ = ["UniMEEncoder", "model_meta"]

CITATION = """@article{gu2025unime,
  title={Breaking the Modality Barrier: Universal Embedding Learning with Multimodal LLMs},
  author={Gu, Tiancheng and Yang, Kaicheng and Feng, Ziyong and Wang, Xingjun and Zhang, Yanzhao and Long, Dingkun and Chen, Yingda and Cai, Weidong and Deng, Jiankang},
  journal={arXiv preprint arXiv:2504.17432},
  year={2025}
}"""
Mode = tuple[str | None, bool]  # (instruction, raw) of UniME.encode


def model_meta(model: UniME, name: str, *, use_instructions: bool = True) -> ModelMeta:
    """mteb's description of a loaded model (it names the results; the model is passed to
    ``mteb.evaluate`` itself, so there is no loader)."""
    return ModelMeta(
        loader=None,
        name=name,
        revision=None,
        release_date=None,
        languages=["eng-Latn"],
        n_parameters=None,
        memory_usage_mb=None,
        max_tokens=model.max_len,
        embed_dim=model.dim,
        license=None,
        open_weights=True,
        public_training_code=None,
        public_training_data=None,
        framework=["JAX"],
        reference="https://arxiv.org/abs/2504.17432",
        similarity_fn_name=ScoringFunction.COSINE,
        use_instructions=use_instructions,
        training_datasets=None,
        modalities=["image", "text"],
        citation=CITATION,
    )


def _row_mode(text: str | None, image: Any, instruction: str | None) -> Mode:
    if instruction is not None:
        return instruction, False
    if text is not None and image is not None:
        return None, True  # raw: the text as given, the placeholder first
    return None, False  # UniME's template for the one modality


class UniMEEncoder(AbsEncoder):
    """A :class:`~unime_jax.embedder.UniME` as an mteb encoder (the module docstring has the prompts).

    Args:
      model: the loaded model.
      name: the model's name in mteb's results, ``organization/model``.
      use_instructions: apply the tasks' instructions where mteb has them.
    """

    def __init__(self, model: UniME, *, name: str = "unime-jax/unime", use_instructions: bool = True) -> None:
        self.model = model
        self.use_instructions = use_instructions
        self.mteb_model_meta = model_meta(model, name, use_instructions=use_instructions)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        name: str | None = None,
        use_instructions: bool = True,
        **load_kwargs: Any,
    ) -> UniMEEncoder:
        """``UniME.load(path, **load_kwargs)`` (dtype, image_size, max_len, ...) as an mteb encoder,
        named ``unime-jax/<directory name>`` unless ``name`` is given."""
        model = UniME.load(path, **load_kwargs)
        name = name or f"unime-jax/{Path(path).resolve().name}"
        return cls(model, name=name, use_instructions=use_instructions)

    def task_instruction(self, task_metadata: TaskMetadata, prompt_type: PromptType | None) -> str | None:
        """The task's instruction for this side (queries or documents), or None."""
        if not self.use_instructions:
            return None
        prompt = task_metadata.prompt
        if isinstance(prompt, dict):
            prompt = prompt.get(prompt_type.value) if prompt_type is not None else None
        elif prompt_type not in (None, PromptType.query):
            prompt = None  # a plain string instructs the queries
        return (prompt.strip() or None) if isinstance(prompt, str) else None

    def encode(
        self,
        inputs: DataLoader,
        *,
        task_metadata: TaskMetadata,
        hf_split: str,
        hf_subset: str,
        prompt_type: PromptType | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """(N, dim) float32 embeddings of every row the loader yields, in order."""
        del hf_split, hf_subset  # the prompts depend on the task and the side only
        features = set(getattr(inputs.dataset, "features", None) or ())
        if unsupported := sorted(features & {"audio", "video"}):
            raise ValueError(
                f"{task_metadata.name}: UniME embeds texts and images, not {' or '.join(unsupported)}"
            )
        instruction = self.task_instruction(task_metadata, prompt_type)
        batch_size = kwargs.get("batch_size", 32)
        side = prompt_type.value if prompt_type is not None else "inputs"
        show = kwargs.get("show_progress_bar", True)
        out = [
            self._encode_batch(batch, instruction, batch_size)
            for batch in progress_bar(inputs, desc=f"{task_metadata.name} ({side})", disable=not show)
        ]
        return np.concatenate(out) if out else np.zeros((0, self.model.dim), np.float32)

    def _encode_batch(self, batch: dict[str, Any], instruction: str | None, batch_size: int) -> np.ndarray:
        """One loader batch; rows are grouped by prompt mode, each group one ``UniME.encode`` call."""
        column_texts: Sequence[str | None] | None = batch.get("text")
        column_images: Sequence[Any] | None = batch.get("image")
        count = len(column_texts) if column_texts is not None else len(column_images or ())
        images = list(column_images) if column_images is not None else [None] * count
        # An empty text beside an image is no text (an image-only row of a mixed corpus).
        texts = [
            text if text or image is None else None
            for text, image in zip(column_texts or [None] * count, images, strict=True)
        ]
        groups: dict[Mode, list[int]] = {}
        for i, (text, image) in enumerate(zip(texts, images, strict=True)):
            groups.setdefault(_row_mode(text, image, instruction), []).append(i)
        out = np.empty((count, self.model.dim), np.float32)
        for (row_instruction, raw), rows in groups.items():
            out[rows] = self.model.encode(
                texts=[texts[i] for i in rows],
                images=[images[i] for i in rows],
                instruction=row_instruction,
                raw=raw,
                batch_size=batch_size,
                progress=False,
            )
        return out
