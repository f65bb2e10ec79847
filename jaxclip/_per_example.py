"""Per-example clipping for differentially private SGD (DP-SGD)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxclip import _base, _norms, _validate


def clip_examples(
  leaves: list[jax.Array], l2_norm_clip: jax.typing.ArrayLike, norms: jax.Array | None = None
) -> tuple[list[jax.Array], jax.Array]:
  """Per leaf the sum of the clipped examples, and the number clipped.

  `norms` (per example; NaN drops the example) default to the examples'
  norms over `leaves`.
  """
  if norms is None:
    norms = example_norms(leaves)
  scale, clipped = _base.example_scale(norms, jnp.asarray(l2_norm_clip, norms.dtype))
  return _base.weighted_sums(scale, leaves), jnp.sum(clipped, dtype=jnp.int32)


def example_norms(leaves: list[jax.Array]) -> jax.Array:
  """The L2 norm of each example's gradient over `leaves` (batch on axis 0)."""
  return _norms.tree_norm(_base.as_floating(leaves), 2.0, batch_ndim=1)


def per_example_global_norm_clip(
  grads: Any, l2_norm_clip: jax.typing.ArrayLike
) -> tuple[Any, jax.Array]:
  """Clips each example's gradient to a global L2 norm, then sums them.

  The clipping step of DP-SGD, as `optax.per_example_global_norm_clip`:
  example ``i``, whose gradient (over all leaves) has norm ``n_i``, is scaled
  by ``min(1, l2_norm_clip / n_i)``, and the scaled gradients are summed over
  the batch. Norms are accumulated in float32 and never overflow; a zero
  gradient stays zero. An example whose gradient holds an inf or NaN
  contributes zero and is counted as clipped: every example's contribution is
  bounded by `l2_norm_clip`, the guarantee differential privacy rests on.

  Args:
    grads: Pytree of per-example gradients, each with the batch on axis 0.
    l2_norm_clip: Largest allowed L2 norm of one example's gradient (>= 0).

  Returns:
    ``(clipped_sum, num_clipped)``: the sum over the batch of the clipped
    gradients (a pytree shaped like one example's gradient) and the number of
    examples that were scaled down (non-finite ones included).

  Raises:
    ValueError: If a leaf has no batch axis, batch sizes differ, `grads` is
      empty, or a concrete `l2_norm_clip` is negative or NaN.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> grads = [jnp.array([[0.0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
    >>> jaxclip.per_example_global_norm_clip(grads, 1.25)
    ([Array([1.75, 1.75, 1.75], dtype=float32)], Array(3, dtype=int32))

  References:
    Abadi et al., [Deep Learning with Differential
    Privacy](https://arxiv.org/abs/1607.00133), 2016.
  """
  _validate.check_threshold(l2_norm_clip, "l2_norm_clip")
  leaves = _base.batched_leaves(grads, "per_example_global_norm_clip")
  sums, num_clipped = clip_examples(leaves, l2_norm_clip)
  return jax.tree.unflatten(jax.tree.structure(grads), sums), num_clipped


def per_example_layer_norm_clip(
  grads: Any, global_l2_norm_clip: jax.typing.ArrayLike, uniform: bool = True
) -> tuple[Any, Any]:
  """Clips each example's gradient layer by layer, then sums them.

  As `optax.per_example_layer_norm_clip`: with ``K`` layers (leaves) and
  ``C = global_l2_norm_clip``, each layer is clipped per example to
  ``C / sqrt(K)`` when `uniform`, otherwise to ``C * sqrt(D_k / D)`` where
  ``D_k`` is the layer's size and ``D`` the model's. Either way the clipped
  gradient of an example has global norm at most ``C``. An example whose
  gradient holds an inf or NaN in any layer contributes zero to every layer
  and is counted as clipped in each.

  Args:
    grads: Pytree of per-example gradients, each with the batch on axis 0.
    global_l2_norm_clip: Overall L2 bound ``C`` (>= 0).
    uniform: Split ``C`` equally between layers (True) or by layer size.

  Returns:
    ``(clipped_sum, num_clipped)``: two pytrees shaped like `grads`, holding
    per layer the sum over the batch of the clipped gradients and the number
    of examples whose gradient for that layer was scaled down.

  Raises:
    ValueError: If a leaf has no batch axis, batch sizes differ, `grads` is
      empty, or a concrete `global_l2_norm_clip` is negative or NaN.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> grads = [jnp.array([[0.0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]])]
    >>> jaxclip.per_example_layer_norm_clip(grads, 1.25)
    ([Array([1.75, 1.75, 1.75], dtype=float32)], [Array(3, dtype=int32)])

  References:
    McMahan et al., [Learning Differentially Private Recurrent Language
    Models](https://arxiv.org/abs/1710.06963), 2018.
  """
  _validate.check_threshold(global_l2_norm_clip, "global_l2_norm_clip")
  leaves = _base.batched_leaves(grads, "per_example_layer_norm_clip")
  sizes = [math.prod(x.shape[1:]) for x in leaves]  # not x[0]: the batch may be empty or split
  total = sum(sizes)
  norms = [example_norms([g]) for g in leaves]
  # An example that is not finite in one layer is dropped from all of them.
  finite = jnp.all(jnp.stack([jnp.isfinite(n) for n in norms]), axis=0)
  results = []
  for g, n, size in zip(leaves, norms, sizes):
    share = 1 / len(leaves) if uniform else size / max(total, 1)
    clip_k = jnp.asarray(global_l2_norm_clip, n.dtype) * share**0.5
    sums, num = clip_examples([g], clip_k, jnp.where(finite, n, jnp.nan))
    results.append((sums[0], num))
  treedef = jax.tree.structure(grads)
  return (
    jax.tree.unflatten(treedef, [s for s, _ in results]),
    jax.tree.unflatten(treedef, [n for _, n in results]),
  )
