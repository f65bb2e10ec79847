"""Exact ports of TensorFlow's clipping functions (``tf.clip_by_*``).

Each function follows the arithmetic of TensorFlow's ``clip_ops.py``
operation for operation, so that a model ported from TensorFlow gets the same
numbers, and the same gradients (at ties, `max` and `min` send the gradient
where TensorFlow sends it). On CPU the only freedom left is the order in
which a sum is reduced: results agree with TensorFlow to 1 unit in the last
place for most inputs, a few units for long sums (measured tolerances in
``docs/porting.md``). They are *not* the jaxclip formulas, and inherit
TensorFlow's behaviour at the edges:

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

Inputs are converted as ``tf.convert_to_tensor`` converts them: a Python
float, or a (nested) list of them, becomes a float32 array, a list of ints an
int32 array, and each element of `t_list` one array (``[[3.0, 4.0]]`` is one
tensor of shape (2,), ``[3.0, 4.0]`` two scalars). Bounds and thresholds must
broadcast to the tensor without changing its shape, as TensorFlow requires.

The jaxclip transforms (`jaxclip.clip_by_global_norm` etc.) avoid these
pitfalls; use this module when bit-level agreement with a TensorFlow model
matters more. See ``docs/porting.md`` for a side-by-side comparison.
"""

from __future__ import annotations

from collections.abc import ItemsView, Iterator, KeysView, Sequence, ValuesView
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxclip import _validate
from jaxclip.compat import _tree

__all__ = [
  "clip_by_average_norm",
  "clip_by_global_norm",
  "clip_by_global_norm_transform",
  "clip_by_norm",
  "clip_by_norm_transform",
  "clip_by_value",
  "clip_by_value_transform",
  "global_norm",
]

# The dtypes `tf.nn.l2_loss` (and so `tf.linalg.global_norm`) accepts.
_L2_LOSS_DTYPES = "float16, bfloat16, float32 or float64"


def _python_leaves(x: Any) -> list[Any] | None:
  """The leaves of a Python number or nested list/tuple of Python numbers.

  None if `x` holds anything else (an array, say).
  """
  if isinstance(x, list | tuple):
    leaves: list[Any] = []
    for item in x:
      sub = _python_leaves(item)
      if sub is None:
        return None
      leaves.extend(sub)
    return leaves
  return [x] if _tree.is_python_number(x) else None


def _python_dtype(leaves: list[Any]) -> type:
  """The dtype TensorFlow infers for Python numbers: float32, int32, bool."""
  if any(isinstance(v, complex) for v in leaves):
    return np.complex64
  if any(isinstance(v, float) for v in leaves) or not leaves:
    return np.float32
  if all(isinstance(v, bool) for v in leaves):
    return np.bool_
  return np.int32


def _convert(x: Any, name: str) -> jax.Array:
  """``tf.convert_to_tensor(x)`` as a jax array.

  Arrays keep their dtype. Python numbers and nested lists of them get
  TensorFlow's dtypes (float32 for floats, int32 for ints, bool); a list that
  holds arrays is packed into one array, as TensorFlow packs it.
  """
  if isinstance(x, jax.Array | np.ndarray | np.generic):
    return jnp.asarray(x)
  if x is None:
    raise ValueError(
      f"`{name}` is None, which TensorFlow cannot convert to a tensor either."
      " Pass a number or an array."
    )
  if not (_tree.is_python_number(x) or isinstance(x, list | tuple)):
    raise TypeError(
      f"`{name}` must be an array, a number or a (nested) list of numbers, got"
      f" {type(x).__name__}: TensorFlow converts it with tf.convert_to_tensor."
      " To clip a dict or another pytree, pass it as `t_list` itself."
    )
  leaves = _python_leaves(x)
  try:
    if leaves is not None:
      return jnp.asarray(np.array(x, dtype=_python_dtype(leaves)))
    return jnp.asarray(x)
  except (TypeError, ValueError):
    raise ValueError(
      f"`{name}` is a nested sequence that is not rectangular (rows of"
      " different lengths, or arrays of different shapes), which TensorFlow"
      " cannot convert to one tensor either (\"Can't convert non-rectangular"
      ' Python sequence to Tensor"). Pass its parts as separate elements, or'
      " pad them to one shape."
    ) from None


