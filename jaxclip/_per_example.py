"""Per-example clipping for differentially private SGD (DP-SGD)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxclip import _base, _norms, _validate


def _check_batched(grads: Any, fn: str) -> list[jax.Array]:
  leaves = jax.tree.leaves(grads)
  if not leaves:
    raise ValueError(
      f"`{fn}` got no gradients: pass a pytree of per-example gradients, each"
      " with the batch on axis 0."
    )
  shapes = [jnp.shape(x) for x in leaves]
  if any(len(s) == 0 or s[0] != shapes[0][0] for s in shapes):
    raise ValueError(
      f"`{fn}` needs every gradient to have the batch on axis 0 with one batch"
      f" size; got shapes {shapes}. Compute per-example gradients with"
      " `jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)`."
    )
  return [jnp.asarray(x) for x in leaves]


def _weighted_sum(multipliers: jax.Array, g: jax.Array) -> jax.Array:
  """sum_i multipliers[i] * g[i], accumulated in float32 (complex64 for
  complex gradients); floating and complex dtypes are kept."""
  if not _norms.is_inexact(g):  # integer gradients sum as numbers, as in optax
    return jnp.tensordot(multipliers, g.astype(multipliers.dtype), axes=1)
  acc = jnp.result_type(g.dtype, _norms.accumulation_dtype(g.dtype))
  total = jnp.tensordot(multipliers.astype(acc), g.astype(acc), axes=1)
  return total.astype(g.dtype)


def example_norms(leaves: list[jax.Array]) -> jax.Array:
  """The L2 norm of each example's gradient over all leaves (batch on axis 0).

  Integer leaves count as numbers here, as in optax's per-example functions.
  """
  floats = [x if _norms.is_inexact(x) else x.astype(jnp.float32) for x in leaves]
  return _norms.norm_of_leaves(floats, 2.0, batch_ndim=1)


def _clip_examples(
  leaves: list[jax.Array], l2_norm_clip: jax.typing.ArrayLike
) -> tuple[list[jax.Array], jax.Array]:
  norms = example_norms(leaves)
  scale, clipped = _base.clip_scale(norms, jnp.asarray(l2_norm_clip, norms.dtype))
  return [_weighted_sum(scale, g) for g in leaves], jnp.sum(clipped, dtype=jnp.int32)


def per_example_global_norm_clip(
  grads: Any, l2_norm_clip: jax.typing.ArrayLike
) -> tuple[Any, jax.Array]:
  """Clips each example's gradient to a global L2 norm, then sums them.

  The clipping step of DP-SGD, as `optax.per_example_global_norm_clip`:
  example ``i``, whose gradient (over all leaves) has norm ``n_i``, is scaled
  by ``min(1, l2_norm_clip / n_i)``, and the scaled gradients are summed over
  the batch. Norms are accumulated in float32 and never overflow; a zero
  gradient stays zero; an example with a non-finite norm is not scaled, so the
  inf or NaN shows in the sum.

  Args:
    grads: Pytree of per-example gradients, each with the batch on axis 0.
    l2_norm_clip: Largest allowed L2 norm of one example's gradient (>= 0).

  Returns:
    ``(clipped_sum, num_clipped)``: the sum over the batch of the clipped
    gradients (a pytree shaped like one example's gradient) and the number of
    examples that were scaled down.

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
  leaves = _check_batched(grads, "per_example_global_norm_clip")
  sums, num_clipped = _clip_examples(leaves, l2_norm_clip)
  return jax.tree.unflatten(jax.tree.structure(grads), sums), num_clipped


def per_example_layer_norm_clip(
  grads: Any, global_l2_norm_clip: jax.typing.ArrayLike, uniform: bool = True
) -> tuple[Any, Any]:
  """Clips each example's gradient layer by layer, then sums them.

  As `optax.per_example_layer_norm_clip`: with ``K`` layers (leaves) and
  ``C = global_l2_norm_clip``, each layer is clipped per example to
  ``C / sqrt(K)`` when `uniform`, otherwise to ``C * sqrt(D_k / D)`` where
  ``D_k`` is the layer's size and ``D`` the model's. Either way the clipped
  gradient of an example has global norm at most ``C``.

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
  leaves = _check_batched(grads, "per_example_layer_norm_clip")
  total = sum(x[0].size for x in leaves)
  results = []
  for g in leaves:
    share = 1 / len(leaves) if uniform else g[0].size / max(total, 1)
    clip_k = jnp.asarray(global_l2_norm_clip, jnp.float32) * share**0.5
    sums, n = _clip_examples([g], clip_k)
    results.append((sums[0], n))
  treedef = jax.tree.structure(grads)
  return (
    jax.tree.unflatten(treedef, [s for s, _ in results]),
    jax.tree.unflatten(treedef, [n for _, n in results]),
  )
