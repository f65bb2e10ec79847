"""Adaptive clipping: thresholds set from the history of the gradient norms.

`autoclip` clips to a percentile of past global norms, `adagc` clips each
tensor relative to an EMA of its own clipped norms, and `quantile_clip` moves
its threshold geometrically towards a target quantile of the norms. ZClip
lives in `jaxclip._zclip`. Every state is a NamedTuple of fixed-shape arrays.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclip import _base, _core, _norms, _validate
from jaxclip._layers import LayerAxes

__all__ = [
  "AdaGCState",
  "AutoClipState",
  "QuantileClipState",
  "adagc",
  "autoclip",
  "quantile_clip",
]


def push(
  history: jax.Array, filled: jax.Array, position: jax.Array, value: jax.Array, keep: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Writes `value` into a ring buffer if `keep`; returns the new buffer state."""
  size = history.shape[0]
  new = history.at[position].set(value.astype(history.dtype))
  return (
    jnp.where(keep, new, history),
    jnp.where(keep, jnp.minimum(filled + 1, size), filled),
    jnp.where(keep, (position + 1) % size, position),
  )


def window_percentile(history: jax.Array, filled: jax.Array, q: jax.Array) -> jax.Array:
  """`np.percentile(history[:filled], q)` (linear interpolation); inf if empty."""
  valid = jnp.arange(history.shape[0]) < filled
  ordered = jnp.sort(jnp.where(valid, history, jnp.inf))
  n = jnp.maximum(filled, 1)
  pos = (n - 1).astype(history.dtype) * (q.astype(history.dtype) / 100)
  lo = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, n - 1)
  hi = jnp.minimum(lo + 1, n - 1)
  a, b = ordered[lo], ordered[hi]
  value = a + (b - a) * (pos - lo.astype(history.dtype))
  return jnp.where(filled > 0, value, jnp.inf)


class AutoClipState(NamedTuple):
  """State of `autoclip`: a fixed window of past global norms.

  Attributes:
    count: Number of updates processed (int32).
    norm: Global norm of the updates at the last step, before clipping.
    threshold: The percentile of the window used as the clipping threshold.
    scale: Factor the updates were multiplied by (1 when not clipped).
    clipped: Whether the updates were scaled down.
    history: Ring buffer of the last `history_size` finite global norms.
    filled: Number of valid entries in `history` (int32).
    position: Index in `history` the next norm is written to (int32).
  """

  count: jax.Array
  norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  clipped: jax.Array
  history: jax.Array
  filled: jax.Array
  position: jax.Array

  stats_name = "autoclip"

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports."""
    return _core.global_summary(self)


def autoclip(
  percentile: jax.typing.ArrayLike = 10.0,
  history_size: int = 1000,
  *,
  axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Clips the global norm to a percentile of the norms seen so far (AutoClip).

  At each step the global norm of the updates joins the history, and the
  updates are scaled down to the `percentile`-th percentile of that history
  (current step included, linear interpolation as `np.percentile`). The paper
  keeps every norm since the start; to keep the state fixed in size this keeps
  the last `history_size` norms in a ring buffer. For norms whose distribution
  changes slowly compared with the window the two agree closely: over 5,000
  stationary lognormal norms, the default window's 10th percentile is within
  1.8% of the full-history one on average (5.6% at worst), the sampling error
  of a 1,000-norm sample; the window also forgets early training's norms.
  Non-finite norms are not recorded and the updates pass through unscaled.

  Args:
    percentile: The percentile of past norms to clip to, in [0, 100] (the
      paper recommends 10). May be traced.
    history_size: Number of past norms kept (a Python int >= 1).
    axis_name: Inside `jax.shard_map` or `jax.pmap` with gradients split over
      devices, the mapped axis to sum the partial norms over, so that every
      device sees the same norm and keeps the same history. Not needed under
      plain `jax.jit` with sharded arrays.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an
    `AutoClipState`.

  Raises:
    ValueError: If a concrete `percentile` is outside [0, 100] or
      `history_size < 1`.
    TypeError: If `history_size` is not an int.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> tx = jaxclip.autoclip(50.0, history_size=4)
    >>> state = tx.init(jnp.zeros(2))
    >>> for g in ([3.0, 4.0], [0.0, 1.0], [6.0, 8.0]):
    ...   u, state = tx.update(jnp.array(g), state)
    >>> u  # norm 10, median of (5, 1, 10) is 5
    Array([3., 4.], dtype=float32)

  References:
    Seetharaman et al., [AutoClip: Adaptive Gradient Clipping for Source
    Separation Networks](https://arxiv.org/abs/2007.14469), 2020.
  """
  _validate.check_range(
    percentile, "percentile", 0.0, 100.0, "Use e.g. 10 for the 10th percentile."
  )
  size = _validate.check_int(history_size, "history_size", 1)

  def init_state(dtype, k):
    zero = _base.zero_count  # a fresh array per field: donated states share no buffer
    return AutoClipState(
        zero(), _base.scalar(0, dtype), _base.scalar(0, dtype), _base.scalar(1, dtype),
        _base.scalar(False, bool), jnp.zeros((size,), dtype), zero(), zero(),
    )  # fmt: skip

  def decide(norm, state, count, extra_args):
    history, filled, position = push(
      state.history, state.filled, state.position, norm, jnp.isfinite(norm)
    )
    threshold = window_percentile(history, filled, jnp.asarray(percentile))
    return threshold, dict(history=history, filled=filled, position=position)

  return _core.global_clipper("autoclip", AutoClipState, init_state, decide, axis_name=axis_name)


