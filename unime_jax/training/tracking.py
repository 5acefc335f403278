"""Weights & Biases beside TensorBoard and metrics.jsonl: the same metrics, and the resolved config.

``metrics.wandb: {project, name, mode}`` in the run config turns it on. Each stage is one W&B run,
named ``<name>/<stage>`` and grouped under ``name``, with its files under ``<stage>/wandb/``. The
run's id is kept in ``<stage>/wandb/run_id``, so a resumed stage continues the same W&B run (W&B
keeps the values it already has for the steps logged again). ``mode: offline`` needs no network
and no account: ``wandb sync <stage>/wandb/offline-run-*`` uploads the run later.

The ``wandb`` package is optional (``pip install unime-jax[wandb]``): it is imported only when
``metrics.wandb`` is set, and its absence is then a one-line error before any model loads.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from unime_jax.atomic import write_text
from unime_jax.config import ConfigError

__all__ = ["MetricsSection", "WandbRun", "WandbSection", "require_wandb"]

MISSING_WANDB = (
    "metrics.wandb is set, but the wandb package is not installed: pip install wandb "
    "(or unime-jax[wandb]), or remove metrics.wandb from the config"
)


@dataclass
class WandbSection:
    project: str  # W&B project the runs go to
    name: str | None = None  # group of the run's stages (each is <name>/<stage>); null = the workdir's name
    mode: Literal["online", "offline", "disabled"] = "online"  # offline: to <stage>/wandb/ only (wandb sync)


@dataclass
class MetricsSection:
    wandb: WandbSection | None = None  # also log to Weights & Biases; null = not


def require_wandb() -> None:
    """ConfigError when the wandb package cannot be imported (checked before a run loads its model)."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError(MISSING_WANDB)


class WandbRun:
    """One stage's W&B run: ``log`` what metrics.jsonl gets, ``finish`` at the end of the stage.

    Args:
      section: the ``metrics.wandb`` settings.
      directory: the stage's directory; W&B writes under ``directory/wandb/``.
      stage: the stage's label (``stage1``, ``stage2``, ``pretrain``).
      config: the resolved run config, stored as the W&B run's config.
    """

    def __init__(self, section: WandbSection, directory: Path, stage: str, config: dict[str, Any]) -> None:
        try:
            import wandb
        except ImportError as e:
            raise ConfigError(MISSING_WANDB) from e
        from wandb.sdk.lib.runid import generate_id

        group = section.name or Path(directory).resolve().parent.name
        files = Path(directory) / "wandb"
        files.mkdir(parents=True, exist_ok=True)
        id_file = files / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else generate_id()
        write_text(id_file, run_id + "\n")
        self._run = wandb.init(
            project=section.project,
            name=f"{group}/{stage}",
            group=group,
            id=run_id,
            resume="allow",
            dir=str(directory),
            mode=section.mode,
            config=config,
            reinit="finish_previous",
            # The console stays ours: the progress bar is not copied into W&B's log.
            settings=wandb.Settings(console="off"),
        )

    @property
    def directory(self) -> Path:
        """The W&B run's own directory (``.../wandb/offline-run-<time>-<id>`` in offline mode)."""
        return Path(self._run.dir).parent

    def log(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def finish(self, exit_code: int = 0) -> None:
        """End the run; a non-zero ``exit_code`` marks it failed."""
        self._run.finish(exit_code=exit_code)
