"""`python -m convert to-jax | to-hf`: the command line over :mod:`unime_jax.conversion`."""
