"""Guards that skip whole optimizer steps: on loss or norm spikes, on norms
above a bound, on inf/NaN."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxclip import _adaptive, _base, _norms, _skip, _validate
from jaxclip._validate import Threshold

__all__ = [
  "SkipLargeNormState",
  "SkipNonFiniteState",
  "SkipOnSpikeState",
  "skip_large_norm",
  "skip_nonfinite",
  "skip_on_spike",
]


class SkipOnSpikeState(NamedTuple):
  """State of `skip_on_spike`.

  Attributes:
    count: Number of steps seen, skipped ones included (int32).
    norm: Global norm of the gradients at the last step.
    loss: The loss passed at the last step (NaN when none was passed).
    skipped: Whether the last step was skipped.
    total_skipped: Number of steps skipped so far (int32).
    norm_history: Ring buffer of recent gradient norms (`window` entries).
    loss_history: Ring buffer of recent losses (NaN where none was passed).
    filled: Number of valid entries of the buffers (int32).
    position: Index the next entry is written to (int32).
    inner_state: The state of the wrapped optimizer.
  """

  count: jax.Array
  norm: jax.Array
  loss: jax.Array
  skipped: jax.Array
  total_skipped: jax.Array
  norm_history: jax.Array
  loss_history: jax.Array
  filled: jax.Array
  position: jax.Array
  inner_state: Any

  stats_name = "skip_on_spike"

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports (the inner state is reported on its own)."""
    return {
      "global_norm": self.norm,
      "loss": self.loss,
      "skipped": self.skipped,
      "total_skipped": self.total_skipped,
      "count": self.count,
    }


def _is_outlier(value, history, filled, n_sigma, min_history, two_sided):
  """Whether `value` exceeds mean + n_sigma * std of the finite valid history
  (with `two_sided`, lies more than n_sigma * std from the mean)."""
  valid = (jnp.arange(history.shape[0]) < filled) & jnp.isfinite(history)
  n = jnp.sum(valid)
  safe = jnp.where(valid, history, 0)
  mean = jnp.sum(safe) / jnp.maximum(n, 1)
  var = jnp.sum(jnp.where(valid, jnp.square(safe - mean), 0)) / jnp.maximum(n - 1, 1)
  band = jnp.asarray(n_sigma, history.dtype) * jnp.sqrt(var)
  outside = jnp.abs(value - mean) > band if two_sided else value > mean + band
  return (n >= min_history) & outside


def _loss(value: Any, dtype: jnp.dtype) -> jax.Array:
  """The `loss=` of a step as a scalar of `dtype`."""
  loss = jnp.asarray(value)
  if loss.shape:
    raise ValueError(
      f"`loss` must be a scalar (the step's loss), got an array of shape {loss.shape}."
      " Pass its mean, e.g. `loss=jnp.mean(per_example_losses)`."
    )
  return loss.astype(dtype)


