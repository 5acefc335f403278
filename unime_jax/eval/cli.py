"""Argument parsing and the three subcommands of ``python -m unime_jax.eval``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from unime_jax.cli_errors import add_debug_flag, run
from unime_jax.data.errors import DataError
from unime_jax.eval.fingerprint import model_fingerprint
from unime_jax.eval.paper import MMEB, RETRIEVAL

MMEB_EPILOG = """\
data:
  --data is the MMEB-eval download (huggingface-cli download TIGER-Lab/MMEB-eval --repo-type dataset
  --local-dir ROOT): ROOT/<Dataset>/test-*.parquet with qry_text, qry_img_path, tgt_text (list) and
  tgt_img_path (list); candidate 0 is the positive. The MMEB-V2 instruct layout (qry_inst/tgt_inst
  columns, ziyjiang/MMEB_Test_Instruct) is read too: its V1 strings are rebuilt. Image paths are
  relative to --image-root (default: --data); unzip images.zip there.

protocol (VLM2Vec v1 eval.py):
  Every distinct (text, image) of a dataset is embedded once; texts are the data's strings, no chat
  template, with <|image_1|> mapped to the backbone's image token. Each row's own candidates are
  scored by cosine and the argmax is the prediction (ties: the first maximum, i.e. the positive, as
  numpy and VLM2Vec do); the score is precision@1 per dataset.

