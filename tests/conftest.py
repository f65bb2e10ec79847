"""Shared test settings: hypothesis runs derandomized so every run is the same."""

from hypothesis import settings

settings.register_profile("jaxclip", derandomize=True, deadline=None, max_examples=40)
settings.load_profile("jaxclip")
