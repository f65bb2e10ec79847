"""Clippy: each tensor's update bounded entry-wise relative to its parameters."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclip import _base, _core, _norms, _validate
from jaxclip._validate import Threshold

__all__ = ["ClippyState", "clippy"]


class ClippyState(NamedTuple):
  """What `clippy` measured at the last step, tensor by tensor.

  Vectors have one entry per floating leaf, in `jax.tree.leaves` order.

  Attributes:
    count: Number of updates processed (int32).
    ratio: Per tensor, the largest ``|u_i| / (relative * |w_i| + absolute)``
      before clipping, how far its step went past the bound (clipped when
      above 1); NaN when the update holds inf or NaN, or a parameter is NaN.
    scale: Per tensor, the factor its update was multiplied by, ``1 / ratio``
      when clipped: the largest ``s <= 1`` with
      ``s * |u_i| <= relative * |w_i| + absolute`` for all entries ``i`` (the
      reference's clipping factor).
    clipped: Per tensor, whether its update was scaled down.
  """

  count: jax.Array
  ratio: jax.Array
  scale: jax.Array
  clipped: jax.Array

  stats_name = "clippy"
  per_tensor_fields = ("ratio", "scale", "clipped")

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports (`clipped_fraction` counts tensors)."""
    return {
      **_core.per_tensor_summary(self, "ratio"),
      "count": self.count,
    }


def clippy(
  relative: Threshold = 0.1, absolute: Threshold = 1e-7
) -> optax.GradientTransformationExtraArgs:
  """Scales each tensor's update so that no entry moves its parameter too far (Clippy).

  For each tensor with update ``u`` and parameters ``w``, the update is
  multiplied by the largest ``s`` in [0, 1] such that
  ``s * |u_i| <= relative * |w_i| + absolute`` for every entry ``i`` (entries
  with ``u_i = 0`` impose nothing). One factor per tensor keeps the
  direction of its update; the bound is entry-wise, so one runaway entry is
  enough to shrink the tensor's step.

  Clippy bounds the *step*, not the gradient: place it after the optimizer
  and the learning rate, where the updates are what `optax.apply_updates`
  adds to the parameters::

    optax.chain(optax.adagrad(learning_rate), jaxclip.clippy(0.1, 1e-7))

  optax updates are added to the parameters (``w + u``, the negative of the
  reference's ``delta``, which is subtracted); the bound is on ``|u|`` and
  the factor is positive, so the sign is kept. `update` needs the current
  parameters. Before the optimizer it would clip the gradient, which an
  adaptive optimizer then rescales anyway.

  ClippyAdagrad can also bound the step by ``accumulator_relative_threshold
  / sqrt(accumulator)`` (default 0) and feed the clipped gradient back to its
  accumulator (``clip_accumulator_update``, default off); both need the
  optimizer's own state and are not part of this transform. Chained after
  `optax.adagrad`, this is ClippyAdagrad with
  ``use_standard_accumulator_update=True``.

  Non-finite values: a tensor whose update holds inf or NaN passes through
  unchanged (so that a guard such as `skip_nonfinite` sees it), and so does
  a tensor whose factor is NaN (NaN parameters). Complex entries are bounded
  by their magnitudes.

  Args:
    relative: ``lambda_rel``, the allowed step relative to ``|w|`` (>= 0): a
      number, an array or a schedule ``step -> value``. The reference
      implementations' default.
    absolute: ``lambda_abs``, the allowed step where ``w`` is 0 (>= 0),
      likewise. The reference implementations' default.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `ClippyState`.

  Raises:
    ValueError: For a concrete negative or NaN `relative` or `absolute`, or
      `update` called without `params` or with parameters that do not match
      the updates.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> params = {"w": jnp.array([1.0, 10.0])}
    >>> tx = jaxclip.clippy(relative=0.1, absolute=0.0)
    >>> updates = {"w": jnp.array([-0.5, 0.5])}
    >>> u, state = tx.update(updates, tx.init(params), params)
    >>> u["w"]  # |u_0| = 0.5 > 0.1 * |w_0|: the whole update times 0.2
    Array([-0.1,  0.1], dtype=float32)

  References:
    Tang et al., [Improving Training Stability for Multitask Ranking Models
    in Recommender Systems](https://arxiv.org/abs/2302.09178), KDD 2023.
  """
  _validate.check_threshold(relative, "relative", scalar=False)
  _validate.check_threshold(absolute, "absolute", scalar=False)
  thresholds = {"relative": relative, "absolute": absolute}
  fixed = not callable(absolute) and _validate.is_concrete(absolute)
  zero_bound = not (fixed and bool(np.all(np.asarray(absolute) > 0)))

  def init_fn(params):
    dtype = _base.record_dtype(params)
    k = len(_norms.inexact_leaves(params))
    return ClippyState(
      _base.zero_count(), jnp.zeros((k,), dtype), jnp.ones((k,), dtype), jnp.zeros((k,), bool)
    )

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
        "`clippy` bounds each step relative to the parameters it moves: call"
        " `update(updates, state, params)` with the current parameters."
      )
    count = _base.step_count(state, ClippyState, thresholds)
    own = isinstance(state, ClippyState)
    dtype = _base.record_dtype(updates)  # recorded in the state's (`keep_dtypes`)
    if own:
      dtype = jnp.result_type(dtype, state.ratio.dtype)
    leaves = _norms.inexact_leaves(updates)
    weights = _weights(leaves, params)
    rel = _base.resolve(relative, count, dtype, "relative", scalar=False)
    ab = _base.resolve(absolute, count, dtype, "absolute", scalar=False)
    ratios = [_ratio(u, w, rel, ab, zero_bound).astype(dtype) for u, w in zip(leaves, weights)]
    scales = [_scale(r) for r in ratios]
    it = iter(_base.scale_leaf(u, s) for u, s in zip(leaves, scales))
    updates = _base.map_inexact(lambda x: next(it), updates)
    ratio = jnp.stack(ratios) if ratios else jnp.zeros((0,), dtype)
    scale = jnp.stack(scales) if scales else jnp.ones((0,), dtype)
    new = ClippyState(count=count + 1, ratio=ratio, scale=scale, clipped=ratio > 1)
    return updates, _base.keep_dtypes(state, ClippyState, new)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _weights(leaves: list[jax.Array], params: optax.Params) -> list[jax.Array]:
  """The floating leaves of `params`, checked to match the updates'."""
  weights = _norms.inexact_leaves(params)
  shapes = [jnp.shape(x) for x in leaves], [jnp.shape(w) for w in weights]
  if shapes[0] != shapes[1]:
    raise ValueError(
      "`clippy` needs `params` with the same floating leaves as the updates;"
      f" got update shapes {shapes[0]} and parameter shapes {shapes[1]}. Pass"
      " the parameters the updates are for."
    )
  return weights