def _convert_numbers(tree: Any) -> Any:
  """`tree` with every Python-number leaf converted as TensorFlow does."""
  return jax.tree.map(lambda x: _convert(x, "leaf") if _tree.is_python_number(x) else x, tree)


def _tensors(t_list: Any) -> tuple[Any, bool]:
  """`t_list` converted: ``(tensors, is_sequence)``.

  A list or tuple is what TensorFlow takes: each element is converted to one
  array (`None` is kept). Any other pytree (a dict, a model's parameter tree)
  is walked as a pytree, with Python-number leaves converted one by one.
  """
  if isinstance(t_list, list | tuple):
    return [None if t is None else _convert(t, f"t_list[{i}]") for i, t in enumerate(t_list)], True
  if isinstance(t_list, Iterator | KeysView | ValuesView | ItemsView):
    raise TypeError(
      f"t_list should be a sequence, got a {type(t_list).__name__} object (as"
      " TensorFlow says). Make it a list first, e.g. `list(grads.values())`."
    )
  return _convert_numbers(t_list), False


def _floating(t: jax.Array, name: str) -> jax.Array:
  if not jnp.issubdtype(t.dtype, jnp.floating):
    raise TypeError(
      f"`{name}` must be a floating-point array, got dtype {t.dtype}. Cast it"
      " first, e.g. `t.astype(jnp.float32)` (write `[3.0, 4.0]`, not `[3, 4]`)."
    )
  return t


def _check_shape(name: str, shape: tuple[int, ...], t_shape: tuple[int, ...]) -> None:
  """TensorFlow's check that `name` broadcasts to `t` without changing it."""
  try:
    out = np.broadcast_shapes(tuple(t_shape), tuple(shape))
  except ValueError:
    out = None
  if out != tuple(t_shape):
    raise ValueError(
      f"`{name}` has shape {tuple(shape)}, which does not broadcast to the"
      f" shape {tuple(t_shape)} of `t` without changing it; TensorFlow raises"
      " too. Pass a scalar or an array whose shape broadcasts to"
      f" {tuple(t_shape)}, e.g. {tuple(t_shape)} itself."
    )


def _bound(value: Any, name: str, t: jax.Array) -> jax.Array:
  """A `clip_by_value` bound: converted, shape-checked, cast to t's dtype."""
  if jnp.issubdtype(t.dtype, jnp.integer):
    leaves = _python_leaves(value)
    if leaves is not None and any(isinstance(v, float | complex) for v in leaves):
      raise TypeError(
        f"`{name}` is the Python number (or list) {value!r}, which TensorFlow"
        f' cannot convert to the integer dtype {t.dtype} of `t` ("Cannot'
        f' convert {value!r} to EagerTensor of dtype {t.dtype}"). Cast `t` to'
        " a floating dtype first, or pass integer bounds."
      )
  bound = _convert(value, name)
  _check_shape(name, bound.shape, t.shape)
  return bound.astype(t.dtype)


