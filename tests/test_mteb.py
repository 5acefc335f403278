"""The mteb wrapper: mteb's own retrieval evaluator on a local image-text task scores a UniME model as
our evaluation harness does, and the wrapper's embeddings are UniME.encode's with UniME's prompts.

Nothing downloads: the task is built from local files (real photos from skimage.data and captions,
written as the harness's pairs.jsonl), and the model is a tiny random LLaVA-NeXT.
"""

from __future__ import annotations

import json

import jax
import mteb
import numpy as np
import pytest
from datasets import Dataset
from helpers.llava import write_tiny_llava
from mteb._create_dataloaders import create_dataloader
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.types import PromptType
from PIL import Image

from unime_jax.embedder import UniME
from unime_jax.eval.retrieval_data import Pairs, read_pairs_jsonl
from unime_jax.eval.retrieval_suite import KS, run_retrieval
from unime_jax.eval.runs import EvalRun
from unime_jax.integrations.mteb import UniMEEncoder
from unime_jax.sharding import make_mesh

skimage_data = pytest.importorskip("skimage.data")

# Real photos, colour and grey, at a few sizes and aspect ratios (LLaVA-NeXT picks its grid per size).
PHOTOS = {
    "astronaut": "an astronaut in a white suit in front of a flag",
    "camera": "a man with a camera on a tripod, in black and white",
    "chelsea": "a ginger cat looking to the side",
    "coffee": "a cup of coffee on a saucer",
    "coins": "old coins on a dark background",
    "rocket": "a rocket standing on its launch pad",
    "hubble_deep_field": "galaxies scattered across dark space",
    "immunohistochemistry": "stained cells under a microscope",
    "moon": "the cratered surface of the moon",
    "page": "a page of printed text",
    "clock": "a clock face seen at an angle",
    "colorwheel": "a wheel of rainbow colours",
}
SIZES = [(40, 56), (56, 40), (48, 48), (30, 72)]
T2I = "LocalCaptionToImage"
I2T = "LocalImageToCaption"


def _metadata(name: str, category: str, prompt: dict | None = None) -> TaskMetadata:
    """An image-text retrieval task's metadata (``category``: t2i, i2t, it2i, ...), local data."""
    return TaskMetadata(
        name=name,
        description="Images and captions of a local pairs.jsonl.",
        reference=None,
        dataset={"path": "local/pairs", "revision": "local"},
        type="Any2AnyRetrieval",
        category=category,
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="hit_rate_at_1",
        date=None,
        domains=None,
        task_subtypes=None,
        license=None,
        annotations_creators=None,
        dialect=None,
        modalities=["text", "image"],
        sample_creation=None,
        bibtex_citation=None,
        prompt=prompt,
    )


