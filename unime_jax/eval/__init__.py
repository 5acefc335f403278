"""Evaluation: retrieval and compositional metrics (``retrieval``, pure numpy)."""
