"""The norm kernel: every norm in jaxclip is computed here.

Design:

* Magnitudes are accumulated in float32 whatever the leaf dtype (float64 for
  float64 leaves), so bf16 and fp16 gradients give the same norm as their
  float32 copies and fp16 squares never overflow.
* The common case is one pass over the gradients. Only when the accumulated
  power sum is not finite, or too small to be represented accurately, is the
  norm computed again with every value divided by the largest magnitude.
* Many small leaves are concatenated into a few buckets before being reduced,
  which keeps compile time low for trees with thousands of leaves; large leaves
  and leaves known to be sharded are reduced in place, so they are never
  copied or gathered across devices.
* Only floating and complex leaves contribute. Integer and boolean leaves (and
  `None` or `optax.MaskedNode` subtrees) are not gradients and are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxclip import _validate

__all__ = ["global_norm", "unitwise_norm"]

# Leaves with at most this many elements may be concatenated into a bucket.
_SMALL_LEAF_SIZE = 1 << 14
# Buckets are made only when at least this many small leaves exist: below it,
# reducing every leaf in place compiles fast and copies nothing.
_MIN_LEAVES_TO_BUCKET = 32
# At most this many leaves go into one bucket (long concatenations compile
# slower than several shorter ones).
_LEAVES_PER_BUCKET = 256

Ord = int | float | str


def is_inexact(x: object) -> bool:
  """Whether `x` is a floating or complex array (a leaf that gets clipped)."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def accumulation_dtype(dtype: jnp.dtype) -> jnp.dtype:
  """The real dtype norms of `dtype` values are accumulated in."""
  return jnp.promote_types(jnp.finfo(dtype).dtype, jnp.float32)


def _magnitude(x: jax.Array, acc: jnp.dtype) -> jax.Array:
  if jnp.iscomplexobj(x):
    return jnp.abs(x).astype(acc)
  return x.astype(acc)


def _powered(v: jax.Array, p: float) -> jax.Array:
  """|v|**p elementwise, with a finite gradient at zero."""
  if p == 2:
    return v * v
  a = jnp.abs(v)
  if p in (1, math.inf):
    return a
  if p < 1:  # d/da a**p is infinite at 0: keep the gradient finite there.
    pos = a > 0
    return jnp.where(pos, jnp.where(pos, a, 1) ** p, 0)
  return a**p


def _reduce(t: jax.Array, p: float, axis: int | tuple[int, ...] | None):
  # Magnitudes are >= 0, so 0 is the identity of their max (empty leaves).
  return jnp.max(t, axis=axis, initial=0) if p == math.inf else jnp.sum(t, axis=axis)


def root(s: jax.Array, p: float) -> jax.Array:
  """s ** (1/p) for a power sum s >= 0, with a finite gradient at s == 0."""
  if p in (1, math.inf):
    return s
  pos = s > 0
  safe = jnp.where(pos, s, 1)
  r = jnp.sqrt(safe) if p == 2 else safe ** (1 / p)
  return jnp.where(pos, r, s)  # 0 stays 0 and NaN stays NaN.


def _is_sharded(x: object) -> bool:
  """Whether `x` is known to be split across devices at trace time."""
  sharding = getattr(x, "sharding", None)
  if sharding is not None and not isinstance(x, jax.core.Tracer):
    return not sharding.is_fully_replicated
  try:
    spec = jax.typeof(x).sharding.spec
  except (AttributeError, TypeError):
    return False
  return any(s is not None for s in spec)


def _bucketable(x: jax.Array) -> bool:
  return 0 < x.size <= _SMALL_LEAF_SIZE and not jnp.iscomplexobj(x) and not _is_sharded(x)


