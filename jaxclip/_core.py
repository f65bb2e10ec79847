"""The clipping pipeline: measure a norm, decide a threshold, scale, record.

Two cores carry every norm-based clipper; a clipper is a state type and a
threshold policy over one of them.

* `global_clipper`: one norm for the whole update (or one per example, with
  `per_example`) and one scale. `clip_by_global_norm`, `autoclip`, `zclip`
  and `quantile_clip` are its policies.
* `per_tensor_clipper`: one measurement per tensor, or per unit of each
  tensor, each scaled on its own. `clip_by_norm`, `clip_by_block_rms`,
  `adaptive_grad_clip` and `adagc` are its policies.

A policy is ``decide(measured, state, count, extra_args) -> (threshold,
fields)``: the threshold to clip to and the state fields of its own. The core
records, in fields of the same names in every state, what it measured
(`norm`), the `threshold`, the `scale` applied and whether it `clipped`, and
the step `count`; every state leaf keeps the dtype `init` gave it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxclip import _base, _layers, _norms

# decide(measured, state, count, extra_args) -> (threshold, policy fields).
Decide = Callable[[jax.Array, Any, jax.Array, dict[str, Any]], tuple[jax.Array, dict[str, Any]]]
# init_state(dtype, num_tensors) -> the transform's state at step 0.
InitState = Callable[[jnp.dtype, int], Any]
# measure(layout, param_layout) -> the measurement of each tensor, one vector
# in the layout's group order (`Layout.join`); unit-wise, per group, the
# measurement of each unit of each member (the unit dims reduced to 1).
Measure = Callable[[_norms.Layout, _norms.Layout | None], jax.Array | list[jax.Array]]


def _count_of(state: Any, state_type: type, name: str, schedules: Mapping[str, Any] | None):
  """The step count; `schedules` given: a stateless state is accepted."""
  if schedules is None:
    _base.expect_state(state, state_type, name)
    return state.count
  return _base.step_count(state, state_type, schedules)


def global_clipper(
  name: str,
  state_type: type,
  init_state: InitState,
  decide: Decide,
  *,
  p: float = 2.0,
  axis_name: str | None = None,
  per_example: bool = False,
  schedules: Mapping[str, Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """A clipper scaling the whole update by one factor (per example).

  Args:
    name: The public name, for error messages.
    state_type: The state NamedTuple; it has the fields `count`, `norm`,
      `threshold`, `scale` and `clipped` and those `decide` returns.
    init_state: Builds the state at step 0.
    decide: The threshold policy, given the norm (per-example norms with
      `per_example`).
    p: The order of the norm.
    axis_name: The mapped axis to sum partial norms over (shard_map, pmap).
    per_example: Whether the updates carry a batch axis 0: each example is
      clipped on its own, and the clipped examples are summed.
    schedules: For a clipper with no state of its own to learn from, its
      thresholds by name: the state of a stateless transform is then accepted
      (schedules need this transform's own count).
  """

  def init_fn(params):
    return init_state(_base.record_dtype(params), 0)

  def update_fn(updates, state, params=None, **extra_args):
    del params
    count = _count_of(state, state_type, name, schedules)
    if per_example:
      leaves = _base.batched_leaves(updates, name)
      norm = _norms.tree_norm(_base.as_floating(leaves), p, batch_ndim=1)
    else:
      leaves = _norms.inexact_leaves(updates)
      norm = _norms.tree_norm(leaves, p, axis_name=axis_name)
    own = isinstance(state, state_type)
    if own:  # scaled in the wider dtype; recorded in the state's (`keep_dtypes`)
      norm = norm.astype(jnp.result_type(norm.dtype, state.norm.dtype))
    threshold, fields = decide(norm, state, count, extra_args)
    threshold = jnp.asarray(threshold).astype(norm.dtype)
    if per_example:
      scale, clipped = _base.example_scale(norm, threshold)
      updates = jax.tree.unflatten(jax.tree.structure(updates), _base.weighted_sums(scale, leaves))
      record = dict(
        norm=_norms.keeping_nan(jnp.max)(norm, initial=0),
        scale=_norms.keeping_nan(jnp.min)(scale, initial=1),
        clipped=jnp.any(clipped),
      )
    else:
      scale, clipped = _base.clip_scale(norm, threshold)
      updates = _base.map_inexact(lambda x: _base.scale_leaf(x, scale), updates)
      record = dict(norm=norm, scale=scale, clipped=clipped)
    new = state_type(count=count + 1, threshold=threshold, **record, **fields) if own else state
    return updates, _base.keep_dtypes(state, state_type, new)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def per_tensor_clipper(
  name: str,
  state_type: type,
  init_state: InitState,
  measure: Measure,
  decide: Decide,
  *,
  needs_params: bool = False,
  unitwise: bool = False,
  schedules: Mapping[str, Any] | None = None,
  layer_axes: _layers.LayerAxes = None,
) -> optax.GradientTransformationExtraArgs:
  """A clipper scaling each tensor (or each unit of it) on its own.

  Args:
    name: The public name, for error messages.
    state_type: The state NamedTuple; it has the fields `count`, `norm`,
      `threshold`, `scale` and `clipped` (one entry per floating leaf, in
      `jax.tree.leaves` order; `threshold` may be a scalar) and those
      `decide` returns.
    init_state: Builds the state at step 0 for a number of tensors.
    measure: The measurement of each tensor (a vector in the layout's group
      order), or unit-wise of each unit, per group of the layout.
    decide: The threshold policy, given each tensor's measurement (its
      largest unit's, when unit-wise): a scalar or one entry per tensor.
    needs_params: Whether `update` needs the parameters (they are grouped
      like the updates and given to `measure`).
    unitwise: Whether `measure` gives one value per unit rather than per
      tensor (then no leaf is flattened, and the record per tensor is the
      largest measurement, the smallest scale and whether any unit clipped).
    schedules: As in `global_clipper`.
    layer_axes: Which leaves hold stacked layers on leading axes (see
      `jaxclip._layers`): each layer slice is then a tensor of its own, with
      its own entry in the state.
  """
  rules = _layers.check_layer_axes(layer_axes)

  def init_fn(params):
    _norms.inexact_leaves(params)  # a Python-number leaf is an error
    return init_state(_base.record_dtype(params), _layers.num_entries(params, rules))

  def update_fn(updates, state, params=None, **extra_args):
    if needs_params and params is None:
      raise ValueError(
        f"`{name}` needs the current parameters: call `update(updates, state, params)`."
      )
    count = _count_of(state, state_type, name, schedules)
    own = isinstance(state, state_type)
    leaves = _norms.inexact_leaves(updates)
    lead = _layers.layer_counts(updates, rules)
    layout = _norms.Layout(leaves, lead, flatten=not unitwise)
    param_layout = None
    if needs_params:
      param_layout = _norms.Layout(_base.matching_params(updates, params, name), lead, like=layout)
    measured = measure(layout, param_layout)
    # Scaled in the wider of the measurement's and the state's dtypes;
    # recorded in the state's (`keep_dtypes`).
    dtype = jnp.result_type(layout.acc, *([measured] if not unitwise else measured))
    if own:
      dtype = jnp.result_type(dtype, state.norm.dtype)
    if unitwise:
      measured = [m.astype(dtype) for m in measured]
      # A leaf with no units (shape (3, 0)) measures 0 and is never clipped.
      largest = functools.partial(_norms.keeping_nan(jnp.max), initial=0)
      per_tensor = layout.vector(layout.reduce_entries(largest, measured))
    else:
      per_tensor = layout.in_leaf_order(measured.astype(dtype))
    threshold, fields = decide(per_tensor, state, count, extra_args)
    threshold = jnp.asarray(threshold).astype(dtype)
    if unitwise:
      scales, scale, clipped = _unit_scales(layout, measured, threshold)
    else:
      scale, clipped = _base.clip_scale(per_tensor, threshold)
      scales = layout.broadcast(scale)
    it = iter(_base.scale_leaf(x, s) for x, s in zip(layout.leaves, scales))
    updates = _base.map_inexact(lambda x: next(it), updates)
    if not own:
      return updates, state
    new = state_type(
      count=count + 1,
      norm=per_tensor,
      threshold=threshold,
      scale=scale,
      clipped=clipped,
      **fields,
    )
    return updates, _base.keep_dtypes(state, state_type, new)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _unit_scales(
  layout: _norms.Layout, measured: list[jax.Array], threshold: jax.Array
) -> tuple[list[jax.Array], jax.Array, jax.Array]:
  """Per leaf the scales of its units (`measured` per group, against a scalar
  `threshold` or one per tensor), and per tensor the smallest scale and
  whether any unit was clipped."""
  group_threshold = layout.groupwise(threshold) if threshold.ndim else [threshold] * len(measured)
  pairs = [_base.clip_scale(m, t) for m, t in zip(measured, group_threshold)]
  scales = [s for s, _ in pairs]
  smallest_of = functools.partial(_norms.keeping_nan(jnp.min), initial=1)
  smallest = layout.vector(layout.reduce_entries(smallest_of, scales))
  clipped = layout.vector(layout.reduce_entries(jnp.any, [c for _, c in pairs]))
  return layout.per_leaf(scales), smallest, clipped


def global_summary(state: Any) -> dict[str, jax.Array]:
  """What `jaxclip.stats` reports for a global-norm clipper's state."""
  return {
    "global_norm": state.norm,
    "threshold": state.threshold,
    "scale": state.scale,
    "clipped": state.clipped,
    "count": state.count,
  }


def per_tensor_summary(state: Any, measured: str = "norm") -> dict[str, jax.Array]:
  """Scalar summaries of a per-tensor state's vectors (empty ones included):
  the largest of the `measured` field (``norm``, or ``ratio`` for clippers
  that measure entries against a bound), the smallest scale, and how many
  tensors were clipped."""
  values = getattr(state, measured)
  k = max(int(values.shape[0]), 1)
  return {
    f"{measured}_max": jnp.max(values, initial=0),
    "scale_min": jnp.min(state.scale, initial=1),
    "clipped": jnp.any(state.clipped),
    "clipped_fraction": jnp.sum(state.clipped, dtype=jnp.float32) / k,
  }
