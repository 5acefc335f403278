"""Adapters to other libraries' interfaces (each imports its library, an optional dependency)."""
