"""Pytree helpers shared by the `jaxclip.compat` modules."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def is_inexact(x: object) -> bool:
  """Whether `x` is a floating or complex array (a leaf that gets clipped)."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def is_python_number(x: object) -> bool:
  """Whether `x` is a number that is not an array (NumPy scalars are arrays)."""
  return isinstance(x, numbers.Number) and getattr(x, "dtype", None) is None


def reject_python_numbers(tree: Any) -> None:
  """Raises a TypeError naming the first leaf of `tree` that is a Python number.

  Gradients are arrays; a Python number among them would be skipped silently.
  """
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if is_python_number(x):
      where = jax.tree_util.keystr(path) or "the root"
      raise TypeError(
        f"The gradient leaf at {where} is the Python {type(x).__name__} {x!r},"
        " not an array. Convert the tree first, e.g."
        " `jax.tree.map(jnp.asarray, grads)`."
      )


def inexact_leaves(tree: Any) -> list[jax.Array]:
  """The floating and complex leaves of `tree`; Python numbers raise."""
  reject_python_numbers(tree)
  return [x for x in jax.tree.leaves(tree) if is_inexact(x)]


def map_inexact(fn: Callable[[jax.Array], jax.Array], tree: Any) -> Any:
  """Maps `fn` over the floating and complex leaves; other leaves pass through."""
  reject_python_numbers(tree)
  return jax.tree.map(lambda x: fn(x) if is_inexact(x) else x, tree)
