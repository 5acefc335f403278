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

A forced change to a finished stage does nothing to it (it is not retrained, its record stays);
a forced change to an unfinished stage applies from its checkpoint on and is appended to
``<stage>/config_changes.log``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jax
import yaml

from unime_jax.config import ConfigError
from unime_jax.model_io import MODEL_FILE
from unime_jax.training.checkpoints import saved_config

__all__ = [
    "MERGED_DIR",
    "RECORD_FILE",
    "ConfigChangedError",
    "StageRecord",
    "check_unchanged",
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


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping) and tree:
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: list(tree) if isinstance(tree, tuple) else tree}


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
    old, new = _flat(saved), _flat(now)
    # A key on one side only is a field added or removed by a newer version of this code: not a change.
    keys = [k for k in sorted(old) if k in new and old[k] != new[k]]
    return {k: (old[k], new[k]) for k in keys if _read_by(k, stage)}


def _show(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_unchanged(
    config: Mapping[str, Any],
    stages: Iterable[StageRecord],
    allowed: Iterable[str] = (),
    report: Callable[[str], None] = print,
) -> None:
    """Refuse ``config`` when it changes what a recorded stage trained (see the module docstring).

    Args:
      config: the resolved run config, as ``to_dict`` gives it.
      stages: the run's stages; those without a record yet are skipped.
      allowed: keys (or key prefixes) whose change the user forces with ``--allow-change``.
    Raises ConfigChangedError naming every refused key, its recorded and its new value.
    """
    allowed = tuple(allowed)
    refused: list[str] = []
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
            _log_forced(stage, step, forced, report)
    if refused:
        raise ConfigChangedError(
            "this workdir was trained with other settings; refusing to change them:\n  "
            + "\n  ".join(refused)
            + f"\nUse a new workdir, set these keys back, or force each with {ALLOW_FLAG} KEY "
            "(a finished stage is never retrained)"
        )


def _log_forced(
    stage: StageRecord, step: int | None, forced: dict[str, tuple[Any, Any]], report: Callable[[str], None]
) -> None:
    when = datetime.now(UTC).isoformat(timespec="seconds")
    lines = [
        f"{when} from step {step}: {k}: {_show(old)} -> {_show(new)} ({ALLOW_FLAG})"
        for k, (old, new) in forced.items()
    ]
    if jax.process_index() == 0:
        with open(stage.directory / CHANGES_FILE, "a", encoding="utf-8") as log:
            log.write("".join(f"{line}\n" for line in lines))
    for line in lines:
        report(f"{stage.directory.name}: {line.split(' ', 1)[1]}")


def write_record(directory: Path, config: Mapping[str, Any]) -> None:
    """Write a finished stage's record, once: an existing one is never rewritten."""
    record = Path(directory) / RECORD_FILE
    if record.exists():
        return
    partial = record.with_name(f".{RECORD_FILE}.partial")
    partial.write_text(
        yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=False), encoding="utf-8"
    )
    partial.replace(record)
