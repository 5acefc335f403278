"""grain input pipelines for both training stages.

Shape of every pipeline (`build_pipeline`)::

    MapDataset.source(records)
      .shuffle(seed)                     # reshuffled every epoch (grain seeds epoch e with seed + e)
      [p : M*n : n]                      # process p of n: a disjoint shard of M records per epoch
      .map(record transforms)            # e.g. attach mined negatives
      SkipBadSamples(make_example)       # featurize; bad samples replaced deterministically
      .batch(b, batch_fn=Collate)        # static shapes; counts ride along in the batch
      .repeat(num_epochs)
      .to_iter_dataset()                 # batches computed ahead by reader threads
      .mp_prefetch(workers)              # each worker computes whole batches k ≡ w (mod workers)
      DataPipeline                       # training process: strips counts, keeps per-epoch totals

Everything up to the batch is a random-access MapDataset, so batch k is a pure function of
(seed, k): the same with 0 or N workers, from a fresh pipeline or after a resume. M is the largest
multiple of b with M*n ≤ len(records), so every process yields the same number of batches per
epoch and no batch straddles two epochs; the len(records) - M*n records left out differ every
epoch (they are the tail of that epoch's shuffle).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import grain
import numpy as np

from unime_jax.data.accounting import STATS_KEY, DataIterator, SkipPolicy
from unime_jax.data.batching import Collate
from unime_jax.data.config import DataSection, LoaderSection
from unime_jax.data.data_negatives import DataNegatives
from unime_jax.data.errors import DataError
from unime_jax.data.examples import Example, MmebExamples, NliExamples
from unime_jax.data.host_memory import check_host_memory
from unime_jax.data.negatives import MinedNegatives
from unime_jax.data.nli import NliSource
from unime_jax.data.packing import PackSpec
from unime_jax.data.skipping import SkipBadSamples
from unime_jax.processing.text import Featurizer, TextFeaturizer

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from unime_jax.data.mmeb import MmebSource

__all__ = [
    "DataPipeline",
    "build_pipeline",
    "mmeb_source",
    "nli_source",
    "stage1_pipeline",
    "stage2_pipeline",
]


class DataPipeline(grain.IterDataset):
    """The last stage, run in the training process; ``iter()`` gives a :class:`DataIterator`.

    Attributes:
      loader: the loader settings it was built with.
      batch_size: examples per batch on this process.
      batches_per_epoch: batches per epoch on every process.
    """

    def __init__(
        self,
        slots: grain.MapDataset,
        batches: grain.MapDataset,
        parent: grain.IterDataset,
        loader: LoaderSection,
        batches_per_epoch: int,
        policy: SkipPolicy,
    ) -> None:
        super().__init__(parent)
        self._slots = slots  # the random-access examples and batches under `parent`
        self._batches = batches
        self.loader = loader
        self.batch_size = loader.batch_size
        self.batches_per_epoch = batches_per_epoch
        self._policy = policy

    def __iter__(self) -> DataIterator:
        return DataIterator(self._parent.__iter__(), self.batches_per_epoch, self._policy)

    def batch_at(self, k: int) -> dict[str, Any]:
        """Batch k computed directly, in this process, without iterating (what ``next`` yields at step k)."""
        batch = dict(self._batches[k])
        del batch[STATS_KEY]
        return batch

    def check_host_memory(self) -> str:
        """A batch's bytes times the batches the loader keeps in flight, against the machine's free
        memory: a one-line account, or DataError naming the loader settings to lower.

        A batch is sized as batch_size examples at their fixed, uncut shapes (one example is
        featurized): the most any batch holds, as length buckets only cut and the packed layout's
        buffers hold the same worst case.
        """
        example = self._slots[0].example.arrays
        batch_bytes = self.batch_size * sum(np.asarray(v).nbytes for v in example.values())
        return check_host_memory(self.loader, batch_bytes)

    def __str__(self) -> str:
        return f"DataPipeline(batch_size={self.batch_size}, batches_per_epoch={self.batches_per_epoch})"


def _process(index: int | None, count: int | None) -> tuple[int, int]:
    if index is None or count is None:
        import jax

        index = jax.process_index() if index is None else index
        count = jax.process_count() if count is None else count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is not within [0, process_count={count})")
    return index, count


def _mark_absl_flags_parsed() -> None:
    # grain reads absl flags when it starts worker processes; in a program that does not run under
    # absl.app (ours) they are unparsed, and reading them raises UnparsedFlagAccessError.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_pipeline(
    source: Any,
    make_example: Callable[[Any], Example],
    loader: LoaderSection,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    record_transforms: Sequence[Callable[[Any], Any]] = (),
    pack: PackSpec | None = None,
) -> DataPipeline:
    """A pipeline over any random-access `source` (``__len__``, ``__getitem__``).

    Args:
      source: records; must be picklable when ``loader.num_workers > 0``.
      make_example: record → :class:`Example`, raising :class:`BadSample` to skip a sample.
      loader: batch size, epochs, workers, bucketing and the bad-sample policy.
      seed: shuffling and replacement seed, in [0, 2**32).
      process_index, process_count: this process's shard; default jax.process_index()/count().
      record_transforms: picklable record → record maps applied after sharding.
      pack: regroup every batch into the packed layout (``unime_jax.data.packing``).
    """
    index, count = _process(process_index, process_count)
    per_process = len(source) // (count * loader.batch_size) * loader.batch_size
    if per_process == 0:
        raise DataError(
            f"{len(source)} records cannot fill one batch of {loader.batch_size} on each of {count} "
            "process(es); lower the stage's batch_size or add data"
        )
    records = grain.MapDataset.source(source).shuffle(seed=seed)[index : per_process * count : count]
    for transform in record_transforms:
        records = records.map(transform)
    slots = SkipBadSamples(records, make_example, seed, loader.max_replacement_draws)
    batches = slots.batch(
        loader.batch_size, drop_remainder=True, batch_fn=Collate(tuple(loader.bucket_lengths), pack)
    )
    dataset = batches.repeat(loader.num_epochs).to_iter_dataset(
        grain.ReadOptions(num_threads=loader.read_threads, prefetch_buffer_size=loader.prefetch_batches)
    )
    if loader.num_workers > 0:
        _mark_absl_flags_parsed()
        dataset = dataset.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=loader.num_workers, per_worker_buffer_size=loader.worker_buffer_size
            )
        )
    policy = SkipPolicy(loader.max_bad_fraction, loader.min_samples_before_stop)
    return DataPipeline(slots, batches, dataset, loader, per_process // loader.batch_size, policy)


def stage1_pipeline(
    data: DataSection,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    pack: PackSpec | None = None,
) -> DataPipeline:
    """NLI triplets + teacher embeddings → ``anchor_/positive_/negative_`` tokens and ``teacher_*``."""
    featurizer = TextFeaturizer(tokenizer, data.text.max_len, data.text.template)
    return build_pipeline(
        nli_source(data),
        NliExamples(featurizer),
        data.loader,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        pack=pack,
    )


def nli_source(data: DataSection) -> NliSource:
    """The NLI triplets `data.nli` names, joined with their teacher store (checked against them)."""
    if data.nli is None:
        raise DataError("stage 1 needs the data.nli section (csv, teacher_dir)")
    nli = data.nli
    expect = {"teacher": nli.teacher, "dim": nli.teacher_dim, "instruction": nli.instruction}
    return NliSource(nli.csv, nli.teacher_dir, {k: v for k, v in expect.items() if v is not None})


def mmeb_source(data: DataSection) -> MmebSource:
    """The MMEB-train records `data.mmeb` selects (stage 2 and the negative miner read the same)."""
    from unime_jax.data.mmeb import MmebSource  # pyarrow: needed for stage 2 only

    if data.mmeb is None:
        raise DataError("stage 2 needs the data.mmeb section (root, split, subsets)")
    mmeb = data.mmeb
    return MmebSource(mmeb.root, mmeb.split, tuple(mmeb.subsets), mmeb.max_per_subset)


def stage2_pipeline(
    data: DataSection,
    featurizer: Featurizer,
    *,
    seed: int,
    source: MmebSource | None = None,
    negatives: np.ndarray | None = None,
    num_negatives: int = 0,
    data_negatives: bool = False,
    process_index: int | None = None,
    process_count: int | None = None,
    pack: PackSpec | None = None,
) -> DataPipeline:
    """MMEB-train pairs → ``query_*``, ``target_*``, ``target_ids`` (+ ``negative_*`` when mined or
    taken from the data).

    Args:
      featurizer: the backbone's multimodal featurizer (prompt formatting, image placeholders, crops).
      source: the records, when already opened (default: :func:`mmeb_source` of `data`).
      negatives: optional (records, K) table of mined negative record indices; the first
        `num_negatives` of each row are attached.
      data_negatives: attach each record's first `num_negatives` negatives from its own
        ``neg_text``/``neg_image_path`` columns instead (``data.data_negatives``).
    """
    source = mmeb_source(data) if source is None else source
    transforms = [] if negatives is None else [MinedNegatives(source, negatives, num_negatives)]
    if data_negatives:
        transforms.append(DataNegatives(num_negatives))
    return build_pipeline(
        source,
        MmebExamples(featurizer, data.mmeb.images, data.mmeb.image_size),
        data.loader,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        record_transforms=transforms,
        pack=pack,
    )