def _scale(ratio: jax.Array) -> jax.Array:
  """1 / ratio above 1, else 1 (also for NaN: the tensor passes through)."""
  clipped = ratio > 1
  return jnp.where(clipped, 1 / jnp.where(clipped, ratio, 1), 1).astype(ratio.dtype)


def _ratio(
  u: jax.Array, w: jax.Array, relative: jax.Array, absolute: jax.Array, zero_bound: bool
) -> jax.Array:
  """max_i |u_i| / (relative * |w_i| + absolute) over the entries with
  ``u_i != 0``; NaN if `u` holds inf or NaN (or `w` NaN where ``u_i != 0``).

  With a positive `absolute` no bound is 0, so an infinite ratio can only come
  from an infinite update: it is read as NaN after the reduction, which keeps
  the reduction free of selects (XLA:CPU does not fuse those into it). When
  bounds can be 0 (`zero_bound`), an infinite update is marked entry by entry.
  """
  acc = jnp.result_type(relative.dtype, _norms.accumulation_dtype(u.dtype))
  mag = jnp.abs(u).astype(acc)
  bound = relative.astype(acc) * jnp.abs(w).astype(acc) + absolute.astype(acc)
  ratio = jnp.where(mag == 0, 0, mag / bound)  # u_i = 0 imposes nothing
  if zero_bound:
    return jnp.max(jnp.where(jnp.isinf(mag), jnp.nan, ratio), initial=0)
  ratio = jnp.max(ratio, initial=0)
  return jnp.where(jnp.isinf(ratio), jnp.nan, ratio)
