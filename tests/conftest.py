"""Shared pytest configuration; helpers live in support.py."""

from hypothesis import settings

# No per-example deadline: on a loaded 2-core CI machine a slow example is not a failure.
settings.register_profile("relay", deadline=None)
settings.load_profile("relay")