def clip_by_value(
  t: jax.typing.ArrayLike,
  clip_value_min: jax.typing.ArrayLike,
  clip_value_max: jax.typing.ArrayLike,
) -> jax.Array:
  """`tf.clip_by_value`: ``max(min(t, clip_value_max), clip_value_min)``.

  `t` is converted as TensorFlow converts it (a list of floats becomes a
  float32 array, a list of ints an int32 array); the bounds are cast to its
  dtype. Each bound is a scalar or an array that broadcasts to the shape of
  `t` *without changing it*: TensorFlow refuses a bound that would make the
  result larger than `t`, and so does this function. NaN entries stay NaN. As
  in TensorFlow, the bounds are not checked against each other: with
  ``clip_value_min > clip_value_max`` every entry becomes `clip_value_min`.

  Args:
    t: An array of real numbers (floating or integer), or a (nested) list of
      numbers.
    clip_value_min: Lower bound, a scalar or an array broadcastable to `t`'s
      shape.
    clip_value_max: Upper bound, likewise.

  Returns:
    An array of the shape and dtype of `t`.

  Raises:
    ValueError: If a bound does not broadcast to `t`'s shape without changing
      it, or `t` is a ragged nested list.
    TypeError: If `t` is complex or boolean, or if `t` is an integer array and
      a bound is a Python float (TensorFlow raises too).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import tf
    >>> tf.clip_by_value(jnp.array([-10.0, -1.0, 0.5, 10.0]), -1, 1)
    Array([-1. , -1. ,  0.5,  1. ], dtype=float32)
    >>> tf.clip_by_value([[-1.0, 0.0, 10.0], [-1.0, 0.0, 10.0]], [[2.0], [1.0]], 100.0)
    Array([[ 2.,  2., 10.],
           [ 1.,  1., 10.]], dtype=float32)

  References:
    TensorFlow, [tf.clip_by_value](https://www.tensorflow.org/api_docs/python/tf/clip_by_value).
  """
  values = _convert(t, "t")
  if values.dtype == jnp.bool_ or jnp.issubdtype(values.dtype, jnp.complexfloating):
    raise TypeError(
      f"`t` has dtype {values.dtype}; TensorFlow's clip_by_value takes real"
      " numbers (floating or integer) only. Cast it first, e.g."
      " `t.astype(jnp.float32)`."
    )
  hi = _bound(clip_value_max, "clip_value_max", values)
  lo = _bound(clip_value_min, "clip_value_min", values)
  # TensorFlow's gradient of clip_by_value is 1 for entries within the bounds,
  # the bounds themselves included; min/max would split it there.
  inside = (values >= lo) & (values <= hi)
  return jnp.where(inside, values, jnp.maximum(jnp.minimum(values, hi), lo))


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

  `clip_norm` is normally a scalar. As in TensorFlow, it may also be an array
  that broadcasts to the shape of `t` without changing it (each entry is then
  divided by ``max(l2norm, clip_norm)`` with its own `clip_norm`); any other
  shape raises.

  Args:
    t: A floating-point array, or a (nested) list of floats.
    clip_norm: The largest allowed norm: a scalar, or an array broadcastable
      to `t`'s shape.
    axes: Axes to compute the norm over (each slice is clipped on its own),
      or None for the whole array.

  Returns:
    An array of the shape and dtype of `t`.

  Raises:
    TypeError: If `t` is not floating-point.
    ValueError: If `clip_norm` does not broadcast to `t`'s shape without
      changing it.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import tf
    >>> tf.clip_by_norm(jnp.array([-2.0, 3.0, 6.0]), 5.0)  # norm 7: * 5 / 7
    Array([-1.4285715,  2.142857 ,  4.285714 ], dtype=float32)
    >>> tf.clip_by_norm([[-3.0, 0.0, 0.0], [4.0, 0.0, 3.0]], 4.0, axes=[1])
    Array([[-3. ,  0. ,  0. ],
           [ 3.2,  0. ,  2.4]], dtype=float32)

  References:
    TensorFlow, [tf.clip_by_norm](https://www.tensorflow.org/api_docs/python/tf/clip_by_norm).
  """
  values = _floating(_convert(t, "t"), "t")
  if np.isscalar(clip_norm):
    # TensorFlow clamps Python and NumPy scalars in Python, before converting.
    c = jnp.asarray(max(clip_norm, 0)).astype(values.dtype)  # type: ignore[call-overload]
  else:
    c_arr = _convert(clip_norm, "clip_norm")
    _check_shape("clip_norm", c_arr.shape, values.shape)
    c = jnp.maximum(c_arr, 0).astype(values.dtype)
  axis = _validate.check_axis(_axes(axes), "axes")
  l2sum = jnp.sum(values * values, axis=axis, keepdims=True)
  pred = l2sum > 0
  l2sum_safe = jnp.where(pred, l2sum, jnp.ones_like(l2sum))
  l2norm = jnp.where(pred, jnp.sqrt(l2sum_safe), l2sum)
  return _divide(values * c, _maximum(l2norm, c))


def clip_by_average_norm(t: jax.typing.ArrayLike, clip_norm: jax.typing.ArrayLike) -> jax.Array:
  """`tf.compat.v1.clip_by_average_norm`: ``t * clip_norm * min(size(t) /
  l2norm(t), 1 / clip_norm)``.

  Clips `t` so that its *average* norm, ``l2norm(t) / size(t)``, is at most
  `clip_norm`. TensorFlow 1's formula, operation for operation: the inverse
  norm is ``rsqrt(sum(t * t))`` and the element count a float32, so, as in
  TensorFlow, `t` must be float32. An all-zero `t` stays zero.

  Args:
    t: A float32 array, or a (nested) list of floats.
    clip_norm: The largest allowed average norm: a scalar.

  Returns:
    An array of the shape and dtype of `t`.

  Raises:
    TypeError: If `t` is not float32 (TensorFlow raises too).

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import tf
    >>> tf.clip_by_average_norm(jnp.array([3.0, 4.0]), 1.0)  # 5 / 2 > 1: * 2 / 5
    Array([1.2, 1.6], dtype=float32)

  References:
    TensorFlow, [tf.compat.v1.clip_by_average_norm](https://www.tensorflow.org/api_docs/python/tf/compat/v1/clip_by_average_norm).
  """
  values = _convert(t, "t")
  if values.dtype != jnp.float32:
    raise TypeError(
      f"`t` has dtype {values.dtype}; TensorFlow's clip_by_average_norm counts"
      " the elements in float32 and raises for other dtypes too. Cast it"
      " first, e.g. `t.astype(jnp.float32)`."
    )
  c = jnp.asarray(clip_norm).astype(jnp.float32)
  n = jnp.float32(values.size)
  # rsqrt(0) is inf, as in TensorFlow; taken on a safe value there, so that
  # the gradient is TensorFlow's (finite) rather than NaN.
  sum_sq = jnp.sum(values * values)
  positive = sum_sq > 0
  l2norm_inv = jnp.where(positive, lax.rsqrt(jnp.where(positive, sum_sq, 1)), jnp.inf)
  return values * c * _minimum(l2norm_inv * n, jnp.float32(1.0) / c)


def _axes(axes: Any) -> Any:
  """`axes` as Python ints: TensorFlow also takes NumPy integers and (concrete)
  integer arrays."""
  if isinstance(axes, np.integer | np.ndarray | jax.Array) and jnp.issubdtype(
    jnp.asarray(axes).dtype, jnp.integer
  ):
    return np.asarray(axes).tolist()
  return axes


def _maximum(x: jax.Array, y: jax.Array) -> jax.Array:
  """`tf.maximum`: NaN if either is NaN; at a tie the gradient goes to `x`
  (jnp.maximum splits it), as TensorFlow's gradient of Maximum does."""
  return jnp.where(x >= y, x, jnp.maximum(x, y))


def _minimum(x: jax.Array, y: jax.Array) -> jax.Array:
  """`tf.minimum`, with the gradient at a tie going to `x` as in TensorFlow."""
  return jnp.where(x <= y, x, jnp.minimum(x, y))


def _divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """``numerator / denominator``, correctly rounded on CPU.

  XLA:CPU turns a division by a broadcast (loop-invariant) value into a
  multiplication by an approximate reciprocal, which is off by one unit in
  the last place for about a fifth of the entries. Materialising the
  broadcast divisor keeps a true elementwise division, as TensorFlow does.
  """
  denominator = jnp.broadcast_to(denominator, numerator.shape)
  return numerator / lax.optimization_barrier(denominator)


def _norm_of(leaves: Sequence[jax.Array]) -> jax.Array:
  """TensorFlow's global norm of floating arrays of one dtype."""
  dtypes = {x.dtype for x in leaves}
  if len(dtypes) > 1:
    names = ", ".join(sorted(str(d) for d in dtypes))
    raise TypeError(
      f"TensorFlow's global norm needs tensors of one dtype, got {names}."
      " Cast them to one dtype first, or use `jaxclip.global_norm`, which"
      " mixes dtypes and accumulates in float32."
    )
  if not leaves:
    return jnp.zeros((), jnp.float32)
  dtype = dtypes.pop()
  half_squared = [jnp.sum(x * x * jnp.asarray(0.5, x.dtype)) for x in leaves]
  total = jnp.sum(jnp.stack(half_squared))
  return jnp.sqrt(total * jnp.asarray(2.0, dtype))


def _global_norm(tensors: Any, is_sequence: bool) -> jax.Array:
  if is_sequence:
    for i, x in enumerate(tensors):
      if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
          f"`t_list[{i}]` has dtype {x.dtype}, but TensorFlow's global norm"
          f" (tf.nn.l2_loss) takes {_L2_LOSS_DTYPES} tensors only and raises"
          " for it too. Cast it first, e.g. `x.astype(jnp.float32)` (write"
          " `[3.0, 4.0]`, not `[3, 4]`)."
        )
    return _norm_of([x for x in tensors if x is not None])
  leaves = _tree.inexact_leaves(tensors)
  for x in leaves:
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
      raise TypeError(
        f"A leaf has the complex dtype {x.dtype}, but TensorFlow's global norm"
        f" takes {_L2_LOSS_DTYPES} tensors only. Use `jaxclip.global_norm`,"
        " which measures complex leaves by their modulus."
      )
  return _norm_of(leaves)


def global_norm(t_list: Any) -> jax.Array:
  """`tf.linalg.global_norm`: ``sqrt(sum(l2norm(t)**2 for t in t_list))``.

  Computed as TensorFlow does: half sums of squares (``tf.nn.l2_loss``) per
  tensor, in the tensors' own dtype, summed, doubled and square-rooted. An
  empty list has norm 0 (float32).

  As in TensorFlow, each element of a list or tuple `t_list` is converted to
  one array: ``[[3.0, 4.0]]`` is one tensor, ``[3.0, 4.0]`` two scalars (both
  have norm 5); `None` elements are ignored, and an integer element raises. A
  dict or any other pytree (not accepted by TensorFlow) is walked leaf by
  leaf instead, and its integer leaves are ignored.

  Args:
    t_list: A list or tuple of floating-point arrays of one dtype (or of
      nested lists of floats), with `None` entries allowed; or any pytree of
      such arrays.

  Returns:
    A scalar of the tensors' dtype: for float16 tensors, a norm above about
    256 overflows to inf, as in TensorFlow.

  Raises:
    TypeError: If the tensors have different dtypes, or an element of a list
      is not floating-point (TensorFlow raises too).
    ValueError: If an element is a ragged nested list.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import tf
    >>> tf.global_norm([jnp.array([3.0]), None, jnp.array([4.0])])
    Array(5., dtype=float32)
    >>> tf.global_norm([[3.0, 4.0]])  # one tensor of shape (2,)
    Array(5., dtype=float32)

  References:
    TensorFlow, [tf.linalg.global_norm](https://www.tensorflow.org/api_docs/python/tf/linalg/global_norm).
  """
  return _global_norm(*_tensors(t_list))


def _clip_by_global_norm(
  tensors: Any, is_sequence: bool, clip_norm: jax.typing.ArrayLike, use_norm: Any
) -> tuple[Any, jax.Array]:
  if use_norm is None:
    norm = _global_norm(tensors, is_sequence)
  else:
    norm = _convert(use_norm, "use_norm")
  if not jnp.issubdtype(norm.dtype, jnp.floating):
    norm = norm.astype(jnp.float32)
  if jnp.ndim(clip_norm) != 0:
    raise ValueError(
      f"`clip_norm` must be a scalar, got shape {jnp.shape(clip_norm)}. To"
      " clip each tensor to its own threshold, use `clip_by_norm`."
    )
  c = jnp.asarray(clip_norm).astype(norm.dtype)
  one = jnp.asarray(1.0, norm.dtype)
  scale_for_finite = c * _minimum(one / norm, one / c)
  scale = scale_for_finite + (norm - norm)  # NaN when the norm is not finite.
  if is_sequence:
    return [None if x is None else x * scale.astype(x.dtype) for x in tensors], norm
  return _tree.map_inexact(lambda x: x * scale.astype(x.dtype), tensors), norm


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

  A list or tuple `t_list` is treated as TensorFlow treats it: each element
  is converted to one array (see `global_norm`), and the result is a list of
  the clipped arrays, `None` where the element was `None`. A dict or other
  pytree comes back in its own structure, integer leaves unchanged.

  Args:
    t_list: A list or tuple of floating-point arrays of one dtype, with
      `None` entries allowed; or any pytree of such arrays.
    clip_norm: The largest allowed global norm, a scalar.
    use_norm: A precomputed global norm to use instead of `global_norm`.

  Returns:
    ``(clipped, norm)``: the arrays scaled (a list for a list or tuple
    `t_list`), and the global norm used (before clipping).

  Raises:
    TypeError: If the tensors have different dtypes, or a list element is
      not floating-point, and `use_norm` is None.
    ValueError: If `clip_norm` is not a scalar.

  Examples:
    >>> import jax.numpy as jnp
    >>> from jaxclip.compat import tf
    >>> t = [jnp.array([-2.0, 3.0, 6.0]), jnp.array([-4.0, 6.0, 12.0])]
    >>> clipped, norm = tf.clip_by_global_norm(t, 14.5)  # scale 14.5 / sqrt(245)
    >>> norm
    Array(15.652476, dtype=float32)
    >>> clipped[0]
    Array([-1.852742 ,  2.7791128,  5.5582256], dtype=float32)
    >>> tf.clip_by_global_norm([[3.0, 4.0]], 1.0)[0]
    [Array([0.6, 0.8], dtype=float32)]

  References:
    TensorFlow, [tf.clip_by_global_norm](https://www.tensorflow.org/api_docs/python/tf/clip_by_global_norm).
    Pascanu et al., [On the difficulty of training recurrent neural
    networks](https://arxiv.org/abs/1211.5063), 2013.
  """
  return _clip_by_global_norm(*_tensors(t_list), clip_norm, use_norm)


def clip_by_value_transform(
  clip_value_min: jax.typing.ArrayLike, clip_value_max: jax.typing.ArrayLike
) -> optax.GradientTransformationExtraArgs:
  """`clip_by_value` applied to every floating leaf, as an optax transform.

  Integer leaves pass through; Python-number leaves are converted first, as
  TensorFlow converts them.

  Args:
    clip_value_min: Lower bound, a scalar or an array broadcastable to the
      shape of every leaf.
    clip_value_max: Upper bound, likewise.

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
    return _tree.map_inexact(fn, _convert_numbers(updates)), state

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
    fn = lambda x: clip_by_norm(x, clip_norm, axes)  # noqa: E731
    return _tree.map_inexact(fn, _convert_numbers(updates)), state

  return optax.GradientTransformationExtraArgs(_init_empty, update_fn)


def clip_by_global_norm_transform(
  clip_norm: jax.typing.ArrayLike,
) -> optax.GradientTransformationExtraArgs:
  """`clip_by_global_norm` over all floating leaves, as an optax transform.

  The updates are a pytree whatever their structure (a list of arrays stays a
  list of arrays, a tuple a tuple), and integer leaves pass through.

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
    return _clip_by_global_norm(_convert_numbers(updates), False, clip_norm, None)[0], state

  return optax.GradientTransformationExtraArgs(_init_empty, update_fn)


def _init_empty(params: optax.Params) -> optax.EmptyState:
  del params
  return optax.EmptyState()