def _task(name: str, category: str, pairs: Pairs, prompt: dict | None = None) -> AbsTaskRetrieval:
    """A retrieval task over the pairs file's images and captions, loaded from the local files."""
    images = [Image.open(path) for path in pairs.images]
    captions = {f"c{j}": text for j, text in enumerate(pairs.captions)}
    pictures = {f"i{i}": image for i, image in enumerate(images)}
    if category == "t2i":
        queries, corpus = captions, pictures
        relevant = {f"c{j}": {f"i{i}": 1} for j, i in enumerate(pairs.caption_image)}
    else:
        queries, corpus = pictures, captions
        relevant = {
            f"i{i}": {f"c{j}": 1 for j, owner in enumerate(pairs.caption_image) if owner == i}
            for i in range(len(images))
        }
    column = {"t2i": ("text", "image"), "i2t": ("image", "text")}[category]

    class Local(AbsTaskRetrieval):
        metadata = _metadata(name, category, prompt)

        def load_data(self, num_proc: int | None = None, **kwargs) -> None:
            split = RetrievalSplitData(
                queries=Dataset.from_dict({"id": list(queries), column[0]: list(queries.values())}),
                corpus=Dataset.from_dict({"id": list(corpus), column[1]: list(corpus.values())}),
                relevant_docs=relevant,
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    return Local()


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("mteb")
    (tmp / "images").mkdir()
    lines = []
    for i, (name, caption) in enumerate(PHOTOS.items()):
        photo = Image.fromarray(getattr(skimage_data, name)()).resize(SIZES[i % len(SIZES)][::-1])
        photo.save(tmp / "images" / f"{name}.png")
        lines.append(
            json.dumps({"image": f"images/{name}.png", "captions": [caption, f"a photo: {caption}"]})
        )
    (tmp / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    mesh = make_mesh(devices=jax.devices()[:2])
    model = UniME.load(write_tiny_llava(tmp / "llava"), mesh=mesh, max_len=64, progress=False)
    return {"tmp": tmp, "pairs": read_pairs_jsonl(tmp / "pairs.jsonl", name="local"), "model": model}


def test_mteb_scores_equal_the_harness(world) -> None:
    model, pairs = world["model"], world["pairs"]
    ours = run_retrieval(
        model, EvalRun(world["tmp"] / "harness", {"model": "tiny"}, batch_size=8, progress=False), [pairs]
    )
    ours = ours["local"]

    encoder = UniMEEncoder(model, name="unime-jax/tiny-llava")
    tasks = [_task(T2I, "t2i", pairs), _task(I2T, "i2t", pairs)]
    result = mteb.evaluate(
        encoder, tasks, cache=None, show_progress_bar=False, encode_kwargs={"batch_size": 8}
    )
    scores = {r.task_name: r.scores["test"][0] for r in result.task_results}
    assert set(scores) == {T2I, I2T}

    # The ranking must not hinge on float rounding: no candidate within 1e-5 of the gold.
    embedded = (
        model.encode(texts=pairs.captions, progress=False)
        @ model.encode(images=pairs.images, progress=False).T
    )
    gold = embedded[np.arange(len(pairs.captions)), pairs.caption_image]
    others = np.abs(embedded - gold[:, None])
    others[np.arange(len(pairs.captions)), pairs.caption_image] = np.inf
    assert others.min() > 1e-5

    # Caption -> image: one gold image, so mteb's recall@k and hit rate@k are the harness's R@k.
    # Image -> caption: an image is a hit when any of its captions ranks in the top k: mteb's hit rate.
    for k in KS:
        assert scores[T2I][f"recall_at_{k}"] == pytest.approx(ours[f"t2i_r{k}"], abs=1e-5)
        assert scores[T2I][f"hit_rate_at_{k}"] == pytest.approx(ours[f"t2i_r{k}"], abs=1e-5)
        assert scores[I2T][f"hit_rate_at_{k}"] == pytest.approx(ours[f"i2t_r{k}"], abs=1e-5)
    assert 0 < ours["t2i_r10"] < 1 and ours["t2i_r1"] < ours["t2i_r10"]  # a ranking, not a constant


def _embed(
    encoder: UniMEEncoder, dataset: Dataset, metadata: TaskMetadata, prompt_type: PromptType
) -> np.ndarray:
    loader = create_dataloader(dataset, task_metadata=metadata, prompt_type=prompt_type, batch_size=5)
    return encoder.encode(
        loader, task_metadata=metadata, hf_split="test", hf_subset="default", prompt_type=prompt_type,
        batch_size=5, show_progress_bar=False,
    )  # fmt: skip


def test_wrapper_embeddings_are_unime_encode_with_unime_prompts(world) -> None:
    model, pairs = world["model"], world["pairs"]
    encoder = UniMEEncoder(model)
    images = [Image.open(path).convert("RGB") for path in pairs.images[:6]]
    texts = pairs.captions[:6]
    plain = _metadata(T2I, "t2i")
    instructed = _metadata(T2I, "t2i", prompt={"query": "Find an image that matches the given caption."})

    # A text or an image alone: UniME's templates (no task instruction).
    text_rows = Dataset.from_dict({"id": [str(i) for i in range(6)], "text": texts})
    got = _embed(encoder, text_rows, plain, PromptType.query)
    np.testing.assert_allclose(got, model.encode(texts=texts, progress=False), atol=1e-6)
    image_rows = Dataset.from_dict({"id": [str(i) for i in range(6)], "image": images})
    got = _embed(encoder, image_rows, plain, PromptType.document)
    np.testing.assert_allclose(got, model.encode(images=images, progress=False), atol=1e-6)

    # The task's query instruction, MMEB style; the documents keep their template.
    instruction = "Find an image that matches the given caption."
    got = _embed(encoder, text_rows, instructed, PromptType.query)
    expected = model.encode(texts=texts, instruction=instruction, progress=False)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert not np.allclose(expected, model.encode(texts=texts, progress=False), atol=1e-3)
    got = _embed(encoder, image_rows, instructed, PromptType.document)
    np.testing.assert_allclose(got, model.encode(images=images, progress=False), atol=1e-6)
    got = _embed(UniMEEncoder(model, use_instructions=False), text_rows, instructed, PromptType.query)
    np.testing.assert_allclose(got, model.encode(texts=texts, progress=False), atol=1e-6)

    # An image with a text: the text as given, the image placeholder first; a row whose text is
    # empty is an image alone.
    mixed = Dataset.from_dict(
        {"id": [str(i) for i in range(6)], "text": ["What is shown?", "", *texts[2:]], "image": images}
    )
    got = _embed(encoder, mixed, _metadata("Mixed", "it2i"), PromptType.query)
    fused = model.encode(
        texts=["What is shown?", *texts[2:]], images=[images[0], *images[2:]], raw=True, progress=False
    )
    np.testing.assert_allclose(got[[0, 2, 3, 4, 5]], fused, atol=1e-6)
    np.testing.assert_allclose(got[1], model.encode(images=[images[1]], progress=False)[0], atol=1e-6)


def test_load_and_model_meta(world) -> None:
    encoder = UniMEEncoder.load(world["tmp"] / "llava", max_len=64, progress=False, mesh=world["model"].mesh)
    meta = encoder.mteb_model_meta
    assert meta.name == "unime-jax/llava" and meta.embed_dim == world["model"].dim == 32
    assert meta.modalities == ["image", "text"] and meta.framework == ["JAX"] and meta.max_tokens == 64
    assert meta.similarity_fn_name == "cosine" and meta.use_instructions
    texts = ["a cup of coffee"]
    np.testing.assert_allclose(
        encoder.model.encode(texts=texts, progress=False),
        world["model"].encode(texts=texts, progress=False),
        atol=1e-6,
    )
