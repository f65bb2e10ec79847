"""The norm kernel: every norm in jaxclip is computed here.

Design:

* Magnitudes are accumulated in float32 whatever the leaf dtype (float64 for
  float64 leaves), so bf16 and fp16 gradients give the same norm as their
  float32 copies and fp16 squares never overflow.
* The common case is one pass over the gradients. Only when an accumulated
  power sum is not finite, or too small to be represented accurately, are the
  sums taken again with the magnitudes scaled by powers of two (a `_Ladder`:
  for 1 <= p <= 2, one factor below 1 and one above), each norm taking the
  scaling its sum suits. However many norms a call computes (one per leaf,
  one per unit of every leaf), that decision is one `lax.cond`, and for
  1 <= p <= 2 its branch is one reduction per group, each norm scaled by its
  own factor.
* Leaves are arranged in groups (`Layout`) so that the compiled program holds
  a few reductions rather than one per leaf, which keeps compile time low for
  trees with thousands of leaves: small leaves of one shape (and sharding) are
  stacked on a new leading axis, and with `flatten`, small leaves of shapes no
  other leaf has are flattened, zero-padded to a power of two and stacked.
  Large leaves and leaves known to be sharded are reduced in place, over their
  own axes: never reshaped, so never copied or gathered across devices.
  Leaves of 32 to 256 entries are stacked four at a time and the stacks
  joined, since XLA:CPU compiles one long concatenation of them slowly.
* The squares of a leaf reduced in place are taken behind an
  `optimization_barrier` (no copy): an optimizer given the same gradients
  unscaled (Adam around which a guard sits) squares them too, and XLA would
  merge the two, which XLA:CPU writes out as a full-size temporary.
* Only floating and complex leaves contribute. Integer and boolean array
  leaves (and `None` or `optax.MaskedNode` subtrees) are not gradients and are
  skipped. Python numbers, and any other leaf that is not an array (a
  generator, a dict view), are a TypeError naming the leaf: skipping them
  would silently report a norm of 0.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxclip import _validate

__all__ = ["global_norm", "unitwise_norm"]

# Leaves with at most this many elements (per example) may be grouped.
_SMALL_LEAF_SIZE = 1 << 14
# Groups are made only when at least this many small leaves exist: below it,
# reducing every leaf in place compiles fast and copies nothing.
_MIN_LEAVES_TO_GROUP = 32
# At most this many leaves go into one group (long concatenations compile
# slower than several shorter ones).
_LEAVES_PER_GROUP = 256
# Leaves with this many elements (inclusive range) are stacked `_STACK_CHUNK`
# at a time (`_stack`).
_CHUNKED_SIZES = (32, 256)
_STACK_CHUNK = 4

Axes = tuple[int, ...]
# Maps a leaf's shape to the axes one of its norms spans.
AxesOf = Callable[[tuple[int, ...]], Axes]


def is_inexact(x: object) -> bool:
  """Whether `x` is a floating or complex array (a leaf that gets clipped)."""
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jnp.inexact)


def inexact_leaves(tree: Any) -> list[jax.Array]:
  """The floating and complex leaves of `tree`: the ones that get clipped.

  Raises:
    TypeError: If a leaf is not an array (a Python number, a generator),
      naming its path.
  """
  check_arrays(tree)
  return [x for x in jax.tree.leaves(tree) if is_inexact(x)]


def _is_array(x: object) -> bool:
  return getattr(x, "dtype", None) is not None and hasattr(x, "shape")


def check_arrays(tree: Any) -> None:
  """Raises a TypeError naming the first leaf of `tree` that is not an array
  (a Python number, a generator): skipped, it would report a norm of 0."""
  if all(_is_array(x) for x in jax.tree.leaves(tree)):
    return
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if _is_array(x):
      continue
    where = jax.tree_util.keystr(path) or "the root"
    if isinstance(x, numbers.Number):
      raise TypeError(
        f"The leaf at {where} is the Python {type(x).__name__} {x!r}, not an"
        " array: jaxclip clips arrays and would otherwise skip it. Convert the"
        " tree first, e.g. `jax.tree.map(jnp.asarray, tree)`."
      )
    raise TypeError(
      f"The leaf at {where} is a {type(x).__name__} object, not an array:"
      " jaxclip clips arrays and would otherwise skip it. Pass a pytree of"
      " arrays (a generator, `map` or dict view is not one: make it a list"
      " first, e.g. `list(grads.values())`)."
    )


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


def keeping_nan(reduce: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
  """`reduce` (a max or min) that gives NaN wherever its input holds a NaN,
  also when the reduced axis is split over devices: a max all-reduce may drop
  a NaN held by another device (seen on XLA:CPU), a sum never does."""

  def reduced(x: jax.Array, axis: Axes | None = None, keepdims: bool = False, **kw) -> jax.Array:
    out = reduce(x, axis=axis, keepdims=keepdims, **kw)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
      return out
    nan = jnp.sum(jnp.where(jnp.isnan(x), x, 0), axis=axis, keepdims=keepdims)
    return out + nan.astype(out.dtype)

  return reduced


@functools.cache
def one_device() -> bool:
  """Whether this runtime has a single device (and process): no reduction can
  then span devices. Asked at trace time, once the backends are up."""
  if jax.process_count() != 1 or jax.device_count() != 1:
    return False
  try:  # host devices too: a mesh may be made of them on a GPU machine
    return len(jax.devices("cpu")) == 1
  except RuntimeError:  # no CPU backend (JAX_PLATFORMS without cpu)
    return True


def _max_magnitude(v: jax.Array, axis: Axes | None, keepdims: bool = False) -> jax.Array:
  """The max of ``|v|``, NaN wherever `v` holds a NaN, also across devices
  (see `keeping_nan`).

  On one device the max itself keeps a NaN. Where a reduction may span
  devices the NaN is carried by ``sum(v - v)``: 0 for finite entries, NaN
  for a NaN (and for an inf, where the max is inf already and is kept: an
  inf held by one device and a NaN by another give inf, where one device
  gives NaN; both pass the updates through unscaled). It is a plain sum,
  which XLA:CPU reduces about ten times faster than a sum of the NaNs
  selected (which `keeping_nan` takes), and it holds no constant and shares
  no `|v|` with the max (either was written out as a full-size array). It
  is still a second pass over `v` (about 13% of a `clip` + AdamW step on
  one CPU device), so it is left out there.
  """
  out = jnp.max(jnp.abs(v), axis=axis, keepdims=keepdims, initial=0)
  if not jnp.issubdtype(v.dtype, jnp.inexact) or one_device():
    return out
  flag = jnp.sum(v - v, axis=axis, keepdims=keepdims)
  return jnp.where(jnp.isinf(out), out, out + flag)


def _reduce(t: jax.Array, p: float, axis: Axes | None, keepdims: bool = False) -> jax.Array:
  # Magnitudes are >= 0, so 0 is the identity of their max (empty leaves).
  if p == math.inf:
    return _max_magnitude(t, axis, keepdims)
  return jnp.sum(t, axis=axis, keepdims=keepdims)


def root(s: jax.Array, p: float) -> jax.Array:
  """s ** (1/p) for a power sum s >= 0, with a finite gradient at s == 0."""
  if p in (1, math.inf):
    return s
  pos = s > 0
  safe = jnp.where(pos, s, 1)
  r = jnp.sqrt(safe) if p == 2 else safe ** (1 / p)
  return jnp.where(pos, r, s)  # 0 stays 0 and NaN stays NaN.


def _sharding_key(x: object) -> object:
  """A hashable description of how `x` is split across devices, or None.

  None when `x` is known not to be split, or nothing is known (inside a jit
  over Auto mesh axes, where shardings are decided after tracing).
  """
  sharding = getattr(x, "sharding", None)
  if sharding is not None and not isinstance(x, jax.core.Tracer):
    return None if sharding.is_fully_replicated else sharding
  try:
    spec = jax.typeof(x).sharding.spec
  except (AttributeError, TypeError):
    return None
  return tuple(spec) if any(s is not None for s in spec) else None


class _Group(NamedTuple):
  """Leaves reduced together: `members` stacked on axis 0 of `data` (when
  `stacked`; flattened past their `lead` axes and zero-padded first when
  `padded`), or one leaf in place (`data` is the leaf). Every member has
  `lead` leading axes that are never reduced (batch or layer axes)."""

  members: tuple[int, ...]
  data: jax.Array
  stacked: bool
  padded: bool
  lead: int


class Layout:
  """A list of floating leaves arranged in groups for reduction.

  Every power sum is returned per group, as an array whose leading axis runs
  over the group's members (length 1 for a leaf in place) followed by the
  member's dimensions, those reduced kept as size 1. `vector` and `per_leaf`
  turn such per-group values back into per-leaf ones.

  Args:
    leaves: The floating or complex leaves.
    lead: Number of leading axes never reduced (a batch axis of per-example
      gradients, the layer axes of a stacked leaf): one int for every leaf,
      or one per leaf.
    flatten: Whether leaves of unique shapes may be flattened into padded
      groups; only for reductions over whole leaves.
    like: Another layout whose grouping to copy (the leaves must have its
      leaves' shapes), e.g. parameters grouped like their gradients.
  """

  def __init__(
    self,
    leaves: Sequence[jax.Array],
    lead: int | Sequence[int] = 0,
    *,
    flatten: bool = True,
    like: Layout | None = None,
  ):
    self.leaves = [jnp.asarray(x) for x in leaves]
    self.lead = [lead] * len(self.leaves) if isinstance(lead, int) else list(lead)
    self.acc = jnp.result_type(jnp.float32, *(accumulation_dtype(x.dtype) for x in self.leaves))
    if like is not None:
      plan = [(g.members, g.padded) for g in like.groups]
    else:
      plan = self._plan(flatten)
    self.groups = [self._group(members, padded) for members, padded in plan]
    # Each leaf has one entry per index of its lead axes; `_entries` lists, in
    # group order, each entry's position in leaf order.
    sizes = [math.prod(x.shape[:k]) for x, k in zip(self.leaves, self.lead)]
    starts = np.cumsum([0, *sizes])
    order = [np.arange(starts[i], starts[i + 1]) for g in self.groups for i in g.members]
    self._entries = np.concatenate(order) if order else np.zeros((0,), np.int64)
    self._inverse = np.argsort(self._entries)
    self._in_order = bool(np.all(self._entries == np.arange(len(self._entries))))

  def _plan(self, flatten: bool) -> list[tuple[tuple[int, ...], bool]]:
    """Groups as (members, padded): stacked by shape, padded, or in place."""
    small = [
      i
      for i, (x, k) in enumerate(zip(self.leaves, self.lead))
      if 0 < math.prod(x.shape[k:]) <= _SMALL_LEAF_SIZE
    ]
    if len(small) < _MIN_LEAVES_TO_GROUP:
      return [((i,), False) for i in range(len(self.leaves))]
    by_key: dict[Any, list[int]] = {}
    for i in small:
      x = self.leaves[i]
      by_key.setdefault((x.shape, x.dtype, _sharding_key(x), self.lead[i]), []).append(i)
    stacked, padded, grouped = [], {}, set()
    for (shape, _, sharding, k), members in by_key.items():
      if len(members) > 1:
        stacked.append(members)
      elif flatten and sharding is None:
        size = math.prod(shape[k:])
        key = (shape[:k], max(size - 1, 0).bit_length())
        padded.setdefault(key, []).extend(members)
      else:
        continue
      grouped.update(members)
    plan = [((i,), False) for i in range(len(self.leaves)) if i not in grouped]
    for members, pad in [(m, False) for m in stacked] + [(m, True) for m in padded.values()]:
      for k in range(0, len(members), _LEAVES_PER_GROUP):
        plan.append((tuple(members[k : k + _LEAVES_PER_GROUP]), pad))
    return plan

  def _group(self, members: tuple[int, ...], padded: bool) -> _Group:
    xs = [self.leaves[i] for i in members]
    k = self.lead[members[0]]
    if len(xs) == 1 and not padded:
      return _Group(members, xs[0], False, False, k)
    if padded:
      flat = [_magnitude(x, self.acc).reshape(x.shape[:k] + (-1,)) for x in xs]
      width = 1 << max(max(f.shape[-1] for f in flat) - 1, 0).bit_length()
      xs = [jnp.pad(f, [(0, 0)] * k + [(0, width - f.shape[-1])]) for f in flat]
    elif len({x.dtype for x in xs}) > 1:
      xs = [_magnitude(x, self.acc) for x in xs]
    return _Group(members, _stack(xs), True, padded, k)

  def _axes(self, g: _Group, axes_of: AxesOf | None) -> Axes:
    """The axes of `g.data` one power sum spans."""
    shape = g.data.shape[1:] if g.stacked else g.data.shape
    rest = shape[g.lead :]
    axes = range(len(rest)) if axes_of is None else axes_of(rest)
    return tuple(a + g.lead + (1 if g.stacked else 0) for a in axes)

  def sums(
    self,
    p: float,
    scalings: Sequence[_Scaling] | None = None,
    axes_of: AxesOf | None = None,
  ) -> list[jax.Array]:
    """Per group, sum |x|**p (max |x| for p = inf) over each member's axes.

    Args:
      p: The power (inf for the largest magnitude).
      scalings: Per group, applied to the magnitudes first (`_rescaled`):
        arrays that broadcast to the group's sums.
      axes_of: Maps the shape of a member past its lead axes to the axes
        (counted from the first axis past them) summed over; None sums over
        every axis past the lead axes.
    """
    data = [g.data for g in self.groups]
    if scalings is not None:
      scalings, data = own_copies(list(scalings), data)
    return self._sums(data, p, scalings, axes_of)

  def joined_sums(self, p: float, scaling: _Scaling | None = None) -> jax.Array:
    """`sums` over whole members, as one vector with one entry per member and
    lead index, in group order (`join`).

    Args:
      p: The power (inf for the largest magnitude).
      scaling: Applied to the magnitudes first (`_rescaled`): vectors with
        one value per entry, in group order. Each group reads its part at an
        offset the compiler cannot see, so that the reductions of groups of
        one shape stay one compiled kernel.
    """
    data = [g.data for g in self.groups]
    if scaling is None:
      return self.join(self._sums(data, p, None, None))
    sizes = [self._num_entries(g) for g in self.groups]
    offsets = [np.uint32(o) for o in np.cumsum([0, *sizes[:-1]])]
    (scaling, offsets), data = own_copies((scaling, offsets), data)
    parts = [
      scaling.map(functools.partial(self._part, g, o, n))
      for g, o, n in zip(self.groups, offsets, sizes)
    ]
    return self.join(self._sums(data, p, parts, None))

  def entry_sizes(self) -> np.ndarray:
    """The number of elements of each entry (a member, or one lead index of
    it), at least 1, in group order (`join`)."""
    sizes = [
      np.full(math.prod(x.shape[: g.lead]), max(math.prod(x.shape[g.lead :]), 1))
      for g in self.groups
      for x in (self.leaves[i] for i in g.members)
    ]
    return np.concatenate(sizes) if sizes else np.zeros((0,), np.int64)

  def _num_entries(self, g: _Group) -> int:
    return len(g.members) * math.prod(self.leaves[g.members[0]].shape[: g.lead])

  def _part(self, g: _Group, offset: jax.Array, size: int, vector: jax.Array) -> jax.Array:
    """The entries of `g` in a group-order `vector`, shaped like its sums."""
    ndim = g.data.ndim + (0 if g.stacked else 1)
    lead = self.leaves[g.members[0]].shape[: g.lead]
    part = lax.dynamic_slice_in_dim(vector, offset, size)
    return part.reshape((len(g.members), *lead) + (1,) * (ndim - 1 - g.lead))

  def _sums(
    self,
    data: list[jax.Array],
    p: float,
    scalings: Sequence[_Scaling] | None,
    axes_of: AxesOf | None,
  ) -> list[jax.Array]:
    out = []
    for i, g in enumerate(self.groups):
      x = data[i]
      if p == 2 and scalings is None and not g.stacked:
        # Behind a barrier, the squares of a leaf are not the optimizer's
        # (Adam's ``g * g``) to XLA's common-subexpression elimination:
        # shared, XLA:CPU writes them out as a full-size temporary for both
        # (a guard around Adam then cost 2.2-2.4x a bare step, not 1.1x).
        x = lax.optimization_barrier(x)
      m = _magnitude(x, self.acc)
      if scalings is not None:
        m = scalings[i](m) if g.stacked else scalings[i].map(lambda a: a[0])(m)
      axes = self._axes(g, axes_of)
      if p == math.inf:
        s = _max_magnitude(m, axes, keepdims=True)
      else:
        s = jnp.sum(_powered(m, p), axis=axes, keepdims=True)
      out.append(s if g.stacked else s[None])
    return out

  def reduce_entries(self, reduce: Any, values: list[jax.Array]) -> list[jax.Array]:
    """Per group, `reduce` over every axis past the members' lead axes (never
    a reshape of a sharded leaf, which would need its sharding resolved:
    only values with one entry per member and lead index are reshaped)."""
    out = []
    for g, v in zip(self.groups, values):
      axes = tuple(range(1 + g.lead, v.ndim))
      whole = all(v.shape[a] == 1 for a in axes)  # one value per entry already
      out.append(v.reshape(v.shape[: 1 + g.lead]) if whole else reduce(v, axis=axes))
    return out

  def join(self, values: list[jax.Array]) -> jax.Array:
    """Per-group values of one entry per member and lead index (as from
    `reduce_entries`), as one vector in group order."""
    if not values:
      return jnp.zeros((0,), self.acc)
    return jnp.concatenate([_replicated(v).reshape(-1) for v in values])

  def in_leaf_order(self, joined: jax.Array) -> jax.Array:
    """A vector in group order (`join`) in leaf order, each leaf's lead
    indices in row-major order."""
    return joined if self._in_order else joined[self._inverse]

  def vector(self, values: list[jax.Array]) -> jax.Array:
    """`join`, in leaf order."""
    return self.in_leaf_order(self.join(values))

  def groupwise(self, vector: jax.Array | np.ndarray) -> list[jax.Array]:
    """A vector with one entry per leaf and lead index as per-group values
    (dims of size 1 past the lead axes); NumPy constants stay constants."""
    out, start = [], 0
    for g in self.groups:
      shape = g.data.shape if g.stacked else (1, *g.data.shape)
      lead = shape[: 1 + g.lead]
      n = math.prod(lead)
      ids = self._entries[start : start + n]
      start += n
      if n > 1 and not isinstance(vector, np.ndarray) and np.all(np.diff(ids) == 1):
        v = lax.slice_in_dim(vector, int(ids[0]), int(ids[0]) + n)  # not a gather
      else:
        v = vector[ids]
      out.append(v.reshape(lead + (1,) * (len(shape) - len(lead))))
    return out

  def broadcast(self, vector: jax.Array) -> list[jax.Array]:
    """A vector in leaf order (one entry per leaf and lead index) as one array
    per leaf, broadcastable to the leaf.

    Each leaf reads its entries at an offset the compiler cannot see (it
    passes through an optimization barrier): the code that scales each leaf
    is then the same for every leaf of a shape and is compiled once, where a
    constant offset would make one distinct kernel per leaf. Offsets are
    unsigned, so no wrapping of negative ones is traced.
    """
    sizes = [math.prod(x.shape[:k]) for x, k in zip(self.leaves, self.lead)]
    starts = [np.uint32(o) for o in np.cumsum([0, *sizes[:-1]])]
    vector, starts = lax.optimization_barrier((vector, starts))
    return [
      lax.dynamic_slice_in_dim(vector, o, n).reshape(x.shape[:k] + (1,) * (x.ndim - k))
      for x, k, o, n in zip(self.leaves, self.lead, starts, sizes)
    ]

  def per_leaf(self, values: list[jax.Array]) -> list[jax.Array]:
    """Per-group values as one array per leaf, broadcastable to the leaf.

    A member's entry is read at an index the compiler cannot see (it passes
    through an optimization barrier): the code that scales each leaf is then
    the same for every leaf of a shape and is compiled once, where a constant
    offset would make one distinct kernel per leaf.
    """
    out: list[Any] = [None] * len(self.leaves)
    width = max((len(g.members) for g in self.groups if g.stacked), default=0)
    values, index = lax.optimization_barrier((values, [np.uint32(j) for j in range(width)]))
    for g, v in zip(self.groups, values):
      for j, i in enumerate(g.members):
        out[i] = lax.dynamic_index_in_dim(v, index[j], keepdims=False) if g.stacked else v[0]
        if g.padded:  # one value per lead index, shaped for the unflattened leaf
          x = self.leaves[i]
          out[i] = out[i].reshape(x.shape[: g.lead] + (1,) * (x.ndim - g.lead))
    return out


def own_copies(values: list[Any], groups: list[jax.Array]) -> tuple[list[Any], list[jax.Array]]:
  """`values` (one entry per group: scalars, or arrays of the group's
  sums' shape) and `groups`, through one optimization barrier.

  XLA:CPU writes a scalar that reductions over several leaves of one shape
  share out as a full-size array per shape, and keeps it as a temporary of
  every step. Scalars that come out of the barrier cannot be told apart, so
  each group reads its own. The groups go through too, or XLA folds a
  barrier of constants away; they are read anyway, so this copies nothing.
  """
  return lax.optimization_barrier((values, groups))


def _stack(xs: list[jax.Array]) -> jax.Array:
  """`jnp.stack(xs)`; leaves of 32 to 256 entries are stacked a few at a time.

  XLA:CPU compiles one long concatenation of such leaves very slowly (200
  leaves of shape (8, 8): about 0.35 s for the one kernel, more than the whole
  of `optax.clip_by_block_rms`). Stacks of four compile as one shared kernel,
  and joining them (behind an optimization barrier, which keeps XLA from
  merging the two back into one) is cheap to compile.
  """
  if not _CHUNKED_SIZES[0] <= xs[0].size <= _CHUNKED_SIZES[1] or len(xs) <= 2 * _STACK_CHUNK:
    return jnp.stack(xs)
  parts = [jnp.stack(xs[i : i + _STACK_CHUNK]) for i in range(0, len(xs), _STACK_CHUNK)]
  return jnp.concatenate(lax.optimization_barrier(parts))


def _replicated(v: jax.Array) -> jax.Array:
  """`v`, replicated if it is split over Explicit mesh axes (the per-layer
  records of a leaf sharded on its layer axis): one vector of records cannot
  hold entries of different shardings. It moves one value per layer."""
  try:
    sharding = jax.typeof(v).sharding
  except (AttributeError, TypeError):
    return v
  if not any(s is not None for s in getattr(sharding, "spec", ())):
    return v
  return jax.sharding.reshard(
    v, jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  )


def _all_reduce(s: jax.Array, p: float, axis_name: str | None) -> jax.Array:
  """Partial power sums (maxima for p = inf) combined over `axis_name`; a NaN
  held by any device reaches every device (a max all-reduce may drop it on
  XLA:CPU, a sum never does)."""
  if axis_name is None:
    return s
  if p != math.inf:
    return lax.psum(s, axis_name)
  return lax.pmax(s, axis_name) + lax.psum(jnp.where(jnp.isnan(s), s, 0), axis_name)


def _needs_rescaling(sums: list[jax.Array], p: float, terms: int | None) -> jax.Array:
  """Whether a power sum overflowed, is NaN or lost precision to underflow.

  A sum that is not 0 but small enough that its underflowed terms may
  matter counts (a higher rung keeps them), and so does an all-zero set; a
  sum that underflowed to exactly 0 next to larger ones does not (telling
  it from a zero leaf would need a second pass at every step). Each of at
  most `terms` terms (None: any number) loses less than the smallest normal
  float, so a sum above ``terms * tiny * 2**bits`` is accurate as it is;
  below it, and below the ladder's `accurate` bound, it is taken again. One
  reduction per array: a small sum is counted as inf, so that a single sum
  tells.
  """
  flagged = []
  for s in sums:
    ladder = _ladder(jnp.dtype(s.dtype), float(p))
    info = jnp.finfo(s.dtype)
    small = float(info.tiny)
    if ladder.above:
      small = ladder.accurate
      if terms is not None:
        small = min(
          small, max(float(info.tiny), terms * float(info.tiny) * 2.0 ** (info.nmant + 1))
        )
    flagged.append(jnp.sum(jnp.where((s > 0) & (s < small), jnp.inf, s)))
  total = flagged[0] if len(flagged) == 1 else jnp.sum(jnp.stack(flagged))
  return ~jnp.isfinite(total) | (total < jnp.finfo(total.dtype).tiny)


# Rescaled power sums are exact to the float's precision for up to
# 2**_LOG2_TERMS terms (`_ladder`).
_LOG2_TERMS = 40


class _Ladder(NamedTuple):
  """Power-of-two scalings of the magnitudes for sums that overflow or lose
  precision (`_ladder`): rungs ``-below .. above``, rung k multiplying by
  ``2**(k * step)``.

  A rung's sum *fits* below ``2**(emax - 2)`` and is *accurate* from
  ``2**(emin + _LOG2_TERMS + bits)`` up (the terms lost to underflow are then
  below its precision). Each norm comes from rung 0 when it fits, else from
  the highest lower rung that fits; from a higher rung when rung 0 is not
  accurate.
  """

  step: int
  below: int
  above: int
  fits: float
  accurate: float

  def rung(self, k: int, dtype: jnp.dtype, p: float, capped: bool) -> tuple[float, float]:
    """Rung `k`: the cap of the magnitudes (see `_climbed`) and the factor
    applied |k| times (``2**step`` or ``2**-step``, products past the float
    range taken in steps)."""
    e = (jnp.finfo(dtype).maxexp - 1) / p - k * self.step  # the cap's exponent
    cap = 2.0**e if capped and e < jnp.finfo(dtype).maxexp else math.inf
    return cap, 2.0 ** (self.step if k > 0 else -self.step)


@functools.cache
def _ladder(dtype: jnp.dtype, p: float) -> _Ladder:
  """The ladder with the fewest rungs such that: a rung below one that does
  not fit is accurate; the lowest rung fits every sum whose norm is finite;
  the highest lifts the smallest normal float's power above `tiny`; and,
  where possible (1 <= p <= 2), the chain of factors in the gradient stays
  within the float range on every rung taken."""
  info = jnp.finfo(dtype)
  emax, emin, bits = info.maxexp, info.minexp, info.nmant + 1
  fits, accurate = emax - 2, emin + _LOG2_TERMS + bits
  need_below, need_above = emax - fits / p, -emin * (1 - 1 / p)

  def rungs(step: int) -> tuple[int, int]:
    return max(math.ceil(need_below / step), 0), max(math.ceil(need_above / step), 0)

  def gradient_in_range(step: int) -> bool:
    below, above = rungs(step)
    slope = 1 / p - 1  # d root / d sum = sum**slope / p
    up = -above * step - math.log2(p) + slope * (accurate + step * p)
    down = below * step - math.log2(p) + slope * (fits - step * p)
    return up >= emin and down < emax - 1

  # A rung below one whose sum does not fit must be accurate.
  steps = [s for s in range(1, emax - 1) if s * p <= fits - accurate]
  safe = [s for s in steps if gradient_in_range(s)] if 1 <= p <= 2 else []
  step = min(safe or steps, key=lambda s: (sum(rungs(s)), -s))
  return _Ladder(step, *rungs(step), 2.0**fits, 2.0**accurate)


class _Scaling(NamedTuple):
  """A scaling of magnitudes by per-norm values (arrays that broadcast
  against the magnitudes): each capped at `cap` (if any), then multiplied by
  each of `factors` (powers of two, exact)."""

  cap: jax.Array | None
  factors: tuple[jax.Array, ...]

  def __call__(self, m: jax.Array) -> jax.Array:
    if self.cap is not None:  # magnitudes may be signed (real leaves)
      m = jnp.clip(m, -self.cap, self.cap)
    for factor in self.factors:
      m = m * factor
    return m

  def map(self, fn: Callable[[jax.Array], jax.Array]) -> _Scaling:
    cap = None if self.cap is None else fn(self.cap)
    return _Scaling(cap, tuple(fn(f) for f in self.factors))


# Power sums, given scalings of the magnitudes (one per sum) or None.
PowerSums = Callable[[float, Sequence[_Scaling] | None], list[jax.Array]]


def _rescaled(
  power_sums: PowerSums, sums: list[jax.Array], p: float, ladder: _Ladder
) -> list[jax.Array]:
  """The norms from `sums` (plain power sums, one of which overflowed or lost
  precision), each taken again with its magnitudes scaled to suit its sum.

  With at most one rung each way (1 <= p <= 2 in float32), a single pass: a
  norm whose sum does not fit takes the rung below 1, one whose sum is not
  accurate the rung above, and the others keep their plain sum (the pass
  scales them by 1). Each norm's scaling is exactly the one it uses, so its
  gradient is the plain one at every scale.
  """
  # Each sum on its own dtype's ladder (AGC's float32 gradients may come
  # with float64 parameters).
  ladders = [_ladder(jnp.dtype(s.dtype), float(p)) for s in sums]
  if any(lad.below > 1 or lad.above > 1 for lad in ladders):
    return _climbed(power_sums, sums, p, ladder)
  factors = [_factor(s, lad) for s, lad in zip(sums, ladders)]
  again = power_sums(p, [_Scaling(None, (f,)) for f in factors])
  # f is a power of 2, so the division is exact; a norm scaled by 1 keeps its
  # plain value (summed again, it could round differently).
  return [jnp.where(f == 1, root(s, p), root(a, p) / f) for s, a, f in zip(sums, again, factors)]


def _factor(s: jax.Array, ladder: _Ladder) -> jax.Array:
  """The power of two by which a one-pass rescaling multiplies the magnitudes
  whose power sum is `s`: down if `s` does not fit, up if it is not
  accurate, else 1."""
  down = 2.0**-ladder.step if ladder.below else 1.0
  up = 2.0**ladder.step if ladder.above else 1.0
  scaled = jnp.where(s < ladder.accurate, up, 1.0)
  return jnp.where(s < ladder.fits, scaled, down).astype(s.dtype)


def _climbed(
  power_sums: PowerSums, sums: list[jax.Array], p: float, ladder: _Ladder
) -> list[jax.Array]:
  """`_rescaled` for ladders of several rungs a side: the sums on every rung,
  each norm from rung 0 when it fits, else from the highest lower rung that
  fits; from a higher rung when rung 0 is not accurate. Magnitudes are capped
  so that no term exceeds ``2**(emax - 1)``: a sum holding a capped term does
  not fit, and the gradient stays finite where a rung is not taken. The
  lowest rung is not capped: finite inputs whose norm is finite cannot
  overflow it, so an inf or NaN there is the norm."""

  def on(k: int, capped: bool = True) -> tuple[list[jax.Array], Callable]:
    cap, factor = ladder.rung(k, sums[0].dtype, p, capped)

    def unscale(norm: jax.Array) -> jax.Array:
      for _ in range(abs(k)):
        norm = norm / factor  # exact: a power of 2
      return norm

    if k == 0:
      return sums, unscale
    scalings = [
      _Scaling(
        None if cap == math.inf else jnp.full_like(s, cap), (jnp.full_like(s, factor),) * abs(k)
      )
      for s in sums
    ]
    return power_sums(p, scalings), unscale

  chosen, unscale = on(-ladder.below, capped=False)
  out = [unscale(root(s, p)) for s in chosen]
  for k in range(1 - ladder.below, ladder.above + 1):
    again, unscale = on(k)
    take = [
      (s < ladder.fits) & (c < ladder.accurate) if k > 0 else s < ladder.fits
      for s, c in zip(again, chosen)
    ]
    out = [jnp.where(t, unscale(root(s, p)), o) for t, s, o in zip(take, again, out)]
    chosen = [jnp.where(t, s, c) for t, s, c in zip(take, again, chosen)]
  return out


def _norm(power_sums: PowerSums, p: float, terms: int | None = None) -> list[jax.Array]:
  """The p-norms from ``power_sums(q, scalings)``, rescaling only when needed.

  The common case is one pass. When a power sum is not finite, or too small
  to be accurate (given at most `terms` terms per sum; None: any number), the
  sums are taken again with the magnitudes scaled by powers of two
  (`_rescaled`), each norm on the rung of a `_Ladder` that its sum suits,
  and scaled back.
  """
  sums = power_sums(p, None)
  if p == math.inf or not sums:  # A max never overflows.
    return sums
  ladder = _ladder(jnp.dtype(sums[0].dtype), float(p))
  if ladder.below == ladder.above == 0:  # no sum can overflow or lose precision
    return [root(s, p) for s in sums]
  plain = lambda: [root(s, p) for s in sums]  # noqa: E731
  rescaled = lambda: _rescaled(power_sums, sums, p, ladder)  # noqa: E731
  return cond(_needs_rescaling(sums, p, terms), rescaled, plain)


def cond(pred: jax.Array, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
  """`lax.cond`, decided in Python when `pred` is a concrete value.

  Outside `jax.jit`, `lax.cond` traces and compiles its branches at every
  call (they are new closures each time: about 50 ms for a two-leaf tree),
  so an eager `update` would be a hundred times slower than optax's.
  """
  if isinstance(pred, jax.core.Tracer):
    return lax.cond(pred, true_fn, false_fn, *operands)
  return (true_fn if bool(pred) else false_fn)(*operands)


def tree_norm(
  leaves: Sequence[jax.Array],
  p: float,
  *,
  batch_ndim: int = 0,
  axis_name: str | None = None,
) -> jax.Array:
  """The p-norm of `leaves` together (per leading batch index if batch_ndim)."""
  if not leaves:
    return jnp.zeros((), jnp.float32)
  layout = Layout(leaves, batch_ndim)
  b = batch_ndim

  def power_sums(q, scalings):
    if scalings is not None:  # one per norm: shaped for each group's sums
      scalings = [scalings[0].map(functools.partial(_per_entry, g, b)) for g in layout.groups]
    parts = [_reduce(s, q, (0, *range(b + 1, s.ndim))) for s in layout.sums(q, scalings)]
    return [_all_reduce(_reduce(jnp.stack(parts), q, (0,)), q, axis_name)]

  return _norm(power_sums, p, _terms(layout.leaves, axis_name, batch_ndim))[0]


def _per_entry(g: _Group, lead: int, v: jax.Array) -> jax.Array:
  """`v` (one value per lead index) shaped like the power sums of `g`."""
  ndim = g.data.ndim + (0 if g.stacked else 1)
  return v.reshape((1, *v.shape) + (1,) * (ndim - 1 - lead))


def tree_sum(leaves: Sequence[jax.Array]) -> jax.Array:
  """The sum of all entries of non-negative `leaves`, in one grouped pass and
  with no rescaling: for values that cannot overflow, such as 0/1 flags."""
  if not leaves:
    return jnp.zeros((), jnp.float32)
  return sum(jnp.sum(s) for s in Layout(leaves).sums(1.0))


def group_norms(
  layout: Layout, p: float, axes_of: AxesOf | None = None, *, axis_name: str | None = None
) -> list[jax.Array]:
  """Per group of `layout`, the p-norm of each member (dims kept as 1), or
  with `axes_of`, of each unit of each member."""
  return paired_group_norms([layout], p, axes_of, axis_name=axis_name)[0]


def paired_group_norms(
  layouts: Sequence[Layout],
  p: float,
  axes_of: AxesOf | None = None,
  *,
  axis_name: str | None = None,
) -> list[list[jax.Array]]:
  """`group_norms` of several layouts with one rescaling decision for all
  (e.g. gradients and parameters: one `lax.cond` rather than two)."""
  starts = np.cumsum([0, *(len(layout.groups) for layout in layouts)])

  def power_sums(q, scalings):
    per_layout = [None if scalings is None else scalings[a:b] for a, b in zip(starts, starts[1:])]
    return [
      _all_reduce(s, q, axis_name)
      for layout, own in zip(layouts, per_layout)
      for s in layout.sums(q, own, axes_of)
    ]

  terms = [_terms(layout.leaves, axis_name) for layout in layouts]
  flat = _norm(power_sums, p, None if None in terms else max(terms, default=0))
  return [flat[a:b] for a, b in zip(starts[:-1], starts[1:])]


def joined_norms(
  layout: Layout, p: float, *, axis_name: str | None = None, mean: bool = False
) -> jax.Array:
  """The p-norm of each member of `layout` (per lead index), as one vector in
  group order (`Layout.join`): one rescaling decision and one set of scalar
  operations for all, however many groups there are.

  With `mean`, the power mean ``(sum |x|**p / size) ** (1/p)`` instead (the
  RMS for p = 2), rounded as its formula is: the mean is taken before the
  root, not the norm divided by ``size ** (1/p)`` after it.
  """

  if not layout.groups:
    return jnp.zeros((0,), layout.acc)
  sizes = layout.entry_sizes().astype(layout.acc) if mean else None

  def power_sums(q, scalings):
    scaling = None if scalings is None else scalings[0]
    sums = _all_reduce(layout.joined_sums(q, scaling), q, axis_name)
    return [sums if sizes is None else sums / sizes]

  # A mean's flushed terms weigh 1 / size each: as one term of a sum.
  return _norm(power_sums, p, 1 if mean else _terms(layout.leaves, axis_name))[0]


def _terms(leaves: Sequence[jax.Array], axis_name: str | None, batch_ndim: int = 0) -> int | None:
  """An upper bound of the number of terms in one power sum of `leaves`
  (per batch index), or None when the sums are combined across devices."""
  if axis_name is not None:
    return None
  return max(sum(math.prod(x.shape[batch_ndim:]) for x in leaves), 1)


def leaf_norms(layout: Layout, p: float, *, axis_name: str | None = None) -> jax.Array:
  """Vector of the p-norm of each leaf of `layout` separately."""
  return layout.in_leaf_order(joined_norms(layout, p, axis_name=axis_name))


def global_norm(
  tree: object, ord: _validate.Ord | None = 2, *, axis_name: str | None = None
) -> jax.Array:
  """The p-norm of all leaves of a pytree taken together.

  Magnitudes are accumulated in float32 (float64 for float64 leaves) whatever
  the leaf dtype, and the result never overflows for finite inputs: when the
  accumulated sum is not finite (or too small to be accurate), it is taken
  again with the magnitudes scaled by exact powers of two. Magnitudes below
  the smallest normal float count as zero, as XLA flushes them. Complex
  leaves contribute ``|z|``. Integer
  and boolean leaves are skipped. An empty tree has norm 0, and the gradient of
  the norm is finite (zero) at zero.

  Args:
    tree: A pytree of arrays.
    ord: The order p of the norm: 2 (Euclidean, also for None), 1,
      ``math.inf`` (or ``'inf'`` or ``'infinity'``, the largest magnitude),
      or any p > 0.
    axis_name: Inside `jax.shard_map` or `jax.pmap`, the name of the mapped
      axis over which the gradients are split; the partial sums of every
      device are combined so that each device gets the norm of the whole tree.
      Leave it as None under plain `jax.jit`, sharded arrays included.

  Returns:
    A float32 scalar (float64 if the tree holds float64 leaves).

  Raises:
    ValueError: If `ord` is not > 0.
    TypeError: If a leaf is a Python number rather than an array.

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
  return tree_norm(inexact_leaves(tree), p, axis_name=axis_name)


_UNITWISE_AXES = {2: (0,), 3: (0,), 4: (0, 1, 2), 5: (0, 1, 2, 3)}


def unitwise_axes(shape: tuple[int, ...], axis: int | Axes | None) -> Axes:
  """Reduction axes (non-negative) of a unit-wise norm of an array of `shape`."""
  ndim = len(shape)
  if axis is not None:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if any(not -ndim <= a < ndim for a in axes):
      raise ValueError(
        f"`axis={axis!r}` is out of range for an update of shape {shape};"
        " every leaf must have all the axes named (use `optax.masked` to clip"
        " leaves of different ranks separately)."
      )
    return tuple(sorted({a % ndim for a in axes}))
  if sum(d != 1 for d in shape) <= 1:
    return tuple(range(ndim))
  if ndim not in _UNITWISE_AXES:
    raise ValueError(
      f"unitwise_norm infers its axes for arrays of rank 1 to 5; got shape"
      f" {shape}. Pass `axis=` to name the axes each unit spans."
    )
  return _UNITWISE_AXES[ndim]


def norm_along(x: jax.Array, p: float, axis: int | Axes | None) -> jax.Array:
  """The p-norm of `x` over `axis` (all axes if None), dims kept."""
  x = jnp.asarray(x)
  axes = tuple(range(x.ndim)) if axis is None else unitwise_axes(x.shape, axis)
  return group_norms(Layout([x], flatten=False), p, lambda shape: axes)[0][0]


def unitwise_norm(x: jax.typing.ArrayLike, axis: int | Axes | None = None) -> jax.Array:
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
    fp16, float32, integer and boolean inputs), holding the norm of the unit
    of each entry.

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
  if not jnp.issubdtype(x.dtype, jnp.inexact):  # integers and booleans, as optax takes them
    x = x.astype(jnp.float32)
  axes = unitwise_axes(x.shape, axis)
  norms = group_norms(Layout([x], flatten=False), 2.0, lambda shape: axes)[0][0]
  return jnp.broadcast_to(norms, x.shape)