class Buckets:
  """A tree's floating leaves arranged for reduction.

  Large, complex and sharded leaves are kept as they are (flattened past the
  batch axes, which copies nothing) and reduced in place. When there are many
  small leaves, they are cast to the accumulation dtype and concatenated into
  a few buckets, so that the compiled program holds a few reductions rather
  than thousands.
  """

  def __init__(self, leaves: Sequence[jax.Array], batch_ndim: int = 0):
    self.leaves = [jnp.asarray(x) for x in leaves]
    self.batch_ndim = batch_ndim
    self.acc = jnp.result_type(jnp.float32, *(accumulation_dtype(x.dtype) for x in self.leaves))
    small = [i for i, x in enumerate(self.leaves) if _bucketable(x)]
    if len(small) < _MIN_LEAVES_TO_BUCKET:
      small = []
    in_place = sorted(set(range(len(self.leaves))) - set(small))
    self.groups = [[i] for i in in_place] + [
      small[k : k + _LEAVES_PER_BUCKET] for k in range(0, len(small), _LEAVES_PER_BUCKET)
    ]
    self.rows = [self._row(g) for g in self.groups]

  def _flat(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[: self.batch_ndim] + (-1,))

  def _row(self, group: list[int]) -> jax.Array:
    if len(group) == 1:
      return self._flat(self.leaves[group[0]])
    return jnp.concatenate([self._flat(self.leaves[i]).astype(self.acc) for i in group], axis=-1)

  def _element_leaf_ids(self, group: list[int]) -> np.ndarray:
    """For a bucket, the index of the leaf each of its elements comes from."""
    per_leaf = [self.leaves[i][(0,) * self.batch_ndim].size for i in group]
    return np.repeat(np.asarray(group), per_leaf)

  def _magnitudes(self, row: jax.Array, down=None) -> jax.Array:
    m = _magnitude(row, self.acc)
    if down is None:
      return m
    return (m * down[0]) * down[1]

  def total(self, p: float, down=None) -> jax.Array:
    """sum |x|**p (max |x| for p = inf) over every leaf, per batch index."""
    if down is not None:
      down = tuple(jnp.expand_dims(d, -1) for d in down)
    partials = [_reduce(_powered(self._magnitudes(v, down), p), p, -1) for v in self.rows]
    return _reduce(jnp.stack(partials), p, axis=0)

  def per_leaf(self, p: float, down=None) -> jax.Array:
    """Vector of sum |x|**p (max |x| for p = inf), one entry per leaf."""
    pieces, order = [], []
    for v, group in zip(self.rows, self.groups):
      ids = group[0] if len(group) == 1 else self._element_leaf_ids(group)
      d = None if down is None else (down[0][ids], down[1][ids])
      t = _powered(self._magnitudes(v, d), p)
      if len(group) == 1:
        pieces.append(_reduce(t, p, axis=None)[None])
      else:
        segments = np.searchsorted(np.asarray(group), ids)
        reducer = jax.ops.segment_max if p == math.inf else jax.ops.segment_sum
        pieces.append(reducer(t, segments, num_segments=len(group), indices_are_sorted=True))
      order.extend(group)
    sums = jnp.concatenate(pieces)
    if order != sorted(order):
      sums = sums[np.argsort(np.asarray(order))]
    return sums

  def scale_leaves(self, scales: jax.Array) -> list[jax.Array]:
    """Each leaf times its entry of `scales`, cast back to the leaf's dtype."""
    out: list[jax.Array] = [None] * len(self.leaves)  # type: ignore[list-item]
    for v, group in zip(self.rows, self.groups):
      if len(group) == 1:
        x = self.leaves[group[0]]
        out[group[0]] = (x * scales[group[0]]).astype(x.dtype)
        continue
      w = v * scales[self._element_leaf_ids(group)]
      start = 0
      for i in group:
        x = self.leaves[i]
        out[i] = w[start : start + x.size].reshape(x.shape).astype(x.dtype)
        start += x.size
    return out


def _all_reduce(s: jax.Array, p: float, axis_name: str | None) -> jax.Array:
  if axis_name is None:
    return s
  return lax.pmax(s, axis_name) if p == math.inf else lax.psum(s, axis_name)


def _needs_rescaling(s: jax.Array) -> jax.Array:
  """Whether a power sum overflowed, is NaN or lost precision to underflow.

  For a vector of per-leaf sums, an entry that is subnormal counts, and so
  does an all-zero vector; an entry that underflowed to exactly 0 next to
  normal ones does not (telling it from a zero leaf would need a second pass
  at every step).
  """
  tiny = jnp.finfo(s.dtype).tiny
  subnormal = (s > 0) & (s < tiny)
  return jnp.any(~jnp.isfinite(s) | subnormal) | (jnp.sum(s) < tiny)


