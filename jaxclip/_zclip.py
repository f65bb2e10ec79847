"""ZClip: clipping of gradient-norm outliers by z-score against EMA statistics."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxclip import _base, _core, _validate

__all__ = ["ZClipState", "zclip"]

_MODES = ("zscore", "percentile")
_CLIP_OPTIONS = ("adaptive_scaling", "mean")


class ZClipState(NamedTuple):
  """State of `zclip`: EMA statistics of the global norm, and the warmup sample.

  Attributes:
    count: Number of updates processed (int32).
    norm: Global norm of the updates at the last step, before clipping.
    threshold: The bound the norm was clipped to at the last step (the
      adaptive value, capped by `max_norm`; inf when nothing bounded it).
    scale: Factor the updates were multiplied by (1 when not clipped).
    clipped: Whether the updates were scaled down.
    spike: Whether the last norm was an outlier (always False in warmup).
    zscore: ``(norm - mean) / (std + eps)`` at the last step (0 in warmup).
    mean: EMA of the (clipped) global norm.
    var: EMA of its squared deviation.
    warmup_norms: The finite norms seen during warmup (length `warmup_steps`).
    filled: Number of entries of `warmup_norms` filled (int32); the EMA is
      in use once it reaches `warmup_steps`.
  """

  count: jax.Array
  norm: jax.Array
  threshold: jax.Array
  scale: jax.Array
  clipped: jax.Array
  spike: jax.Array
  zscore: jax.Array
  mean: jax.Array
  var: jax.Array
  warmup_norms: jax.Array
  filled: jax.Array

  stats_name = "zclip"

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports."""
    return {
      **_core.global_summary(self),
      "spike": self.spike,
      "zscore": self.zscore,
      "norm_mean": self.mean,
      "norm_std": jnp.sqrt(jnp.maximum(self.var, 0)),
    }


