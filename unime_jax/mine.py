"""Mine hard negatives for stage 2 offline: rank every MMEB-train record's candidate targets with a model.

    python -m unime_jax.mine --model runs/phi35v_stage1/stage1/merged --data configs/phi35v_stage2.yaml \\
        --out data/mined/phi35v

Every record's query and positive target are embedded exactly as stage 2 feeds them (the raw MMEB
instructions, the same image loading and bad-sample rules); the similarities are ranked in blocks and
the table described in :mod:`unime_jax.data.negatives` is written. See `--help` for the details.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from unime_jax.cli_args import model_cli_parser
from unime_jax.cli_errors import run, usage_errors
from unime_jax.config import ConfigError, load_config
from unime_jax.data.errors import BadSample, DataError
from unime_jax.data.examples import Side, mmeb_pair, mmeb_where
from unime_jax.data.negatives import MANIFEST_FILE, UNMINED, MinedManifest, table_sha256, write_mined
from unime_jax.data.pipeline import mmeb_source
from unime_jax.embedder import InputError, UniME
from unime_jax.progress import progress_bar
from unime_jax.runs.schema import Config

if TYPE_CHECKING:
    from unime_jax.data.mmeb import MmebSource

EPILOG = """\
data:
  --data is a training run config (what python -m unime_jax.train --config takes; --set overrides
  apply as there). data.mmeb selects the records (data.mmeb.image_size resizes their images as in
  training), data.text.max_len bounds the texts as in training, data.loader.max_bad_fraction bounds
  the bad records, stage2.loss.beta is the default β.

candidates:
  For record i: the targets of the same subset (--across-subsets: of any subset) that differ from
  i's own, each distinct target once, as its first record j (MMEB target ids: the same text and
  image path is the same target). With S_ij the cosine of i's query and j's target, candidates with
  S_ij > S_ii + β are dropped as probable false negatives; the --top-k most similar others are
  kept, hardest first.
  A row with fewer than K candidates repeats them cyclically, as the loss does in the batch; a row
  whose candidates were all dropped by β keeps the hardest of those instead (both are counted).

output (--out DIR; written under a temporary name and renamed once complete):
  negatives.npy  int32 (records, K) source indices, hardest first; a row of -1: record not mined
  scores.npy     float16 (records, K) cosine similarities (NaN in -1 rows)
  manifest.json  the source (split, subsets, records, checksum, image size), model, K, β, counts, bad records

bad records:
  A record whose query or target cannot be embedded (missing or unreadable image, empty text, an
  input the model cannot take) is listed with its file and row, is never a candidate, and gets a
  -1 row, which training skips and counts like any bad sample. More than
  data.loader.max_bad_fraction of them stops the run before anything is written.

exit status:
  0 on success, 1 when too many records are bad, 2 on a usage error (arguments, config, data, model).

devices:
  The model runs on all local devices (single process), batch rows split over them. Similarities
  are computed on the default device, --block-rows queries against one candidate pool (a subset, or
  everything with --across-subsets) at a time: memory O(block rows x pool), not O(records^2).

training with the table:
  stage2.negatives: {mode: mined | both, dir: DIR, k: N} with N <= K (python -m unime_jax.train --help).
