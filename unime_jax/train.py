"""`python -m unime_jax.train --config FILE [--set key=value ...]`.

Until the training engine lands, this resolves the config, builds the mesh and reports the
environment, so the command, the config system and the device setup are exercised end to end.
"""

from __future__ import annotations

import argparse
import platform
import sys

import yaml

from unime_jax.config import ConfigError, add_config_args, config_from_args, describe, to_dict


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m unime_jax.train",
        description="Train UniME embeddings (stage 1: textual distillation; stage 2: hard-negative tuning).",
        epilog="config sections and fields:\n" + describe(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_args(parser)
    return parser


def environment_report() -> str:
    import flax
    import jax
    import optax
    import orbax.checkpoint
    import transformers

    lines = [
        f"python        {platform.python_version()} ({platform.machine()})",
        f"jax           {jax.__version__} backend={jax.default_backend()} devices={jax.device_count()} "
        f"({jax.devices()[0].device_kind}) processes={jax.process_count()}",
        f"flax          {flax.__version__}",
        f"optax         {optax.__version__}",
        f"orbax         {orbax.checkpoint.__version__}",
        f"transformers  {transformers.__version__}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    from unime_jax.sharding import make_mesh

    print(environment_report())
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    print(f"mesh          {dict(mesh.shape)}")
    print("resolved config:")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
    print("The training engine (stages 1 and 2) is not implemented yet; nothing was trained.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
