"""One evaluation run: its output directory, its settings and how it embeds.

An output directory holds the results of one model with one set of settings: ``run.json`` records
them, and a rerun into the directory with other ones is refused, naming the first differing key. The
model counts by its contents (``model_fingerprint``), not its path: a copy of it continues the run.
Each dataset's ``<name>_score.json`` is written last, so its presence means "done": a rerun skips
the dataset, as VLM2Vec's ``eval.py`` does. While a dataset runs, its embeddings are cached in
``cache/<name>/`` (:class:`~unime_jax.eval.store.EmbeddingStore`), so a killed run resumes.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from unime_jax.eval.encoding import Entry, agree, encode_entries
from unime_jax.eval.store import EmbeddingStore, StoreMismatch, atomic_write_text, first_difference

__all__ = ["RUN_FILE", "SCORE_SUFFIX", "EvalRun"]

RUN_FILE = "run.json"
SCORE_SUFFIX = "_score.json"


@dataclass(frozen=True)
class EvalRun:
    out: Path
    settings: dict[str, Any]  # the model and what changes its embeddings; in run.json and every cache
    batch_size: int = 32
    chunk_size: int = 1024  # items per cached chunk
    keep_embeddings: bool = False  # keep cache/<name>/ once the dataset is scored
    progress: bool = True
    # In run.json for the reader but never compared, e.g. the model's path: a copy elsewhere, or each
    # host's own copy, is the same model (settings' model_fingerprint says which one it is).
    notes: Mapping[str, Any] = field(default_factory=dict)

    def start(self) -> None:
        """Create ``out``; refuse it if it holds results of other settings; record these."""
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / RUN_FILE
        if path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as e:
                raise StoreMismatch(f"{path} is unreadable ({e}); delete it or use a new --out") from e
            stored = {k: v for k, v in stored.items() if k not in self.notes}
            if difference := first_difference(stored, self.settings):
                if difference.startswith("model_fingerprint "):  # two hashes would tell the reader nothing
                    difference = (
                        "the model's files differ from those of the model these results were computed "
                        "with (or the results predate content fingerprints)"
                    )
                raise StoreMismatch(
                    f"{path}: {difference}; this directory holds results of another setup: use a new "
                    f"--out, or delete {self.out}'s results to recompute them"
                )
        if jax.process_index() == 0:
            atomic_write_text(path, json.dumps({**self.settings, **self.notes}, indent=1) + "\n")

    def score_path(self, name: str) -> Path:
        return self.out / f"{name}{SCORE_SUFFIX}"

    def earlier_score(self, name: str) -> tuple[bool, dict[str, Any] | None]:
        """(whether ``name`` was scored earlier, its score on process 0); every process agrees."""
        path = self.score_path(name)
        if not agree(path.is_file()):
            return False, None
        if jax.process_index() != 0:
            return True, None
        print(f"{name}: scored earlier ({path}), skipping", file=sys.stderr)
        return True, json.loads(path.read_text(encoding="utf-8"))

    def embed(
        self, model: Any, name: str, entries: Sequence[Entry], identity: dict[str, Any], *, raw: bool
    ) -> tuple[np.ndarray, list[str]]:
        """Embeddings of ``entries`` through the cache ``cache/<name>/`` (``identity``: what they are)."""
        store = EmbeddingStore(
            self.out / "cache" / name, {**self.settings, **identity}, len(entries), self.chunk_size
        )
        return encode_entries(
            model, entries, store, raw=raw, batch_size=self.batch_size, desc=name, progress=self.progress
        )

    def finish(self, name: str, score: dict[str, Any], caches: Sequence[str] = ()) -> None:
        """Write the score (the dataset is done), then drop its caches unless they are to be kept."""
        atomic_write_text(self.score_path(name), json.dumps(score, indent=4) + "\n")
        if not self.keep_embeddings:
            for cache in caches or [name]:
                shutil.rmtree(self.out / "cache" / cache, ignore_errors=True)