"""

# Records decoded and embedded per encode call, in batches: bounds the decoded images held at once.
_CHUNK_BATCHES = 8
_SHOWN_BAD = 20  # bad records printed; the manifest lists all


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = model_cli_parser(
        "python -m unime_jax.mine",
        "Mine stage-2 hard negatives: rank every MMEB-train record's candidate targets "
        "with a UniME model and write a table that training attaches (stage2.negatives).",
        EPILOG,
        "e.g. the stage-1 model <workdir>/stage1/merged",
    )
    parser.add_argument("--data", required=True, type=Path, help="run config YAML with a data.mmeb section")
    parser.add_argument("--out", required=True, type=Path, help="directory to write the table to")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        action="append",
        default=None,
        help="override a value of the --data config by dotted key (repeatable), e.g. --set data.mmeb.root=/data",
    )
    parser.add_argument("--top-k", type=int, default=32, help="negatives kept per record, K (default: 32)")
    parser.add_argument("--beta", type=float, help="false-negative margin (default: stage2.loss.beta)")
    parser.add_argument(
        "--across-subsets",
        action="store_true",
        help="take candidates from every subset, not only the record's",
    )
    parser.add_argument("--batch-size", type=int, default=32, help="inputs per forward pass (default: 32)")
    parser.add_argument(
        "--block-rows", type=int, default=1024, help="queries per similarity block (default: 1024)"
    )
    parser.add_argument("--dtype", help="compute dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("top_k", "batch_size", "block_rows"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


@dataclass(frozen=True)
class BadRecord:
    index: int  # source index
    reason: str  # BadSample reason, or "unembeddable" when the model refuses the input
    where: str  # file, row, subset and side


@dataclass
class Embeddings:
    queries: np.ndarray  # (records, dim) float32, L2-normalised; zeros for bad records
    targets: np.ndarray
    bad: list[BadRecord]

    @property
    def good(self) -> np.ndarray:
        good = np.ones(len(self.queries), bool)
        good[[b.index for b in self.bad]] = False
        return good


def _encode_pairs(
    model: UniME, source: MmebSource, indices: list[int], pairs: list[tuple[Side, Side]], batch_size: int
) -> tuple[np.ndarray, list[BadRecord]]:
    """(len(pairs), 2, dim) embeddings of the pairs the model takes, and the records it refuses.

    Refused records are dropped from `indices` and `pairs` in place.
    """
    bad: list[BadRecord] = []
    while True:
        sides = [side for pair in pairs for side in pair]  # query, target, query, target, ...
        try:
            out = model.encode(
                texts=[text for text, _ in sides],
                images=[image for _, image in sides],
                raw=True,  # MMEB instructions as they are, like stage 2
                batch_size=batch_size,
                progress=False,
            )
            return out.reshape(len(pairs), 2, model.dim), bad
        except InputError as e:  # raised before any forward pass: drop the record and retry
            row = e.index // 2
            where = f"{mmeb_where(source[indices[row]])} {('qry', 'pos')[e.index % 2]}: {e.message}"
            bad.append(BadRecord(indices[row], "unembeddable", where))
            del indices[row], pairs[row]


def embed_records(
    model: UniME,
    source: MmebSource,
    image_root: Path,
    batch_size: int,
    progress: bool,
    image_size: int | None = None,
) -> Embeddings:
    """Every record's query and target embedding, as stage 2 would feed them (images resized to
    image_size x image_size when set, as ``data.mmeb.image_size``); bad records listed."""
    queries = np.zeros((len(source), model.dim), np.float32)
    targets = np.zeros_like(queries)
    bad: list[BadRecord] = []
    chunk = _CHUNK_BATCHES * batch_size
    with progress_bar(total=len(source), desc="embed", unit="record", disable=not progress) as bar:
        for start in range(0, len(source), chunk):
            indices, pairs = [], []
            for i in range(start, min(start + chunk, len(source))):
                try:
                    pairs.append(mmeb_pair(source[i], image_root, image_size))
                    indices.append(i)
                except BadSample as e:
                    bad.append(BadRecord(i, e.reason, e.where))
            if pairs:
                out, refused = _encode_pairs(model, source, indices, pairs, batch_size)
                queries[indices], targets[indices] = out[:, 0], out[:, 1]
                bad += refused
            bar.update(min(chunk, len(source) - start))
    return Embeddings(queries, targets, sorted(bad, key=lambda b: b.index))


@functools.partial(jax.jit, static_argnames="k")
def _rank_block(
    queries: jax.Array,
    own: jax.Array,
    pool: jax.Array,
    pool_ids: jax.Array,
    pool_open: jax.Array,
    beta: jax.Array,
    *,
    k: int,
) -> tuple[jax.Array, ...]:
    """Top-k candidates of a block of queries in a pool of targets; `own` = each row's target in the pool,
    `pool_open` = the targets that may be candidates.

    Returns (indices (B, k) into the pool, their cosines, valid, candidate and β-dropped counts (B,)).
    """
    sims = jnp.matmul(queries, pool.T, precision="highest")
    positive = jnp.take_along_axis(sims, own[:, None], axis=1)  # S_ii
    candidate = pool_open[None, :] & (pool_ids[None, :] != pool_ids[own][:, None])
    dropped = candidate & (sims > positive + beta)
    valid = candidate & ~dropped
    # Valid candidates rank first; then the β-dropped ones (cosines lie in [-1, 1], so 4 below any
    # valid one), which only a row without a valid candidate reaches.
    key = jnp.where(valid, sims, jnp.where(candidate, sims - 4.0, -jnp.inf))
    kept = min(k, pool.shape[0])
    _, top = jax.lax.top_k(key, kept)
    n_valid, n_candidates = valid.sum(axis=1), candidate.sum(axis=1)
    used = jnp.where(n_valid > 0, n_valid, n_candidates)
    # Fewer than k: cycle through them, as the loss pads a row with few valid in-batch negatives.
    slot = jnp.arange(k)[None, :] % jnp.clip(used, 1, kept)[:, None]
    index = jnp.take_along_axis(top, slot, axis=1)
    return index, jnp.take_along_axis(sims, index, axis=1), n_valid, n_candidates, dropped.sum(axis=1)


def candidate_pools(source: MmebSource, across_subsets: bool) -> list[tuple[int, int]]:
    """[start, stop) source ranges whose records are each other's candidates (subsets are contiguous)."""
    if across_subsets:
        return [(0, len(source))]
    bounds = np.cumsum([0, *source.subset_sizes.values()])
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]


