"""Shared plumbing of the clipping transforms: thresholds, step counts, scaling.

Nothing here computes a norm: norms come from `jaxclip._norms`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import jax.numpy as jnp
import numpy as np

from jaxclip import _norms

# A threshold: a number, an array (possibly traced, e.g. under
# `optax.inject_hyperparams`) or a schedule mapping the step count to a value.
Threshold: TypeAlias = jax.typing.ArrayLike | Callable[[jax.Array], jax.typing.ArrayLike]


def is_concrete(value: object) -> bool:
  """Whether `value` can be inspected in Python (it is not traced)."""
  return not isinstance(value, jax.core.Tracer)


def check_threshold(
  value: Threshold, name: str, *, allow_negative: bool = False, allow_schedule: bool = True
) -> None:
  """Raises a ValueError for a concrete NaN (or negative) threshold.

  Schedules and traced values are not checked: their values are only known
  inside the step. With ``allow_schedule=False`` a callable is a TypeError.
  """
  if callable(value) and not allow_schedule:
    raise TypeError(
      f"`{name}` must be a number or an array, got the callable {value!r}:"
      " this argument does not take a schedule."
    )
  if callable(value) or not is_concrete(value):
    return
  if isinstance(value, bool):
    raise TypeError(f"`{name}` must be a number or an array, got the bool {value!r}.")
  if not isinstance(value, numbers.Number | np.ndarray | np.generic | jax.Array):
    raise TypeError(
      f"`{name}` must be a number, an array or a schedule (a callable taking"
      f" the step count), got {value!r} of type {type(value).__name__}."
    )
  arr = np.asarray(value)
  if not np.issubdtype(arr.dtype, np.number):
    raise TypeError(f"`{name}` must be numeric, got dtype {arr.dtype}.")
  if np.any(np.isnan(arr)):
    raise ValueError(
      f"`{name}` is NaN ({value!r}); pass a number such as 1.0, or math.inf to disable clipping."
    )
  if not allow_negative and np.any(arr < 0):
    raise ValueError(
      f"`{name}` must be >= 0, got {value!r}. A threshold of 0 zeroes every"
      " non-zero update and math.inf disables clipping."
    )


def check_ord(ord: Any, name: str = "ord") -> float:
  """Validates a norm order (None means 2), also a concrete 0-d array."""
  if ord is None:
    return 2.0
  if isinstance(ord, jax.Array | np.ndarray | np.generic):
    if not is_concrete(ord):
      raise TypeError(
        f"`{name}` must be a Python number, not a traced array. Under"
        f" `optax.inject_hyperparams`, pass static_args=('{name}',)."
      )
    if np.ndim(ord) != 0:
      raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(ord)}.")
    ord = float(ord)
  return _norms.check_ord(ord, name)


def check_axis(axis: Any, name: str = "axis") -> int | tuple[int, ...] | None:
  """Validates reduction axes: None, an int or a tuple of ints."""
  if axis is None:
    return None
  if isinstance(axis, int) and not isinstance(axis, bool):
    return axis
  if isinstance(axis, tuple | list) and all(
    isinstance(a, int) and not isinstance(a, bool) for a in axis
  ):
    return tuple(axis)
  raise TypeError(f"`{name}` must be None, an int or a tuple of ints, got {axis!r}.")


def check_int(value: Any, name: str, minimum: int) -> int:
  """Validates a static integer hyperparameter (sizes, step counts)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise TypeError(
      f"`{name}` must be a Python int >= {minimum}, got {value!r} of type"
      f" {type(value).__name__}. It sets an array shape or a step count, so it"
      " cannot be traced: under `optax.inject_hyperparams`, list it in"
      f" static_args=('{name}',)."
    )
  if value < minimum:
    raise ValueError(f"`{name}` must be >= {minimum}, got {value!r}.")
  return int(value)


