"""Artefacts that appear whole or not at all (unime_jax.atomic): never over another writer's files."""

from __future__ import annotations

import pytest

from unime_jax.atomic import atomic_directory, write_text


def test_a_directory_filled_meanwhile_is_kept_and_the_new_copy_dropped(tmp_path):
    out = tmp_path / "export"
    filled_meanwhile = pytest.raises(FileExistsError, match=f"{out} was filled by another process while")
    with filled_meanwhile, atomic_directory(out) as partial:
        (partial / "mine.txt").write_text("mine")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")  # another run finished first
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no partial left behind


def test_replacing_leaves_only_the_new_directory(tmp_path):
    out = tmp_path / "export"
    for text in ("first", "second"):
        with atomic_directory(out, replace=True) as partial:
            (partial / "model.txt").write_text(text)
    assert (out / "model.txt").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # the old copy is gone, under any name


def test_write_text_replaces_a_file_whole(tmp_path):
    path = tmp_path / "run" / "config.yaml"
    write_text(path, "a: 1\n")
    write_text(path, "a: 2\n")
    assert path.read_text() == "a: 2\n"
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]
