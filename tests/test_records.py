"""A rerun compared with what each stage trained (unime_jax.runs.records): sections switched on or off,
fields a newer version added or removed, free-form mappings, and forced changes logged once."""

from __future__ import annotations

from pathlib import Path

import pytest

from unime_jax.config import from_dict, to_dict
from unime_jax.runs.records import (
    CHANGES_FILE,
    ConfigChangedError,
    StageRecord,
    check_unchanged,
    log_forced,
    write_record,
)
from unime_jax.runs.schema import Config

MMEB = {"root": "/data/mmeb"}


def _stage2(tmp_path: Path, record: dict) -> list[StageRecord]:
    (tmp_path / "stage2").mkdir(parents=True)
    write_record(tmp_path / "stage2", record)
    return [StageRecord(tmp_path / "stage2", "stage2", "stage2")]


def _config(tree: dict) -> dict:
    return to_dict(from_dict(Config, tree))


def test_a_section_switched_on_or_off_is_a_change(tmp_path):
    stages = _stage2(tmp_path, _config({"data": {"mmeb": MMEB}}))
    with pytest.raises(ConfigChangedError, match=r"data\.mmeb: \{\"root\": \"/data/mmeb\".* now null"):
        check_unchanged(_config({}), stages)
    stages = _stage2(tmp_path / "off", _config({}))
    with pytest.raises(ConfigChangedError, match=r"data\.mmeb: null in .*, now \{\"root\""):
        check_unchanged(_config({"data": {"mmeb": MMEB}}), stages)
    check_unchanged(_config({"data": {"nli": {"csv": "x.csv", "teacher_dir": "t"}}}), stages)  # stage 2 never reads data.nli


def test_fields_added_or_removed_by_a_newer_version(tmp_path):
    record = _config({"stage2": {"lora": {"rank": 4}}})
    del record["stage2"]["lora"]["variant"]  # written before the field existed
    record["stage2"]["retired_option"] = 3  # a field this version no longer has
    stages = _stage2(tmp_path, record)
    check_unchanged(_config({"stage2": {"lora": {"rank": 4}}}), stages)  # at its default: no change
    with pytest.raises(ConfigChangedError, match=r"stage2\.lora\.variant: \"lora\" in .*, now \"dora\""):
        check_unchanged(_config({"stage2": {"lora": {"rank": 4, "variant": "dora"}}}), stages)


def test_a_key_added_to_a_free_form_mapping_is_a_change(tmp_path):
    init = {"model_type": "mistral", "hidden_size": 32}
    stages = _stage2(tmp_path, _config({"model": {"init": init}}))
    with pytest.raises(ConfigChangedError, match=r"model\.init\.num_hidden_layers: \(not set\) in .*, now 2"):
        check_unchanged(_config({"model": {"init": {**init, "num_hidden_layers": 2}}}), stages)


def test_forced_changes_are_logged_once_the_run_starts_and_once_only(tmp_path):
    stages = _stage2(tmp_path, _config({"seed": 0}))  # a record, not yet merged: unfinished
    log = tmp_path / "stage2" / CHANGES_FILE
    with pytest.raises(ConfigChangedError, match=r"stage2\.steps"):  # one refused key refuses the run
        check_unchanged(_config({"seed": 1, "stage2": {"steps": 9}}), stages, allowed=["seed"])
    assert not log.exists()
    forced = check_unchanged(_config({"seed": 1}), stages, allowed=["seed"])
    assert not log.exists()  # nothing is logged before the run passes its checks
    reported: list[str] = []
    for _ in range(2):  # a rerun forcing the same change from the same record
        log_forced(forced, reported.append)
    lines = log.read_text().splitlines()
    assert len(lines) == 1 and lines[0].endswith(" from step None: seed: 0 -> 1 (--allow-change)")
    assert reported == ["stage2: from step None: seed: 0 -> 1 (--allow-change)"] * 2