def check_range(value: Any, name: str, lo: float, hi: float, fix: str) -> None:
  """Raises a ValueError if a concrete `value` is outside ``[lo, hi]``."""
  check_threshold(value, name, allow_negative=True, allow_schedule=False)
  if not is_concrete(value):
    return
  v = np.asarray(value)  # NumPy: this also runs while a jit traces the caller
  if np.any((v < lo) | (v > hi)):
    raise ValueError(f"`{name}` must be in [{lo}, {hi}], got {value!r}. {fix}")


def resolve(value: Threshold, count: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """The value of a threshold at step `count`, as a scalar array of `dtype`."""
  if callable(value):
    value = value(count)
  return jnp.asarray(value).astype(dtype)


def record_dtype(tree: Any) -> jnp.dtype:
  """The dtype norms of `tree` are accumulated and recorded in."""
  leaves = inexact_leaves(tree)
  if not leaves:
    return jnp.dtype(jnp.float32)
  return jnp.result_type(*(_norms.accumulation_dtype(x.dtype) for x in leaves))


def inexact_leaves(tree: Any) -> list[jax.Array]:
  """The floating and complex leaves of `tree`: the ones that get clipped."""
  return [x for x in jax.tree.leaves(tree) if _norms.is_inexact(x)]


def map_inexact(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
  """Maps `fn` over the floating leaves of `tree`; other leaves pass through."""
  return jax.tree.map(lambda x, *r: fn(x, *r) if _norms.is_inexact(x) else x, tree, *rest)


def scale_leaf(x: jax.Array, scale: jax.Array) -> jax.Array:
  """x * scale, computed in the scale's precision and cast back to x's dtype."""
  return (x * scale).astype(x.dtype)


def clip_scale(norm: jax.Array, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The factor that brings `norm` down to `threshold`, and whether it clips.

  A norm at or below the threshold is left alone (scale 1). A non-finite norm
  is never used to rescale: the updates pass through unchanged so that the
  inf or NaN stays visible to guards such as `optax.apply_if_finite`, rather
  than every finite entry being silently zeroed.
  """
  clipped = jnp.isfinite(norm) & (norm > threshold)
  safe_norm = jnp.where(clipped, norm, 1)
  return jnp.where(clipped, threshold / safe_norm, 1).astype(norm.dtype), clipped


def scalar(value: Any, dtype: Any = jnp.float32) -> jax.Array:
  """A 0-d array of `dtype`, for state fields."""
  return jnp.asarray(value, dtype)


def zero_count() -> jax.Array:
  return jnp.zeros([], jnp.int32)


def step_count(state: Any, state_type: type, thresholds: dict[str, Any]) -> jax.Array:
  """The step count kept in `state`, or 0 for a state from elsewhere.

  Like optax's stateless clippers, every jaxclip transform accepts the state of
  a stateless transform (`optax.EmptyState()`, `None`, `()`) and then returns
  it unchanged; schedules need the count kept by this transform's own state.
  """
  if isinstance(state, state_type):
    return state.count
  for name, value in thresholds.items():
    if callable(value):
      raise ValueError(
        f"`{name}` is a schedule, which needs the step count kept in the"
        f" state returned by `init`; got a state of type"
        f" {type(state).__name__}. Call `state = tx.init(params)` and pass"
        " that state to `update`."
      )
  return zero_count()


def expect_state(state: Any, state_type: type, transform: str) -> None:
  """Raises a TypeError unless `state` is `transform`'s own state.

  Transforms that learn from past steps cannot run from the state of a
  stateless transform (`optax.EmptyState()`, `None`).
  """
  if not isinstance(state, state_type):
    raise TypeError(
      f"`{transform}` keeps statistics across steps and needs its own state, a"
      f" {state_type.__name__}; got {type(state).__name__}. Call"
      " `state = tx.init(params)` and pass that state to `update`."
    )


def next_state(old: Any, state_type: type, new: Any) -> Any:
  """`new` if `old` is this transform's state, else `old` untouched."""
  return new if isinstance(old, state_type) else old


def as_bool(x: Any) -> jax.Array:
  return jnp.asarray(x, dtype=bool)
