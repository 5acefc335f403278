"""Which restore failures skip a checkpoint (unime_jax.training.checkpoints): a file that does not read
or decode is skipped and set aside; any other error stops the run and moves nothing.

tests/test_faults.py runs the fallback through whole training runs; these are its edges, on a tiny state.
"""

from __future__ import annotations

from pathlib import Path

import grain
import jax.numpy as jnp
import pytest

from unime_jax.data.accounting import DataIterator, SkipPolicy
from unime_jax.training.checkpoints import Checkpoints

STATE = {"w": jnp.arange(8.0)}


def _iterator() -> grain.DatasetIterator:
    return iter(grain.MapDataset.range(8).to_iter_dataset())


def _two_steps(directory: Path) -> None:
    """Steps 1 and 2 of a plain grain iterator's run."""
    iterator = _iterator()
    checkpoints = Checkpoints(directory, {"model": "tiny"}, {}, async_save=False)
    for step in (1, 2):
        next(iterator)
        checkpoints.save(step, STATE, iterator)
    checkpoints.close()


def _steps(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_a_truncated_iterator_state_is_skipped_and_set_aside(tmp_path):
    directory = tmp_path / "checkpoints"
    _two_steps(directory)
    (state_file,) = (directory / "2" / "data").glob("process_*.json")
    state_file.write_text(state_file.read_text()[:10])
    lines: list[str] = []
    iterator = _iterator()
    checkpoints = Checkpoints(directory, {"model": "tiny"}, {}, async_save=False)
    _, step = checkpoints.restore_latest(STATE, iterator, report=lines.append)
    checkpoints.close()
    assert step == 1 and next(iterator) == 1  # the iterator continues after step 1's element
    assert lines[0].startswith(f"skipping checkpoint {directory / '2'}: {directory / '2' / 'data'}: JSONDecodeError")
    assert _steps(directory) == ["1"] and _steps(tmp_path / "checkpoints.skipped") == ["2"]


def test_a_state_that_reads_but_does_not_fit_stops_the_run_and_moves_nothing(tmp_path):
    """The data pipeline changed (a counting DataIterator over a plain grain iterator's state): not
    a damaged file, so no checkpoint is skipped or set aside."""
    directory = tmp_path / "checkpoints"
    _two_steps(directory)
    counting = DataIterator(_iterator(), batches_per_epoch=4, policy=SkipPolicy(0.1, 10))
    checkpoints = Checkpoints(directory, {"model": "tiny"}, {}, async_save=False)
    with pytest.raises(KeyError, match="parent"):
        checkpoints.restore_latest(STATE, counting, report=print)
    checkpoints.close()
    assert _steps(directory) == ["1", "2"] and not (tmp_path / "checkpoints.skipped").exists()
