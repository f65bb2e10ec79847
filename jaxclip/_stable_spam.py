"""Stable-SPAM's spike clipping: each tensor against an EMA of its largest
magnitude, with the optional adaptive rescaling of its norm (AdaGN).

Statistics are kept per tensor in float32 (float64 for float64 parameters),
and the EMAs of a tensor holding inf or NaN are left as they were, so one bad
step never poisons them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxclip import _base, _core, _norms, _validate
from jaxclip._spam import check_decay, check_entries, complement, debias

__all__ = ["StableSpamClipState", "stable_spam_clip"]


class StableSpamClipState(NamedTuple):
  """State of `stable_spam_clip`: per-tensor EMAs and what was clipped.

  Vectors have one entry per floating leaf, in `jax.tree.leaves` order.

  Attributes:
    count: Number of updates processed (int32).
    norm: Per tensor, its largest magnitude (inf-norm) before clipping.
    threshold: Per tensor, the bias-corrected EMA of its largest magnitude
      (current step included) that entries were compared with (inf before its
      first finite step).
    scale: Per tensor, the factor its entries above `threshold` were
      multiplied by, ``threshold / norm`` (1 when none was).
    clipped: Per tensor, whether any entry was above `threshold`.
    max_ema: Per tensor, the EMA of its largest magnitude (``m_max``).
    steps: Per tensor, the number of finite steps its EMAs have seen
      (int32), for their bias correction.
    l2_norm: Per tensor, its Euclidean norm after element-wise clipping
      (with `adaptive_norm`; 0 otherwise).
    norm_scale: Per tensor, the factor AdaGN multiplied it by (1 without
      `adaptive_norm`).
    norm_ema: Per tensor, the EMA of `l2_norm` (``m_norm``).
    norm_sq_ema: Per tensor, the EMA of its square (``v_norm``).
  """

  count: jax.Array
  norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  clipped: jax.Array
  max_ema: jax.Array
  steps: jax.Array
  l2_norm: jax.Array
  norm_scale: jax.Array
  norm_ema: jax.Array
  norm_sq_ema: jax.Array

  stats_name = "stable_spam_clip"
  per_tensor_fields = ("norm", "threshold", "scale", "clipped", "norm_scale")

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports."""
    return {
      **_core.per_tensor_summary(self),
      "threshold_min": jnp.min(self.threshold, initial=jnp.inf).astype(self.threshold.dtype),
      "norm_scale_min": jnp.min(self.norm_scale, initial=1).astype(self.norm_scale.dtype),
      "norm_scale_max": jnp.max(self.norm_scale, initial=1).astype(self.norm_scale.dtype),
      "count": self.count,
    }