def skip_on_spike(
  inner: optax.GradientTransformation,
  window: int = 128,
  n_sigma: jax.typing.ArrayLike = 6.0,
  min_history: int = 64,
  *,
  record_skipped: bool = True,
  two_sided: bool = False,
  axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips steps whose gradient norm or loss spikes above its recent history.

  The rule of OLMo's ``SkipStepOptimizer``: a step is skipped (zero update,
  the inner optimizer's state untouched) when the global norm of the
  gradients, or the loss passed as ``update(..., loss=loss)``, exceeds the
  mean of the last `window` values by more than `n_sigma` sample standard
  deviations (with ``two_sided=True``, lies that far from the mean on either
  side, as OLMo-core's newer versions test ``|value - mean| / std``). Nothing
  is skipped for spikes until `min_history` values are known. Non-finite
  norms or losses are always skipped and never recorded.

  History of skipped steps: by default (``record_skipped=True``, as OLMo
  does) every finite value enters the window, skipped or not, so the window
  follows a lasting change of level (after a learning-rate change, say) and
  training never locks into skipping every step. With
  ``record_skipped=False`` a skipped step's values stay out of the window, so
  a spike does not widen the band used to judge the next steps; but a lasting
  jump of the norm above the band is then skipped for good, since the window
  never sees the new level.

  Cost: the norm is the one an inner `clip_by_global_norm` computes (XLA
  computes it once for both), and the inner step is not branched: under
  `jax.jit` each new state value is selected where it is computed, so with
  donated buffers the inner state is still updated in place
  (`benchmarks/bench_guards.py`; state computed inside a `lax.cond`, as in
  `optax.MultiSteps`, is selected after it and may be copied: a
  `jaxclip.StateCopyWarning` says so once). On a skipped
  step the rest of the inner step then runs on the old state: callbacks in it
  see those values, and a gradient taken through a skipped step can be NaN.

  Args:
    inner: The optimizer to guard; extra arguments (``loss=`` included) are
      forwarded to it.
    window: Number of recent values kept (a Python int >= 2).
    n_sigma: Number of standard deviations above the mean that is a spike.
    min_history: Earlier values needed before spikes are skipped (int in
      [2, window]). OLMo's gate counts the current value too: its 64 values
      (``rolling_interval_length // 2``) are ``min_history=63`` here.
    record_skipped: Whether values of skipped (finite) steps enter the
      history.
    two_sided: Whether a sudden drop (of the norm or the loss) is a spike
      too. Off by default: a loss that falls is seldom a step to undo.
    axis_name: Inside `jax.shard_map` or `jax.pmap` with gradients split over
      devices, the mapped axis to sum the partial norms over, so that every
      device sees the same norm and every device skips the same steps (the loss
      is averaged over the axis). Not needed under plain `jax.jit` with sharded
      arrays.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `SkipOnSpikeState`.

  Raises:
    ValueError: For `window < 2`, `min_history` outside ``[2, window]`` or a
      concrete negative or NaN `n_sigma`; at `update`, for a `loss` that is
      not a scalar.
    TypeError: If `inner` is not a transformation (an uncalled optimizer
      factory such as `optax.sgd`, say) or `two_sided` is not a bool.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxclip
    >>> opt = jaxclip.skip_on_spike(optax.sgd(1.0), window=8, n_sigma=3.0, min_history=4)
    >>> params = jnp.zeros(2)
    >>> state = opt.init(params)
    >>> for loss in (1.0, 1.1, 0.9, 1.0, 50.0):
    ...   u, state = opt.update(jnp.ones(2), state, params, loss=jnp.asarray(loss))
    >>> u, bool(state.skipped), int(state.total_skipped)
    (Array([0., 0.], dtype=float32), True, 1)

  References:
    Groeneveld et al., [OLMo: Accelerating the Science of Language
    Models](https://arxiv.org/abs/2402.00838), 2024; OLMo 2 ([2 OLMo 2
    Furious](https://arxiv.org/abs/2501.00656), 2025) and
    ``olmo_core.optim.SkipStepOptimizer``.
  """
  size = _validate.check_int(window, "window", 2)
  need = _validate.check_int(min_history, "min_history", 2)
  if need > size:
    raise ValueError(
      f"`min_history` ({min_history}) must be <= `window` ({window}): the"
      " window never holds more values. Lower `min_history` or widen `window`."
    )
  _validate.check_threshold(n_sigma, "n_sigma", allow_schedule=False)
  two_sided = _validate.check_bool(two_sided, "two_sided")
  inner = _base.with_extra_args(inner)
  outlier = functools.partial(_is_outlier, n_sigma=n_sigma, min_history=need, two_sided=two_sided)

  def init_fn(params):
    dtype = _base.record_dtype(params)
    zero = _base.zero_count  # a fresh array per field: donated states share no buffer
    return SkipOnSpikeState(
        zero(), jnp.zeros([], dtype), jnp.full([], jnp.nan, dtype), jnp.zeros([], bool), zero(),
        jnp.zeros((size,), dtype), jnp.full((size,), jnp.nan, dtype), zero(), zero(),
        inner.init(params),
    )  # fmt: skip

  def update_fn(updates, state, params=None, **extra_args):
    _base.expect_state(state, SkipOnSpikeState, "skip_on_spike")
    dtype = state.norm_history.dtype
    norm = _norms.global_norm(updates, axis_name=axis_name).astype(dtype)
    has_loss = extra_args.get("loss") is not None
    loss = _loss(extra_args["loss"], dtype) if has_loss else jnp.full([], jnp.nan, dtype)
    if has_loss and axis_name is not None:
      # One decision for all devices: the mean, as a sum of shares (a sum of
      # the losses first could overflow).
      loss = jax.lax.psum(loss / jax.lax.psum(1, axis_name), axis_name)
    finite = jnp.isfinite(norm) & (jnp.isfinite(loss) | (not has_loss))
    spike = outlier(norm, state.norm_history, state.filled)
    if has_loss:
      spike = spike | outlier(loss, state.loss_history, state.filled)
    skip = ~finite | spike
    keep = finite & (jnp.asarray(record_skipped) | ~skip)
    norms, filled, position = _adaptive.push(
      state.norm_history, state.filled, state.position, norm, keep
    )
    losses, _, _ = _adaptive.push(state.loss_history, state.filled, state.position, loss, keep)
    updates, inner_state = _skip.skippable_update(
      inner, skip, updates, state.inner_state, params, extra_args
    )
    new_state = SkipOnSpikeState(
        state.count + 1, norm, loss, skip, state.total_skipped + skip.astype(jnp.int32),
        norms, losses, filled, position, inner_state,
    )  # fmt: skip
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class SkipNonFiniteState(NamedTuple):
  """State of `skip_nonfinite`.

  Attributes:
    count: Number of steps seen (int32).
    total_skipped: Number of steps skipped because of inf or NaN (int32).
    consecutive_skipped: Number of consecutive non-finite steps up to the
      last one (int32; 0 after a finite step).
    last_finite: Whether the last step's gradients were all finite.
    applied_nonfinite: Number of non-finite steps applied anyway because
      `max_consecutive` was exceeded (int32).
    inner_state: The state of the wrapped optimizer.
  """

  count: jax.Array
  total_skipped: jax.Array
  consecutive_skipped: jax.Array
  last_finite: jax.Array
  applied_nonfinite: jax.Array
  inner_state: Any

  stats_name = "skip_nonfinite"

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports (the inner state is reported on its own)."""
    return {
      "nonfinite": ~self.last_finite,
      "total_skipped": self.total_skipped,
      # Steps applied after giving up count too: a run of non-finite steps.
      "consecutive_nonfinite": self.consecutive_skipped,
      "applied_nonfinite": self.applied_nonfinite,
      "count": self.count,
    }


def skip_nonfinite(
  inner: optax.GradientTransformation,
  max_consecutive: int | None = None,
  *,
  axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips steps whose gradients hold inf or NaN, and counts them.

  Like `optax.apply_if_finite`: a step with a non-finite gradient entry gives
  a zero update and leaves the inner optimizer's state untouched. The test is
  on the global norm of the gradients (float32-accumulated and rescaled, so
  finite entries only fail it when the norm itself exceeds the float range).
  The state reports how many steps were skipped in total and in a row. The
  inner step runs as in `skip_on_spike` (see its "Cost" paragraph): not
  branched, and with donated buffers its state is updated in place.

  After more than `max_consecutive` non-finite steps in a row the guard gives
  up, as optax does: the step is passed to `inner` (so the inf/NaN reaches the
  parameters and the failure is visible) and counted in `applied_nonfinite`
  rather than `total_skipped`; the first finite step resets the run. With
  `max_consecutive=None` (the default) non-finite steps are always skipped.

  Args:
    inner: The optimizer to guard; extra arguments are forwarded to it.
    max_consecutive: Number of consecutive non-finite steps skipped before
      giving up (a Python int >= 0), or None never to give up.
    axis_name: Inside `jax.shard_map` or `jax.pmap` with gradients split over
      devices, the mapped axis to sum the partial norms over, so that every
      device sees the same norm and every device skips the same steps. Not
      needed under plain `jax.jit` with sharded arrays.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `SkipNonFiniteState`.

  Raises:
    ValueError: If `max_consecutive` is negative.
    TypeError: If `inner` is not a transformation (an uncalled optimizer
      factory such as `optax.sgd`, say).

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxclip
    >>> opt = jaxclip.skip_nonfinite(optax.sgd(1.0))
    >>> state = opt.init(jnp.zeros(2))
    >>> u, state = opt.update(jnp.array([1.0, jnp.nan]), state)
    >>> u, int(state.total_skipped), bool(state.last_finite)
    (Array([0., 0.], dtype=float32), 1, False)
  """
  if max_consecutive is not None:
    max_consecutive = _validate.check_int(max_consecutive, "max_consecutive", 0)
  inner = _base.with_extra_args(inner)

  def init_fn(params):
    zero = _base.zero_count  # a fresh array per field: donated states share no buffer
    return SkipNonFiniteState(
      zero(), zero(), zero(), jnp.ones([], bool), zero(), inner.init(params)
    )

  def update_fn(updates, state, params=None, **extra_args):
    _base.expect_state(state, SkipNonFiniteState, "skip_nonfinite")
    # The global norm is finite exactly when every entry is (short of a norm
    # beyond the float range), and it is the very computation a clipper in
    # `inner` makes, so XLA computes it once for both.
    finite = jnp.isfinite(_norms.global_norm(updates, axis_name=axis_name))
    run = jnp.where(finite, 0, state.consecutive_skipped + 1)
    give_up = ~finite & (False if max_consecutive is None else run > max_consecutive)
    skip = ~finite & ~give_up
    updates, inner_state = _skip.skippable_update(
      inner, skip, updates, state.inner_state, params, extra_args
    )
    new_state = SkipNonFiniteState(
      state.count + 1,
      state.total_skipped + skip.astype(jnp.int32),
      run.astype(jnp.int32),
      finite,
      state.applied_nonfinite + give_up.astype(jnp.int32),
      inner_state,
    )
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class SkipLargeNormState(NamedTuple):
  """State of `skip_large_norm`.

  Attributes:
    count: Number of steps seen, skipped ones included (int32).
    norm: Global norm of the gradients at the last step.
    threshold: The bound `max_norm` in force at the last step.
    skipped: Whether the last step was skipped.
    total_skipped: Number of steps skipped so far (int32).
    inner_state: The state of the wrapped optimizer.
  """

  count: jax.Array
  norm: jax.Array
  threshold: jax.Array
  skipped: jax.Array
  total_skipped: jax.Array
  inner_state: Any

  stats_name = "skip_large_norm"

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports (the inner state is reported on its own)."""
    return {
      "global_norm": self.norm,
      "threshold": self.threshold,
      "skipped": self.skipped,
      "total_skipped": self.total_skipped,
      "count": self.count,
    }


def skip_large_norm(
  inner: optax.GradientTransformation,
  max_norm: Threshold,
  *,
  axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Skips steps whose gradient norm exceeds a fixed bound.

  A step whose global gradient norm is above `max_norm`, or not finite, gives
  a zero update and leaves the inner optimizer's state untouched: the rule of
  axlearn's ``skip_and_clip_by_global_norm`` with a fixed ``drop_norm`` (its
  GPT recipes skip above 100 and clip to 1). Where clipping bounds every step
  and still takes it, this guard drops a step whose gradient is so large that
  its direction is not trusted (a bad batch, a loss spike) and keeps the
  optimizer's moments free of it. Chain a clipper inside `inner` to clip the
  steps that are kept:
  ``skip_large_norm(optax.chain(clip_by_global_norm(1.0), optax.adamw(lr)), 100.0)``.
  The inner step runs as in `skip_on_spike` (see its "Cost" paragraph): not
  branched, and the norm is the one an inner `clip_by_global_norm` computes.

  A norm equal to `max_norm` is kept (axlearn skips it). For a bound that
  follows the run's own norms rather than a fixed scale, see `skip_on_spike`.

  Args:
    inner: The optimizer to guard; extra arguments are forwarded to it.
    max_norm: The largest global norm of a step that is taken (>= 0), a
      constant or a schedule of the step count (skipped steps counted).
    axis_name: Inside `jax.shard_map` or `jax.pmap` with gradients split over
      devices, the mapped axis to sum the partial norms over, so that every
      device sees the same norm and every device skips the same steps. Not
      needed under plain `jax.jit` with sharded arrays.

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `SkipLargeNormState`.

  Raises:
    ValueError: If a concrete `max_norm` is negative or NaN.
    TypeError: If `inner` is not a transformation (an uncalled optimizer
      factory such as `optax.sgd`, say) or `max_norm` is not a real number,
      array or schedule.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import jaxclip
    >>> opt = jaxclip.skip_large_norm(optax.sgd(1.0), max_norm=10.0)
    >>> state = opt.init(jnp.zeros(2))
    >>> u, state = opt.update(jnp.array([30.0, 40.0]), state)
    >>> u, float(state.norm), bool(state.skipped)
    (Array([0., 0.], dtype=float32), 50.0, True)

  References:
    axlearn, ``axlearn.common.optimizers.skip_and_clip_by_global_norm``;
    Chowdhery et al., [PaLM: Scaling Language Modeling with
    Pathways](https://arxiv.org/abs/2204.02311), 2022 (skipping batches
    around loss spikes).
  """
  _validate.check_threshold(max_norm, "max_norm")
  inner = _base.with_extra_args(inner)

  def init_fn(params):
    dtype = _base.record_dtype(params)
    zero = _base.zero_count  # a fresh array per field: donated states share no buffer
    return SkipLargeNormState(
      zero(), jnp.zeros([], dtype), jnp.zeros([], dtype), jnp.zeros([], bool), zero(),
      inner.init(params),
    )  # fmt: skip

  def update_fn(updates, state, params=None, **extra_args):
    _base.expect_state(state, SkipLargeNormState, "skip_large_norm")
    dtype = state.norm.dtype
    norm = _norms.global_norm(updates, axis_name=axis_name).astype(dtype)
    threshold = _base.resolve(max_norm, state.count, dtype, "max_norm")
    skip = ~(jnp.isfinite(norm) & (norm <= threshold))  # inf/NaN skipped, also below an inf bound
    updates, inner_state = _skip.skippable_update(
      inner, skip, updates, state.inner_state, params, extra_args
    )
    new_state = SkipLargeNormState(
      state.count + 1, norm, threshold, skip, state.total_skipped + skip.astype(jnp.int32),
      inner_state,
    )  # fmt: skip
    return updates, new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
