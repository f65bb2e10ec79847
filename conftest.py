"""Doctests of functions that need an optional extra skip, with a message,
when that extra is not installed, as the tests in tests/ do.

A docstring declares its extra with the sentence "Needs the `NAME` extra".
"""

from __future__ import annotations

import importlib.util
import re

import pytest

# extra -> the module it installs
EXTRA_MODULES = {"dp": "dp_accounting", "plot": "matplotlib", "flax": "flax"}
NEEDS_EXTRA = re.compile(r"Needs the `(\w+)` extra")


def missing_extra(docstring: str | None) -> str | None:
  """The extra a docstring says it needs, if that extra is not installed."""
  match = NEEDS_EXTRA.search(docstring or "")
  if match is None:
    return None
  extra = match.group(1)
  if extra not in EXTRA_MODULES:
    raise ValueError(f"A docstring needs the unknown extra {extra!r}: add it to EXTRA_MODULES.")
  return None if importlib.util.find_spec(EXTRA_MODULES[extra]) else extra


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  for item in items:
    dtest = getattr(item, "dtest", None)  # a doctest item
    extra = missing_extra(dtest.docstring) if dtest is not None else None
    if extra is not None:
      reason = f"{item.name} needs the {extra} extra: pip install -e '.[{extra}]'"
      item.add_marker(pytest.mark.skip(reason=reason))
