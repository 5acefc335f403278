"""grain pipeline on stage-1 data: determinism, epochs, sharding, resume, bad samples, workers."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from helpers.nli import triplets, write_nli_csv, write_store
from helpers.tokenizers import LLAVA_TEMPLATE, mistral_tokenizer

from unime_jax.data.config import DataSection, LoaderSection, NliSection, TextSection
from unime_jax.data.errors import DataError
from unime_jax.data.nli import NliSource
from unime_jax.data.packing import PackSpec, pack_batch, pack_classes, packed_lengths
from unime_jax.data.pipeline import DataPipeline, stage1_pipeline

ROWS = 40
BATCH = 4
EMPTY = (5, 17)  # rows whose hard_neg is empty: bad samples


@pytest.fixture(scope="module")
def tokenizer():
    return mistral_tokenizer()


def make_data(directory: Path, rows: list[list[str]]) -> tuple[Path, Path, np.ndarray]:
    csv_path = write_nli_csv(directory / "nli.csv", rows)
    store = write_store(directory / "store", NliSource(csv_path))
    return csv_path, directory / "store", store


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    return make_data(tmp_path_factory.mktemp("clean"), triplets(ROWS))


@pytest.fixture(scope="module")
def with_bad(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    rows = triplets(ROWS)
    for row in EMPTY:
        rows[row][2] = "  "
    rows[9][0] = "A very long premise about a man who plays the guitar on a stage. " * 6  # truncated
    return make_data(tmp_path_factory.mktemp("bad"), rows)


def pipeline(
    data, tokenizer, seed: int = 0, index: int = 0, count: int = 1, pack: PackSpec | None = None, **loader
) -> DataPipeline:
    csv_path, store, _ = data
    section = DataSection(
        loader=LoaderSection(**{"batch_size": BATCH, "read_threads": 0, **loader}),
        text=TextSection(LLAVA_TEMPLATE, 32),
        nli=NliSection(str(csv_path), str(store), teacher_dim=8),
    )
    return stage1_pipeline(section, tokenizer, seed=seed, process_index=index, process_count=count, pack=pack)


def take(pipe: DataPipeline, n: int) -> list[dict[str, np.ndarray]]:
    it = iter(pipe)
    return [next(it) for _ in range(n)]


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def rows_of(batch: dict[str, np.ndarray], store: np.ndarray) -> list[int]:
    """Which CSV rows a batch holds, found through their (unique) teacher anchor embeddings."""
    anchors = store[:, 0].astype(np.float32)
    return [int(np.flatnonzero((anchors == t).all(axis=1))[0]) for t in batch["teacher_anchor"]]


def test_batch_contract(clean, tokenizer) -> None:
    batch = take(pipeline(clean, tokenizer), 1)[0]
    token_keys = [
        f"{r}_{k}" for r in ("anchor", "positive", "negative") for k in ("input_ids", "attention_mask")
    ]
    assert sorted(batch) == sorted([*token_keys, "teacher_anchor", "teacher_positive", "teacher_negative"])
    for key in token_keys:
        assert batch[key].shape == (BATCH, 32) and batch[key].dtype == np.int32
    for role in ("anchor", "positive", "negative"):
        assert batch[f"teacher_{role}"].shape == (BATCH, 8) and batch[f"teacher_{role}"].dtype == np.float32
        mask = batch[f"{role}_attention_mask"]
        assert (np.diff(mask, axis=1) <= 0).all()  # right padding


def test_batch_k_is_a_pure_function_of_seed_and_k(clean, tokenizer) -> None:
    pipe = pipeline(clean, tokenizer, seed=3)
    iterated = take(pipe, 14)  # crosses into the second epoch (10 batches per epoch)
    assert pipe.batches_per_epoch == ROWS // BATCH
    assert_same(take(pipeline(clean, tokenizer, seed=3), 14), iterated)
    fresh = pipeline(clean, tokenizer, seed=3)
    assert_same([fresh.batch_at(k) for k in (13, 0, 7)], [iterated[k] for k in (13, 0, 7)])
    other = take(pipeline(clean, tokenizer, seed=4), 1)[0]
    assert not np.array_equal(other["teacher_anchor"], iterated[0]["teacher_anchor"])


def test_each_epoch_is_a_new_permutation(clean, tokenizer) -> None:
    _, _, store = clean
    batches = take(pipeline(clean, tokenizer, num_epochs=2), 20)
    epochs = [[r for b in batches[e * 10 : (e + 1) * 10] for r in rows_of(b, store)] for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(ROWS))
    assert epochs[0] != epochs[1]
    with pytest.raises(StopIteration):
        it = iter(pipeline(clean, tokenizer, num_epochs=1))
        for _ in range(11):
            next(it)


def test_two_processes_get_disjoint_shards_covering_the_data(clean, tokenizer) -> None:
    _, _, store = clean
    shards = [
        [r for b in take(pipeline(clean, tokenizer, index=p, count=2), 5) for r in rows_of(b, store)]
        for p in range(2)
    ]
    assert len(shards[0]) == len(shards[1]) == ROWS // 2
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == list(range(ROWS))


def test_uneven_split_gives_every_process_the_same_number_of_batches(clean, tokenizer) -> None:
    # 40 rows over 3 processes of batch 4: 3 batches each, 4 rows left out per epoch (a new 4 each epoch).
    _, _, store = clean
    pipes = [pipeline(clean, tokenizer, index=p, count=3) for p in range(3)]
    assert [p.batches_per_epoch for p in pipes] == [3, 3, 3]
    seen = [r for p in pipes for b in take(p, 3) for r in rows_of(b, store)]
    assert len(seen) == len(set(seen)) == 36


def test_resume_through_orbax_equals_uninterrupted(with_bad, tokenizer, tmp_path: Path) -> None:
    uninterrupted = iter(pipeline(with_bad, tokenizer, seed=7))
    expected = [next(uninterrupted) for _ in range(14)]

    it = iter(pipeline(with_bad, tokenizer, seed=7))
    for _ in range(5):  # mid-epoch
        next(it)
    manager = ocp.CheckpointManager(tmp_path / "ckpt")
    manager.save(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    manager.wait_until_finished()
    next(it)  # the interrupted run went on a little before dying

    restored = iter(pipeline(with_bad, tokenizer, seed=7))
    manager.restore(5, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
    assert_same([next(restored) for _ in range(9)], expected[5:])
    assert restored.total_counts() == uninterrupted.total_counts()
    assert restored.epoch_counts(0) == uninterrupted.epoch_counts(0)
    manager.close()


def test_bad_samples_are_replaced_counted_and_logged(with_bad, tokenizer, caplog) -> None:
    pipe = pipeline(with_bad, tokenizer, num_epochs=1)
    with caplog.at_level(logging.WARNING, logger="unime_jax.data"):
        batches = take(pipe, pipe.batches_per_epoch)
    assert all(b["anchor_input_ids"].shape == (BATCH, 32) for b in batches)
    it = iter(pipe)
    for _ in range(pipe.batches_per_epoch):
        next(it)
    counts = it.epoch_counts(0)
    assert counts.samples == ROWS and counts.skipped == {"empty_text": 2} and counts.truncated == 1
    assert it.total_counts().metrics()["data/skipped/empty_text"] == 2
    for row in EMPTY:
        assert f"nli.csv row {row} column hard_neg" in caplog.text
    _, _, store = with_bad
    rows = Counter(r for b in batches for r in rows_of(b, store))
    assert not set(EMPTY) & rows.keys()  # skipped rows never reach a batch ...
    assert sum(rows.values()) == ROWS and len(rows) == ROWS - 2  # ... two others stand in for them


def test_too_many_bad_samples_stop_the_run_with_a_summary(tokenizer, tmp_path: Path) -> None:
    rows = triplets(ROWS)
    for row in range(0, ROWS, 3):
        rows[row][1] = ""
    data = make_data(tmp_path, rows)
    it = iter(pipeline(data, tokenizer, max_bad_fraction=0.1, min_samples_before_stop=8))
    with pytest.raises(
        DataError,
        match=r"samples \(\d+\.\d%\) were bad and skipped, over data\.loader\.max_bad_fraction=0\.1",
    ) as err:
        for _ in range(10):
            next(it)
    assert "nli.csv row" in str(err.value) and "column sent1" in str(err.value)


def test_all_replacements_bad_stops(tokenizer, tmp_path: Path) -> None:
    rows = [[a, b, ""] for a, b, _ in triplets(8)]
    data = make_data(tmp_path, rows)
    with pytest.raises(DataError, match="and so were 3 random replacements"):
        take(pipeline(data, tokenizer, max_replacement_draws=3), 1)


def test_bucketing_cuts_to_the_smallest_fitting_length(with_bad, tokenizer) -> None:
    full = take(pipeline(with_bad, tokenizer), 10)
    cut = take(pipeline(with_bad, tokenizer, bucket_lengths=(24, 28, 32)), 10)
    for a, b in zip(full, cut, strict=True):
        for role in ("anchor", "positive", "negative"):
            longest = a[f"{role}_attention_mask"].sum(axis=1).max()
            length = b[f"{role}_input_ids"].shape[1]
            assert length == min(x for x in (24, 28, 32) if x >= longest)
            np.testing.assert_array_equal(b[f"{role}_input_ids"], a[f"{role}_input_ids"][:, :length])
    assert {b["anchor_input_ids"].shape[1] for b in cut} == {28, 32}


def test_too_small_for_one_batch_per_process(clean, tokenizer) -> None:
    with pytest.raises(DataError, match="cannot fill one batch of 4 on each of 16"):
        pipeline(clean, tokenizer, count=16)


def test_two_workers_give_the_same_batches_as_none(with_bad, tokenizer) -> None:
    expected = take(pipeline(with_bad, tokenizer, seed=5), 6)
    it = iter(pipeline(with_bad, tokenizer, seed=5, num_workers=2))
    try:
        assert_same([{k: np.array(v) for k, v in next(it).items()} for _ in range(6)], expected)
        assert it.total_counts().samples == 6 * BATCH
    finally:
        it.close()


def test_packed_batches_from_workers_are_the_padded_batches_regrouped(with_bad, tokenizer) -> None:
    spec = PackSpec(pack_classes(packed_lengths(32), (), chunk_tokens=64, max_rows=4), shards=2)
    padded = take(pipeline(with_bad, tokenizer, seed=5), 4)
    it = iter(pipeline(with_bad, tokenizer, seed=5, num_workers=2, pack=spec))
    try:
        packed = [{k: np.array(v) for k, v in next(it).items()} for _ in range(4)]
    finally:
        it.close()
    assert_same(packed, [pack_batch(batch, spec) for batch in padded])
    assert packed[0]["packed_tokens"].shape == (2, 3 * BATCH // 2 * 32)
    assert int(packed[0]["packed_row_len"].sum()) == sum(
        int(padded[0][f"{r}_attention_mask"].sum()) for r in ("anchor", "positive", "negative")
    )


def test_host_memory_is_accounted_and_an_excess_is_refused(clean, tokenizer) -> None:
    from unime_jax.data.host_memory import check_host_memory

    pipe = pipeline(clean, tokenizer, num_workers=3, worker_buffer_size=2, prefetch_batches=1)
    uncut = sum(v.nbytes for v in pipe.batch_at(0).values())
    cut = pipeline(clean, tokenizer, bucket_lengths=tuple(range(4, 33, 4))).batch_at(0)
    assert sum(v.nbytes for v in cut.values()) < uncut  # buckets cut; the account takes the uncut size
    in_flight = 3 * (2 + 1 + 1) + 2  # workers x (buffered + prefetched + building) + the loop's two
    need = in_flight * uncut
    line = check_host_memory(pipe.loader, uncut, available=need)
    assert f"{in_flight} in flight (3 workers x (2 buffered + 1 prefetched + 1 in progress)" in line
    assert f"x {uncut / 1e9:.2f} GB per batch = {need / 1e9:.1f} GB" in line
    with pytest.raises(DataError, match=r"only 0\.0 GB are available; lower data\.loader\.num_workers"):
        check_host_memory(pipe.loader, uncut, available=need - 1)
    line = pipe.check_host_memory()  # this machine has room for a tiny batch
    assert f"x {uncut / 1e9:.2f} GB per batch" in line and "GB available" in line
