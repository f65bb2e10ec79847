"""The rest of a DP-SGD step: Gaussian noise, averaging, and privacy accounting.

The guarantee `dp_epsilon` computes is that of the *Poisson-sampled*
Gaussian mechanism (Abadi et al., 2016; Mironov, 2017): at every step each
of the N training examples is in the batch independently with probability
``sampling_rate``, the clipped sum of the batch gets Gaussian noise of
standard deviation ``noise_multiplier * l2_norm_clip``, under the add-or-
remove-one-example neighbouring relation. Batches of a fixed size drawn by
shuffling are not Poisson sampling, and the figure does not apply to them.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxclip import _norms, _validate

ACCOUNTANTS = ("rdp", "pld")


def noisy_mean(
  grads_sum: optax.Updates,
  l2_norm_clip: jax.typing.ArrayLike,
  noise_multiplier: jax.typing.ArrayLike,
  batch_size: jax.typing.ArrayLike,
  *,
  key: jax.Array,
) -> optax.Updates:
  """Adds DP-SGD's Gaussian noise to a clipped sum and divides by the batch size.

  Every floating leaf ``s`` of `grads_sum` becomes
  ``(s + noise_multiplier * l2_norm_clip * N(0, I)) / batch_size``, the noise
  drawn in float32 (float64 for float64 leaves) from `key` and the result
  cast to the leaf's dtype. A complex leaf gets independent noise of that
  standard deviation on its real and imaginary parts (its entries count as
  pairs of reals, as its modulus does in the clipping norm). Other leaves
  (None, integers) pass through.
  Jittable; every argument but `grads_sum` may be traced.

  With Poisson sampling (each example in the batch with probability q, the
  sampling `dp_epsilon` accounts for), pass the *expected* batch size
  ``q * N``, a public constant, not the number of examples actually drawn:
  that number differs between neighbouring datasets, and dividing by it is
  not covered by the accounting. With padded batches, pad examples must
  contribute zero to the sum (e.g. a zero loss), and are not counted.

  Args:
    grads_sum: The sum of the clipped per-example gradients, e.g. from
      `jaxclip.clipped_grad`.
    l2_norm_clip: The clipping norm C the sum was clipped with (>= 0).
    noise_multiplier: The noise standard deviation in units of C (>= 0).
    batch_size: The divisor: the expected batch size (> 0).
    key: A PRNG key, fresh at every step.

  Returns:
    A pytree shaped like `grads_sum`: the noisy mean gradient.

  Raises:
    ValueError: If a concrete argument is negative, NaN, or (`batch_size`) 0.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import jaxclip
    >>> s = {"w": jnp.array([2.0, -4.0])}
    >>> jaxclip.noisy_mean(s, 1.0, 0.0, 4, key=jax.random.key(0))
    {'w': Array([ 0.5, -1. ], dtype=float32)}
    >>> jaxclip.noisy_mean(s, 1.0, 1.1, 4, key=jax.random.key(0))["w"].shape
    (2,)

  References:
    Abadi et al., [Deep Learning with Differential
    Privacy](https://arxiv.org/abs/1607.00133), 2016.
  """
  _validate.check_threshold(l2_norm_clip, "l2_norm_clip", allow_schedule=False)
  _validate.check_threshold(noise_multiplier, "noise_multiplier", allow_schedule=False)
  _validate.check_threshold(batch_size, "batch_size", allow_schedule=False)
  if _validate.is_concrete(batch_size) and np.any(np.asarray(batch_size) == 0):
    raise ValueError("`batch_size` must be > 0, got 0; pass the expected batch size q * N.")
  leaves, treedef = jax.tree.flatten(grads_sum)
  keys = jax.random.split(key, max(len(leaves), 1))
  out = []
  for x, k in zip(leaves, keys):
    if not _norms.is_inexact(x):
      out.append(x)
      continue
    acc = _norms.accumulation_dtype(x.dtype)
    std = jnp.asarray(noise_multiplier, acc) * jnp.asarray(l2_norm_clip, acc)
    if jnp.iscomplexobj(x):
      real, imag = jax.random.split(k)
      noise = lax.complex(
        jax.random.normal(real, x.shape, acc), jax.random.normal(imag, x.shape, acc)
      )
      noisy = x.astype(noise.dtype) + std * noise
    else:
      noisy = x.astype(acc) + std * jax.random.normal(k, x.shape, acc)
    out.append((noisy / jnp.asarray(batch_size, acc)).astype(x.dtype))
  return jax.tree.unflatten(treedef, out)


def _import_dp_accounting() -> Any:
  try:
    import dp_accounting
  except ImportError as e:
    raise ImportError(
      f"jaxclip.dp_epsilon needs Google's dp-accounting package, which could not be"
      f" imported ({e}). Install it with `pip install 'jaxclip[dp]'`.",
      name=e.name,
    ) from e
  return dp_accounting


def _real(value: Any, name: str, low: float, high: float, fix: str) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real | np.ndarray | np.generic):
    raise TypeError(f"`{name}` must be a Python number, got {value!r}. {fix}")
  v = float(value)
  if not low <= v <= high:  # also catches NaN
    raise ValueError(f"`{name}` must be in [{low}, {high}], got {value!r}. {fix}")
  return v


def dp_epsilon(
  noise_multiplier: float,
  sampling_rate: float,
  steps: int,
  delta: float,
  *,
  accountant: str = "rdp",
) -> float:
  """The epsilon of DP-SGD with Poisson sampling, by Google's `dp_accounting`.

  The privacy loss of `steps` steps of the Poisson-sampled Gaussian
  mechanism: at each step every training example is in the batch
  independently with probability `sampling_rate`, and the clipped sum gets
  Gaussian noise of standard deviation ``noise_multiplier * l2_norm_clip``
  (as `noisy_mean` adds). The guarantee is ``(epsilon, delta)``-DP for adding
  or removing one example. It does not hold for batches of a fixed size drawn
  by shuffling, nor for a run whose batches were chosen any other way.

  Needs the `dp` extra: ``pip install 'jaxclip[dp]'``.

  Args:
    noise_multiplier: Noise standard deviation in units of the clipping norm
      (>= 0; 0 gives infinite epsilon).
    sampling_rate: Probability q that an example is in a batch: the expected
      batch size over the dataset size, in (0, 1].
    steps: Number of noisy steps taken (>= 0).
    delta: Target delta, in (0, 1); commonly below 1 / dataset size.
    accountant: ``"rdp"`` (Renyi DP, Mironov 2017; fast, slightly
      pessimistic) or ``"pld"`` (privacy loss distributions; tighter, slower
      for many steps).

  Returns:
    epsilon, a Python float (``math.inf`` without noise).

  Raises:
    ValueError: If an argument is out of range or `accountant` unknown.
    ImportError: If `dp_accounting` is not installed.

  Examples:
    >>> import jaxclip
    >>> eps = jaxclip.dp_epsilon(1.1, sampling_rate=256 / 60000, steps=10000, delta=1e-5)
    >>> round(eps, 2)
    2.16

  References:
    Abadi et al., [Deep Learning with Differential
    Privacy](https://arxiv.org/abs/1607.00133), 2016. Mironov, [Renyi
    Differential Privacy](https://arxiv.org/abs/1702.07476), 2017.
  """
  sigma = _real(noise_multiplier, "noise_multiplier", 0.0, math.inf, "Use e.g. 1.0.")
  q = _real(sampling_rate, "sampling_rate", 0.0, 1.0, "It is expected batch size / dataset size.")
  d = _real(delta, "delta", 0.0, 1.0, "Use e.g. 1e-5, below 1 / dataset size.")
  steps = _validate.check_int(steps, "steps", 0)
  if q == 0 or d in (0.0, 1.0):
    raise ValueError(
      f"`sampling_rate` must be > 0 and `delta` in (0, 1); got {sampling_rate!r}, {delta!r}."
    )
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"`accountant` must be 'rdp' or 'pld', got {accountant!r}.")
  dpa = _import_dp_accounting()
  if steps == 0:
    return 0.0
  if sigma == 0:
    return math.inf
  event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(sigma)), steps)
  acc = dpa.rdp.RdpAccountant() if accountant == "rdp" else dpa.pld.PLDAccountant()
  acc.compose(event)
  return float(acc.get_epsilon(d))