def _distinct(target_ids: np.ndarray, good: np.ndarray) -> np.ndarray:
    """Mask of the first good record of every target: a label shared by many records ("Yes", a class
    name) is one negative, not K copies of it."""
    first = np.zeros(len(target_ids), bool)
    first[np.unique(np.where(good, target_ids, -1), return_index=True)[1]] = True
    return first & good


def _padded(rows: np.ndarray, count: int) -> np.ndarray:
    """`rows` padded with zeros to `count` rows: every block has one shape, one compilation per pool."""
    return np.concatenate([rows, np.zeros((count - len(rows), *rows.shape[1:]), rows.dtype)])


@dataclass
class Mined:
    negatives: np.ndarray  # (records, k) int32 source indices, hardest first; UNMINED rows
    scores: np.ndarray  # (records, k) float16 cosines; NaN in UNMINED rows
    counts: dict[str, int]


def mine(
    embeddings: Embeddings,
    target_ids: np.ndarray,
    pools: list[tuple[int, int]],
    k: int,
    beta: float,
    block_rows: int,
    progress: bool,
) -> Mined:
    """Every record's k hardest candidates (see the CLI epilog for the rules)."""
    records = len(target_ids)
    good = embeddings.good
    negatives = np.full((records, k), UNMINED, np.int32)
    scores = np.full((records, k), np.nan, np.float32)
    n_valid, n_candidates, n_dropped = (np.zeros(records, np.int64) for _ in range(3))
    with progress_bar(total=records, desc="rank", unit="record", disable=not progress) as bar:
        for start, stop in pools:
            ids, usable = target_ids[start:stop], good[start:stop]
            pool = [jax.device_put(x) for x in (embeddings.targets[start:stop], ids, _distinct(ids, usable))]
            rows = min(block_rows, stop - start)
            for first in range(start, stop, rows):
                last = min(first + rows, stop)
                block = slice(first, last)
                out = _rank_block(
                    _padded(embeddings.queries[block], rows),
                    _padded(np.arange(first, last) - start, rows),
                    *pool,
                    np.float32(beta),
                    k=k,
                )
                index, sims, valid, candidates, dropped = (np.asarray(x)[: last - first] for x in out)
                negatives[block], scores[block] = index + start, sims
                n_valid[block], n_candidates[block], n_dropped[block] = valid, candidates, dropped
                bar.update(last - first)
    mined = good & (n_candidates > 0)
    negatives[~mined], scores[~mined] = UNMINED, np.nan
    used = np.where(n_valid > 0, n_valid, n_candidates)
    counts = {
        "rows_mined": int(mined.sum()),
        "rows_padded": int((mined & (used < k)).sum()),  # fewer than k distinct negatives, cycled
        "rows_without_valid_candidate": int((mined & (n_valid == 0)).sum()),  # kept β-dropped ones
        "rows_unmined": int((~mined).sum()),  # -1 rows: bad records, or no candidate at all
        "rows_without_candidate": int((good & (n_candidates == 0)).sum()),
        "bad_records": int((~good).sum()),
        "false_negatives_filtered": int(n_dropped[good].sum()),  # (i, j) pairs dropped by β
    }
    return Mined(negatives, scores.astype(np.float16), counts)


