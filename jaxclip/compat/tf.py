"""Exact ports of TensorFlow's clipping functions (``tf.clip_by_*``).

Each function follows the arithmetic of TensorFlow's ``clip_ops.py``
operation for operation, so that a model ported from TensorFlow gets the same
numbers: in float32 the results agree with TensorFlow on CPU to within one
unit in the last place (the only freedom left is the order in which a sum is
reduced). They are *not* the jaxclip formulas, and inherit TensorFlow's
behaviour at the edges:

* Norms are computed in the dtype of the tensors, as TensorFlow does: float16
  sums of squares overflow above 65504 (a float16 tensor of norm above 256
  then gets clipped to zeros by `clip_by_norm`, and to NaN by
  `clip_by_global_norm`).
* `clip_by_norm` divides: ``t * clip_norm / max(l2norm, clip_norm)``. A
  negative `clip_norm` acts as 0, and ``clip_norm=0`` on an all-zero tensor
  gives NaN (0 / 0).
* `clip_by_global_norm` multiplies by ``clip_norm * min(1 / norm,
  1 / clip_norm)``: below the threshold the scale is ``clip_norm * (1 /
  clip_norm)``, which is not exactly 1 for some thresholds (1.85 in float32),
  and a negative `clip_norm` gives scale 1 (no clipping at all). An inf or
  NaN global norm turns every output NaN.

The jaxclip transforms (`jaxclip.clip_by_global_norm` etc.) avoid these
pitfalls; use this module when bit-level agreement with a TensorFlow model
matters more. See ``docs/porting.md`` for a side-by-side comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxclip import _base, _validate

__all__ = [
  "clip_by_global_norm",
  "clip_by_global_norm_transform",
  "clip_by_norm",
  "clip_by_norm_transform",
  "clip_by_value",
  "clip_by_value_transform",
  "global_norm",
]


def _floating(t: jax.typing.ArrayLike, name: str) -> jax.Array:
  t = jnp.asarray(t)
  if not jnp.issubdtype(t.dtype, jnp.floating):
    raise TypeError(
      f"`{name}` must be a floating-point array, got dtype {t.dtype}. Cast it"
      " first, e.g. `t.astype(jnp.float32)`."
    )
  return t


def clip_by_value(
  t: jax.typing.ArrayLike,
  clip_value_min: jax.typing.ArrayLike,
  clip_value_max: jax.typing.ArrayLike,
) -> jax.Array:
  """`tf.clip_by_value`: ``max(min(t, clip_value_max), clip_value_min)``.

  The bounds are cast to the dtype of `t`. NaN entries stay NaN. As in
  TensorFlow, the bounds are not checked: with ``clip_value_min >
  clip_value_max`` every entry becomes `clip_value_min`.

  Args:
    t: An array.
    clip_value_min: Lower bound, a scalar or an array broadcastable to `t`.
    clip_value_max: Upper bound, likewise.

  Returns:
    An array of the shape and dtype of `t`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import tf
    >>> tf.clip_by_value(jnp.array([-10.0, -1.0, 0.5, 10.0]), -1, 1)
    Array([-1. , -1. ,  0.5,  1. ], dtype=float32)

  References:
    TensorFlow, [tf.clip_by_value](https://www.tensorflow.org/api_docs/python/tf/clip_by_value).
  """
  t = jnp.asarray(t)
  lo = jnp.asarray(clip_value_min).astype(t.dtype)
  hi = jnp.asarray(clip_value_max).astype(t.dtype)
  return jnp.maximum(jnp.minimum(t, hi), lo)


def clip_by_norm(
  t: jax.typing.ArrayLike,
  clip_norm: jax.typing.ArrayLike,
  axes: int | Sequence[int] | None = None,
) -> jax.Array:
  """`tf.clip_by_norm`: ``t * clip_norm / max(l2norm(t), clip_norm)``.

  The Euclidean norm is summed in the dtype of `t` (TensorFlow's formula, not
  jaxclip's float32 kernel), with a guard so that the gradient is finite at
  zero. A negative `clip_norm` acts as 0; an all-zero `t` stays zero for
  ``clip_norm > 0`` and becomes NaN for ``clip_norm == 0`` (0 / 0), as in
  TensorFlow. Because the formula divides, a tensor below the threshold comes
  back as ``t * c / c``, which is `t` up to rounding.

  Args:
    t: A floating-point array.
    clip_norm: The largest allowed norm, a scalar.
    axes: Axes to compute the norm over (each slice is clipped on its own),
      or None for the whole array.

  Returns:
    An array of the shape and dtype of `t`.

  Raises:
    TypeError: If `t` is not floating-point.
    ValueError: If `clip_norm` is not a scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import tf
    >>> tf.clip_by_norm(jnp.array([-2.0, 3.0, 6.0]), 5.0)  # norm 7: * 5 / 7
    Array([-1.4285715,  2.142857 ,  4.285714 ], dtype=float32)

  References:
    TensorFlow, [tf.clip_by_norm](https://www.tensorflow.org/api_docs/python/tf/clip_by_norm).
  """
  values = _floating(t, "t")
  if np.isscalar(clip_norm):
    # TensorFlow clamps Python and NumPy scalars in Python, before converting.
    clip_norm = max(clip_norm, 0)  # type: ignore[call-overload]
  elif jnp.ndim(clip_norm) != 0:
    raise ValueError(
      f"`clip_norm` must be a scalar, got shape {jnp.shape(clip_norm)}. To"
      " clip slices separately, pass `axes=`."
    )
  else:
    clip_norm = jnp.maximum(clip_norm, 0)
  c = jnp.asarray(clip_norm).astype(values.dtype)
  axis = _validate.check_axis(axes, "axes")
  l2sum = jnp.sum(values * values, axis=axis, keepdims=True)
  pred = l2sum > 0
  l2sum_safe = jnp.where(pred, l2sum, jnp.ones_like(l2sum))
  l2norm = jnp.where(pred, jnp.sqrt(l2sum_safe), l2sum)
  return _divide(values * c, jnp.maximum(l2norm, c))


def _divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """``numerator / denominator``, correctly rounded on CPU.

  XLA:CPU turns a division by a broadcast (loop-invariant) value into a
  multiplication by an approximate reciprocal, which is off by one unit in
  the last place for about a fifth of the entries. Materialising the
  broadcast divisor keeps a true elementwise division, as TensorFlow does.
  """
  denominator = jnp.broadcast_to(denominator, numerator.shape)
  return numerator / lax.optimization_barrier(denominator)


def _dtype_of_leaves(leaves: Sequence[jax.Array]) -> jnp.dtype:
  dtypes = {x.dtype for x in leaves}
  if len(dtypes) > 1:
    names = ", ".join(sorted(str(d) for d in dtypes))
    raise TypeError(
      f"TensorFlow's global norm needs tensors of one dtype, got {names}."
      " Cast them to one dtype first, or use `jaxclip.global_norm`, which"
      " mixes dtypes and accumulates in float32."
    )
  return dtypes.pop() if dtypes else jnp.dtype(jnp.float32)


def global_norm(t_list: Any) -> jax.Array:
  """`tf.linalg.global_norm`: ``sqrt(sum(l2norm(t)**2 for t in t_list))``.

  Computed as TensorFlow does: half sums of squares (``tf.nn.l2_loss``) per
  tensor, in the tensors' own dtype, summed, doubled and square-rooted.
  `None` entries are ignored, and so are integer leaves. An empty list has
  norm 0 (float32).

  Args:
    t_list: A list (or any pytree) of floating-point arrays of one dtype, with
      `None` entries allowed.

  Returns:
    A scalar of the tensors' dtype: for float16 tensors, a norm above about
    256 overflows to inf, as in TensorFlow.

  Raises:
    TypeError: If the tensors have different dtypes (TensorFlow raises too).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import tf
    >>> tf.global_norm([jnp.array([3.0]), None, jnp.array([4.0])])
    Array(5., dtype=float32)

  References:
    TensorFlow, [tf.linalg.global_norm](https://www.tensorflow.org/api_docs/python/tf/linalg/global_norm).
  """
  leaves = _base.inexact_leaves(t_list)
  dtype = _dtype_of_leaves(leaves)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  leaves = [jnp.asarray(x) for x in leaves]
  half_squared = [jnp.sum(x * x * jnp.asarray(0.5, x.dtype)) for x in leaves]
  total = jnp.sum(jnp.stack(half_squared))
  return jnp.sqrt(total * jnp.asarray(2.0, dtype))


def clip_by_global_norm(
  t_list: Any,
  clip_norm: jax.typing.ArrayLike,
  use_norm: jax.typing.ArrayLike | None = None,
) -> tuple[Any, jax.Array]:
  """`tf.clip_by_global_norm`: scales every tensor by one factor.

  The factor is ``clip_norm * min(1 / global_norm, 1 / clip_norm)``, plus
  ``global_norm - global_norm`` (0 for a finite norm, NaN otherwise), exactly
  as in TensorFlow. Hence, unlike `jaxclip.clip_by_global_norm`:

  * an inf or NaN global norm makes every output NaN;
  * a zero norm leaves the tensors unchanged (for ``clip_norm > 0``) and
    ``clip_norm == 0`` with a zero norm gives NaN;
  * a negative `clip_norm` leaves the tensors unchanged;
  * below the threshold the factor ``clip_norm * (1 / clip_norm)`` may differ
    from 1 by one unit in the last place.

  Args:
    t_list: A list (or any pytree) of floating-point arrays of one dtype;
      `None` entries are kept as `None`, integer leaves pass through.
    clip_norm: The largest allowed global norm, a scalar.
    use_norm: A precomputed global norm to use instead of `global_norm`.

  Returns:
    ``(clipped, norm)``: the arrays scaled, in the structure of `t_list`, and
    the global norm used (before clipping).

  Raises:
    TypeError: If the tensors have different dtypes and `use_norm` is None.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import tf
    >>> t = [jnp.array([-2.0, 3.0, 6.0]), jnp.array([-4.0, 6.0, 12.0])]
    >>> clipped, norm = tf.clip_by_global_norm(t, 14.5)  # scale 14.5 / sqrt(245)
    >>> norm
    Array(15.652476, dtype=float32)
    >>> clipped[0]
    Array([-1.852742 ,  2.7791128,  5.5582256], dtype=float32)

  References:
    TensorFlow, [tf.clip_by_global_norm](https://www.tensorflow.org/api_docs/python/tf/clip_by_global_norm).
    Pascanu et al., [On the difficulty of training recurrent neural
    networks](https://arxiv.org/abs/1211.5063), 2013.
  """
  norm = global_norm(t_list) if use_norm is None else jnp.asarray(use_norm)
  if not jnp.issubdtype(norm.dtype, jnp.floating):
    norm = norm.astype(jnp.float32)
  if jnp.ndim(clip_norm) != 0:
    raise ValueError(f"`clip_norm` must be a scalar, got shape {jnp.shape(clip_norm)}.")
  c = jnp.asarray(clip_norm).astype(norm.dtype)
  one = jnp.asarray(1.0, norm.dtype)
  scale_for_finite = c * jnp.minimum(one / norm, one / c)
  scale = scale_for_finite + (norm - norm)  # NaN when the norm is not finite.
  clipped = _base.map_inexact(lambda x: x * scale.astype(x.dtype), t_list)
  return clipped, norm


def clip_by_value_transform(
  clip_value_min: jax.typing.ArrayLike, clip_value_max: jax.typing.ArrayLike
) -> optax.GradientTransformationExtraArgs:
  """`clip_by_value` applied to every floating leaf, as an optax transform.

  Args:
    clip_value_min: Lower bound.
    clip_value_max: Upper bound.

  Returns:
    A stateless `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import tf
    >>> tx = tf.clip_by_value_transform(-1.0, 1.0)
    >>> tx.update({"w": jnp.array([-3.0, 0.5])}, tx.init(None))[0]["w"]
    Array([-1. ,  0.5], dtype=float32)

  References:
    TensorFlow, [tf.clip_by_value](https://www.tensorflow.org/api_docs/python/tf/clip_by_value).
  """

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    fn = lambda x: clip_by_value(x, clip_value_min, clip_value_max)  # noqa: E731
    return _base.map_inexact(fn, updates), state

  return optax.GradientTransformationExtraArgs(_init_empty, update_fn)


def clip_by_norm_transform(
  clip_norm: jax.typing.ArrayLike, axes: int | Sequence[int] | None = None
) -> optax.GradientTransformationExtraArgs:
  """`clip_by_norm` applied to every floating leaf on its own.

  This is also what Keras' ``clipnorm`` does (see `jaxclip.compat.keras`).

  Args:
    clip_norm: The largest allowed norm of each leaf.
    axes: Axes of each leaf to compute the norm over, or None for all.

  Returns:
    A stateless `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from jaxclip.compat import tf
    >>> tx = tf.clip_by_norm_transform(1.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.5])}
    >>> clipped, _ = tx.update(g, tx.init(g))
    >>> clipped["a"], clipped["b"]
    (Array([0.6, 0.8], dtype=float32), Array([0.5], dtype=float32))
    >>> opt = optax.chain(tf.clip_by_norm_transform(1.0), optax.sgd(0.1))

  References:
    TensorFlow, [tf.clip_by_norm](https://www.tensorflow.org/api_docs/python/tf/clip_by_norm).
  """

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return _base.map_inexact(lambda x: clip_by_norm(x, clip_norm, axes), updates), state

  return optax.GradientTransformationExtraArgs(_init_empty, update_fn)


def clip_by_global_norm_transform(
  clip_norm: jax.typing.ArrayLike,
) -> optax.GradientTransformationExtraArgs:
  """`clip_by_global_norm` over all floating leaves, as an optax transform.

  Args:
    clip_norm: The largest allowed global norm.

  Returns:
    A stateless `optax.GradientTransformationExtraArgs`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from jaxclip.compat import tf
    >>> tx = optax.chain(tf.clip_by_global_norm_transform(1.0), optax.sgd(1.0))
    >>> g = {"a": jnp.array([3.0]), "b": jnp.array([4.0])}
    >>> updates, _ = tx.update(g, tx.init(g))
    >>> updates["a"], updates["b"]
    (Array([-0.6], dtype=float32), Array([-0.8], dtype=float32))

  References:
    TensorFlow, [tf.clip_by_global_norm](https://www.tensorflow.org/api_docs/python/tf/clip_by_global_norm).
  """

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    return clip_by_global_norm(updates, clip_norm)[0], state

  return optax.GradientTransformationExtraArgs(_init_empty, update_fn)


def _init_empty(params: optax.Params) -> optax.EmptyState:
  del params
  return optax.EmptyState()
