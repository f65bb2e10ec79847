"""SPAM's spike clipping: each entry against an EMA of its squared gradient.

Also the helpers it shares with `jaxclip._stable_spam`: EMA weights and bias
corrections accurate in float32, and checks of EMA coefficients. Statistics
are kept in float32 (float64 for float64 parameters), and the EMA of an entry
holding inf or NaN is left as it was, so one bad step never poisons it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxclip import _base, _core, _norms, _validate
from jaxclip._validate import Threshold

__all__ = ["SpamClipState", "spam_clip"]


def complement(decay: jax.typing.ArrayLike, dtype: Any) -> jax.Array:
  """``1 - decay`` in `dtype`. A concrete `decay` is subtracted in float64 and
  rounded once: float32 ``1 - 0.999`` is otherwise 1.3e-5 off, far more than
  the rounding of the EMAs it weights."""
  if _validate.is_concrete(decay):
    return jnp.asarray(1 - np.asarray(decay, np.float64), dtype)
  return 1 - jnp.asarray(decay, dtype)


def debias(c: jax.Array, steps: jax.Array) -> jax.Array:
  """``1 - (1 - c)**steps``, the bias correction of an EMA with weight `c`
  after `steps` >= 1 updates, without the cancellation of ``1 - b**n``."""
  return -jnp.expm1(steps.astype(c.dtype) * jnp.log1p(-c))


def check_decay(value: jax.typing.ArrayLike, name: str, fix: str) -> None:
  """Raises for a concrete EMA coefficient outside [0, 1) (1 never moves)."""
  _validate.check_range(value, name, 0.0, 1.0, fix)
  if _validate.is_concrete(value) and np.any(np.asarray(value, np.float64) == 1):
    raise ValueError(
      f"`{name}` must be < 1, got {value!r}: an EMA with coefficient 1 never moves and"
      f" its bias correction divides by zero. {fix}"
    )


def check_entries(leaves: list[jax.Array], k: int, name: str, shapes: list | None = None) -> None:
  """Raises unless the updates have the `k` floating leaves (of `shapes`)
  that `init` saw."""
  got = [jnp.shape(x) for x in leaves]
  if len(leaves) != k or (shapes is not None and got != shapes):
    raise ValueError(
      f"`{name}` was initialised for {k} floating leaves"
      f"{'' if shapes is None else f' of shapes {shapes}'} but the updates have"
      f" {len(leaves)}{'' if shapes is None else f' of shapes {got}'}. Call `init`"
      " with parameters of the same structure as the updates."
    )


def magnitude_sq(x: jax.Array) -> jax.Array:
  """|x|**2, real, for real or complex `x`."""
  if jnp.iscomplexobj(x):
    return jnp.real(x) ** 2 + jnp.imag(x) ** 2
  return x * x


# SPAM: spike-aware clipping against an EMA of g**2, entry by entry.


class SpamClipState(NamedTuple):
  """State of `spam_clip`: the EMA of squared gradients and what was clipped.

  Per-tensor vectors have one entry per floating leaf, in `jax.tree.leaves`
  order.

  Attributes:
    count: Number of updates processed (int32).
    threshold: The threshold ``theta`` used at the last step.
    ratio: Per tensor, the largest ``g**2 / v`` over its finite entries with
      history (``v > 0``), before clipping: the entries above `threshold`
      were clipped (when clipping was active).
    scale: Per tensor, the smallest factor an entry was multiplied by,
      ``sqrt(threshold / ratio)`` (1 when none was clipped).
    clipped: Per tensor, whether any entry was clipped.
    v: A tree shaped like the parameters (as optax's moments, so that
      `optax.tree_utils.tree_map_params` reaches it): for each floating leaf
      the EMA of its squared clipped gradient (float32 for bf16, fp16 and
      float32 leaves), sharded like the leaf; non-floating leaves hold
      zeros, never read.
  """

  count: jax.Array
  threshold: jax.Array
  ratio: jax.Array
  scale: jax.Array
  clipped: jax.Array
  v: Any

  stats_name = "spam_clip"
  per_tensor_fields = ("ratio", "scale", "clipped")

  def summary(self) -> dict[str, jax.Array]:
    """What `jaxclip.stats` reports; `clipped_fraction` counts tensors."""
    return {
      **_core.per_tensor_summary(self, "ratio"),
      "threshold": self.threshold,
      "count": self.count,
    }


def spam_clip(
  threshold: Threshold = 5000.0,
  beta: jax.typing.ArrayLike = 0.999,
  *,
  start_step: int = 20,
  reset_interval: int = 0,
) -> optax.GradientTransformationExtraArgs:
  """Clips gradient spikes entry by entry against an EMA of squared gradients (SPAM).

  Each entry ``g`` with ``g**2 > threshold * v`` becomes
  ``sign(g) * sqrt(threshold * v)``, where ``v`` is the entry's EMA of past
  squared gradients; then ``v <- beta * v + (1 - beta) * g_clipped**2``.
  The update at step ``n`` (counting from 1) is compared with the ``v`` of
  the steps before it, and clipping is active when ``n >= start_step`` (and,
  with `reset_interval`, ``n % reset_interval >= start_step``).

  In the SPAM optimizer, ``v`` is Adam's own second moment (not
  bias-corrected, ``beta2 = 0.999``), updated with the clipped gradient. Here
  ``v`` is kept by this transform, so it chains with any optimizer; chained
  as ``optax.chain(spam_clip(), optax.adam(lr, b2=0.999))`` its ``v`` equals
  Adam's ``nu`` and the clipping is SPAM's. SPAM also zeroes Adam's moments
  every ``DeltaT`` steps (500 in its examples): `reset_interval` zeroes ``v``
  on the same steps (``n % reset_interval == 0``), which is what SPAM's
  clipping sees; resetting the optimizer's momentum is not this transform's
  job.

  First steps: ``v`` starts at 0, so the first ``start_step - 1`` updates
  (and the first `start_step` of each reset period) pass unclipped and only
  build ``v``; this transform has no bias correction either, like the
  reference. An entry whose ``v`` is still exactly 0 (its gradient has always
  been 0) is never clipped: the reference clips it to 0, and as the clipped
  value feeds ``v``, that entry would then never move again.

  Non-finite entries: an inf or NaN entry passes through unchanged (so that
  a guard such as `skip_nonfinite` or a loss scaler sees it) and leaves its
  ``v`` unchanged; the other entries are clipped as usual. Complex entries
  are compared by ``|g|**2`` and keep their phase.

  Args:
    threshold: ``theta``, the largest allowed ratio ``g**2 / v`` (>= 0):
      a number, a 0-d array or a schedule ``step -> value``. 0 turns
      clipping off (``v`` is still tracked), as in SPAM's code.
    beta: EMA coefficient of ``v``, in [0, 1) (may be traced).
    start_step: The first step (counting from 1) at which entries are
      clipped, the reference's ``grad_accu_steps`` (a Python int >= 1).
    reset_interval: Zero ``v`` every this many steps, as SPAM's momentum
      reset (``DeltaT``); 0 never resets (a Python int >= 0).

  Returns:
    An `optax.GradientTransformationExtraArgs` whose state is a
    `SpamClipState`.

  Raises:
    ValueError: For a concrete negative or NaN `threshold`, `beta` outside
      [0, 1), `start_step < 1`, or `reset_interval` neither 0 nor above
      `start_step`.
    TypeError: If `start_step` or `reset_interval` is not an int.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> tx = jaxclip.spam_clip(threshold=8.0, beta=0.5, start_step=2)
    >>> state = tx.init(jnp.zeros(2))
    >>> _, state = tx.update(jnp.array([2.0, 2.0]), state)  # v = (2, 2)
    >>> u, state = tx.update(jnp.array([-10.0, 3.0]), state)
    >>> u  # 100 > 8 * 2: clipped to -sqrt(16); 9 < 16 passes
    Array([-4.,  3.], dtype=float32)

  References:
    Huang et al., [SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training](https://arxiv.org/abs/2501.06842), ICLR 2025.
  """
  _validate.check_threshold(threshold, "threshold")
  check_decay(beta, "beta", "SPAM uses Adam's beta2, 0.999.")
  start = _validate.check_int(start_step, "start_step", 1)
  interval = _validate.check_int(reset_interval, "reset_interval", 0)
  if 0 < interval <= start:
    raise ValueError(
      f"`reset_interval={interval}` must be 0 or above `start_step={start}`: clipping"
      " pauses for the first `start_step` steps of each reset period, so it would never"
      " be active. SPAM uses reset_interval=500 with start_step=20."
    )

  def init_fn(params):
    leaves = _norms.inexact_leaves(params)
    dtype = _base.record_dtype(params)
    k = len(leaves)
    return SpamClipState(
      count=_base.zero_count(),
      threshold=_base.scalar(0, dtype),
      ratio=jnp.zeros((k,), dtype),
      scale=jnp.ones((k,), dtype),
      clipped=jnp.zeros((k,), bool),
      v=jax.tree.map(_zero_moment, params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args
    _base.expect_state(state, SpamClipState, "spam_clip")
    leaves = _norms.inexact_leaves(updates)
    v_leaves, v_def = jax.tree.flatten(state.v)
    v_prev = [v for v in v_leaves if _norms.is_inexact(v)]
    check_entries(leaves, len(v_prev), "spam_clip", [v.shape for v in v_prev])
    n = state.count + 1
    active = n >= start
    if interval:
      active = active & (n % interval >= start)
      v_prev = [jnp.where(n % interval == 0, 0, v).astype(v.dtype) for v in v_prev]
    dtype = state.threshold.dtype
    theta = _base.resolve(threshold, state.count, dtype, "threshold")
    active = active & (theta != 0)  # SPAM: `if self.thres != 0`
    b, c = jnp.asarray(beta, dtype), complement(beta, dtype)
    parts = [_spam_leaf(x, v, theta, active, b, c) for x, v in zip(leaves, v_prev)]
    it = iter(p[0] for p in parts)
    updates = _base.map_inexact(lambda x: next(it), updates)
    ratio = _stack([p[2] for p in parts], dtype)
    clipped = active & (ratio > theta)
    new = SpamClipState(
      count=n,
      threshold=theta,
      ratio=ratio,
      scale=jnp.where(clipped, jnp.sqrt(theta / jnp.where(clipped, ratio, 1)), 1),
      clipped=clipped,
      v=_replace_inexact(v_def, v_leaves, [p[1] for p in parts]),
    )
    return updates, _base.keep_dtypes(state, SpamClipState, new)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _zero_moment(x: Any) -> jax.Array:
  """The initial ``v`` of one parameter leaf, keeping its sharding."""
  if _norms.is_inexact(x):
    return jnp.zeros_like(x, _norms.accumulation_dtype(x.dtype))
  return jnp.zeros_like(x)


def _replace_inexact(treedef: Any, leaves: list[Any], new: list[jax.Array]) -> Any:
  """The tree of `leaves` with its floating leaves replaced, in order, by `new`."""
  it = iter(new)
  return jax.tree.unflatten(treedef, [next(it) if _norms.is_inexact(x) else x for x in leaves])


def _stack(values: list[jax.Array], dtype: Any) -> jax.Array:
  """Per-leaf scalars as one vector (empty for no leaves)."""
  return jnp.stack(values).astype(dtype) if values else jnp.zeros((0,), dtype)


def _spam_leaf(x, v, theta, active, b, c):
  """One leaf of `spam_clip`: (clipped leaf, new v, largest g**2 / v)."""
  acc = jnp.result_type(v.dtype, _norms.accumulation_dtype(x.dtype))
  v = v.astype(acc)
  g = x.astype(jnp.result_type(x.dtype, acc))
  seen = v > 0
  # g**2 may overflow where g does not: a finite g is a spike to clip.
  ratio = jnp.where(seen & jnp.isfinite(g), magnitude_sq(g) / jnp.where(seen, v, 1), 0)
  ratio = jnp.max(ratio, initial=0)
  # The ratio is reduced before v is overwritten, and the clipped leaf and v
  # are materialised: XLA:CPU otherwise recomputes the clipped leaf from v in
  # each of the optimizer's consumers and copies a donated v.
  ratio, x, v = jax.lax.optimization_barrier((ratio, x, v))
  g = x.astype(jnp.result_type(x.dtype, acc))
  finite = jnp.isfinite(g)
  bound_sq = jnp.where(active & (v > 0), theta.astype(acc) * v, jnp.inf)
  bound = jnp.sqrt(bound_sq)
  if jnp.iscomplexobj(g):
    mag = jnp.abs(g)
    over = finite & (mag > bound)
    # Where not over, the bound may be inf: the factor is 1 there, so that
    # no inf reaches the gradient through the discarded branch.
    factor = jnp.where(over, bound, 1) / jnp.where(over, mag, 1)
    out = jnp.where(over, g * factor, g)
  else:
    out = jnp.where(finite, jnp.clip(g, -bound, bound), g)
  out = out.astype(x.dtype)
  # v is fed what the optimizer sees; reading `out` also orders the in-place
  # write of a donated v after every read of the old one (no copy).
  new_v = b.astype(acc) * v + c.astype(acc) * magnitude_sq(out.astype(g.dtype))
  return jax.lax.optimization_barrier((out, jnp.where(finite, new_v, v), ratio))
