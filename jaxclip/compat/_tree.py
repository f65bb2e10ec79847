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


def reject_non_arrays(tree: Any) -> None:
  """Raises a TypeError naming the first leaf of `tree` that is not an array
  (a Python number, a generator).

  Gradients are arrays; anything else among them would be skipped silently.
  """
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if getattr(x, "dtype", None) is not None:
      continue
    where = jax.tree_util.keystr(path) or "the root"
    if is_python_number(x):
      raise TypeError(
        f"The gradient leaf at {where} is the Python {type(x).__name__} {x!r},"
        " not an array. Convert the tree first, e.g."
        " `jax.tree.map(jnp.asarray, grads)`."
      )
    raise TypeError(
      f"The gradient leaf at {where} is a {type(x).__name__} object, not an"
      " array. Pass a pytree of arrays (a generator, `map` or dict view is not"
      " one: make it a list first)."
    )


def inexact_leaves(tree: Any) -> list[jax.Array]:
  """The floating and complex leaves of `tree`; Python numbers raise."""
  reject_non_arrays(tree)
  return [x for x in jax.tree.leaves(tree) if is_inexact(x)]


def map_inexact(fn: Callable[[jax.Array], jax.Array], tree: Any) -> Any:
  """Maps `fn` over the floating and complex leaves; other leaves pass through."""
  reject_non_arrays(tree)
  return jax.tree.map(lambda x: fn(x) if is_inexact(x) else x, tree)
