"""Adaptive gradient clipping (AGC): unit-wise, relative to the parameters."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxclip import _clipping, _norms, _validate
from jaxclip._layers import LayerAxes
from jaxclip._validate import Threshold


def unitwise_clip(
  g_norm: jax.typing.ArrayLike,
  max_norm: jax.typing.ArrayLike,
  grad: jax.typing.ArrayLike,
  div_eps: jax.typing.ArrayLike = 1e-6,
) -> jax.Array:
  """Scales the units of `grad` whose norm exceeds `max_norm` down to it.

  ``grad * max_norm / max(g_norm, div_eps)`` where ``g_norm > max_norm``,
  `grad` elsewhere, as `optax.unitwise_clip`. A non-finite `g_norm` leaves
  the unit unchanged rather than zeroing it.

  Args:
    g_norm: Unit-wise norms of `grad`, of `grad`'s shape (see
      `unitwise_norm`).
    max_norm: Unit-wise largest allowed norms, of `grad`'s shape.
    grad: The gradient.
    div_eps: Smallest divisor, guarding against division by zero.

  Returns:
    The clipped gradient, of `grad`'s shape and dtype (floating for an
    integer `grad`, as optax).

  Raises:
    ValueError: If the three arrays do not have the same shape.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> g = jnp.array([[3.0], [4.0]])
    >>> n = jaxclip.unitwise_norm(g)
    >>> jaxclip.unitwise_clip(n, jnp.full_like(n, 1.0), g)
    Array([[0.6],
           [0.8]], dtype=float32)
  """
  g_norm, max_norm, grad = map(jnp.asarray, (g_norm, max_norm, grad))
  if not g_norm.shape == max_norm.shape == grad.shape:
    raise ValueError(
      "unitwise_clip needs `g_norm`, `max_norm` and `grad` of one shape, got"
      f" {g_norm.shape}, {max_norm.shape} and {grad.shape}; broadcast the"
      " norms with `unitwise_norm`, which returns the gradient's shape."
    )
  clipped = jnp.isfinite(g_norm) & (g_norm > max_norm)
  scale = jnp.where(clipped, max_norm / jnp.maximum(g_norm, div_eps), 1)
  # An integer gradient is clipped as numbers, to floats (as optax does).
  dtype = grad.dtype if _norms.is_inexact(grad) else scale.dtype
  return jnp.where(clipped, grad * scale, grad).astype(dtype)


def _ratio(g_norm: jax.Array, w_norm: jax.Array) -> jax.Array:
  """``g_norm / w_norm``, kept finite for a finite gradient norm: where it
  overflows (or `w_norm` is 0) it is the largest float, so that the unit is
  clipped (to about 0) rather than passed through as a non-finite gradient
  would be; 0 for a zero gradient norm (not 0 / 0)."""
  ratio = g_norm / w_norm
  ratio = jnp.where(jnp.isfinite(g_norm), jnp.minimum(ratio, jnp.finfo(ratio.dtype).max), ratio)
  return jnp.where(g_norm == 0, 0, ratio)


def adaptive_grad_clip(
  clipping: Threshold,
  eps: jax.typing.ArrayLike = 1e-3,
  axis: int | tuple[int, ...] | None = None,
  *,
  layer_axes: LayerAxes = None,
) -> optax.GradientTransformationExtraArgs:
  """Clips each unit's gradient to at most `clipping` times its parameter norm.

  Adaptive gradient clipping (AGC) from NFNets: for each unit (see
  `unitwise_norm`), when ``||g|| > clipping * max(||w||, eps)`` the gradient
  is scaled down to that bound. `update` needs the current parameters. The
  paper leaves the final classifier layer unclipped: wrap this transform in
  `optax.masked` to do the same.

  Args:
    clipping: Largest allowed ratio of unit gradient norm to unit parameter
      norm (>= 0): a number, a 0-d array or a schedule ``step -> value``.
    eps: Smallest parameter norm used, so zero-initialised parameters still
      get updates.
    axis: Axis or axes each unit spans; None infers them from the rank (with
      `layer_axes`, of one layer).
    layer_axes: Which leaves stack several layers on leading axes (an int
      for every leaf, or a dict such as ``{"blocks": 1}`` from a path
      fragment to a count): units are then taken within each layer, never
      across layers, and each layer has its own entry in the state.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `PerTensorClipState` (its `norm` field holds each tensor's largest
    ratio ``||g|| / max(||w||, eps)``; for a finite gradient whose ratio
    overflows, or is a division by a zero `eps` and parameter norm, the
    largest float, and the unit is clipped).

  Raises:
    ValueError: If a concrete `clipping` or `eps` is negative or NaN, either
      is not a scalar, or `update` is called without `params`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> params = {"w": jnp.array([[1.0], [0.0]])}
    >>> grads = {"w": jnp.array([[3.0], [4.0]])}
    >>> tx = jaxclip.adaptive_grad_clip(0.1)
    >>> clipped, _ = tx.update(grads, tx.init(params), params)
    >>> clipped["w"]  # unit norm 5 > 0.1 * 1: scaled to norm 0.1
    Array([[0.06],
           [0.08]], dtype=float32)

  References:
    Brock et al., [High-Performance Large-Scale Image Recognition Without
    Normalization](https://arxiv.org/abs/2102.06171), 2021.
  """
  _validate.check_threshold(clipping, "clipping")
  _validate.check_threshold(eps, "eps", allow_schedule=False)
  axis = _validate.check_axis(axis)

  def measure(layout, param_layout):
    axes_of = lambda shape: _norms.unitwise_axes(shape, axis)  # noqa: E731
    g_norms, w_norms = _norms.paired_group_norms([layout, param_layout], 2.0, axes_of)
    return [_ratio(g, jnp.maximum(w, jnp.asarray(eps, w.dtype))) for g, w in zip(g_norms, w_norms)]

  return _clipping.per_tensor(
    "adaptive_grad_clip",
    measure,
    clipping,
    "clipping",
    needs_params=True,
    unitwise=True,
    layer_axes=layer_axes,
  )
