"""Pytree helpers shared by the `jaxclip.compat` modules."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax

from jaxclip import _norms

is_inexact = _norms.is_inexact
inexact_leaves = _norms.inexact_leaves


def is_python_number(x: object) -> bool:
  """Whether `x` is a number that is not an array (NumPy scalars are arrays)."""
  return isinstance(x, numbers.Number) and getattr(x, "dtype", None) is None


def map_inexact(fn: Callable[[jax.Array], jax.Array], tree: Any) -> Any:
  """Maps `fn` over the floating and complex leaves; other leaves pass through.

  Raises:
    TypeError: If a leaf is not an array, naming it (`_norms.check_arrays`).
  """
  _norms.check_arrays(tree)
  return jax.tree.map(lambda x: fn(x) if is_inexact(x) else x, tree)
