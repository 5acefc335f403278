"""Executed vs useful FLOPs of stage 1, stage 2 and encode at the production shapes (CPU, abstract weights).

What it measures. For LLaVA-1.6-Mistral-7B at its production configs (configs/llava16_stage{1,2}.yaml
on one host of 8 devices) it builds a realistic batch through the project's own featurizer and
packer, then counts the FLOPs the step executes on that batch and the FLOPs it would need if every
row ran at its real length with its real tiles only. The ratio is the step's waste: padding,
zero tiles, empty chunk slots, shards that wait for the longest, recomputation.

How it counts. XLA's cost analysis of lowered functions, with the full-size weights as abstract
shapes (nothing is allocated, so it runs on any CPU in minutes):

- the step's own per-chunk functions: ``training.trainer.embed_fn`` (the forward the GradCache
  cache pass and the packed chunks run) and its ``jax.vjp`` pull-back (forward + backward, with the
  configured remat policy and LoRA dropout), the CLIP tower's ``tile_features``, and the model's
  pixel forward (encode, the padded layout);
- every function is lowered with 1 and 2 decoder layers and extrapolated to 32 (the layers are
  identical; XLA's analysis counts a loop body once, so whole steps, which scan over chunks, are
  not lowered as one);
- a row's cost is fitted as a + b·L + c·L² over its length L from lowerings at a few lengths
  (the fit error is printed), and a chunk of r rows costs r times a row (checked).

Executed = what the step runs: every filled chunk of every length class (the packed layout: each
shard runs as many chunks as the fullest shard, at the class's padded length), or every row at the
padded shape (the padded layout), plus the CLIP tiles it runs. Useful = per row, the same passes at
its real length (GradCache's cache forward, then forward + backward: the method's own passes; no
remat recomputation), plus one CLIP pass per real tile (the tower is frozen). Attention is counted
as XLA's CPU kernel computes it (the full L×L matrix, masked) in both.

The data is generated, with stated assumptions (``MMEB_MIX``, ``nli_triplets``): text lengths and
image sizes per MMEB-train subset, weighted by subset size. Token counts come from the real
Mistral-7B tokenizer (pip mistral-common) and the real anyres geometry.

    PYTHONPATH=. python benchmarks/flops.py [--workloads stage1,stage2,encode] [--json OUT]
    PYTHONPATH=. python benchmarks/flops.py --before   # the previous configs: padded, remat full

``--encode-shapes FILE`` records only the batch shapes ``UniME.encode`` runs on the encode workload
(any checkout of the project that has ``UniME``); ``--encode-before FILE`` costs such a record.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse
import functools
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

MODEL_TYPE = "llava_next"
LAYERS = 32
# llava-hf/llava-v1.6-mistral-7b-hf's config.json (the values this port reads).
LLAVA16 = {
    "model_type": MODEL_TYPE,
    "image_token_index": 32000,
    "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
    "projector_hidden_act": "gelu",
    "vision_config": {
        "model_type": "clip_vision_model",
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
        "hidden_act": "quick_gelu",
    },
    "text_config": {
        "model_type": "mistral",
        "vocab_size": 32064,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "sliding_window": None,
    },
}
CONFIGS = {"stage1": "configs/llava16_stage1.yaml", "stage2": "configs/llava16_stage2.yaml"}
# The previous production settings, for --before: every row padded, remat full, stage 1 without GradCache.
BEFORE = ("model.remat=full", "stage1.layout.mode=padded", "stage1.grad_chunks=1", "stage2.layout.mode=padded")

_VOCABULARY = (
    "man woman child dog cat bird car street house table chair window tree flower river water sky "
    "city field road wall door light shadow paper book phone screen chart figure number line bar "
    "red blue green yellow black white small large old young tall short happy busy quiet open "
    "walks runs sits stands holds looks plays reads writes carries wears rides eats drinks shows "
    "near behind under above inside outside along across through over with without and the a of "
    "in on at to from by for about into during before after while because although"
)
WORDS = _VOCABULARY.split()


def words(rng: np.random.Generator, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS, int(rng.integers(low, high + 1))))


# ---------------------------------------------------------------------------------------------
# The data (assumptions, stated)


@dataclass(frozen=True)
class Side:
    """One side of an MMEB pair: its text (``{text}`` = generated words) and image sizes (h, w)."""

    template: str
    words: tuple[int, int] = (0, 0)
    sizes: tuple[tuple[int, int], ...] = ()  # () = no image


@dataclass(frozen=True)
class Subset:
    name: str
    pairs: float  # thousands of training pairs used (MMEB-train, capped at 50K per subset)
    query: Side
    target: Side


IMG = "<|image_1|>\n"
COCO = ((480, 640), (640, 480), (427, 640))
PHOTO = ((375, 500), (500, 375), (500, 500), (333, 500))
NEWS = ((400, 600), (600, 900), (683, 1024))
LABEL = Side("{text}", (1, 3))
ANSWER = Side("{text}", (1, 4))
CAPTION = Side("{text}", (8, 14))
IMAGE_TARGET = Side(IMG + "Represent the given image.", (0, 0), COCO)
# Sizes: the subsets' public statistics, capped at 50K as in the paper (they sum to its ~662K).
# Text lengths and image sizes: typical values per source dataset (ImageNet/VOC photos, COCO,
# news photos, scanned documents, infographics, charts), an assumption stated here.
MMEB_MIX = (
    Subset("ImageNet_1K", 50.0, Side(IMG + "Represent the given image for classification", (0, 0), PHOTO), LABEL),
    Subset(
        "N24News",
        49.0,
        Side(IMG + "Represent the given news image with the following caption for domain classification: {text}",
             (10, 40), NEWS),
        LABEL,
    ),
    Subset(
        "HatefulMemes",
        8.5,
        Side(IMG + "Represent the given image for binary classification to determine whether it constitutes "
             "hateful speech or not", (0, 0), ((500, 500), (800, 600))),
        Side("{text}", (1, 1)),
    ),
    Subset("VOC2007", 7.8, Side(IMG + "Identify the object shown in the image", (0, 0), PHOTO), LABEL),
    Subset("SUN397", 19.9, Side(IMG + "Identify the scene shown in the image", (0, 0), PHOTO + COCO), LABEL),
    *(
        Subset(name, pairs, Side(IMG + "Represent the given image with the following question: {text}", q, sizes),
               ANSWER)
        for name, pairs, q, sizes in (
            ("OK-VQA", 9.0, (6, 12), COCO),
            ("A-OKVQA", 17.0, (6, 14), COCO),
            ("DocVQA", 39.5, (6, 14), ((2200, 1700), (1000, 760))),
            ("InfographicsVQA", 23.9, (8, 16), ((3000, 1000), (2000, 1000))),
            ("ChartQA", 28.3, (8, 16), ((500, 800), (600, 850))),
            ("Visual7W", 50.0, (6, 12), COCO),
        )
    ),
    Subset(
        "VisDial",
        50.0,
        Side("Represent the given dialogue about an image, which is used for image retrieval: {text}", (100, 180)),
        IMAGE_TARGET,
    ),
    Subset(
        "CIRR",
        26.0,
        Side(IMG + "Given an image, find a similar everyday image with the described changes: {text}", (6, 16),
             ((400, 600), (500, 700))),
        replace(IMAGE_TARGET, sizes=((400, 600), (500, 700))),
    ),
    Subset("VisualNews_t2i", 50.0, Side("Retrieve an image of this news caption. {text}", (12, 30)),
           replace(IMAGE_TARGET, sizes=NEWS)),
    Subset("VisualNews_i2t", 50.0, Side(IMG + "Find a caption for the news in the given photo.", (0, 0), NEWS),
           Side("{text}", (12, 30))),
    Subset("MSCOCO_t2i", 50.0, Side("Find me an everyday image that matches the given caption: {text}", (8, 14)),
           IMAGE_TARGET),
    Subset("MSCOCO_i2t", 50.0, Side(IMG + "Find an image caption describing the given everyday image.", (0, 0),
                                    COCO), CAPTION),
    Subset("NIGHTS", 15.9, Side(IMG + "Find a day-to-day image that looks similar to the provided image.", (0, 0),
                                ((512, 512),)), replace(IMAGE_TARGET, sizes=((512, 512),))),
    Subset(
        "WebQA",
        17.2,
        Side("Find a Wikipedia image that answers this question: {text}", (8, 20)),
        Side(IMG + "Represent the given Wikipedia image with related text information: {text}", (10, 40),
             ((400, 600), (700, 1000))),
    ),
    Subset(
        "MSCOCO",
        50.0,
        Side(IMG + 'Select the portion of the image that isolates the object labeled as "{text}"', (1, 2), COCO),
        replace(IMAGE_TARGET, sizes=((120, 160), (250, 200), (300, 400))),
    ),
)  # fmt: skip


def _side(rng: np.random.Generator, side: Side) -> tuple[str, Image.Image | None]:
    text = (
        side.template.replace("{text}", words(rng, *side.words))
        if "{text}" in side.template
        else side.template
    )
    if not side.sizes:
        return text, None
    h, w = side.sizes[int(rng.integers(len(side.sizes)))]
    return text, Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 255, 3)))


def mmeb_pairs(n: int, seed: int = 0) -> list[tuple[str, tuple[str, Any], tuple[str, Any]]]:
    """n (subset, query, target) pairs drawn from MMEB_MIX by subset size."""
    rng = np.random.default_rng(seed)
    weights = np.array([s.pairs for s in MMEB_MIX])
    chosen = rng.choice(len(MMEB_MIX), size=n, p=weights / weights.sum())
    return [(MMEB_MIX[i].name, _side(rng, MMEB_MIX[i].query), _side(rng, MMEB_MIX[i].target)) for i in chosen]


def nli_triplets(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """(premise, entailment, contradiction) with SNLI's published mean lengths (14.1 / 8.3 words)."""
    rng = np.random.default_rng(seed)

    def sentence(mean: float, sd: float) -> str:
        count = int(np.clip(round(rng.normal(mean, sd)), 3, 48))
        return words(rng, count, count).capitalize() + "."

    return [(sentence(14.1, 6.0), sentence(8.3, 3.0), sentence(8.3, 3.0)) for _ in range(n)]


