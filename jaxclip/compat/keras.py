"""Keras 3 optimizer clipping (``clipnorm``, ``clipvalue``, ``global_clipnorm``).

`with_clipping` wraps any optax optimizer so that it clips gradients exactly
as a Keras 3 optimizer constructed with the same argument does (see
``keras/src/optimizers/base_optimizer.py``):

* ``clipnorm``: every gradient on its own, ``g * clipnorm / max(l2norm(g),
  clipnorm)`` (the formula of `tf.clip_by_norm`);
* ``clipvalue``: every entry clipped to ``[-clipvalue, clipvalue]``;
* ``global_clipnorm``: all gradients scaled by ``clipnorm * min(1 / norm, 1 /
  clipnorm)``, NaN for a non-finite norm (the formula of
  `tf.clip_by_global_norm`, with Keras' global norm
  ``sqrt(sum(sum(g**2)))``). As in Keras, ``1 / clipnorm`` is computed in
  Python (float64) and then rounded to the gradients' dtype, where
  TensorFlow's function divides in that dtype: for some thresholds (1.05,
  1.15, ...) the two differ by one unit in the last place.

Norms are computed in the gradients' dtype, as Keras does. Keras allows one of
the three only, and so does `with_clipping`. Keras silently ignores a
negative value; `with_clipping` rejects it. A value of 0 disables clipping in
both. Error messages begin with Keras' own text.

Keras clips after averaging when ``gradient_accumulation_steps`` is set; the
same order in optax is ``optax.MultiSteps(with_clipping(tx, ...), k)``, which
hands `with_clipping` the averaged gradients. See ``docs/porting.md`` for a
side-by-side comparison.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclip import _base, _validate
from jaxclip.compat import _tree
from jaxclip.compat.tf import _divide

__all__ = ["with_clipping"]


def _check(value: float | None, name: str) -> float | None:
  if value is None:
    return None
  if (
    isinstance(value, np.ndarray | np.generic | jax.Array)
    and np.ndim(value) == 0
    and _validate.is_concrete(value)
    and jnp.issubdtype(value.dtype, jnp.number)
  ):
    value = value.item()  # a NumPy or JAX scalar, as Keras takes it
  if isinstance(value, bool) or not isinstance(value, numbers.Real):
    raise TypeError(
      f"`{name}` must be a number (a NumPy or JAX scalar too) or None, got {value!r} of"
      f" type {type(value).__name__}."
    )
  if not value >= 0:  # also NaN
    raise ValueError(
      f"`{name}` must be >= 0, got {value!r}. Keras silently ignores negative"
      " values; pass None (or 0) to disable clipping."
    )
  return float(value)


def _clip_by_norm(g: jax.Array, clipnorm: float) -> jax.Array:
  l2sum = jnp.sum(jnp.square(g), keepdims=True)
  pred = l2sum > 0
  l2sum_safe = jnp.where(pred, l2sum, jnp.ones_like(l2sum))
  l2norm = jnp.where(pred, jnp.sqrt(l2sum_safe), l2sum)
  c = jnp.asarray(clipnorm, g.dtype)
  return _divide(g * c, jnp.maximum(l2norm, c))


def _clip_by_global_norm(grads: Any, clipnorm: float) -> Any:
  leaves = _tree.inexact_leaves(grads)
  if not leaves:
    return grads
  squared = jnp.stack([jnp.sum(jnp.square(g)) for g in leaves])
  norm = jnp.sqrt(jnp.sum(squared))
  c = jnp.asarray(clipnorm, norm.dtype)
  # Keras divides 1.0 / clipnorm in Python, then rounds to the norm's dtype.
  inverse_c = jnp.asarray(1.0 / clipnorm, norm.dtype)
  scale_for_finite = c * jnp.minimum(1.0 / norm, inverse_c)
  scale = scale_for_finite + (norm - norm)  # NaN when the norm is not finite.
  return _tree.map_inexact(lambda g: g * scale.astype(g.dtype), grads)


def _clip_by_value(g: jax.Array, clipvalue: float) -> jax.Array:
  v = jnp.asarray(clipvalue, g.dtype)
  return jnp.clip(g, -v, v)


def with_clipping(
  tx: optax.GradientTransformation,
  *,
  clipnorm: float | None = None,
  clipvalue: float | None = None,
  global_clipnorm: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps `tx` to clip gradients as a Keras 3 optimizer does.

  ``keras.optimizers.SGD(0.1, clipnorm=1.0)`` becomes
  ``with_clipping(optax.sgd(0.1), clipnorm=1.0)``: the gradients are clipped
  first, then passed to `tx` with its state, the parameters and any extra
  arguments. At most one of the three arguments may be set; with none set (or
  the one set to 0), `tx` runs on the gradients as they are.

  Args:
    tx: Any optax optimizer or transform.
    clipnorm: If set, each gradient is clipped to this Euclidean norm on its
      own.
    clipvalue: If set, each entry is clipped to ``[-clipvalue, clipvalue]``.
    global_clipnorm: If set, all gradients are scaled together so that their
      global norm is at most this value.

  Returns:
    An `optax.GradientTransformationExtraArgs` with the state of `tx`.

  Raises:
    ValueError: If more than one of the three is set, or one is negative or
      NaN.
    TypeError: If one is not a Python number.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> from jaxclip.compat.keras import with_clipping
    >>> tx = with_clipping(optax.sgd(0.1), global_clipnorm=1.0)
    >>> params = {"w": jnp.zeros(2)}
    >>> updates, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
    >>> updates["w"]
    Array([-0.06      , -0.08000001], dtype=float32)

  References:
    Keras, [Optimizer base
    class](https://keras.io/api/optimizers/#base-optimizer-class)
    (``clipnorm``, ``clipvalue``, ``global_clipnorm``).
  """
  set_args = {
    name: value
    for name, value in (
      ("clipnorm", clipnorm),
      ("clipvalue", clipvalue),
      ("global_clipnorm", global_clipnorm),
    )
    if value is not None
  }
  if len(set_args) > 1:
    # Keras' message (keras/src/optimizers/base_optimizer.py), then the hint.
    raise ValueError(
      "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set."
      f" Received: clipnorm={clipnorm}, clipvalue={clipvalue},"
      f" global_clipnorm={global_clipnorm}. Keep one, or chain jaxclip"
      " transforms explicitly."
    )
  clipnorm = _check(clipnorm, "clipnorm")
  clipvalue = _check(clipvalue, "clipvalue")
  global_clipnorm = _check(global_clipnorm, "global_clipnorm")
  inner = _base.with_extra_args(tx, "tx")

  def clip(grads):
    # Keras clips only with a value > 0 (`if self.clipnorm and ...`).
    if clipnorm:
      return _tree.map_inexact(lambda g: _clip_by_norm(g, clipnorm), grads)
    if global_clipnorm:
      return _clip_by_global_norm(grads, global_clipnorm)
    if clipvalue:
      return _tree.map_inexact(lambda g: _clip_by_value(g, clipvalue), grads)
    return grads

  def init_fn(params):
    return inner.init(params)

  def update_fn(updates, state, params=None, **extra_args):
    return inner.update(clip(updates), state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
