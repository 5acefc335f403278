"""``python -m unime_jax.teacher``: offline teacher embeddings (implemented in :mod:`unime_jax.data.teacher`)."""

import sys

from unime_jax.data.teacher import main

if __name__ == "__main__":
    sys.exit(main())
