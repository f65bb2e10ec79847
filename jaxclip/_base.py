"""Shared plumbing of the clipping transforms: thresholds, step counts, scaling.

Nothing here computes a norm: norms come from `jaxclip._norms`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxclip import _norms
from jaxclip._validate import Threshold


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