def zclip(
  alpha: jax.typing.ArrayLike = 0.97,
  z_thresh: jax.typing.ArrayLike = 2.5,
  warmup_steps: int = 25,
  max_norm: jax.typing.ArrayLike | None = 1.0,
  *,
  mode: str = "zscore",
  clip_option: str = "adaptive_scaling",
  skip_update_on_spike: bool = False,
  clip_factor: jax.typing.ArrayLike = 1.0,
  eps: jax.typing.ArrayLike = 1e-6,
  axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Clips global-norm outliers detected by z-score against EMA statistics (ZClip).

  A port of the reference implementation (bluorion-com/ZClip):

  * Warmup: for the first `warmup_steps` finite norms, the updates are
    clipped to the fixed `max_norm` and the norms are stored; at the last
    warmup step ``mean`` and ``var`` are set to the mean and (population)
    variance of that sample.
  * Then, with ``std = sqrt(var)``: in ``mode='zscore'``, the norm ``n`` is a
    spike when ``z = (n - mean) / (std + eps) > z_thresh``, and is clipped to
    ``clip_factor * (mean + z_thresh * std / (z / z_thresh))``
    (``clip_option='adaptive_scaling'``: larger outliers are clipped harder)
    or to ``mean`` (``clip_option='mean'``). In ``mode='percentile'``
    (``clip_option`` ignored) the norm is clipped to ``mean + z_thresh * std``
    when above it. The threshold is always capped at `max_norm` when given.
  * The EMA is updated with the clipped value ``x`` of a spike (the norm
    itself otherwise): ``mean <- alpha * mean + (1 - alpha) * x`` and
    ``var <- alpha * var + (1 - alpha) * (x - mean)**2`` with the new mean.
    With `skip_update_on_spike` the statistics are frozen on spikes.

  Unlike the reference, the scale is ``threshold / n`` rather than
  ``threshold / (n + 1e-6)``, and a non-finite norm is neither recorded nor
  used to rescale (the updates pass through unchanged).

  Args:
    alpha: EMA smoothing factor in [0, 1].
    z_thresh: Z-score above which a norm is an outlier (>= 0).
    warmup_steps: Number of finite norms collected before the EMA starts (a
      Python int >= 1).
    max_norm: Hard cap on the threshold, also the fixed threshold during
      warmup; None for no cap (then warmup does not clip).
    mode: ``'zscore'`` or ``'percentile'``.
    clip_option: In ``'zscore'`` mode, ``'adaptive_scaling'`` or ``'mean'``.
    skip_update_on_spike: Whether spikes leave the statistics unchanged.
    clip_factor: Multiplier of the adaptive-scaling threshold (0.5 to 0.9
      for aggressive clipping).
    eps: Added to the standard deviation in the z-score.
    axis_name: Inside `jax.shard_map` or `jax.pmap` with gradients split over
      devices, the mapped axis to sum the partial norms over, so that every
      device sees the same norm and keeps the same statistics. Not needed under
      plain `jax.jit` with sharded arrays.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a `ZClipState`.

  Raises:
    ValueError: For an unknown `mode` or `clip_option`, concrete
      hyperparameters out of range, or `warmup_steps < 1`.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> tx = jaxclip.zclip(warmup_steps=3, max_norm=None)
    >>> state = tx.init(jnp.zeros(1))
    >>> for n in (1.0, 1.2, 0.8):  # warmup: mean 1, std 0.163
    ...   _, state = tx.update(jnp.array([n]), state)
    >>> u, state = tx.update(jnp.array([5.0]), state)
    >>> bool(state.spike), round(float(u[0]), 3)
    (True, 1.042)

  References:
    Kumar et al., [ZClip: Adaptive Spike Mitigation for LLM
    Pre-Training](https://arxiv.org/abs/2504.02507), 2025.
  """
  _validate.check_range(alpha, "alpha", 0.0, 1.0, "The paper uses 0.97.")
  _validate.check_threshold(z_thresh, "z_thresh", allow_schedule=False)
  _validate.check_threshold(clip_factor, "clip_factor", allow_schedule=False)
  _validate.check_threshold(eps, "eps", allow_schedule=False)
  if max_norm is not None:
    _validate.check_threshold(max_norm, "max_norm")
  warmup = _validate.check_int(warmup_steps, "warmup_steps", 1)
  skip_update_on_spike = _validate.check_bool(skip_update_on_spike, "skip_update_on_spike")
  mode = _validate.check_choice(mode, "mode", _MODES)
  if mode == "zscore":
    clip_option = _validate.check_choice(clip_option, "clip_option", _CLIP_OPTIONS)

  def init_state(dtype, k):
    # A fresh array per field: donated states share no buffer.
    def z():
      return jnp.zeros([], dtype)

    def false():
      return jnp.zeros([], bool)

    zero = _base.zero_count
    return ZClipState(
      zero(), z(), z(), jnp.ones([], dtype), false(), false(), z(), z(), z(),
      jnp.zeros((warmup,), dtype), zero(),
    )  # fmt: skip

  def adaptive(norm, mean, var):
    """The clip value of the reference once initialised, and whether n spikes."""
    std = jnp.sqrt(var)
    zt = jnp.asarray(z_thresh, norm.dtype)
    z = (norm - mean) / (std + eps)
    if mode == "percentile":
      bound = mean + zt * std
      return bound, norm > bound, z
    if clip_option == "mean":
      return mean, z > zt, z
    spike = z > zt
    # The bound is used only on a spike; elsewhere z may be 0, and its 0/0
    # would make a NaN gradient through the discarded branch.
    z_spike = jnp.where(spike, z, zt)
    bound = (mean + zt * std / (z_spike / zt)) * jnp.asarray(clip_factor, norm.dtype)
    return bound, spike, z

  def decide(norm, state, count, extra_args):
    dtype = norm.dtype
    finite = jnp.isfinite(norm)
    cap = _base.resolve(jnp.inf if max_norm is None else max_norm, count, dtype, "max_norm")
    warming = state.filled < warmup

    # Warmup: record the norm; initialise the statistics once the sample is full.
    slot = jnp.minimum(state.filled, warmup - 1)
    keep = warming & finite
    buf = jnp.where(
      keep,
      state.warmup_norms.at[slot].set(norm.astype(state.warmup_norms.dtype)),
      state.warmup_norms,
    )
    filled = state.filled + keep.astype(jnp.int32)
    w_mean = jnp.mean(buf)
    w_var = jnp.mean(jnp.square(buf - w_mean))
    ready = warming & (filled >= warmup)

    # After warmup: z-score against the EMA.
    bound, spike, z = adaptive(norm, state.mean, state.var)
    spike = ~warming & finite & spike
    threshold = jnp.minimum(jnp.where(spike, bound, jnp.inf), cap)
    x = jnp.where(spike, bound, norm)
    a = jnp.asarray(alpha, dtype)
    ema_mean = a * state.mean + (1 - a) * x
    ema_var = a * state.var + (1 - a) * jnp.square(x - ema_mean)
    step = ~warming & finite
    if skip_update_on_spike:
      step = step & ~spike
    return threshold, dict(
      spike=spike,
      zscore=jnp.where(warming, 0, z),
      mean=jnp.where(ready, w_mean, jnp.where(step, ema_mean, state.mean)),
      var=jnp.where(ready, w_var, jnp.where(step, ema_var, state.var)),
      warmup_norms=buf,
      filled=filled,
    )

  return _core.global_clipper("zclip", ZClipState, init_state, decide, axis_name=axis_name)
