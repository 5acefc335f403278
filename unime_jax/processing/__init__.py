"""Input processing shared by the backbones (numpy/PIL only, no torch, jax or model code): the
shared image-processing pieces, prompts and padded lengths, the text featurizer, and the generic
featurizer each backbone's input strategy plugs into (``unime_jax.backbones``)."""
