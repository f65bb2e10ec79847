"""Fixed-threshold clipping: by value, per-tensor norm, global norm, block RMS."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclip import _base, _core, _norms, _validate
from jaxclip._layers import LayerAxes
from jaxclip._validate import Ord, Threshold


class ClipByValueState(NamedTuple):
  """What `clip` and `clip_by_value` measured at the last step.

  Attributes:
    count: Number of updates processed (int32).
    max_abs: Largest magnitude among the updates before clipping.
    clipped_fraction: Fraction of floating entries that were outside the bounds
      (NaN when the updates hold a NaN).
    clipped: Whether any entry was clipped.
  """

  count: jax.Array
  max_abs: jax.Array
  clipped_fraction: jax.Array
  clipped: jax.Array

  stats_name = "clip_by_value"

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports."""
    return {
      "max_abs": self.max_abs,
      "clipped": self.clipped,
      "clipped_fraction": self.clipped_fraction,
      "count": self.count,
    }


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

  stats_name = "clip_by_global_norm"

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports."""
    return _core.global_summary(self)


class PerTensorClipState(NamedTuple):
  """What a per-tensor clipper measured at the last step, tensor by tensor.

  `norm`, `scale` and `clipped` are vectors with one entry per floating leaf
  of the updates, in the order of `jax.tree.leaves` (integer leaves have no
  entry; with `layer_axes`, a stacked leaf has one entry per layer, its
  layers in row-major order, before the next leaf's entries: not the order
  of the same model with unstacked layers, so read them by name with
  `jaxclip.stats`). Vectors rather than trees keep the state small and fast to compile
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

  stats_name = "per_tensor"
  per_tensor_fields = ("norm", "scale", "clipped")

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports."""
    return {**_core.per_tensor_summary(self), "threshold": self.threshold, "count": self.count}


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
  _validate.check_threshold(min_value, "min_value", allow_negative=True, scalar=False)
  _validate.check_threshold(max_value, "max_value", allow_negative=True, scalar=False)
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
    bounds = dict(scalar=False, allow_negative=True)
    lo = _base.resolve(min_value, count, dtype, "min_value", **bounds)
    hi = _base.resolve(max_value, count, dtype, "max_value", **bounds)
    if (callable(min_value) or callable(max_value)) and _validate.is_concrete(lo - hi):
      if np.any(np.asarray(lo) > np.asarray(hi)):
        raise ValueError(
          f"The bounds' schedules gave `min_value` {np.asarray(lo).tolist()} above"
          f" `max_value` {np.asarray(hi).tolist()}"
          f"{_base.at_step(count)}; each step needs min_value <= max_value."
        )
    leaves = _norms.inexact_leaves(updates)
    for x in leaves:
      _check_bounds_fit(x, lo, hi)
    # Leaves of one shape are stacked once, for both records (no padding:
    # a padded zero may lie outside the bounds).
    groups = [g.data for g in _norms.Layout(leaves, flatten=False).groups]
    max_abs = _norms.tree_norm(groups, math.inf)
    n_out = _count_outside(groups, lo, hi, max_abs)
    new_state = ClipByValueState(
      count=count + 1,
      max_abs=max_abs,
      clipped_fraction=n_out / max(sum(x.size for x in leaves), 1),
      clipped=n_out > 0,
    )
    updates = _base.map_inexact(
      lambda x: jnp.clip(x, lo.astype(x.dtype), hi.astype(x.dtype)), updates
    )
    return updates, _base.keep_dtypes(state, ClipByValueState, new_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _count_outside(
  groups: list[jax.Array], lo: jax.Array, hi: jax.Array, max_abs: jax.Array
) -> jax.Array:
  """The number of entries outside ``[lo, hi]`` (NaN if any is NaN).

  With scalar bounds, the count is taken only on steps where the largest
  magnitude reaches the nearer bound (or is NaN): no entry can be outside
  otherwise, and counting is the costliest pass of value clipping.
  """

  def count():
    # Each group reads its own copy of the scalars (shared, they tripled the
    # cost of the count on a 40M-parameter tree; see `_norms.own_copies`).
    scalars = (lo, hi, *(jnp.float32(c) for c in _OUTSIDE_CONSTANTS))
    copies, data = _norms.own_copies([scalars] * len(groups), groups)
    return _norms.tree_sum([_outside(x, *c) for x, c in zip(data, copies)])

  if lo.ndim or hi.ndim or not groups:
    return count()
  # An entry outside is beyond the nearer bound, also as rounded to its dtype
  # (an entry above the rounded bound is above the bound itself).
  near = jnp.minimum(jnp.abs(lo), jnp.abs(hi)).astype(max_abs.dtype)
  maybe = (max_abs > near) | jnp.isnan(max_abs) | (lo > 0) | (hi < 0)
  return _norms.cond(maybe, count, lambda: jnp.zeros((), jnp.float32))


# 0, the two factors whose product (2**149) lifts the smallest distance to at
# least 1, and 1 (see `_outside`).
_OUTSIDE_CONSTANTS = (0.0, 2.0**100, 2.0**49, 1.0)


def _outside(
  x: jax.Array,
  lo: jax.Array,
  hi: jax.Array,
  zero: jax.Array,
  lift: jax.Array,
  lift_more: jax.Array,
  one: jax.Array,
) -> jax.Array:
  """1.0 where an entry is outside ``[lo, hi]``, else 0.0 (NaN where it is NaN).

  Arithmetic rather than a comparison, which XLA:CPU reduces several times
  slower: the distance to the bounds is 0 inside them, and any non-zero
  distance, even the smallest subnormal (2**-149), times 2**149 is at least
  1 (applied in two clamped steps, `lift` and `lift_more`, as 2**149 is not
  a float32). The constants are arguments (see `_count_outside`).
  """
  # The bounds in the leaf's dtype, as `jnp.clip` applies them.
  lo, hi = (b.astype(x.dtype).astype(jnp.float32) for b in (lo, hi))
  x = x.astype(jnp.float32)
  d = jnp.maximum(x - hi, zero) + jnp.maximum(lo - x, zero)
  return jnp.minimum(jnp.minimum(d * lift, one) * lift_more, one)


def _check_bounds_fit(x: jax.Array, lo: jax.Array, hi: jax.Array) -> None:
  """Raises unless both bounds broadcast to `x` without changing its shape."""
  for name, bound in (("min_value", lo), ("max_value", hi)):
    try:
      fits = np.broadcast_shapes(x.shape, bound.shape) == x.shape
    except ValueError:
      fits = False
    if not fits:
      raise ValueError(
        f"`{name}` of shape {bound.shape} does not broadcast to an update of"
        f" shape {x.shape} without changing its shape. Pass a scalar, or an"
        " array broadcastable to every leaf (clip leaves of different shapes"
        " separately with `optax.masked` or `optax.partition`)."
      )


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
  _validate.check_threshold(max_delta, "max_delta", scalar=False)
  if callable(max_delta):
    schedule = max_delta

    def checked(count):
      value = schedule(count)
      _base.check_scheduled(value, "max_delta", count, scalar=False)
      return value

    return clip_by_value(lambda n: -jnp.asarray(checked(n)), schedule)
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
    max_norm: The largest allowed global norm (>= 0): a number, a 0-d array
      (also traced, for `optax.inject_hyperparams`) or a schedule
      ``step -> value``.
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
    ValueError: If a concrete `max_norm` is negative or NaN, or `ord <= 0`;
      or `max_norm` is not a scalar (also from a schedule or traced).

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
  return _core.global_clipper(
    "clip_by_global_norm",
    ClipByGlobalNormState,
    _fixed_init(ClipByGlobalNormState),
    _fixed(max_norm, "max_norm"),
    p=p,
    axis_name=axis_name,
    schedules={"max_norm": max_norm},
  )


def _fixed_init(state_type: type):
  """`init_state` of a fixed-threshold clipper: nothing measured yet."""

  def init_state(dtype, k):
    shape = () if state_type is ClipByGlobalNormState else (k,)
    return state_type(
      count=_base.zero_count(),
      threshold=_base.scalar(0, dtype),
      norm=jnp.zeros(shape, dtype),
      scale=jnp.ones(shape, dtype),
      clipped=jnp.zeros(shape, bool),
    )

  return init_state


def _fixed(threshold: Threshold, name: str) -> _core.Decide:
  """The policy of a fixed (or scheduled) scalar threshold named `name`."""

  def decide(measured, state, count, extra_args):
    return _base.resolve(threshold, count, measured.dtype, name), {}

  return decide


def per_tensor(
  name: str, measure: _core.Measure, threshold: Threshold, arg: str, **kwargs: Any
) -> optax.GradientTransformationExtraArgs:
  """A per-tensor clipper with a fixed (or scheduled) threshold named `arg`."""
  return _core.per_tensor_clipper(
    name,
    PerTensorClipState,
    _fixed_init(PerTensorClipState),
    measure,
    _fixed(threshold, arg),
    schedules={arg: threshold},
    **kwargs,
  )


def clip_by_norm(
  max_norm: Threshold,
  ord: Ord | None = None,
  axis: int | tuple[int, ...] | None = None,
  *,
  layer_axes: LayerAxes = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales each tensor separately so that its norm is at most `max_norm`.

  The port of `tf.clip_by_norm` and Keras' ``clipnorm``. Each leaf gets its
  own factor ``max_norm / norm(leaf)`` when its norm exceeds `max_norm`; with
  `axis`, the norm is taken over those axes and each slice is clipped on its
  own. Per-tensor clipping changes the relative size of layers: prefer
  `clip_by_global_norm` unless you are porting code that uses this.

  Args:
    max_norm: The largest allowed norm of each tensor (>= 0): a number, a
      0-d array or a schedule ``step -> value``.
    ord: Order of the norm: 2 (the default, also for None), 1, ``math.inf``
      or any p > 0. Under `optax.inject_hyperparams`, list it in
      ``static_args``.
    axis: Axis or axes of each leaf to take the norm over (every leaf must
      have them; with `layer_axes`, counted within one layer); None takes
      the whole leaf.
    layer_axes: Which leaves stack several layers on leading axes (an int
      for every leaf, or a dict such as ``{"blocks": 1}`` from a path
      fragment to a count): each layer is then clipped as a tensor of its
      own and has its own entry in the state.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `PerTensorClipState`.

  Raises:
    ValueError: If a concrete `max_norm` is negative or NaN, `ord <= 0`,
      `axis` does not fit a leaf, or `max_norm` is not a scalar (also from a
      schedule or traced).

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
  axis = _validate.check_axis(axis)
  if axis is None:
    measure = lambda layout, _: _norms.joined_norms(layout, p)  # noqa: E731
    return per_tensor("clip_by_norm", measure, max_norm, "max_norm", layer_axes=layer_axes)

  def measure_units(layout, _):
    return _norms.group_norms(layout, p, lambda shape: _norms.unitwise_axes(shape, axis))

  return per_tensor(
    "clip_by_norm", measure_units, max_norm, "max_norm", unitwise=True, layer_axes=layer_axes
  )


def clip_by_block_rms(
  threshold: Threshold, *, layer_axes: LayerAxes = None
) -> optax.GradientTransformationExtraArgs:
  """Scales each tensor so that its root mean square is at most `threshold`.

  ``rms(g) = sqrt(mean(g**2))`` (the mean taken before the root, as optax
  takes it); a tensor whose RMS exceeds the threshold is multiplied by
  ``threshold / rms``. `optax.clip_by_block_rms` divides by ``rms /
  threshold`` instead, so entries may differ from optax's in the last bit:
  XLA does not fuse a division of every entry into the optimizer's kernels
  (chained with AdamW on CPU, 2.2x a bare step against 1.2x). Unlike
  `optax.clip_by_block_rms`, a zero tensor with a zero threshold stays zero
  (optax gives NaN).

  Args:
    threshold: The largest allowed RMS of each tensor (>= 0): a number, a
      0-d array or a schedule ``step -> value``.
    layer_axes: Which leaves stack several layers on leading axes (as in
      `clip_by_norm`): each layer is then a block of its own.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `PerTensorClipState` (its `norm` field holds the RMS).

  Raises:
    ValueError: If a concrete `threshold` is negative or NaN, or it is not a
      scalar (also from a schedule or traced).

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> tx = jaxclip.clip_by_block_rms(1.0)
    >>> tx.update(jnp.array([4.0, 0.0, 0.0, 0.0]), tx.init(None))[0]
    Array([2., 0., 0., 0.], dtype=float32)
  """
  _validate.check_threshold(threshold, "threshold")

  def measure(layout, _):
    return _norms.joined_norms(layout, 2.0, mean=True)

  return per_tensor("clip_by_block_rms", measure, threshold, "threshold", layer_axes=layer_axes)
