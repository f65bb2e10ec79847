"""Fixed-threshold clipping: by value, per-tensor norm, global norm, block RMS."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclip import _base, _norms, _validate
from jaxclip._validate import Ord, Threshold


class ClipByValueState(NamedTuple):
  """What `clip` and `clip_by_value` measured at the last step.

  Attributes:
    count: Number of updates processed (int32).
    max_abs: Largest magnitude among the updates before clipping.
    clipped_fraction: Fraction of floating entries that were outside the bounds.
    clipped: Whether any entry was clipped.
  """

  count: jax.Array
  max_abs: jax.Array
  clipped_fraction: jax.Array
  clipped: jax.Array


class ClipByGlobalNormState(NamedTuple):
  """What `clip_by_global_norm` measured at the last step.

  Attributes:
    count: Number of updates processed (int32).
    threshold: The `max_norm` used (useful with schedules).
    norm: Global norm of the updates before clipping (float32, or float64
      for float64 updates).
    scale: Factor every update was multiplied by (1 when not clipped).
    clipped: Whether the updates were scaled down.
  """

  count: jax.Array
  threshold: jax.Array
  norm: jax.Array
  scale: jax.Array
  clipped: jax.Array


class PerTensorClipState(NamedTuple):
  """What a per-tensor clipper measured at the last step, tensor by tensor.

  `norm`, `scale` and `clipped` are vectors with one entry per floating leaf
  of the updates, in the order of `jax.tree.leaves` (integer leaves have no
  entry). Vectors rather than trees keep the state small and fast to compile
  for models with thousands of tensors. When a tensor is clipped unit by unit
  (an `axis`, or AGC), its entries are its largest measurement, its smallest
  scale and whether any unit was clipped.

  Attributes:
    count: Number of updates processed (int32).
    threshold: The threshold used at the last step.
    norm: Per tensor, the measured quantity compared with the threshold: its
      p-norm (`clip_by_norm`), its RMS (`clip_by_block_rms`) or its largest
      unit-wise ratio of gradient norm to parameter norm
      (`adaptive_grad_clip`).
    scale: Per tensor, the smallest factor applied to it.
    clipped: Per tensor, whether any part of it was scaled down.
  """

  count: jax.Array
  threshold: jax.Array
  norm: jax.Array
  scale: jax.Array
  clipped: jax.Array


def clip_by_value(
  min_value: Threshold, max_value: Threshold
) -> optax.GradientTransformationExtraArgs:
  """Clips every entry of the updates to ``[min_value, max_value]``.

  The port of `tf.clip_by_value`, Keras' ``clipvalue`` (with bounds
  ``-v, v``) and `torch.nn.utils.clip_grad_value_`. Value clipping changes
  the direction of the update; prefer `clip_by_global_norm` unless a method
  asks for it. Infinities become the bounds and NaN stays NaN.

  Args:
    min_value: Lower bound: a number, an array broadcastable to every leaf, or
      a schedule ``step -> value``.
    max_value: Upper bound, likewise.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `ClipByValueState`.

  Raises:
    ValueError: If a concrete bound is NaN or `min_value > max_value`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> tx = jaxclip.clip_by_value(-1.0, 0.5)
    >>> g = {"w": jnp.array([-3.0, 0.2, 2.0])}
    >>> clipped, state = tx.update(g, tx.init(g))
    >>> clipped["w"]
    Array([-1. ,  0.2,  0.5], dtype=float32)
    >>> round(float(state.clipped_fraction), 4)
    0.6667
  """
  _validate.check_threshold(min_value, "min_value", allow_negative=True)
  _validate.check_threshold(max_value, "max_value", allow_negative=True)
  if (
    not callable(min_value)
    and not callable(max_value)
    and _validate.is_concrete(min_value)
    and _validate.is_concrete(max_value)
    and np.any(np.asarray(min_value) > np.asarray(max_value))
  ):
    raise ValueError(
      f"`min_value` ({min_value!r}) must be <= `max_value` ({max_value!r}); swap them."
    )
  thresholds = {"min_value": min_value, "max_value": max_value}

  def init_fn(params):
    dtype = _base.record_dtype(params)
    return ClipByValueState(
      _base.zero_count(), _base.scalar(0, dtype), _base.scalar(0), _base.scalar(False, bool)
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = _base.step_count(state, ClipByValueState, thresholds)
    dtype = _base.record_dtype(updates)
    lo = _base.resolve(min_value, count, dtype)
    hi = _base.resolve(max_value, count, dtype)
    leaves = _base.inexact_leaves(updates)
    outside = [
      ((x < lo.astype(x.dtype)) | (x > hi.astype(x.dtype))).astype(jnp.float32) for x in leaves
    ]
    n_out = _norms.norm_of_leaves(outside, 1.0)
    size = sum(x.size for x in leaves)
    new_state = ClipByValueState(
      count=count + 1,
      max_abs=_norms.norm_of_leaves(leaves, math.inf).astype(dtype),
      clipped_fraction=n_out / max(size, 1),
      clipped=n_out > 0,
    )
    updates = _base.map_inexact(
      lambda x: jnp.clip(x, lo.astype(x.dtype), hi.astype(x.dtype)), updates
    )
    return updates, _base.next_state(state, ClipByValueState, new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def clip(max_delta: Threshold) -> optax.GradientTransformationExtraArgs:
  """Clips every entry of the updates to ``[-max_delta, max_delta]``.

  The optax name of ``clip_by_value(-max_delta, max_delta)``.

  Args:
    max_delta: Largest allowed magnitude of an entry (>= 0): a number, an
      array or a schedule ``step -> value``.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `ClipByValueState`.

  Raises:
    ValueError: If a concrete `max_delta` is negative or NaN.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> tx = jaxclip.clip(1.0)
    >>> tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(None))[0]
    Array([-1. ,  0.5,  1. ], dtype=float32)
  """
  _validate.check_threshold(max_delta, "max_delta")
  if callable(max_delta):
    schedule = max_delta
    return clip_by_value(lambda n: -jnp.asarray(schedule(n)), schedule)
  return clip_by_value(jnp.negative(max_delta), max_delta)


def clip_by_global_norm(
  max_norm: Threshold, ord: Ord | None = None, *, axis_name: str | None = None
) -> optax.GradientTransformationExtraArgs:
  """Scales all updates by one factor so that their global norm is at most
  `max_norm`.

  The direction of the whole update is kept: when the global norm ``n``
  exceeds ``max_norm`` every leaf is multiplied by ``max_norm / n``. This is
  `optax.clip_by_global_norm`, `tf.clip_by_global_norm`, Keras'
  ``global_clipnorm`` and `torch.nn.utils.clip_grad_norm_`, with the norm
  accumulated in float32 for bf16/fp16 updates, no overflow, no NaN for zero
  updates or ``max_norm=0``, and non-finite norms passed through unscaled
  (see the "Non-finite gradients" section of the docs).

  Args:
    max_norm: The largest allowed global norm (>= 0): a number, an array (also
      traced, for `optax.inject_hyperparams`) or a schedule ``step -> value``.
    ord: Order of the norm: 2 (the default, also for None), 1, ``math.inf``
      or any p > 0. Under `optax.inject_hyperparams`, list it in
      ``static_args``.
    axis_name: Inside `jax.shard_map` or `jax.pmap` with gradients split over
      devices, the mapped axis to sum the partial norms over. Not needed under
      plain `jax.jit` with sharded arrays.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `ClipByGlobalNormState`.

  Raises:
    ValueError: If a concrete `max_norm` is negative or NaN, or `ord <= 0`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxclip
    >>> tx = jaxclip.clip_by_global_norm(1.0)
    >>> g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([4.0])}
    >>> clipped, state = tx.update(g, tx.init(g))
    >>> clipped["a"], clipped["b"]
    (Array([0.6, 0. ], dtype=float32), Array([0.8], dtype=float32))
    >>> float(state.norm), float(state.scale), bool(state.clipped)
    (5.0, 0.20000000298023224, True)
    >>> opt = optax.chain(jaxclip.clip_by_global_norm(1.0), optax.adam(1e-3))

  References:
    Pascanu et al., [On the difficulty of training recurrent neural
    networks](https://arxiv.org/abs/1211.5063), 2013.
  """
  _validate.check_threshold(max_norm, "max_norm")
  p = _validate.check_ord(ord)
  thresholds = {"max_norm": max_norm}

  def init_fn(params):
    dtype = _base.record_dtype(params)
    return ClipByGlobalNormState(
      _base.zero_count(),
      _base.scalar(0, dtype),
      _base.scalar(0, dtype),
      _base.scalar(1, dtype),
      _base.scalar(False, bool),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    count = _base.step_count(state, ClipByGlobalNormState, thresholds)
    leaves = _base.inexact_leaves(updates)
    norm = _norms.norm_of_leaves(leaves, p, axis_name=axis_name)
    norm = norm.astype(_base.record_dtype(updates))
    threshold = _base.resolve(max_norm, count, norm.dtype)
    scale, clipped = _base.clip_scale(norm, threshold)
    updates = _base.map_inexact(lambda x: _base.scale_leaf(x, scale), updates)
    new_state = ClipByGlobalNormState(count + 1, threshold, norm, scale, clipped)
    return updates, _base.next_state(state, ClipByGlobalNormState, new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# Per-tensor clippers: a measurement per tensor, or per unit of each tensor,
# compared with one threshold. `measure(buckets, param_leaves)` returns either
# a vector with one entry per leaf of `buckets`, or a list with, per leaf, an
# array broadcastable to it.
Measure = Callable[[_norms.Buckets, Sequence[jax.Array] | None], jax.Array | list[jax.Array]]


def per_tensor_clipper(
  measure: Measure,
  threshold: Threshold,
  name: str,
  *,
  needs_params: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """A transform scaling each tensor (or unit) whose measurement exceeds
  `threshold` down to it."""
  thresholds = {name: threshold}

  def init_fn(params):
    dtype = _base.record_dtype(params)
    k = len(_base.inexact_leaves(params))
    return PerTensorClipState(
      count=_base.zero_count(),
      threshold=_base.scalar(0, dtype),
      norm=jnp.zeros((k,), dtype),
      scale=jnp.ones((k,), dtype),
      clipped=jnp.zeros((k,), bool),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if needs_params and params is None:
      raise ValueError(
        "This transform needs the current parameters: call `update(updates, state, params)`."
      )
    count = _base.step_count(state, PerTensorClipState, thresholds)
    dtype = _base.record_dtype(updates)
    thr = _base.resolve(threshold, count, dtype)
    buckets = _norms.Buckets(_base.inexact_leaves(updates))
    param_leaves = _base.inexact_leaves(params) if needs_params else None
    measured = measure(buckets, param_leaves)
    if isinstance(measured, list):  # unit-wise
      pairs = [_base.clip_scale(m.astype(dtype), thr) for m in measured]
      new_leaves = [_base.scale_leaf(x, s) for x, (s, _) in zip(buckets.leaves, pairs)]
      record = (
        _stack([jnp.max(m) for m in measured], dtype),
        _stack([jnp.min(s) for s, _ in pairs], dtype),
        _stack([jnp.any(c) for _, c in pairs], bool),
      )
    else:
      scale, clipped = _base.clip_scale(measured.astype(dtype), thr)
      new_leaves = buckets.scale_leaves(scale)
      record = (measured.astype(dtype), scale, clipped)
    it = iter(new_leaves)
    updates = _base.map_inexact(lambda x: next(it), updates)
    new_state = PerTensorClipState(count + 1, thr, *record)
    return updates, _base.next_state(state, PerTensorClipState, new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _stack(values: list[jax.Array], dtype: jnp.dtype) -> jax.Array:
  if not values:
    return jnp.zeros((0,), dtype)
  return jnp.stack(values).astype(dtype)


def _leaf_norms(p: float, axis: int | tuple[int, ...] | None) -> Measure:
  def measure(buckets, param_leaves):
    del param_leaves
    if axis is None:
      return _norms.per_leaf_norms(buckets, p)
    return [_norms.norm_along(x, p, _check_axes(x, axis)) for x in buckets.leaves]

  return measure


def _check_axes(x: jax.Array, axis: int | tuple[int, ...]) -> int | tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else axis
  if any(not -x.ndim <= a < x.ndim for a in axes):
    raise ValueError(
      f"`axis={axis!r}` is out of range for an update of shape {x.shape};"
      " every leaf must have all the axes named (use `optax.masked` to clip"
      " leaves of different ranks separately)."
    )
  return axis


def clip_by_norm(
  max_norm: Threshold, ord: Ord | None = None, axis: int | tuple[int, ...] | None = None
) -> optax.GradientTransformationExtraArgs:
  """Scales each tensor separately so that its norm is at most `max_norm`.

  The port of `tf.clip_by_norm` and Keras' ``clipnorm``. Each leaf gets its
  own factor ``max_norm / norm(leaf)`` when its norm exceeds `max_norm`; with
  `axis`, the norm is taken over those axes and each slice is clipped on its
  own. Per-tensor clipping changes the relative size of layers: prefer
  `clip_by_global_norm` unless you are porting code that uses this.

  Args:
    max_norm: The largest allowed norm of each tensor (>= 0): a number, an
      array or a schedule ``step -> value``.
    ord: Order of the norm: 2 (the default, also for None), 1, ``math.inf``
      or any p > 0. Under `optax.inject_hyperparams`, list it in
      ``static_args``.
    axis: Axis or axes of each leaf to take the norm over (every leaf must
      have them); None takes the whole leaf.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `PerTensorClipState`.

  Raises:
    ValueError: If a concrete `max_norm` is negative or NaN, `ord <= 0`, or
      `axis` does not fit a leaf.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> tx = jaxclip.clip_by_norm(5.0)
    >>> g = {"a": jnp.array([-2.0, 3.0, 6.0]), "b": jnp.array([3.0, 4.0])}
    >>> clipped, state = tx.update(g, tx.init(g))
    >>> clipped["a"]  # norm 7 > 5: scaled by 5/7
    Array([-1.4285715,  2.142857 ,  4.285714 ], dtype=float32)
    >>> clipped["b"]  # norm 5: unchanged
    Array([3., 4.], dtype=float32)
  """
  _validate.check_threshold(max_norm, "max_norm")
  p = _validate.check_ord(ord)
  return per_tensor_clipper(_leaf_norms(p, _validate.check_axis(axis)), max_norm, "max_norm")


def clip_by_block_rms(threshold: Threshold) -> optax.GradientTransformationExtraArgs:
  """Scales each tensor so that its root mean square is at most `threshold`.

  ``rms(g) = norm(g) / sqrt(g.size)``; a tensor whose RMS exceeds the
  threshold is multiplied by ``threshold / rms``. Unlike
  `optax.clip_by_block_rms`, a zero tensor with a zero threshold stays zero
  (optax gives NaN).

  Args:
    threshold: The largest allowed RMS of each tensor (>= 0): a number, an
      array or a schedule ``step -> value``.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `PerTensorClipState` (its `norm` field holds the RMS).

  Raises:
    ValueError: If a concrete `threshold` is negative or NaN.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> tx = jaxclip.clip_by_block_rms(1.0)
    >>> tx.update(jnp.array([4.0, 0.0, 0.0, 0.0]), tx.init(None))[0]
    Array([2., 0., 0., 0.], dtype=float32)
  """
  _validate.check_threshold(threshold, "threshold")
  norms = _leaf_norms(2.0, None)

  def measure(buckets, param_leaves):
    sizes = jnp.asarray([max(x.size, 1) for x in buckets.leaves], buckets.acc)
    return norms(buckets, param_leaves) / jnp.sqrt(sizes)

  return per_tensor_clipper(measure, threshold, "threshold")