def _norm(power_sum, p: float) -> jax.Array:
  """The p-norm from `power_sum(q, down)`, rescaling only when needed.

  The common case is one pass. When the power sum is not finite, or too small
  to be accurate, every magnitude is multiplied by ``2**-e`` (``2**e`` being
  the largest magnitude, rounded to a power of two: exact, and applied as two
  factors so that neither is subnormal) and the result scaled back.
  """
  s = power_sum(p, None)
  if p == math.inf:  # A max never overflows.
    return s

  def rescaled():
    m = power_sum(math.inf, None)
    ok = jnp.isfinite(m) & (m > 0)
    _, e = jnp.frexp(jnp.where(ok, m, 1))
    h = (e // 2, e - e // 2)
    down = tuple(jnp.ldexp(jnp.ones_like(m), -k) for k in h)
    up = tuple(jnp.ldexp(jnp.ones_like(m), k) for k in h)
    r = root(power_sum(p, down), p) * up[0] * up[1]
    return jnp.where(ok, r, lax.stop_gradient(m))

  return lax.cond(_needs_rescaling(s), rescaled, lambda: root(s, p))


def norm_of_leaves(
  leaves: Sequence[jax.Array],
  p: float,
  *,
  batch_ndim: int = 0,
  axis_name: str | None = None,
) -> jax.Array:
  """The p-norm of `leaves` together (per leading batch index if batch_ndim)."""
  if not leaves:
    return jnp.zeros((), jnp.float32)
  buckets = Buckets(leaves, batch_ndim)
  return _norm(lambda q, down: _all_reduce(buckets.total(q, down), q, axis_name), p)


def per_leaf_norms(buckets: Buckets, p: float, *, axis_name: str | None = None) -> jax.Array:
  """Vector of the p-norm of each leaf of `buckets` separately."""
  if not buckets.leaves:
    return jnp.zeros((0,), jnp.float32)
  return _norm(lambda q, down: _all_reduce(buckets.per_leaf(q, down), q, axis_name), p)


def norm_along(x: jax.Array, p: float, axis: int | tuple[int, ...] | None) -> jax.Array:
  """The p-norm of `x` over `axis` (all axes if None), dims kept."""
  acc = accumulation_dtype(x.dtype)

  def power_sum(q, down):
    m = _magnitude(x, acc)
    if down is not None:
      m = (m * down[0]) * down[1]
    t = _powered(m, q)
    if q == math.inf:
      return jnp.max(t, axis=axis, keepdims=True, initial=0)
    return jnp.sum(t, axis=axis, keepdims=True)

  return _norm(power_sum, p)


def global_norm(tree: object, ord: Ord = 2, *, axis_name: str | None = None) -> jax.Array:
  """The p-norm of all leaves of a pytree taken together.

  Magnitudes are accumulated in float32 (float64 for float64 leaves) whatever
  the leaf dtype, and the result never overflows for finite inputs: when the
  accumulated sum is not finite, the norm is recomputed with every value
  divided by the largest magnitude. Complex leaves contribute ``|z|``. Integer
  and boolean leaves are skipped. An empty tree has norm 0, and the gradient of
  the norm is finite (zero) at zero.

  Args:
    tree: A pytree of arrays.
    ord: The order p of the norm: 2 (Euclidean), 1, ``math.inf`` (or
      ``'inf'``, the largest magnitude), or any p > 0.
    axis_name: Inside `jax.shard_map` or `jax.pmap`, the name of the mapped
      axis over which the gradients are split; the partial sums of every
      device are combined so that each device gets the norm of the whole tree.
      Leave it as None under plain `jax.jit`, sharded arrays included.

  Returns:
    A float32 scalar (float64 if the tree holds float64 leaves).

  Raises:
    ValueError: If `ord` is not > 0.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> jaxclip.global_norm({"w": jnp.array([3.0, 4.0]), "b": jnp.zeros(2)})
    Array(5., dtype=float32)
    >>> jaxclip.global_norm([jnp.array([1.0, -2.0])], ord=1)
    Array(3., dtype=float32)
    >>> big = jnp.full((4,), 1e20)  # the squares overflow float32
    >>> jaxclip.global_norm(big)
    Array(2.e+20, dtype=float32)
  """
  p = _validate.check_ord(ord)
  leaves = [x for x in jax.tree.leaves(tree) if is_inexact(x)]
  return norm_of_leaves(leaves, p, axis_name=axis_name)


_UNITWISE_AXES = {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}


def unitwise_axes(x: jax.Array, axis: int | tuple[int, ...] | None) -> int | tuple[int, ...] | None:
  """Reduction axes of a unit-wise norm (`None`: over the whole array)."""
  if axis is not None:
    return axis
  if jnp.squeeze(x).ndim <= 1:
    return None
  if x.ndim not in _UNITWISE_AXES:
    raise ValueError(
      f"unitwise_norm infers its axes for arrays of rank 1 to 5; got shape"
      f" {x.shape}. Pass `axis=` to name the axes each unit spans."
    )
  return _UNITWISE_AXES[x.ndim]


def unitwise_norm(x: jax.typing.ArrayLike, axis: int | tuple[int, ...] | None = None) -> jax.Array:
  """The Euclidean norm of each unit of `x`, broadcast back to `x`'s shape.

  A unit is the slice of `x` spanned by `axis`. With `axis=None` the axes
  follow common layer layouts: vectors and scalars are one unit, rank 2 and 3
  (dense ``(in, out)`` and multi-head kernels) reduce axis 0, rank 4 (conv
  ``HWIO``) axes ``(0, 1, 2)`` and rank 5 (conv3d) axes ``(0, 1, 2, 3)``.
  Unlike `optax.unitwise_norm`, the norm is accumulated in float32, never
  overflows and has a finite gradient at zero.

  Args:
    x: An array.
    axis: Axis or axes spanned by one unit, or None to infer them from the rank.

  Returns:
    An array of `x`'s shape, in the accumulation dtype (float32 for bf16,
    fp16 and float32 inputs), holding the norm of the unit of each entry.

  Raises:
    ValueError: If `axis` is None and `x` has rank above 5.

  Examples:
    >>> import jax.numpy as jnp
    >>> import jaxclip
    >>> jaxclip.unitwise_norm(jnp.array([[3.0, 0.0], [4.0, 1.0]]))
    Array([[5., 1.],
           [5., 1.]], dtype=float32)
  """
  x = jnp.asarray(x)
  norms = norm_along(x, 2.0, unitwise_axes(x, axis))
  return jnp.broadcast_to(norms, x.shape)