def stable_spam_clip(
  theta: jax.typing.ArrayLike = 0.999,
  *,
  adaptive_norm: bool = False,
  gamma1: jax.typing.ArrayLike = 0.7,
  gamma2: jax.typing.ArrayLike = 0.9,
  eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  """Scales down the entries of each tensor above an EMA of its largest magnitude (Stable-SPAM).

  Stable-SPAM's adaptive spike clipping, tensor by tensor: with ``M`` the
  largest magnitude of the tensor's gradient ``g``,
  ``m <- theta * m + (1 - theta) * M`` and ``T = m / (1 - theta**t)`` (the
  current step included, ``t`` counting the tensor's finite steps); the
  entries with ``|g_i| > T`` are multiplied by ``T / M``, so the largest
  becomes ``T`` and the others above ``T`` shrink in proportion (entries at
  most ``T`` are unchanged). At the first step ``T = M`` and nothing is
  clipped.

  With ``adaptive_norm=True``, Stable-SPAM's adaptive gradient-norm scaling
  (AdaGN) follows: with ``l`` the tensor's Euclidean norm after clipping,
  ``m_l <- gamma1 * m_l + (1 - gamma1) * l`` and
  ``v_l <- gamma2 * v_l + (1 - gamma2) * l**2``, bias-corrected to
  ``m_hat, v_hat``, and a tensor with ``l > 0`` is rescaled to norm
  ``m_hat / (sqrt(v_hat) + eps)``. That norm is about 1 rather than the
  gradient's own, so use AdaGN before a scale-invariant optimizer such as
  Adam, as Stable-SPAM does, not before SGD.

  The reference also restarts its bias-correction count at each of its
  momentum resets (every ``update_proj_gap`` steps) and can scale ``gamma1``
  by a cosine schedule; neither is done here (``gamma1`` may be injected with
  `optax.inject_hyperparams` and a schedule). A tensor holding inf or NaN
  passes through unchanged and leaves its EMAs and its ``t`` as they were.
  Complex entries are compared by magnitude and keep their phase.

  Args:
    theta: EMA coefficient of the largest magnitude, in [0, 1) (may be
      traced).
    adaptive_norm: Whether to apply AdaGN after clipping.
    gamma1: EMA coefficient of the norm (AdaGN), in [0, 1). Stable-SPAM's
      default; its LLaMA scripts use 0.85.
    gamma2: EMA coefficient of the squared norm (AdaGN), in [0, 1).
      Stable-SPAM's default; its LLaMA scripts use 0.99999.
    eps: Added to ``sqrt(v_hat)`` (AdaGN; Adam's epsilon in the reference).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `StableSpamClipState`.

  Raises:
    ValueError: For a concrete `theta`, `gamma1` or `gamma2` outside [0, 1),
      or a negative or NaN `eps`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> tx = jaxclip.stable_spam_clip(theta=0.5)
    >>> state = tx.init(jnp.zeros(3))
    >>> _, state = tx.update(jnp.array([1.0, -2.0, 0.5]), state)  # m = 1, T = 2
    >>> u, state = tx.update(jnp.array([7.0, -8.0, 0.5]), state)
    >>> u  # m = 4.5, T = 4.5 / 0.75 = 6: entries above 6 times 6 / 8
    Array([ 5.25, -6.  ,  0.5 ], dtype=float32)

  References:
    Huang et al., [Stable-SPAM: How to Train in 4-Bit More Stably than 16-Bit
    Adam](https://arxiv.org/abs/2502.17055), 2025.
  """
  check_decay(theta, "theta", "Stable-SPAM uses 0.999.")
  check_decay(gamma1, "gamma1", "Stable-SPAM uses 0.7 (0.85 in its LLaMA scripts).")
  check_decay(gamma2, "gamma2", "Stable-SPAM uses 0.9 (0.99999 in its LLaMA scripts).")
  _validate.check_threshold(eps, "eps", allow_schedule=False)
  adaptive_norm = _validate.check_bool(adaptive_norm, "adaptive_norm")

  def init_fn(params):
    dtype = _base.record_dtype(params)
    k = len(_norms.inexact_leaves(params))
    vec = lambda value, d=dtype: jnp.full((k,), value, d)  # noqa: E731
    return StableSpamClipState(
      _base.zero_count(), vec(0), vec(jnp.inf), vec(1), vec(False, bool), vec(0),
      vec(0, jnp.int32), vec(0), vec(1), vec(0), vec(0),
    )  # fmt: skip

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _base.expect_state(state, StableSpamClipState, "stable_spam_clip")
    leaves = _norms.inexact_leaves(updates)
    check_entries(leaves, state.norm.shape[0], "stable_spam_clip")
    if not leaves:
      return updates, state._replace(count=state.count + 1)
    dtype = state.norm.dtype
    layout = _norms.Layout(leaves)
    peak = _norms.leaf_norms(layout, math.inf).astype(dtype)
    finite = jnp.isfinite(peak)
    steps = state.steps + finite.astype(jnp.int32)
    c = complement(theta, dtype)
    max_ema = jnp.where(finite, jnp.asarray(theta, dtype) * state.max_ema + c * peak, state.max_ema)
    hat = jnp.where(steps > 0, max_ema / debias(c, jnp.maximum(steps, 1)), jnp.inf)
    clipped = finite & (peak > hat)
    scale = jnp.where(clipped, hat / jnp.where(clipped, peak, 1), 1).astype(dtype)
    pairs = zip(layout.leaves, _per_leaf(layout, hat), _per_leaf(layout, scale))
    out = [_scale_above(x, t, s) for x, t, s in pairs]
    new = state._replace(
      count=state.count + 1, norm=peak, threshold=hat, scale=scale, clipped=clipped,
      max_ema=max_ema, steps=steps,
    )  # fmt: skip
    if adaptive_norm:
      out, new = _adagn(out, layout, new, finite, (gamma1, gamma2, eps))
    it = iter(out)
    updates = _base.map_inexact(lambda x: next(it), updates)
    return updates, _base.keep_dtypes(state, StableSpamClipState, new)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _per_leaf(layout: _norms.Layout, vector: jax.Array) -> list[jax.Array]:
  """One entry per leaf of a per-tensor vector, shaped to broadcast to it."""
  return layout.per_leaf(layout.groupwise(vector))


def _scale_above(x: jax.Array, threshold: jax.Array, scale: jax.Array) -> jax.Array:
  """`x` with its entries of magnitude above `threshold` multiplied by `scale`."""
  g = x.astype(jnp.result_type(x.dtype, scale.dtype))
  mag = jnp.abs(g).astype(scale.dtype)
  return jnp.where(mag > threshold, g * scale, g).astype(x.dtype)


def _adagn(out, layout, state, finite, hparams):
  """AdaGN: each finite tensor of non-zero norm rescaled to norm
  ``m_hat / (sqrt(v_hat) + eps)`` from bias-corrected EMAs of its norm."""
  gamma1, gamma2, eps = hparams
  dtype = state.norm.dtype
  l2 = _norms.leaf_norms(_norms.Layout(out, like=layout), 2.0).astype(dtype)
  steps = jnp.maximum(state.steps, 1)
  c1, c2 = complement(gamma1, dtype), complement(gamma2, dtype)
  m = jnp.where(finite, jnp.asarray(gamma1, dtype) * state.norm_ema + c1 * l2, state.norm_ema)
  v = jnp.where(
    finite, jnp.asarray(gamma2, dtype) * state.norm_sq_ema + c2 * l2 * l2, state.norm_sq_ema
  )
  v_hat = v / debias(c2, steps)
  # sqrt(0) has an infinite derivative: a zero norm (its factor unused)
  # would give a NaN gradient through the discarded branch.
  rms = jnp.where(v_hat > 0, jnp.sqrt(jnp.where(v_hat > 0, v_hat, 1)), 0)
  target = (m / debias(c1, steps)) / (rms + jnp.asarray(eps, dtype))
  use = finite & (l2 > 0)
  factor = jnp.where(use, target / jnp.where(use, l2, 1), 1).astype(dtype)
  out = [_base.scale_leaf(y, f) for y, f in zip(out, _per_leaf(layout, factor))]
  return out, state._replace(l2_norm=l2, norm_scale=factor, norm_ema=m, norm_sq_ema=v)