the published numbers:
  UniME-Phi3.5-V:   --num-crops 4 --max-len 256              (native image size)
  UniME-LLaVA-1.6:  --image-size 1344 --max-len 4096         (what UniME's README command does
                                                              through VLM2Vec's eval.py)
  --max-len defaults to these values per backbone. Add --compare unime-phi35v / unime-llava16 to
  print the paper's row beside yours.

outputs (in --out):
  <Dataset>_score.json {"acc", "num_correct", "num_pred", "num_rows", "num_skipped", "num_tied"}
  (VLM2Vec's file; acc over the scored rows; num_tied: rows whose top score was shared, which the
  tie rule gives to the positive), <Dataset>_pred.jsonl (one {"pred": index} per row, in order),
  <Dataset>_skipped.jsonl (rows that could not be scored: file, row, reason), summary.json and
  summary.md (percent: overall_36, overall_meta_mean, ind, ood and the four meta-tasks).

resuming:
  Embeddings are cached per dataset in OUT/cache/ as they are computed: a killed run resumes where
  it stopped, and a dataset with a score file is skipped. Rerunning into OUT with another model or
  other settings is refused (run.json); the model counts by its files' contents, so a copy of it
  elsewhere continues the run.

multi-host:
  Encoding is split over all devices and processes; on clusters (SLURM, Open MPI, TPU) start one
  process per host with the same command, or pass --coordinator-address/--num-processes/--process-id.

exit status: 0 done, 1 bad data or model, 2 usage error.
"""

RETRIEVAL_EPILOG = """\
datasets (each as its public source ships it; give any subset):
  --flickr30k DIR     royokong/flickr30k_test (HF download: parquet with image and text columns)
  --coco DIR          royokong/coco_test (first 5 captions per image kept)
  --sharegpt4v JSON   share-captioner_coco_lcs_sam_1246k_1107.json, first 1000 records, with
                      --sharegpt4v-images (the root its "image" paths are relative to)
  --urban1k DIR       Long-CLIP's Urban1k: image/*.jpg and caption/*.txt
  --sugarcrepe DIR    SugarCrepe's 7 <subset>.json files, with --sugarcrepe-images (COCO val2017)
  --pairs FILE        your own: JSON lines {"image": path, "captions": [...]}; relative paths against
                      --image-root (default: the file's directory); repeatable

protocol:
  UniME's E5-V "Summary above sentence/image in one word" templates; R@1/5/10 text->image and
  image->text (an image is a hit when any of its captions ranks in the top k); SugarCrepe counts
  an image right when its caption beats the negative caption strictly.

outputs (in --out): <name>_score.json (fractions), retrieval_summary.json/.md (percent); embeddings
are cached in OUT/cache/ while they are computed, so a killed run resumes.

exit status: 0 done, 1 bad data or model, 2 usage error.
"""


def _add_compare(parser: argparse.ArgumentParser, rows: Iterable[str], benchmark: str) -> None:
    """``--compare NAME``, checked while parsing: a name without published numbers for this
    subcommand is a usage error before the model loads, not a failure after the evaluation."""
    names = list(dict.fromkeys(rows))

    def published(name: str) -> str:
        if name not in names:
            raise argparse.ArgumentTypeError(
                f"no published {benchmark} row {name!r}; choose from {', '.join(names)}"
            )
        return name

    parser.add_argument(
        "--compare",
        type=published,
        metavar="NAME",
        help=f"a published {benchmark} row to print beside the results: {', '.join(names)}",
    )


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    add_debug_flag(parser)
    parser.add_argument(
        "--model",
        required=True,
        type=Path,
        help="converted unime-jax checkpoint (unime_model.yaml) or HuggingFace model directory (config.json)",
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="directory for scores, summaries and the cache"
    )
    parser.add_argument("--dtype", help="compute dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=_positive, default=32, help="rows per forward pass (default 32)")
    parser.add_argument("--max-len", type=_positive, help="most text tokens of a text-only input")
    parser.add_argument(
        "--image-size", type=_positive, help="resize every image to N x N first (default: native)"
    )
    parser.add_argument(
        "--num-crops", type=_positive, help="Phi-3.5-V HD crop budget (default: the checkpoint's)"
    )
    parser.add_argument(
        "--chunk-size",
        type=_positive,
        default=1024,
        help="items per cached chunk of embeddings (default 1024)",
    )
    parser.add_argument("--keep-embeddings", action="store_true", help="keep OUT/cache/ after scoring")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    multi = parser.add_argument_group("multi-host (jax.distributed; SLURM/Open MPI/TPU are auto-detected)")
    multi.add_argument("--coordinator-address", help="host:port of process 0")
    multi.add_argument("--num-processes", type=int, help="number of processes")
    multi.add_argument("--process-id", type=int, help="this process's index, 0-based")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unime_jax.eval",
        description="Evaluate a UniME model on MMEB (36 datasets) and UniME's zero-shot retrieval suite.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{mmeb,retrieval,summarize}")
    raw = argparse.RawDescriptionHelpFormatter
    mmeb = commands.add_parser(
        "mmeb", help="MMEB precision@1 per dataset", epilog=MMEB_EPILOG, formatter_class=raw,
        description="MMEB-eval with VLM2Vec v1's protocol: precision@1 per dataset and the papers' aggregates.",
    )  # fmt: skip
    _add_model_args(mmeb)
    _add_compare(mmeb, MMEB, "MMEB")
    mmeb.add_argument("--data", required=True, type=Path, help="MMEB-eval root: <Dataset>/test-*.parquet")
    mmeb.add_argument("--image-root", type=Path, help="base of the image paths (default: --data)")
    mmeb.add_argument(
        "--datasets", help="comma-separated dataset names (default: every dataset under --data)"
    )
    ret = commands.add_parser(
        "retrieval", help="Flickr30K, COCO, ShareGPT4V, Urban1K, SugarCrepe, your pairs",
        epilog=RETRIEVAL_EPILOG, formatter_class=raw,
        description="UniME's zero-shot retrieval suite: R@1/5/10 in both directions and SugarCrepe.",
    )  # fmt: skip
    _add_model_args(ret)
    _add_compare(ret, RETRIEVAL, "retrieval")
    ret.add_argument("--flickr30k", type=Path, help="royokong/flickr30k_test download directory")
    ret.add_argument("--coco", type=Path, help="royokong/coco_test download directory")
    ret.add_argument("--sharegpt4v", type=Path, help="share-captioner_coco_lcs_sam_1246k_1107.json")
    ret.add_argument("--sharegpt4v-images", type=Path, help="root of ShareGPT4V's image paths")
    ret.add_argument("--urban1k", type=Path, help="Urban1k directory (image/, caption/)")
    ret.add_argument("--sugarcrepe", type=Path, help="directory of SugarCrepe's <subset>.json files")
    ret.add_argument("--sugarcrepe-images", type=Path, help="COCO val2017 images")
    ret.add_argument("--pairs", type=Path, action="append", default=[], help="JSON lines of image + captions")
    ret.add_argument(
        "--image-root", type=Path, help="base of --pairs image paths (default: the file's directory)"
    )
    summarize = commands.add_parser(
        "summarize", help="recompute the summaries from the score files in a directory",
        description="Recompute summary.{json,md} (MMEB) and retrieval_summary.{json,md} from OUT's "
        "<name>_score.json files, e.g. after runs split across machines.",
    )  # fmt: skip
    summarize.add_argument("out", type=Path, help="directory holding <name>_score.json files")
    add_debug_flag(summarize)
    _add_compare(summarize, [*MMEB, *RETRIEVAL], "MMEB or retrieval")
    return parser


def _model_type(path: Path) -> str:
    """The model type of a checkpoint or HF directory, read without loading it."""
    for name, load in (("unime_model.yaml", yaml.safe_load), ("config.json", json.loads)):
        file = path / name
        if file.is_file():
            return str(load(file.read_text(encoding="utf-8"))["model_type"])
    raise FileNotFoundError(
        f"{path} is neither a unime-jax checkpoint (unime_model.yaml) nor an HF model directory"
    )


def _settings(args: argparse.Namespace, benchmark: str, max_len: int, model_type: str) -> dict[str, Any]:
    """What the embeddings depend on; the model by its contents (a copy of it is the same model)."""
    return {
        "benchmark": benchmark,
        "model_fingerprint": model_fingerprint(args.model),
        "model_type": model_type,
        "dtype": args.dtype,
        "max_len": max_len,
        "image_size": args.image_size,
        "num_crops": args.num_crops,
    }


def _load(args: argparse.Namespace, benchmark: str) -> tuple[Any, dict[str, Any]]:
    """Join the multi-process run, then load the model on this process's devices."""
    import jax

    from unime_jax.backbones import spec_for
    from unime_jax.embedder import UniME
    from unime_jax.sharding import make_mesh
    from unime_jax.training import distributed

    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    model_type = _model_type(args.model)
    max_len = args.max_len or (spec_for(model_type).mmeb_max_len if benchmark == "mmeb" else 512)
    model = UniME.load(
        args.model,
        mesh=make_mesh(devices=jax.local_devices()),
        dtype=args.dtype,
        max_len=max_len,
        image_size=args.image_size,
        num_crops=args.num_crops,
        progress=not args.no_progress,
    )
    return model, _settings(args, benchmark, max_len, model_type)


def _datasets(args: argparse.Namespace) -> list[str]:
    from unime_jax.eval.mmeb_data import dataset_files
    from unime_jax.eval.mmeb_tasks import MMEB_DATASETS

    if args.datasets:
        names = [n.strip() for n in args.datasets.split(",") if n.strip()]
        missing = [n for n in names if not dataset_files(args.data, n)]
        if missing:
            raise DataError(f"no {args.data}/<name>/test-*.parquet for dataset(s) {', '.join(missing)}")
        return names
    if not args.data.is_dir():
        raise DataError(f"--data {args.data} is not a directory")
    present = {d.name for d in args.data.iterdir() if d.is_dir() and dataset_files(args.data, d.name)}
    if not present:
        raise DataError(f"no <Dataset>/test-*.parquet under {args.data}; is it the MMEB-eval download?")
    return [n for n in MMEB_DATASETS if n in present] + sorted(present - set(MMEB_DATASETS))


def _run(args: argparse.Namespace, settings: dict[str, Any]) -> Any:
    from unime_jax.eval.runs import EvalRun

    return EvalRun(
        args.out, settings, batch_size=args.batch_size, chunk_size=args.chunk_size,
        keep_embeddings=args.keep_embeddings, progress=not args.no_progress,
        notes={"model": str(args.model.resolve())},
    )  # fmt: skip


def _mmeb(args: argparse.Namespace) -> int:
    import jax

    from unime_jax.eval.mmeb import run_mmeb
    from unime_jax.eval.summary import write_summary

    datasets = _datasets(args)  # before loading the model: a typo fails in a second
    model, settings = _load(args, "mmeb")
    image_root = args.image_root or args.data
    scores = run_mmeb(model, _run(args, settings), args.data, image_root, datasets)
    if jax.process_index() != 0:
        return 0
    write_summary(args.out, args.compare)
    print((args.out / "summary.md").read_text(encoding="utf-8"))
    if empty := [name for name, score in scores.items() if not score["num_pred"]]:
        print(
            f"error: no row of {', '.join(empty)} could be scored (reasons in <Dataset>_skipped.jsonl); "
            f"images are looked up under --image-root {image_root}: is that where images.zip was unzipped?",
            file=sys.stderr,
        )
        return 1
    return 0


def _retrieval_sets(args: argparse.Namespace) -> tuple[list[Any], list[Any]]:
    from unime_jax.eval import retrieval_data as rd

    pairs = []
    if args.flickr30k:
        pairs.append(rd.read_hf_parquet(args.flickr30k, "flickr30k"))
    if args.coco:
        pairs.append(rd.read_hf_parquet(args.coco, "coco", max_captions=5))
    if args.sharegpt4v:
        if not args.sharegpt4v_images:
            raise DataError("--sharegpt4v needs --sharegpt4v-images, the root of its image paths")
        pairs.append(rd.read_sharegpt4v(args.sharegpt4v, args.sharegpt4v_images))
    if args.urban1k:
        pairs.append(rd.read_urban1k(args.urban1k))
    for path in args.pairs:
        pairs.append(rd.read_pairs_jsonl(path, args.image_root))
    sugarcrepe = []
    if args.sugarcrepe:
        if not args.sugarcrepe_images:
            raise DataError("--sugarcrepe needs --sugarcrepe-images, the COCO val2017 image directory")
        sugarcrepe = rd.read_sugarcrepe(args.sugarcrepe, args.sugarcrepe_images)
    names = [p.name for p in pairs]
    if len(set(names)) != len(names):
        raise DataError(f"two datasets share a name ({', '.join(names)}); rename a --pairs file")
    if not pairs and not sugarcrepe:
        raise DataError(
            "no dataset given: pass --flickr30k, --coco, --sharegpt4v, --urban1k, --sugarcrepe or --pairs"
        )
    return pairs, sugarcrepe


def _retrieval(args: argparse.Namespace) -> int:
    import jax

    from unime_jax.eval.retrieval_suite import run_retrieval, write_retrieval_summary

    pairs, sugarcrepe = _retrieval_sets(args)
    model, settings = _load(args, "retrieval")
    scores = run_retrieval(model, _run(args, settings), pairs, sugarcrepe)
    if jax.process_index() == 0:
        write_retrieval_summary(args.out, scores, args.compare)
        print((args.out / "retrieval_summary.md").read_text(encoding="utf-8"))
    return 0


def _summarize(args: argparse.Namespace) -> int:
    from unime_jax.eval.retrieval_suite import read_retrieval_scores, write_retrieval_summary
    from unime_jax.eval.summary import read_scores, write_summary

    if not args.out.is_dir():
        raise DataError(f"{args.out} is not a directory")
    printed = False
    if read_scores(args.out):
        write_summary(args.out, args.compare if args.compare in MMEB else None)
        print((args.out / "summary.md").read_text(encoding="utf-8"))
        printed = True
    retrieval = read_retrieval_scores(args.out)
    if retrieval:
        write_retrieval_summary(args.out, retrieval, args.compare if args.compare in RETRIEVAL else None)
        print((args.out / "retrieval_summary.md").read_text(encoding="utf-8"))
        printed = True
    if not printed:
        raise DataError(f"no <name>_score.json files in {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    commands = {"mmeb": _mmeb, "retrieval": _retrieval, "summarize": _summarize}
    # Bad data, model files or settings: one line and exit 1 (DataError's, ValueError's, OSError's).
    return run(
        lambda: commands[args.command](args),
        debug=args.debug,
        on_interrupt="interrupted; the same command resumes from the cached chunks",
    )