# ---------------------------------------------------------------------------------------------
# Costs of the real functions, lowered with abstract weights


def _flops(fn: Callable, *args: Any) -> float:
    analysis = jax.jit(fn).lower(*args).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    return float(analysis["flops"])


def _fit(lengths: Sequence[int], costs: Sequence[float]) -> np.ndarray:
    return np.polyfit(np.asarray(lengths, np.float64), np.asarray(costs, np.float64), 2)


class Costs:
    """FLOPs of one model's training and encode functions, per row, at 32 decoder layers."""

    def __init__(self, arch: Any, lora_config: Any, remat: str, extras: dict[str, np.ndarray]):
        self.arch, self.lora, self.remat, self.extras = arch, lora_config, remat, extras
        self._fits: dict[tuple, np.ndarray] = {}

    @functools.cache  # noqa: B019 - one instance per run
    def _split(self, layers: int, remat: str) -> tuple:
        from flax import nnx

        from unime_jax.backbones import spec_for
        from unime_jax.models import lora

        text = replace(self.arch.text, num_hidden_layers=layers, remat=remat)
        arch = replace(self.arch, text=text, remat=remat)
        spec = spec_for(MODEL_TYPE)

        def build() -> nnx.Module:
            model = spec.module_cls(arch, nnx.Rngs(0))
            if self.lora is not None:
                lora.apply_lora(model, self.lora, nnx.Rngs(1))
            return model

        trainable = nnx.LoRAParam if self.lora is not None else nnx.Param
        return nnx.split(nnx.eval_shape(build), trainable, ...)

    def _inputs(self, kind: str, rows: int, length: int, tiles: int = 0) -> dict[str, jax.ShapeDtypeStruct]:
        s = jax.ShapeDtypeStruct
        inputs = {"input_ids": s((rows, length), jnp.int32), "attention_mask": s((rows, length), jnp.int32)}
        if kind == "text":
            return inputs
        inputs |= {k: s((rows, *v.shape), v.dtype) for k, v in self.extras.items() if k != "pixel_values"}
        if kind == "image":  # the packed layout: each row's tile features, gathered
            return inputs | {"gathered_features": s((rows, length, self.arch.vision.hidden_size), self.dtype)}
        pixels = self.extras["pixel_values"]
        return inputs | {"pixel_values": s((rows, tiles, *pixels.shape[1:]), pixels.dtype)}

    @property
    def dtype(self) -> Any:
        return jnp.dtype(self.arch.dtype)

    def _layered(self, lower: Callable[[int], float]) -> float:
        one, two = lower(1), lower(2)
        return one + (LAYERS - 1) * (two - one)

    @functools.cache  # noqa: B019
    def lowered(
        self, kind: str, pass_: str, rows: int, length: int, tiles: int = 0, remat: str | None = None
    ) -> float:
        """FLOPs of the forward ("fwd") or the pull-back ("vjp": forward + backward) of `rows` rows."""
        from unime_jax.training.trainer import embed_fn

        remat = self.remat if remat is None else remat
        key = jax.ShapeDtypeStruct((2,), jnp.uint32)
        inputs = self._inputs(kind, rows, length, tiles)

        def lower(layers: int) -> float:
            graphdef, params, frozen = self._split(layers, remat)
            if pass_ == "fwd":
                return _flops(lambda p, f, x, k: embed_fn(graphdef, f)(p, x, k), params, frozen, inputs, key)

            def pull_back(p: Any, f: Any, x: Any, k: Any) -> Any:
                out, vjp = jax.vjp(lambda q: embed_fn(graphdef, f)(q, x, k), p)
                return vjp(jnp.ones_like(out))

            return _flops(pull_back, params, frozen, inputs, key)

        return self._layered(lower)

    @functools.cache  # noqa: B019
    def clip_tile(self) -> float:
        """One tile through the frozen vision tower (``tile_features``), forward only."""
        graphdef, params, frozen = self._split(1, "none")
        from flax import nnx

        pixels = self.extras["pixel_values"]
        tiles = jax.ShapeDtypeStruct((4, *pixels.shape[1:]), pixels.dtype)
        total = _flops(lambda p, f, t: nnx.merge(graphdef, p, f).tile_features(t), params, frozen, tiles)
        return total / 4

    def row(self, kind: str, pass_: str, length: int, remat: str | None = None) -> float:
        """Fitted cost of one row of `length` tokens (kind "text" or "image", packed inputs)."""
        remat = self.remat if remat is None else remat
        fit_key = (kind, pass_, remat)
        if fit_key not in self._fits:
            grid = (8, 32, 64, 128, 256) if kind == "text" else (576, 1200, 2000, 3184)
            costs = [self.lowered(kind, pass_, 1, n, remat=remat) for n in grid]
            self._fits[fit_key] = _fit(grid, costs)
        return float(np.polyval(self._fits[fit_key], length))

    def fit_error(self, kind: str, pass_: str, length: int) -> float:
        """Relative error of the fitted row cost against a lowering at `length` (a checkpoint of the fit)."""
        exact = self.lowered(kind, pass_, 1, length)
        return abs(self.row(kind, pass_, length) - exact) / exact

    def pixel_row(self, length: int, tiles: int, pass_: str = "fwd") -> float:
        """One row of the pixel forward (encode, the padded layout): CLIP on `tiles` slots inside."""
        return self.lowered("pixels", pass_, 1, length, tiles)


