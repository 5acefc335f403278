"""CPU demo: a synthetic compositional image–caption dataset (``shapes``) small enough to train on a laptop."""
