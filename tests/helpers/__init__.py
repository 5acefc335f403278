"""Builders the test modules share: tiny HF models and references, tokenizers, data fixtures, and the
reference-interpreter runner. Test modules import from here, never from each other."""
