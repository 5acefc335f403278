"""NLI CSV reading and the teacher-embedding store: format errors and manifest checks."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
from helpers.nli import triplets, write_nli_csv, write_store

from unime_jax.data import teacher_store
from unime_jax.data.errors import DataError
from unime_jax.data.nli import NliSource, read_nli_csv


def test_reads_rows_and_checksum(tmp_path: Path) -> None:
    path = write_nli_csv(tmp_path / "nli.csv", [*triplets(3), ['with "quotes", commas', "line\nbreak", ""]])
    table = read_nli_csv(path)
    assert len(table.rows) == 4
    assert table.rows[3] == ('with "quotes", commas', "line\nbreak", "")
    assert len(table.sha256) == 64


def test_columns_in_any_order(tmp_path: Path) -> None:
    path = write_nli_csv(tmp_path / "nli.csv", [["n", "a", "p"]], header=("hard_neg", "sent0", "sent1"))
    assert read_nli_csv(path).rows == [("a", "p", "n")]


def test_missing_column_names_file_and_column(tmp_path: Path) -> None:
    path = write_nli_csv(tmp_path / "nli.csv", [["a", "b"]], header=("sent0", "sent1"))
    with pytest.raises(DataError, match=r"nli\.csv: line 1 \(header\) lacks column\(s\) hard_neg"):
        read_nli_csv(path)


def test_short_row_names_line_row_and_column(tmp_path: Path) -> None:
    path = tmp_path / "nli.csv"
    write_nli_csv(path, triplets(2))
    with open(path, "a", encoding="utf-8") as f:
        f.write("only,two\n")
    with pytest.raises(
        DataError, match=r"nli\.csv: line 4 \(row 2\): 2 field\(s\), expected 3; column\(s\) hard_neg missing"
    ):
        read_nli_csv(path)


def test_long_row_is_an_error(tmp_path: Path) -> None:
    path = write_nli_csv(tmp_path / "nli.csv", [["a", "b", "c", "d"]])
    with pytest.raises(DataError, match=r"line 2 \(row 0\): 4 fields, expected 3"):
        read_nli_csv(path)


def test_teacher_store_joins_rows(tmp_path: Path) -> None:
    path = write_nli_csv(tmp_path / "nli.csv", triplets(5))
    expected = write_store(tmp_path / "store", NliSource(path))
    source = NliSource(path, tmp_path / "store", {"dim": 8, "teacher": "fake-teacher"})
    record = source[3]
    assert record.texts == tuple(triplets(5)[3])
    np.testing.assert_array_equal(record.teacher, expected[3])
    # Workers get paths, not data, and reload on first access.
    clone = pickle.loads(pickle.dumps(source))
    assert len(pickle.dumps(source)) < 2000
    np.testing.assert_array_equal(clone[3].teacher, expected[3])


@pytest.mark.parametrize(
    ("change", "field", "expect"),
    [
        ({"data_sha256": "0" * 64}, "data_sha256", {}),
        ({"dim": 8}, "dim", {"dim": 4096}),
        ({"rows": 4}, "rows", {}),
        ({"teacher": "other"}, "teacher", {"teacher": "NV-Embed-v2"}),
    ],
)
def test_store_mismatch_names_field(
    tmp_path: Path, change: dict[str, object], field: str, expect: dict[str, object]
) -> None:
    path = write_nli_csv(tmp_path / "nli.csv", triplets(5))
    write_store(tmp_path / "store", NliSource(path), **change)
    with pytest.raises(
        DataError, match=rf"does not match .*nli\.csv:\n  {field}: expected .*, found "
    ) as err:
        NliSource(path, tmp_path / "store", expect)
    assert "python -m unime_jax.teacher" in str(err.value)


def test_store_of_edited_csv_is_refused(tmp_path: Path) -> None:
    path = write_nli_csv(tmp_path / "nli.csv", triplets(5))
    write_store(tmp_path / "store", NliSource(path))
    write_nli_csv(path, [*triplets(4), ["edited", "row", "here"]])
    with pytest.raises(DataError, match="data_sha256: expected"):
        NliSource(path, tmp_path / "store")


def test_incomplete_store_is_refused(tmp_path: Path) -> None:
    path = write_nli_csv(tmp_path / "nli.csv", triplets(5))
    write_store(tmp_path / "store", NliSource(path))
    manifest = teacher_store.read_manifest(tmp_path / "store")
    teacher_store.write_manifest(tmp_path / "store", dataclasses.replace(manifest, rows_done=2))
    with pytest.raises(DataError, match=r"incomplete \(2 of 5 rows\)"):
        NliSource(path, tmp_path / "store")


def test_missing_store_says_how_to_make_it(tmp_path: Path) -> None:
    path = write_nli_csv(tmp_path / "nli.csv", triplets(2))
    with pytest.raises(DataError, match=r"python -m unime_jax\.teacher"):
        NliSource(path, tmp_path / "nowhere")