# ---------------------------------------------------------------------------------------------
# Workloads


@dataclass
class Count:
    executed: float = 0.0
    useful: float = 0.0
    parts: dict[str, float] | None = None

    @property
    def ratio(self) -> float:
        return self.executed / self.useful


def _useful_rows(costs: Costs, lengths: np.ndarray, tiles: np.ndarray, passes: Sequence[str]) -> float:
    """Each row at its real length and real tiles: the given passes, no remat, CLIP once per tile."""
    total = 0.0
    for length, count in zip(lengths, tiles, strict=True):
        kind = "image" if count else "text"
        total += sum(costs.row(kind, p, int(length), remat="none") for p in passes)
        if count:
            total += count * costs.clip_tile()
    return total


def _packed_executed(costs: Costs, batch: dict[str, np.ndarray], spec: Any, passes: Sequence[str]) -> dict:
    """What the packed step runs: per class, (fullest shard's chunks) x shards x rows x passes, and the tiles."""
    parts = {"text": 0.0, "image": 0.0, "clip": 0.0}
    shards = spec.shards
    for cls in spec.classes:
        filled = int(batch[f"packed_chunks_{cls.name}"].max())
        if filled:
            per_row = sum(costs.row(cls.kind, p, cls.length) for p in passes)
            parts[cls.kind] += filled * shards * cls.rows * per_row
    if "packed_tile_chunks" in batch:
        parts["clip"] = int(batch["packed_tile_chunks"].max()) * shards * spec.tile_chunk * costs.clip_tile()
    return parts


