"""Shared plumbing of the clipping transforms: thresholds, step counts, scaling.

Nothing here computes a norm: norms come from `jaxclip._norms`.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxclip import _norms, _validate
from jaxclip._validate import Threshold


def resolve(
  value: Threshold,
  count: jax.Array,
  dtype: jnp.dtype,
  name: str | None = None,
  *,
  scalar: bool = True,
  allow_negative: bool = False,
) -> jax.Array:
  """The value of a threshold at step `count`, as an array of `dtype`.

  Given its `name`, a schedule's concrete value (outside `jax.jit`) is
  checked as a constant one is (`scheduled`), and with `scalar` the value
  (a traced one too: shapes are known while tracing) must be a scalar.
  """
  if callable(value):
    value = value(count)
    if name is not None:
      check_scheduled(value, name, count, scalar=scalar, allow_negative=allow_negative)
  out = jnp.asarray(value).astype(dtype)
  if name is not None and scalar:
    _validate.check_scalar(out, name)
  return out


def check_scheduled(value: Any, name: str, count: jax.Array, **kwargs: Any) -> None:
  """Checks the concrete `value` a schedule given as `name` returned at step
  `count` as `_validate.check_threshold` checks a constant (with its
  keyword arguments); traced values pass unchecked."""
  if not _validate.is_concrete(value):
    return
  try:
    _validate.check_threshold(value, name, **kwargs)
  except (TypeError, ValueError) as e:
    raise type(e)(
      f"The schedule given as `{name}` returned {value!r}{at_step(count)}: {e}"
    ) from None


def at_step(count: jax.Array) -> str:
  """ " at step N" for a concrete step count, else "" (under `jax.jit`)."""
  return f" at step {int(count)}" if _validate.is_concrete(count) else ""


def record_dtype(tree: Any) -> jnp.dtype:
  """The dtype norms of `tree` are accumulated and recorded in."""
  leaves = _norms.inexact_leaves(tree)
  if not leaves:
    return jnp.dtype(jnp.float32)
  return jnp.result_type(*(_norms.accumulation_dtype(x.dtype) for x in leaves))


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


def with_extra_args(tx: Any, name: str = "inner") -> optax.GradientTransformationExtraArgs:
  """`tx` (the argument `name`) as a transformation whose `update` takes
  extra keyword arguments.

  `optax.with_extra_args_support` drops them for any `tx` that is not a
  `GradientTransformationExtraArgs`. `optax.MultiSteps` is not one, yet
  forwards them to the transformation it wraps (a guard's ``loss=``, say):
  it gets them, as itself or as its `gradient_transformation()`.
  """
  if isinstance(tx, optax.GradientTransformationExtraArgs):
    return tx
  if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
    hint = " (an optimizer factory: call it, e.g. `optax.sgd(0.1)`)" if callable(tx) else ""
    raise TypeError(f"`{name}` must be an optax.GradientTransformation, got {tx!r}{hint}.")
  if isinstance(tx, optax.MultiSteps) or isinstance(
    getattr(tx.update, "__self__", None), optax.MultiSteps
  ):
    return optax.GradientTransformationExtraArgs(tx.init, tx.update)
  return optax.with_extra_args_support(tx)


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


def keep_dtypes(state: Any, state_type: type, new: Any) -> Any:
  """`new`, each leaf cast to the dtype of `state`'s: a state's dtypes are set
  by `init` and never change (a `lax.scan` carry, no retrace). A state from
  elsewhere (a stateless transform's) is returned as it is."""
  if not isinstance(state, state_type):
    return state
  return jax.tree.map(lambda old, x: jnp.asarray(x).astype(old.dtype), state, new)


def matching_params(updates: Any, params: Any, name: str) -> list[jax.Array]:
  """The leaves of `params` paired with the floating leaves of `updates`
  (integer or boolean parameters as float32, as numbers), checked to have
  the updates' leaf shapes."""
  _norms.check_arrays(params)
  u, w = jax.tree.leaves(updates), jax.tree.leaves(params)
  shapes = [jnp.shape(x) for x in u], [jnp.shape(x) for x in w]
  if shapes[0] != shapes[1]:
    raise ValueError(
      f"`{name}` needs `params` with the leaves of the updates; got update"
      f" shapes {shapes[0]} and parameter shapes {shapes[1]}. Pass the"
      " parameters the updates are for."
    )
  return [
    jnp.asarray(p) if _norms.is_inexact(p) else jnp.asarray(p, jnp.float32)
    for x, p in zip(u, w)
    if _norms.is_inexact(x)
  ]


# Per-example gradients (DP-SGD): every leaf has the batch on axis 0.


def batched_leaves(grads: Any, fn: str) -> list[jax.Array]:
  """The leaves of per-example gradients, checked to share a batch axis 0."""
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError(
      f"`{fn}` got no gradients: pass a pytree of per-example gradients, each"
      " with the batch on axis 0."
    )
  if any(isinstance(x, numbers.Number) for x in leaves):
    _norms.inexact_leaves(grads)  # raises, naming the leaf
  shapes = [jnp.shape(x) for x in leaves]
  if any(len(s) == 0 or s[0] != shapes[0][0] for s in shapes):
    raise ValueError(
      f"`{fn}` needs every gradient to have the batch on axis 0 with one batch"
      f" size; got shapes {shapes}. Compute per-example gradients with"
      " `jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)`."
    )
  return [jnp.asarray(x) for x in leaves]


def as_floating(leaves: list[jax.Array]) -> list[jax.Array]:
  """Integer leaves as float32: per-example sums count them, as optax does."""
  return [x if _norms.is_inexact(x) else x.astype(jnp.float32) for x in leaves]


def example_scale(norms: jax.Array, threshold: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per example, the factor bounding its norm by `threshold`, and whether it
  was clipped. An example with a non-finite norm gets 0 (and counts as
  clipped): its gradient is left out, so no example contributes more than
  the threshold, which is what differential privacy rests on. A traced
  threshold that is NaN or negative (a concrete one is an error) keeps no
  example rather than none clipped or every sign flipped."""
  scale, clipped = clip_scale(norms, threshold)
  keep = jnp.isfinite(norms) & (threshold >= 0)
  return jnp.where(keep, scale, 0).astype(scale.dtype), clipped | ~keep


def weighted_sums(weights: jax.Array, leaves: list[jax.Array]) -> list[jax.Array]:
  """Per leaf, ``sum_i weights[i] * g[i]`` over the batch axis, accumulated in
  float32 (complex64 for complex leaves), in each leaf's dtype.

  An example of weight 0 contributes exactly 0, also where its gradient holds
  inf or NaN: those examples are masked out first (only when there are any).
  """
  dropped = weights == 0

  def total(masked: bool) -> list[jax.Array]:
    return [_weighted_sum(weights, g, dropped if masked else None) for g in leaves]

  return _norms.cond(jnp.any(dropped), lambda: total(True), lambda: total(False))


def _weighted_sum(weights: jax.Array, g: jax.Array, dropped: jax.Array | None) -> jax.Array:
  if dropped is not None:
    g = jnp.where(dropped.reshape((-1,) + (1,) * (g.ndim - 1)), jnp.zeros((), g.dtype), g)
  if not _norms.is_inexact(g):  # integer gradients sum as numbers, as in optax
    return _over_batch(weights, g.astype(weights.dtype))
  acc = jnp.result_type(g.dtype, _norms.accumulation_dtype(g.dtype))
  return _over_batch(weights.astype(acc), g.astype(acc)).astype(g.dtype)


def _over_batch(weights: jax.Array, g: jax.Array) -> jax.Array:
  """``sum_i weights[i] * g[i]``. With the batch split over Explicit mesh
  axes, the sum is all-reduced into the sharding of one example's gradient
  (jax asks for that sharding to be named)."""
  try:
    sharding = jax.typeof(g).sharding
  except (AttributeError, TypeError):
    sharding = None
  spec = tuple(getattr(sharding, "spec", ()))
  if not spec or spec[0] is None:
    return jnp.tensordot(weights, g, axes=1)
  out = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec[1:]))
  return jnp.tensordot(weights, g, axes=1, out_sharding=out)
