"""What each stage was trained with, and refusing a rerun that would quietly change it.

A stage's settings are on record in its directory: ``<stage>/config.yaml``, written once when the
stage finishes and never rewritten, or, before that, the run config saved in its latest
checkpoint. A rerun of the same workdir compares its resolved config with each record, before
any model is loaded:

- a change to what was trained (model, data, loss, adapters, optimizer and schedule, steps, seed)
  is refused, naming each key and the flag that forces it (``--allow-change KEY``);
- harmless changes pass: logging and checkpoint intervals, workers and prefetching, the mesh,
  attention kernel and remat policy, export choices, the bad-sample policy;
- settings a stage never read pass too: another stage's section, the other stage's data.

Keys are compared down to their leaves; a section null on one side and set on the other is one
change at the section's key. A key that one side lacks is compared with the current schema's
default: a field a newer version of this code added, left at its default, is no change; one it
removed is none either. Inside a free-form mapping (``model.init``) a key on one side only is a
change.

A forced change to a finished stage does nothing to it (it is not retrained, its record stays);
a forced change to an unfinished stage applies from its checkpoint on and, once the run has
passed its checks (:func:`log_forced`), is appended to ``<stage>/config_changes.log`` (once: a
rerun forcing the same change from the same checkpoint adds no line).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax
import yaml

from unime_jax.atomic import write_text
from unime_jax.config import ConfigError, to_dict
from unime_jax.model_io import MODEL_FILE
from unime_jax.runs.schema import Config
from unime_jax.training.checkpoints import saved_config

__all__ = [
    "MERGED_DIR",
    "RECORD_FILE",
    "ConfigChangedError",
    "ForcedChanges",
    "StageRecord",
    "check_unchanged",
    "log_forced",
    "write_record",
]

MERGED_DIR = "merged"  # a finished stage's model: its LoRA merged into the backbone
RECORD_FILE = "config.yaml"
CHANGES_FILE = "config_changes.log"
ALLOW_FLAG = "--allow-change"

# Keys (or key prefixes) whose change leaves the trained weights as they would have been.
_HARMLESS = (
    "workdir",
    "stages",
    "export",
    "metrics",
    "distributed",
    "mesh",
    "model.attention",
    "model.remat",
    "data.loader.batch_size",  # each stage's batch_size replaces it
    "data.loader.num_workers",
    "data.loader.worker_buffer_size",
    "data.loader.read_threads",
    "data.loader.prefetch_batches",
    "data.loader.max_bad_fraction",
    "data.loader.min_samples_before_stop",
    "demo.ablation",
    "demo.eval_scenes",
    "demo.teacher_batch_size",
)
_HARMLESS_IN_STAGE = ("save_every", "keep_checkpoints", "log_every", "peak_tflops", "max_nonfinite", "profile")
_STAGE_SECTIONS = ("stage1", "stage2", "demo.pretrain")
_UNREAD_DATA = {"stage1": ("data.mmeb",), "stage2": ("data.nli", "data.text.template")}


class ConfigChangedError(ConfigError):
    """A rerun asks for settings other than those a stage was (or is being) trained with."""


@dataclass(frozen=True)
class StageRecord:
    """One trained stage of a run: where it lives, which task it is, and its config section."""

    directory: Path
    task: str  # "stage1" or "stage2": what data it reads
    section: str  # dotted key of its section: "stage1", "stage2" or "demo.pretrain"

    @property
    def finished(self) -> bool:
        return (self.directory / MERGED_DIR / MODEL_FILE).is_file()

    def saved(self) -> tuple[dict[str, Any], str, int | None] | None:
        """(config, where it was read, checkpoint step or None) of the record; None before any."""
        record = self.directory / RECORD_FILE
        if record.is_file():
            return yaml.safe_load(record.read_text(encoding="utf-8")), str(record), None
        found = saved_config(self.directory / "checkpoints")
        if found is None:
            return None
        step, config = found
        return config, f"its checkpoint {self.directory / 'checkpoints' / str(step)}", step


_ABSENT = object()  # the side of a key that does not have it, where no default stands in
_REMOVED = object()  # a key the current schema has no field for: one a newer version removed


def _dataclass_in(kind: Any) -> type | None:
    """The dataclass a field's type holds (``X`` of ``X | None``); None for any other type."""
    union = typing.get_origin(kind) in (typing.Union, types.UnionType)
    options = typing.get_args(kind) if union else (kind,)
    return next((t for t in options if isinstance(t, type) and dataclasses.is_dataclass(t)), None)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_dict(value)
    return list(value) if isinstance(value, tuple) else value


def _schema_default(keys: Sequence[str]) -> Any:
    """The current schema's default for a dotted key, as ``to_dict`` writes it; _ABSENT inside a
    free-form mapping (any key there is data) or for a field without a default; _REMOVED when the
    schema has no such field."""
    kind: Any = Config
    for depth, key in enumerate(keys):
        section = _dataclass_in(kind)
        if section is None:
            return _ABSENT
        field = next((f for f in dataclasses.fields(section) if f.name == key), None)
        if field is None:
            return _REMOVED
        if depth == len(keys) - 1:
            if field.default_factory is not dataclasses.MISSING:
                return _plain(field.default_factory())
            return _ABSENT if field.default is dataclasses.MISSING else _plain(field.default)
        kind = typing.get_type_hints(section)[key]
    return _ABSENT