def _report_bad(bad: list[BadRecord], records: int) -> None:
    for record in bad[:_SHOWN_BAD]:
        print(f"bad record {record.index} ({record.reason}): {record.where}", file=sys.stderr)
    if len(bad) > _SHOWN_BAD:
        print(f"... and {len(bad) - _SHOWN_BAD} more", file=sys.stderr)
    if bad:
        print(f"{len(bad)} of {records} records cannot be embedded", file=sys.stderr)


def _warn_top_k(k: int, embeddings: Embeddings, target_ids: np.ndarray, pools: list[tuple[int, int]]) -> None:
    """A K above what any record can have fills its row by repeating candidates: say so."""
    good = embeddings.good
    most = max((int(_distinct(target_ids[a:b], good[a:b]).sum()) - 1 for a, b in pools), default=0)
    if k > most:
        print(
            f"warning: --top-k {k} is more than the {max(most, 0)} distinct other targets of the largest "
            "candidate pool; rows repeat their candidates to fill the table (a smaller --top-k, or "
            "--across-subsets, avoids that)",
            file=sys.stderr,
        )


def _error(message: str, status: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return status


def _manifest(
    args: argparse.Namespace,
    source: MmebSource,
    image_root: Path,
    beta: float,
    embeddings: Embeddings,
    mined: Mined,
    image_size: int | None,
) -> MinedManifest:
    return MinedManifest(
        model=str(args.model.resolve()),
        root=str(source.root.resolve()),
        image_root=str(image_root.resolve()),
        split=source.split,
        subsets=tuple(source.subsets),
        max_per_subset=source.max_per_subset,
        records=len(source),
        source_sha256=source.sha256,
        table_sha256=table_sha256(mined.negatives),
        k=args.top_k,
        beta=beta,
        across_subsets=args.across_subsets,
        counts=mined.counts,
        bad_records=tuple(asdict(b) for b in embeddings.bad),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        image_size=image_size,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(lambda: _mine(args), debug=args.debug)


def _mine(args: argparse.Namespace) -> int:
    if not args.model.is_dir():
        return _error(f"model directory {args.model} does not exist", 2)
    if args.out.exists() and not args.overwrite:
        return _error(f"{args.out} exists; pass --overwrite to replace it", 2)
    with usage_errors(ConfigError, DataError, ValueError, OSError):
        cfg = load_config(args.data, args.overrides or (), Config)
        source = mmeb_source(cfg.data)
        model = UniME.load(
            args.model, dtype=args.dtype, max_len=cfg.data.text.max_len, progress=not args.no_progress
        )
    image_root, image_size = cfg.data.mmeb.images, cfg.data.mmeb.image_size
    beta = cfg.stage2.loss.beta if args.beta is None else args.beta

    embeddings = embed_records(model, source, image_root, args.batch_size, not args.no_progress, image_size)
    _report_bad(embeddings.bad, len(source))
    limit = cfg.data.loader.max_bad_fraction
    if len(embeddings.bad) > limit * len(source):
        return _error(
            f"more than data.loader.max_bad_fraction={limit} of the records are bad; check data.mmeb's "
            "root and image_root; nothing was written",
            1,
        )
    pools = candidate_pools(source, args.across_subsets)
    _warn_top_k(args.top_k, embeddings, source.target_ids, pools)
    mined = mine(
        embeddings, source.target_ids, pools, args.top_k, beta, args.block_rows, not args.no_progress
    )
    write_mined(
        args.out,
        mined.negatives,
        mined.scores,
        _manifest(args, source, image_root, beta, embeddings, mined, image_size),
    )
    counts = ", ".join(f"{name} {value}" for name, value in mined.counts.items())
    print(f"wrote {args.out}: {len(source)} records x {args.top_k} negatives (beta {beta}); {counts}")
    if embeddings.bad:
        print(
            f"all {len(embeddings.bad)} bad records are listed in {args.out / MANIFEST_FILE}", file=sys.stderr
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
