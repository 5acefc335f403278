"""`python -m unime_jax.eval {mmeb,retrieval,summarize}`: the benchmarks the UniME paper reports.

    python -m unime_jax.eval mmeb --model DIR --data MMEB-eval --out results/mmeb
    python -m unime_jax.eval retrieval --model DIR --flickr30k data/flickr30k_test --out results/retrieval
    python -m unime_jax.eval summarize results/mmeb --compare unime-llava16

See each subcommand's ``--help``.
"""

from __future__ import annotations

import sys

from unime_jax.eval.cli import main

if __name__ == "__main__":
    sys.exit(main())