def _roles(batch: dict[str, np.ndarray]) -> list[str]:
    return sorted(k[: -len("_attention_mask")] for k in batch if k.endswith("_attention_mask"))


def _lengths_and_tiles(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    lengths, tiles = [], []
    for role in _roles(batch):
        lengths.append(batch[f"{role}_attention_mask"].sum(-1))
        tiles.append(batch.get(f"{role}_num_tiles", np.zeros(len(lengths[-1]), np.int32)))
    return np.concatenate(lengths), np.concatenate(tiles)


def step_count(costs: Costs, padded: dict[str, np.ndarray], spec: Any | None, gradcache: bool) -> Count:
    """Executed and useful FLOPs of one training step on the padded batch (packed by `spec` when given)."""
    from unime_jax.data.packing import pack_batch

    passes = ("fwd", "vjp") if gradcache else ("vjp",)
    lengths, tiles = _lengths_and_tiles(padded)
    useful = _useful_rows(costs, lengths, tiles, passes)
    if spec is not None:
        parts = _packed_executed(costs, pack_batch(padded, spec), spec, passes)
        return Count(sum(parts.values()), useful, parts)
    executed = 0.0
    for role in _roles(padded):
        rows, length = padded[f"{role}_attention_mask"].shape
        if f"{role}_pixel_values" in padded:
            slots = padded[f"{role}_pixel_values"].shape[1]
            executed += rows * sum(costs.pixel_row(length, slots, p) for p in passes)
        else:
            executed += rows * sum(costs.lowered("text", p, 1, length) for p in passes)
    return Count(executed, useful, {"padded rows": executed})


def encode_count(costs: Costs, shapes: list[dict], rows: list[tuple[int, int]]) -> Count:
    """Executed FLOPs of the recorded encode batches; useful: every row once at its real length."""
    executed = 0.0
    for batch in shapes:
        if batch["tiles"]:
            executed += batch["rows"] * costs.pixel_row(batch["length"], batch["tiles"])
        else:
            executed += batch["rows"] * costs.lowered("text", "fwd", 1, batch["length"])
    lengths, tiles = (np.array(v) for v in zip(*rows, strict=True))
    return Count(executed, _useful_rows(costs, lengths, tiles, ("fwd",)), None)


# ---------------------------------------------------------------------------------------------
# Building the batches through the project's featurizer and packer


def _load_config(stage: str, overrides: Sequence[str]) -> Any:
    from unime_jax.config import load_config
    from unime_jax.runs.schema import Config

    return load_config(CONFIGS[stage], list(overrides), Config)


def _arch(cfg: Any) -> Any:
    from unime_jax.backbones import spec_for, with_runtime

    m = cfg.model
    return with_runtime(
        spec_for(MODEL_TYPE).from_hf(LLAVA16), dtype=m.dtype, param_dtype=m.param_dtype, attention="xla"
    )


def _stacked(examples: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    from unime_jax.data.batching import stack_examples

    return stack_examples(examples)


def _tokenizer() -> Any:
    from unime_jax.tokenizer import load_tokenizer

    return load_tokenizer("mistral-common", MODEL_TYPE)


def stage1_batch(cfg: Any, rows: int) -> dict[str, np.ndarray]:
    from unime_jax.data.examples import NLI_ROLES
    from unime_jax.processing.text import TRUNCATED, TextFeaturizer

    featurizer = TextFeaturizer(_tokenizer(), cfg.data.text.max_len, cfg.data.text.template)
    examples = []
    for triplet in nli_triplets(rows):
        example = {}
        for role, text in zip(NLI_ROLES, triplet, strict=True):
            arrays = dict(featurizer(text))
            arrays.pop(TRUNCATED, None)
            example |= {f"{role}_{k}": v for k, v in arrays.items()}
        examples.append(example)
    return _stacked(examples)


def _mmeb_featurizer(cfg: Any, arch: Any) -> Any:
    from unime_jax.backbones import spec_for

    return spec_for(MODEL_TYPE).featurizer(arch, _tokenizer(), max_len=cfg.data.text.max_len, raw=True)


def stage2_batch(cfg: Any, arch: Any, rows: int) -> tuple[dict[str, np.ndarray], list[str]]:
    from unime_jax.processing.text import TRUNCATED

    featurizer = _mmeb_featurizer(cfg, arch)
    examples, subsets = [], []
    for subset, query, target in mmeb_pairs(rows):
        example = {}
        for role, (text, image) in (("query", query), ("target", target)):
            arrays = dict(featurizer(text, image))
            arrays.pop(TRUNCATED, None)
            example |= {f"{role}_{k}": v for k, v in arrays.items()}
        examples.append(example)
        subsets.append(subset)
    return _stacked(examples), subsets


def histogram(batch: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Real token counts by role and modality: rows, min, quartiles, max, mean."""
    out = {}
    for role in _roles(batch):
        lengths = batch[f"{role}_attention_mask"].sum(-1)
        tiles = batch.get(f"{role}_num_tiles", np.zeros(len(lengths)))
        for modality, rows in (("text", tiles == 0), ("image", tiles > 0)):
            if rows.any():
                q = np.percentile(lengths[rows], [0, 25, 50, 75, 100])
                out[f"{role} {modality}"] = {
                    "rows": int(rows.sum()),
                    **dict(zip(("min", "p25", "median", "p75", "max"), q.tolist(), strict=True)),
                    "mean": float(lengths[rows].mean()),
                    "padded_to": int(batch[f"{role}_attention_mask"].shape[-1]),
                }
    return out


# ---------------------------------------------------------------------------------------------
# Encode: the batches UniME.encode runs


ENCODE_QUERIES = 1000  # an MMEB-eval dataset's size: image+question queries, short text candidates


def encode_inputs(seed: int = 1) -> tuple[list[str], list[Any]]:
    """Queries (image + instruction + question) followed by text candidates (answers), VQA-style."""
    rng = np.random.default_rng(seed)
    vqa = [s for s in MMEB_MIX if s.query.sizes and "question" in s.query.template]
    texts, images = [], []
    for i in range(ENCODE_QUERIES):
        text, image = _side(rng, vqa[i % len(vqa)].query)
        texts.append(text)
        images.append(image)
    for _ in range(ENCODE_QUERIES):
        texts.append(words(rng, 1, 4))
        images.append(None)
    return texts, images


def tiny_llava16() -> dict:
    """LLaVA-1.6's geometry (tiles, pinpoints, image token) with tiny towers."""
    tiny = json.loads(json.dumps(LLAVA16))
    tiny["vision_config"] |= {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                              "num_attention_heads": 2}  # fmt: skip
    tiny["text_config"] |= {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                            "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip
    return tiny


def record_encode_shapes(batch_size: int = 32) -> dict:
    """The (rows, length, tile slots) of every forward ``UniME.encode`` runs on the encode workload,
    and each input's real (length, tiles); the model is a tiny one with LLaVA-1.6's real geometry
    (the batching depends only on the tokenizer and the image processor), and no forward is run."""
    from unime_jax import UniME
    from unime_jax.backbones import spec_for
    from unime_jax.model_io import init_model
    from unime_jax.sharding import make_mesh

    spec = spec_for(MODEL_TYPE)
    arch = spec.from_hf(tiny_llava16())
    mesh = make_mesh()
    model = UniME(
        init_model(spec, arch, mesh), MODEL_TYPE, arch, _tokenizer(), mesh=mesh, max_len=256, raw=True
    )
    shapes: list[dict] = []

    def record(state: Any, batch: dict[str, jax.Array]) -> jax.Array:
        rows, length = batch["input_ids"].shape
        tiles = batch["pixel_values"].shape[1] if "pixel_values" in batch else 0
        shapes.append({"rows": rows, "length": length, "tiles": tiles})
        return jnp.zeros((rows, model.dim), jnp.float32)

    model._forward = record  # instrumentation: the shapes the real batching dispatches
    texts, images = encode_inputs()
    model.encode(texts=texts, images=images, batch_size=batch_size, progress=False)
    return {"batch_size": batch_size, "batches": shapes}


def encode_rows() -> list[tuple[int, int]]:
    """Each encode input's real (token count, tiles), through the current featurizer."""
    cfg = _load_config("stage2", ())
    featurizer = replace(_mmeb_featurizer(cfg, _arch(cfg)), max_len=256)
    real = []
    for text, image in zip(*encode_inputs(), strict=True):
        if image is None:
            real.append((len(featurizer.token_ids(text)[0]), 0))
        else:
            arrays, tokens = featurizer.process_image(image)
            real.append((len(featurizer.token_ids(text, tokens)[0]), featurizer.inputs.num_tiles(arrays)))
    return real


# ---------------------------------------------------------------------------------------------


def _report(name: str, count: Count) -> dict:
    parts = (
        ""
        if not count.parts
        else " (" + ", ".join(f"{k} {v / 1e15:.2f}" for k, v in count.parts.items()) + ")"
    )
    print(
        f"{name:48s} executed {count.executed / 1e15:9.2f} PFLOP{parts}; useful {count.useful / 1e15:8.2f} PFLOP; "
        f"executed/useful {count.ratio:.3f}",
        flush=True,
    )
    return {"executed": count.executed, "useful": count.useful, "ratio": count.ratio, "parts": count.parts}


def run_stage(stage: str, overrides: Sequence[str]) -> dict:
    from unime_jax.backbones import spec_for
    from unime_jax.runs.stages import lora_config, pack_spec
    from unime_jax.sharding import make_mesh

    cfg = _load_config(stage, overrides)
    section = getattr(cfg, stage)
    arch = _arch(cfg)
    mesh = make_mesh(data=-1)
    if stage == "stage1":
        batch, subsets = stage1_batch(cfg, section.batch_size), None
        featurizer = None
    else:
        batch, subsets = stage2_batch(cfg, arch, section.batch_size)
        featurizer = _mmeb_featurizer(cfg, arch)
    extras = {} if featurizer is None else featurizer.inputs.empty()
    adapters = lora_config(stage, section, spec_for(MODEL_TYPE), arch)  # the run's own adapters
    costs = Costs(arch, adapters, cfg.model.remat, extras)
    spec = pack_spec(section, mesh, cfg.data.text.max_len, featurizer, ())
    gradcache = section.grad_chunks > 1
    label = (
        f"{stage}: batch {section.batch_size}, {section.layout.mode}, remat {cfg.model.remat}, "
        f"{'GradCache' if gradcache else 'no GradCache'}"
    )
    result = {
        "config": CONFIGS[stage],
        "overrides": list(overrides),
        "histogram": histogram(batch),
        **_report(label, step_count(costs, batch, spec, gradcache)),
    }
    if subsets is not None:
        result["subsets"] = dict(zip(*np.unique(subsets, return_counts=True), strict=True))
        result["subsets"] = {k: int(v) for k, v in result["subsets"].items()}
    checks = {"text fwd @ 48": costs.fit_error("text", "fwd", 48)}
    if featurizer is not None:
        checks["image vjp @ 1500"] = costs.fit_error("image", "vjp", 1500)
        rows4 = costs.lowered("text", "vjp", 4, 64)
        checks["4 rows = 4 x 1 row (text vjp @ 64)"] = (
            abs(rows4 - 4 * costs.lowered("text", "vjp", 1, 64)) / rows4
        )
    result["checks"] = checks
    print("  checks (relative error): " + "; ".join(f"{k} {v:.1e}" for k, v in checks.items()))
    return result


def run_encode(recorded: dict, label: str) -> dict:
    cfg = _load_config("stage2", ())
    arch = _arch(cfg)
    costs = Costs(arch, None, "none", _mmeb_featurizer(cfg, arch).inputs.empty())
    count = encode_count(costs, recorded["batches"], encode_rows())
    return {"batch_size": recorded["batch_size"], **_report(label, count)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workloads", default="stage1,stage2,encode", help="comma-separated: stage1,stage2,encode"
    )
    parser.add_argument(
        "--before", action="store_true", help="the previous configs: padded layout, remat full"
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument(
        "--encode-shapes", metavar="FILE", help="only record the encode batch shapes into FILE"
    )
    parser.add_argument("--encode-before", metavar="FILE", help="also cost encode shapes recorded elsewhere")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.encode_shapes:
        recorded = record_encode_shapes()
        with open(args.encode_shapes, "w") as f:
            json.dump(recorded, f)
        print(f"{len(recorded['batches'])} encode batches recorded in {args.encode_shapes}")
        return recorded
    overrides = [*(BEFORE if args.before else ()), *args.set]
    results: dict = {"jax": jax.__version__, "devices": jax.device_count(), "workloads": {}}
    for workload in args.workloads.split(","):
        if workload in CONFIGS:
            results["workloads"][workload] = run_stage(workload, overrides)
        elif workload == "encode":
            results["workloads"]["encode"] = run_encode(
                record_encode_shapes(), "encode: UniME.encode, batch 32"
            )
        else:
            parser.error(f"unknown workload {workload!r}; choose from stage1, stage2, encode")
    if args.encode_before:
        with open(args.encode_before) as f:
            results["workloads"]["encode before"] = run_encode(json.load(f), "encode: recorded elsewhere")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return results


if __name__ == "__main__":
    main()