def _differences(old: Any, new: Any, keys: tuple[str, ...] = ()) -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, old, new) of every leaf that differs (see the module docstring)."""
    if not (isinstance(old, Mapping) and isinstance(new, Mapping)):
        if _plain(old) != _plain(new):
            yield ".".join(keys), old, new
        return
    for key in sorted(set(old) | set(new), key=str):
        path = (*keys, str(key))
        default = _ABSENT if key in old and key in new else _schema_default(path)
        if default is not _REMOVED:
            yield from _differences(old.get(key, default), new.get(key, default), path)


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(f"{p}.") for p in prefixes)


def _read_by(key: str, stage: StageRecord) -> bool:
    """Whether the key can change what ``stage`` trained."""
    if _under(key, _HARMLESS) or _under(key, _UNREAD_DATA[stage.task]):
        return False
    section = next((s for s in _STAGE_SECTIONS if _under(key, [s])), None)
    if section is None:
        return True
    return section == stage.section and not _under(key, [f"{section}.{name}" for name in _HARMLESS_IN_STAGE])


def _changes(
    saved: Mapping[str, Any], now: Mapping[str, Any], stage: StageRecord
) -> dict[str, tuple[Any, Any]]:
    return {key: (old, new) for key, old, new in _differences(saved, now) if _read_by(key, stage)}


def _show(value: Any) -> str:
    if value is _ABSENT:
        return "(not set)"
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class ForcedChanges:
    """The changes ``--allow-change`` forces on an unfinished stage, from its checkpoint ``step`` on."""

    stage: StageRecord
    step: int | None
    changes: dict[str, tuple[Any, Any]]

    def lines(self) -> list[str]:
        return [
            f"from step {self.step}: {k}: {_show(old)} -> {_show(new)} ({ALLOW_FLAG})"
            for k, (old, new) in self.changes.items()
        ]


def check_unchanged(
    config: Mapping[str, Any],
    stages: Iterable[StageRecord],
    allowed: Iterable[str] = (),
    report: Callable[[str], None] = print,
) -> list[ForcedChanges]:
    """Refuse ``config`` when it changes what a recorded stage trained (see the module docstring).

    Args:
      config: the resolved run config, as ``to_dict`` gives it.
      stages: the run's stages; those without a record yet are skipped.
      allowed: keys (or key prefixes) whose change the user forces with ``--allow-change``.
    Returns the forced changes to unfinished stages, for :func:`log_forced` once the run starts.
    Raises ConfigChangedError naming every refused key, its recorded and its new value.
    """
    allowed = tuple(allowed)
    refused: list[str] = []
    forced_changes: list[ForcedChanges] = []
    for stage in stages:
        saved = stage.saved()
        if saved is None:
            continue
        record, where, step = saved
        changes = _changes(record, config, stage)
        forced = {k: v for k, v in changes.items() if _under(k, allowed)}
        refused += [
            f"{key}: {_show(old)} in {where}, now {_show(new)}"
            for key, (old, new) in changes.items()
            if key not in forced
        ]
        if forced and stage.finished:
            report(
                f"{stage.directory.name} is finished and keeps its record; {', '.join(forced)} apply to later stages only"
            )
        elif forced:
            forced_changes.append(ForcedChanges(stage, step, forced))
    if refused:
        raise ConfigChangedError(
            "this workdir was trained with other settings; refusing to change them:\n  "
            + "\n  ".join(refused)
            + f"\nUse a new workdir, set these keys back, or force each with {ALLOW_FLAG} KEY "
            "(a finished stage is never retrained)"
        )
    return forced_changes


def log_forced(forced: Iterable[ForcedChanges], report: Callable[[str], None] = print) -> None:
    """Name each forced change and append it to its stage's ``config_changes.log``, with the time,
    unless the log already has it (a rerun forcing the same change from the same checkpoint)."""
    when = datetime.now(UTC).isoformat(timespec="seconds")
    for entry in forced:
        log = entry.stage.directory / CHANGES_FILE
        logged = log.read_text(encoding="utf-8") if log.is_file() else ""
        new = [line for line in entry.lines() if f" {line}\n" not in logged]
        if new and jax.process_index() == 0:
            with open(log, "a", encoding="utf-8") as out:
                out.write("".join(f"{when} {line}\n" for line in new))
        for line in entry.lines():
            report(f"{entry.stage.directory.name}: {line}")


def write_record(directory: Path, config: Mapping[str, Any]) -> None:
    """Write a finished stage's record, once: an existing one is never rewritten."""
    record = Path(directory) / RECORD_FILE
    if record.exists():
        return
    write_text(record, yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False))
