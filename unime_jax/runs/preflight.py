"""What a run checks before it loads any model: the inputs of every stage it still has to train.

A missing CSV, a teacher store that does not match it, an MMEB root without the subsets, a
mined table for other data, data negatives asked of data without them (or with columns that are
not strings, or files whose schema does not read), a W&B writer without the
wandb package, or a batch larger than the data would otherwise surface only after
the model has loaded (seconds to minutes). Here they fail at once, naming the config key.
"""

from __future__ import annotations

from pathlib import Path

from unime_jax.config import ConfigError
from unime_jax.runs.records import StageRecord
from unime_jax.runs.schema import Config
from unime_jax.training.sections import Stage2Section, StageSection
from unime_jax.training.tracking import require_wandb

__all__ = ["check_inputs"]


def check_inputs(cfg: Config, stages: list[tuple[StageRecord, StageSection]]) -> None:
    """Open the data of each unfinished stage; ConfigError or DataError naming the key or file
    when one cannot be used."""
    from unime_jax.data.data_negatives import check_data_negatives
    from unime_jax.data.negatives import open_mined
    from unime_jax.data.pipeline import mmeb_source, nli_source

    if cfg.metrics.wandb is not None:
        require_wandb()
    model = cfg.model
    if model.checkpoint and not Path(model.checkpoint).is_dir():
        raise ConfigError(f"model.checkpoint {model.checkpoint} is not a directory")
    for stage, section in stages:
        if stage.finished:
            continue
        key = stage.section
        if stage.task == "stage1":
            source, what = nli_source(cfg.data), f"data.nli.csv ({cfg.data.nli.csv})"
        else:
            source, what = mmeb_source(cfg.data), f"data.mmeb ({cfg.data.mmeb.root})"
            negatives = section.negatives if isinstance(section, Stage2Section) else None
            if negatives is not None and negatives.source == "mined":
                open_mined(negatives.dir, source, negatives.k, cfg.data.mmeb.image_size)
            elif negatives is not None and negatives.source == "data":
                check_data_negatives(source, f"{key}.negatives.mode={negatives.mode}")
        if len(source) < section.batch_size:
            raise ConfigError(
                f"{key}.batch_size={section.batch_size} is more than the {len(source)} records of {what}; "
                f"lower {key}.batch_size or add data"
            )
