"""Training data: sources, featurizers and grain pipelines for both UniME stages.

- ``nli`` / ``teacher_store`` / ``teacher``: stage-1 NLI triplets, teacher-embedding store, and the
  ``python -m unime_jax.teacher`` CLI that fills it;
- ``mmeb``: stage-2 MMEB-train pairs; ``negatives``: the table of mined hard negatives (written by
  ``python -m unime_jax.mine``), its checks and the map that attaches them;
- ``tfds_source``: any prepared TFDS (ArrayRecord) dataset as a source, without TensorFlow;
- ``featurize``: the ``Featurizer`` protocol and the text-only ``TextFeaturizer``;
- ``pipeline``: ``build_pipeline``, ``stage1_pipeline``, ``stage2_pipeline``; their iterator
  (``accounting.DataIterator``) checkpoints through ``grain.checkpoint.CheckpointSave/Restore``;
- ``config``: the ``data:`` config section.

Modules are imported on use (``from unime_jax.data.pipeline import stage1_pipeline``) so that
the CLIs start without grain, pyarrow or tensorflow-datasets.
"""