class AdaGCState(NamedTuple):
  """State of `adagc`: per-tensor EMAs of the clipped norms.

  Vectors have one entry per floating leaf, in `jax.tree.leaves` order
  (per layer with `layer_axes`, as `PerTensorClipState` says).

  Attributes:
    count: Number of updates processed (int32).
    global_norm: Global norm of the updates at the last step, before clipping.
    norm: Per tensor, its norm before clipping.
    threshold: Per tensor, the bound it was clipped to: ``relative * ema``
      after warmup; during warmup, its share of the global clip,
      ``warmup_max_norm * norm / global_norm`` (inf while the global norm is
      within `warmup_max_norm`).
    scale: Per tensor, the factor applied.
    clipped: Per tensor, whether it was scaled down.
    ema: Per tensor, the EMA of its clipped norm (``gamma`` in the paper);
      inf before the first finite step.
  """

  count: jax.Array
  global_norm: jax.Array
  norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  clipped: jax.Array
  ema: jax.Array

  stats_name = "adagc"
  per_tensor_fields = ("norm", "scale", "clipped", "threshold")

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports."""
    return {
      "global_norm": self.global_norm,
      **_core.per_tensor_summary(self),
      "threshold_min": jnp.min(self.threshold, initial=jnp.inf).astype(self.threshold.dtype),
      "count": self.count,
    }


def adagc(
  relative: jax.typing.ArrayLike = 1.04,
  beta: jax.typing.ArrayLike = 0.99,
  warmup_steps: int = 100,
  warmup_max_norm: jax.typing.ArrayLike = 1.0,
  *,
  axis_name: str | None = None,
  layer_axes: LayerAxes = None,
) -> optax.GradientTransformationExtraArgs:
  """Clips each tensor relative to an EMA of its own clipped norms (AdaGC).

  For the first `warmup_steps` steps the updates are clipped globally to
  `warmup_max_norm` and each tensor's reference norm ``gamma`` is the running
  minimum of its clipped norms. Afterwards tensor ``i`` with norm ``n_i`` is
  scaled by ``min(1, relative * gamma_i / n_i)`` (``gamma_i`` from the
  previous step) and ``gamma_i <- beta * gamma_i + (1 - beta) * clipped n_i``.
  No epsilon is needed: the scale comes from `clip_scale`, which never
  divides by a zero norm. A tensor whose norm is not finite passes through and
  leaves its ``gamma`` unchanged.

  A tensor whose gradient is exactly zero during warmup gets ``gamma = 0`` and
  then stays clipped to zero, as in the paper's rule; mask such tensors out
  (`optax.masked`) or use a warmup during which every tensor gets gradients.

  Args:
    relative: ``lambda_rel``, the allowed ratio of a tensor's norm to its EMA
      (> 0; may be traced).
    beta: EMA coefficient in [0, 1] (may be traced).
    warmup_steps: Number of initial steps of global clipping (``T_start``; a
      Python int >= 1).
    warmup_max_norm: ``lambda_abs``, the global threshold during warmup (>= 0).
    axis_name: Inside `jax.shard_map` or `jax.pmap` with gradients split over
      devices, the mapped axis to sum each tensor's partial norms over, so that
      every device sees the same norms and keeps the same thresholds. Not needed
      under plain `jax.jit` with sharded arrays. With `layer_axes`, split
      stacked leaves on other axes than their layer axes: each device counts
      the layers it holds, so entries of different layers would be summed.
    layer_axes: Which leaves stack several layers on leading axes (an int
      for every leaf, or a dict such as ``{"blocks": 1}`` from a path
      fragment to a count): each layer then has its own EMA and threshold.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is an `AdaGCState`.

  Raises:
    ValueError: For a concrete negative or NaN `relative` or
      `warmup_max_norm`, `beta` outside [0, 1] or `warmup_steps < 1`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> tx = jaxclip.adagc(relative=2.0, warmup_steps=1, warmup_max_norm=10.0)
    >>> g = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([1.0])}
    >>> state = tx.init(g)
    >>> _, state = tx.update(g, state)  # warmup: gamma = (5, 1)
    >>> u, state = tx.update({"a": g["a"], "b": jnp.array([4.0])}, state)
    >>> u["b"]  # norm 4 > 2 * 1: scaled to 2
    Array([2.], dtype=float32)

  References:
    Wang et al., [AdaGC: Improving Training Stability for Large Language Model
    Pretraining](https://arxiv.org/abs/2502.11034), 2025.
  """
  _validate.check_threshold(relative, "relative", allow_schedule=False)
  _validate.check_threshold(warmup_max_norm, "warmup_max_norm")
  _validate.check_range(beta, "beta", 0.0, 1.0, "Typical values are 0.98 to 0.99.")
  warmup = _validate.check_int(warmup_steps, "warmup_steps", 1)

  def init_state(dtype, k):
    vec = lambda v, d=dtype: jnp.full((k,), v, d)  # noqa: E731
    return AdaGCState(
      _base.zero_count(), _base.scalar(0, dtype), vec(0), vec(0), vec(1), vec(False, bool),
      vec(jnp.inf),
    )  # fmt: skip

  def measure(layout, _):
    return _norms.joined_norms(layout, 2.0, axis_name=axis_name)

  def decide(norms, state, count, extra_args):
    total = _norms.tree_norm([norms], 2.0)
    in_warmup = count < warmup
    limit = _base.resolve(warmup_max_norm, count, norms.dtype, "warmup_max_norm")
    # Warmup clips globally: each tensor's bound is its share of the limit.
    over = jnp.isfinite(total) & (total > limit)
    share = jnp.where(over, limit * (norms / jnp.where(over, total, 1)), jnp.inf)
    threshold = jnp.where(in_warmup, share, relative * state.ema).astype(norms.dtype)
    clipped_norms = jnp.minimum(norms, threshold)
    b = jnp.asarray(beta, norms.dtype)
    ema = jnp.where(
      in_warmup | ~jnp.isfinite(state.ema),  # a tensor with no finite norm yet starts here
      jnp.minimum(state.ema, clipped_norms),
      b * state.ema + (1 - b) * clipped_norms,
    )
    ema = jnp.where(jnp.isfinite(norms), ema, state.ema)
    return threshold, dict(global_norm=total, ema=ema)

  return _core.per_tensor_clipper(
    "adagc", AdaGCState, init_state, measure, decide, layer_axes=layer_axes
  )


class QuantileClipState(NamedTuple):
  """State of `quantile_clip`.

  Attributes:
    count: Number of updates processed (int32).
    norm: Global norm of the updates before clipping (per-example mode: the
      largest per-example norm).
    threshold: The clipping norm ``C`` used at this step.
    scale: Factor applied (per-example mode: the smallest factor).
    clipped: Whether anything was scaled down.
    fraction_below: The (noisy, in DP mode, then clamped to [0, 1])
      fraction of norms that were <= ``C``.
    next_threshold: The threshold for the next step,
      ``C * exp(-lr * (b - q))``.
    key: PRNG key (uint32[2]) for the count noise, split at every step in
      per-example mode.
  """

  count: jax.Array
  norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  clipped: jax.Array
  fraction_below: jax.Array
  next_threshold: jax.Array
  key: jax.Array

  stats_name = "quantile_clip"

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports."""
    return {
      **_core.global_summary(self),
      "fraction_below": self.fraction_below,
      "next_threshold": self.next_threshold,
    }


def quantile_clip(
  target_quantile: jax.typing.ArrayLike = 0.5,
  learning_rate: jax.typing.ArrayLike = 0.2,
  initial_max_norm: jax.typing.ArrayLike = 1.0,
  *,
  per_example: bool = False,
  count_noise_std: jax.typing.ArrayLike = 0.0,
  seed: int = 0,
  axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Clips to a threshold that tracks a quantile of the norms geometrically.

  The rule of Andrew et al.: clip to ``C``, measure the fraction ``b`` of
  norms that were at most ``C``, then ``C <- C * exp(-lr * (b - q))``. ``C``
  rises while fewer than a fraction ``q`` of the norms fit under it and falls
  otherwise, converging to the ``q``-quantile of the norm distribution.

  By default the updates are one gradient and ``b`` is 1 or 0. With
  ``per_example=True`` the updates hold per-example gradients with the batch
  on axis 0: each example is clipped to ``C`` on its own, the clipped
  gradients are summed over the batch (as `per_example_global_norm_clip`),
  and ``b`` is the fraction of the batch at most ``C``; for differential
  privacy pass ``count_noise_std`` (the paper's ``sigma_b``): Gaussian noise
  of that standard deviation is added to the count before dividing by the
  batch size, and the noisy fraction is clamped to [0, 1] (as TF Privacy's
  `QuantileEstimatorQuery`), so that one step moves ``C`` by at most a
  factor ``exp(lr * max(q, 1 - q))``. The noise key comes from the state (seeded by `seed`) or from
  ``update(..., key=k)``. An example with a non-finite norm counts as above
  ``C`` and contributes zero to the sum (so no example exceeds ``C``); in the
  default mode a non-finite norm leaves ``C`` unchanged and the updates pass
  through unscaled.

  Args:
    target_quantile: The quantile ``q`` in [0, 1] to track (may be traced).
    learning_rate: Geometric step size ``eta`` >= 0 (the paper uses 0.2).
    initial_max_norm: Starting threshold ``C`` (>= 0).
    per_example: Whether the updates carry a batch axis 0 (see above).
    count_noise_std: Standard deviation of the noise on the count of
      unclipped examples (>= 0; per-example mode only: a traced value, e.g.
      from `optax.inject_hyperparams`, is not checked and is unused in the
      default mode).
    seed: Seed of the PRNG key kept in the state.
    axis_name: Inside `jax.shard_map` or `jax.pmap` with gradients split over
      devices, the mapped axis to sum the partial norms over, so that every
      device sees the same norm and the same threshold (default mode only). Not
      needed under plain `jax.jit` with sharded arrays.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `QuantileClipState`.

  Raises:
    ValueError: For concrete hyperparameters out of range, or
      `count_noise_std` without `per_example`, or `axis_name` with
      `per_example`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> tx = jaxclip.quantile_clip(0.5, learning_rate=0.2, initial_max_norm=1.0)
    >>> u, state = tx.update(jnp.array([3.0, 4.0]), tx.init(jnp.zeros(2)))
    >>> u  # clipped to C = 1; the norm was above C so C grows by exp(0.1)
    Array([0.6, 0.8], dtype=float32)
    >>> round(float(state.next_threshold), 4)
    1.1052

  References:
    Andrew et al., [Differentially Private Learning with Adaptive
    Clipping](https://arxiv.org/abs/1905.03871), 2021.
  """
  _validate.check_range(target_quantile, "target_quantile", 0.0, 1.0, "Use 0.5 for the median.")
  _validate.check_threshold(learning_rate, "learning_rate", allow_schedule=False)
  _validate.check_threshold(initial_max_norm, "initial_max_norm", allow_schedule=False)
  _validate.check_threshold(count_noise_std, "count_noise_std", allow_schedule=False)
  noisy = not (_validate.is_concrete(count_noise_std) and not np.any(np.asarray(count_noise_std)))
  if noisy and not per_example and _validate.is_concrete(count_noise_std):
    raise ValueError(
      f"`count_noise_std={count_noise_std!r}` needs `per_example=True`: noise on"
      " the count of unclipped examples only makes sense over a batch."
    )
  seed = _validate.check_int(seed, "seed", 0)
  if per_example and axis_name is not None:
    raise ValueError(
      f"`axis_name={axis_name!r}` is not supported with `per_example=True`: each"
      " example's norm is computed on the device that holds it. Leave `axis_name`"
      " unset, or clip per example before the gradients are split."
    )

  def init_state(dtype, k):
    # A fresh array per field: donated states share no buffer.
    c = lambda: jnp.array(initial_max_norm, dtype)  # noqa: E731
    z = lambda: _base.scalar(0, dtype)  # noqa: E731
    return QuantileClipState(
      _base.zero_count(), z(), c(), _base.scalar(1, dtype), _base.scalar(False, bool), z(), c(),
      jax.random.PRNGKey(seed),
    )  # fmt: skip

  def decide(norms, state, count, extra_args):
    c = state.next_threshold.astype(norms.dtype)
    below = jnp.sum(norms <= c).astype(c.dtype)  # a non-finite norm is not below
    key = state.key
    if per_example:
      # The key is split at every step, noisy or not, so that it evolves
      # alike eagerly and under jit (where an injected std is traced).
      if "key" in extra_args:
        sub = jnp.asarray(extra_args["key"])
      else:
        key, sub = jax.random.split(state.key)
      if noisy:
        noise = jax.random.normal(sub, (), c.dtype)
        below = below + jnp.asarray(count_noise_std, c.dtype) * noise
    # The noisy fraction is clamped to [0, 1] (as TF Privacy's quantile
    # estimator): without it, noise could move C by more than exp(eta * q).
    fraction = jnp.clip(below / max(norms.size, 1), 0, 1)
    eta = jnp.asarray(learning_rate, c.dtype)
    new_c = c * jnp.exp(-eta * (fraction - jnp.asarray(target_quantile, c.dtype)))
    if not per_example:  # a non-finite norm leaves C unchanged
      new_c = jnp.where(jnp.isfinite(norms), new_c, c)
    return c, dict(fraction_below=fraction, next_threshold=new_c, key=key)

  return _core.global_clipper(
    "quantile_clip",
    QuantileClipState,
    init_state,
    decide,
    axis_name=axis_name,
    per_example=per_example,
  )
