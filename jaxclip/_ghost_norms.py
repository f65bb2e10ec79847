"""Per-example gradient norms of dense, lookup and conv uses, from factors.

The gradient one example gives a parameter through one use is a sum over
*positions* t (tokens, pixels) of outer products: ``sum_t a_t (x) b_t``, per
index h of the contraction's batch axes. For a dense use ``a_t`` is the
input row and ``b_t`` the output cotangent; for an embedding lookup ``a_t``
is the one-hot row id; for a convolution ``a_t`` is the input patch. Its
squared norm is then, with no per-example gradient formed,

    ||sum_t a_t (x) b_t||^2 = sum_{t,s} <a_t, a_s> <b_t, b_s>,

which costs ``T^2`` per example against ``K_a * K_b`` for forming the
gradient: each parameter takes the cheaper ("mixed ghost norm", Bu et al.,
2022). A parameter used several times needs the norm of the sum over its
uses, cross terms included: ``sum_{t,s} <a_t, a'_s> <b_t, b'_s>`` when both
uses factor the parameter's axes the same way (tied embeddings: the lookup's
one-hot rows pair with the output head's cotangents).

A `Geometry` describes a use statically (shapes only); its `factors` turns
the use's input values and output cotangent, for one example, into
``(a, b)``: arrays ``[H, T, K]``, or an `Index` for one-hot factors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxclip import _norms
from jaxclip._ghost_trace import Program, Use, explicitly_sharded

_HIGHEST = lax.Precision.HIGHEST
Axes = tuple[int, ...]


class Index(NamedTuple):
  """One-hot factors: position t is the one-hot vector of ``ids[t]``, or zero
  where not ``valid[t]``."""

  ids: jax.Array
  valid: jax.Array


Factor = jax.Array | Index


class Geometry(NamedTuple):
  """How a use's per-example gradient factors (see the module docstring).

  Attributes:
    sets: The parameter axes (view axes when the view is not a permutation of
      the parameter's axes) of the first and second factors.
    hset: The parameter axes of the contraction's batch axes.
    size: ``(H, T, K_a, K_b)``.
    factors: ``(inputs, cotangent) -> (a, b)`` for one example, `inputs`
      mapping operand positions to values.
  """

  sets: tuple[Axes, Axes]
  hset: Axes
  size: tuple[int, int, int, int]
  factors: Callable[[dict[int, Any], jax.Array], tuple[Factor, Factor]]


def geometry(prog: Program, use: Use) -> Geometry | None:
  """The geometry of a dense, lookup or conv use, or None for a form not supported."""
  op = prog.ops[use.op]
  shapes = [prog.shape(r) for r in op.ins]
  perm = use.view.perm or tuple(range(len(shapes[use.pos])))
  if use.kind == "dense":
    return _dense(op.params, use.pos, shapes, perm)
  if use.kind == "lookup" and op.prim.name == "gather":
    return _gather(op.params, shapes, op.out_avals[0].shape, perm)
  if use.kind == "lookup":
    return _dynamic_slice(op.params["slice_sizes"], shapes[0], perm)
  if use.kind == "conv":
    return _conv(op.params, shapes, op.out_avals[0].shape, perm)
  return None


def _sorted_by(keys: Sequence[int], items: Sequence[int]) -> list[int]:
  return [items[i] for i in np.argsort(keys, kind="stable")]


def _dense(params: dict, pos: int, shapes: list, perm: Axes) -> Geometry:
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  wc, wb, xc, xb = (rc, rb, lc, lb) if pos == 1 else (lc, lb, rc, rb)
  wshape, xshape = shapes[pos], shapes[1 - pos]
  wf = [d for d in range(len(wshape)) if d not in wc and d not in wb]
  xf = [d for d in range(len(xshape)) if d not in xc and d not in xb]
  nb = len(lb)
  gx = list(range(nb, nb + len(xf)))
  gw = list(range(nb + len(xf), nb + len(xf) + len(wf)))
  if pos == 0:  # the parameter is the left operand: its free axes come first
    gw, gx = list(range(nb, nb + len(wf))), list(range(nb + len(wf), nb + len(wf) + len(xf)))
  xc_s = _sorted_by([perm[a] for a in wc], list(xc))
  xb_s = _sorted_by([perm[a] for a in wb], list(xb))
  gb_s = _sorted_by([perm[a] for a in wb], list(range(nb)))
  gw_s = _sorted_by([perm[a] for a in wf], gw)
  size = tuple(int(np.prod([xshape[d] for d in ds])) for ds in (xb, xf, xc)) + (
    int(np.prod([wshape[d] for d in wf])),
  )
  h, t, ka, kb = size

  def factors(inputs: dict[int, Any], g: jax.Array) -> tuple[Factor, Factor]:
    x = jnp.transpose(inputs[1 - pos], xb_s + xf + xc_s).reshape(h, t, ka)
    return x, jnp.transpose(g, gb_s + gx + gw_s).reshape(h, t, kb)

  sets = (tuple(sorted(perm[a] for a in wc)), tuple(sorted(perm[a] for a in wf)))
  return Geometry(sets, tuple(sorted(perm[a] for a in wb)), size, factors)


def _rows(shape: Sequence[int], slice_sizes: Sequence[int]) -> tuple[list, list] | None:
  """Axes looked up one index at a time, and axes taken whole; None if a
  slice is neither."""
  looked = [a for a in range(len(shape)) if slice_sizes[a] != shape[a]]
  if any(slice_sizes[a] != 1 for a in looked):
    return None
  return looked, [a for a in range(len(shape)) if slice_sizes[a] == shape[a]]


def _linear_index(starts: dict[int, jax.Array], shape, looked, perm) -> jax.Array:
  lin = 0
  for a in _sorted_by([perm[a] for a in looked], looked):
    lin = lin * shape[a] + starts.get(a, 0)
  return jnp.asarray(lin, jnp.int32)


def _gather(params: dict, shapes: list, out_shape, perm: Axes) -> Geometry | None:
  dn, sizes, shape = params["dimension_numbers"], params["slice_sizes"], shapes[0]
  axes = _rows(shape, sizes)
  if axes is None or dn.operand_batching_dims:
    return None
  looked, whole = axes
  batch_out = [d for d in range(len(out_shape)) if d not in dn.offset_dims]
  kept = [a for a in range(len(shape)) if a not in dn.collapsed_slice_dims]
  t = int(np.prod([out_shape[d] for d in batch_out]))
  kb = int(np.prod([shape[a] for a in whole]))
  # Out-of-bounds rows get no gradient where the pullback's scatter drops
  # them: with FILL_OR_DROP, and with PROMISE_IN_BOUNDS (`E[ids]`), whose
  # gather clamps but whose scatter discards (as JAX documents for XLA).
  drop = params["mode"] in (
    lax.GatherScatterMode.FILL_OR_DROP,
    lax.GatherScatterMode.PROMISE_IN_BOUNDS,
  )
  present = [a for a in kept if a in whole]  # a whole axis of size 1 may be collapsed
  order = [present.index(a) + 1 for a in _sorted_by([perm[a] for a in present], present)]

  def factors(inputs: dict[int, Any], g: jax.Array) -> tuple[Factor, Factor]:
    idx, starts = inputs[1], {}
    valid = jnp.ones(idx.shape[:-1], bool)
    for j, a in enumerate(dn.start_index_map):
      s, hi = idx[..., j], shape[a] - sizes[a]
      if drop:  # out-of-bounds rows get no gradient
        valid &= (s >= 0) & (s <= hi)
      starts[a] = jnp.clip(s, 0, hi)
    ids = _linear_index(starts, shape, looked, perm).reshape(-1)
    rows = jnp.transpose(g, batch_out + list(dn.offset_dims))
    rows = rows.reshape(t, *(shape[a] for a in present))
    rows = jnp.transpose(rows, [0, *order]).reshape(1, t, kb)
    return Index(ids * jnp.ones((t,), jnp.int32), valid.reshape(t)), rows

  sets = (tuple(sorted(perm[a] for a in looked)), tuple(sorted(perm[a] for a in whole)))
  return Geometry(sets, (), (1, t, int(np.prod([shape[a] for a in looked])), kb), factors)


def _dynamic_slice(sizes: Sequence[int], shape: Sequence[int], perm: Axes) -> Geometry | None:
  axes = _rows(shape, sizes)
  if axes is None:
    return None
  looked, whole = axes
  kb = int(np.prod([shape[a] for a in whole]))
  order = _sorted_by([perm[a] for a in whole], whole)

  def factors(inputs: dict[int, Any], g: jax.Array) -> tuple[Factor, Factor]:
    starts = {a: jnp.clip(inputs[1 + a], 0, shape[a] - sizes[a]) for a in looked}
    ids = _linear_index(starts, shape, looked, perm).reshape(1)
    return Index(ids, jnp.ones((1,), bool)), jnp.transpose(g, order + looked).reshape(1, 1, kb)

  sets = (tuple(sorted(perm[a] for a in looked)), tuple(sorted(perm[a] for a in whole)))
  return Geometry(sets, (), (1, 1, int(np.prod([shape[a] for a in looked])), kb), factors)


def _conv(params: dict, shapes: list, out_shape, perm: Axes) -> Geometry | None:
  if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
    return None
  lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
  window = [shapes[1][d] for d in rhs_spec[2:]]
  t = int(np.prod([out_shape[d] for d in (out_spec[0], *out_spec[2:])]))
  ka = shapes[0][lhs_spec[1]] * int(np.prod(window))
  kb = shapes[1][rhs_spec[0]]

  def factors(inputs: dict[int, Any], g: jax.Array) -> tuple[Factor, Factor]:
    patches = lax.conv_general_dilated_patches(
      jnp.transpose(inputs[0], lhs_spec),
      window,
      params["window_strides"],
      params["padding"],
      params["lhs_dilation"],
      params["rhs_dilation"],
      precision=_HIGHEST,
    )  # [N, C * prod(window), *spatial]: C major, as the kernel's (I, *spatial)
    a = jnp.moveaxis(patches, 1, -1).reshape(1, t, ka)
    return a, jnp.moveaxis(jnp.transpose(g, out_spec), 1, -1).reshape(1, t, kb)

  sets = (tuple(sorted(perm[a] for a in rhs_spec[1:])), (perm[rhs_spec[0]],))
  return Geometry(sets, (), (1, t, ka, kb), factors)


def _gram(a: Factor, b: Factor) -> jax.Array:
  """``[H, T_a, T_b]`` inner products between the positions of two factors."""
  if isinstance(a, Index) and isinstance(b, Index):
    same = (a.ids[:, None] == b.ids[None, :]) & a.valid[:, None] & b.valid[None, :]
    return same[None].astype(jnp.float32)
  if isinstance(a, Index):
    return jnp.swapaxes(_gram(b, a), 1, 2)
  a = a.astype(jnp.float32)
  if isinstance(b, Index):
    picked = jnp.take(a, b.ids, axis=2, mode="clip")  # [H, T_a, T_b]
    return jnp.where(b.valid[None, None, :], picked, 0)
  b = b.astype(jnp.float32)
  return _einsum("htk,hsk->hts", a, b)


def _materialized(a: Factor, b: Factor, ka: int, kb: int) -> jax.Array:
  """The gradient ``[H, K_a, K_b]`` the factors describe."""
  if isinstance(a, Index):
    rows = jnp.where(a.valid[:, None], b[0].astype(jnp.float32), 0)
    return jnp.zeros((ka, kb), jnp.float32).at[a.ids].add(rows, mode="clip")[None]
  if isinstance(b, Index):
    return jnp.swapaxes(_materialized(b, a, kb, ka), 1, 2)
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return _einsum("htk,htl->hkl", a, b)


def _einsum(subscripts: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """`jnp.einsum` at full precision. With factors sharded over explicit mesh
  axes, JAX cannot always infer the output's sharding: the result, a small
  per-example matrix, is then replicated. Factors split on their features (a
  tensor-parallel layer) are contracted locally and the partial products
  summed over the devices; factors split on their positions (a
  sequence-sharded batch) are gathered, as a Gram matrix of all positions
  needs them."""
  sharded = any(explicitly_sharded(jax.typeof(x)) for x in (a, b))
  kw = {"out_sharding": jax.sharding.PartitionSpec()} if sharded else {}
  return jnp.einsum(subscripts, a, b, precision=_HIGHEST, **kw)


def use_ghost(sizes: Sequence[tuple[int, int, int, int]]) -> bool:
  """Whether the uses of one parameter (their ``(H, T, K_a, K_b)``) are
  cheaper by ghost norms (``H * T_u * T_w`` per pair) than by forming the
  gradient (``H * K_a * K_b``)."""
  h, _, ka, kb = sizes[0]
  positions = sum(s[1] for s in sizes)
  return h * positions * positions <= h * ka * kb


def norm(
  factors: list[tuple[Factor, Factor]], sizes: list, ghost: bool, *, balance: bool = False
) -> jax.Array:
  """The norm of one example's gradient of a parameter, the sum over its
  uses of the factors given (oriented alike), in float32; with `balance`,
  ghost norms from balanced factors (exact for any factors, at the price of
  scaled copies of them; see `in_range`). The root is taken before the
  scaling is undone, so a norm in the float32 range is never lost to its
  square's underflow or overflow."""
  if not ghost:
    _, _, ka, kb = sizes[0]
    return _norms.tree_norm([sum(_materialized(a, b, ka, kb) for a, b in factors)], 2.0)
  exponent = jnp.zeros((), jnp.int32)
  if balance:
    factors, exponent = _balanced(factors)
  out = jnp.zeros((), jnp.float32)
  for i, (a, b) in enumerate(factors):
    for j in range(i, len(factors)):
      c, d = factors[j]
      term = jnp.sum(_gram(a, c) * _gram(b, d))
      out = out + (term if i == j else 2 * term)
  return _times_power_of_two(jnp.sqrt(jnp.maximum(out, 0)), exponent)


def _times_power_of_two(x: jax.Array, e: jax.Array) -> jax.Array:
  """``x * 2**e`` for an integer `e` beyond one float32 power's range (the
  product of two balanced sides), in two exact steps."""
  half = e // 2
  x = x * _power_of_two(jnp.clip(half, -126, 127))
  return x * _power_of_two(jnp.clip(e - half, -126, 127))


# The Gram products of factors in range stay below 2**_GRAM_MAX and, for the
# largest entries, above 2**-_GRAM_MIN (float32 normals reach 2**-126).
_GRAM_MAX, _GRAM_MIN = 120, 100


def in_range(factors: list[tuple[Factor, Factor]]) -> jax.Array:
  """Whether the ghost norm of `factors` taken as they are is exact: every
  product of their Gram matrices below the float32 range, and none of the
  largest flushed to zero. Each side (its magnitudes below ``2**e``, rows of
  at most K entries) has Gram entries below ``2**(2e + log2 K)``; the
  ``T**2`` terms of a norm sum products of two such entries. Factors out of
  range (a padding activation of 1e21, activations of 1e-19 with cotangents
  of 1e19) need `_balanced`."""
  positions = sum(_num_positions(a) for a, _ in factors)
  bound = []
  for side in (0, 1):
    dense = [pair[side] for pair in factors if not isinstance(pair[side], Index)]
    if not dense:  # one-hot rows: entries 0 or 1, one 1 per position
      bound.append((jnp.int32(1), 0.0))
      continue
    peak = jnp.max(jnp.stack([jnp.max(jnp.abs(x.astype(jnp.float32))) for x in dense]))
    bound.append((_exponent_of(peak) + 1, math.log2(max(x.shape[-1] for x in dense))))
  (ea, ka), (eb, kb) = bound
  gram_a, gram_b = 2 * ea + ka, 2 * eb + kb
  terms = 2 * math.log2(max(positions, 1))
  fits = (gram_a <= _GRAM_MAX) & (gram_b <= _GRAM_MAX) & (gram_a + gram_b + terms <= _GRAM_MAX)
  return fits & (2 * ea >= -_GRAM_MIN) & (2 * eb >= -_GRAM_MIN) & (2 * (ea + eb) >= -_GRAM_MIN)


def _num_positions(x: Factor) -> int:
  return x.ids.shape[0] if isinstance(x, Index) else x.shape[1]


def _balanced(
  factors: list[tuple[Factor, Factor]],
) -> tuple[list[tuple[Factor, Factor]], jax.Array]:
  """The factors balanced position by position (`_positionwise`), then the
  dense ones of each side scaled by one power of two that brings their
  largest magnitude near 1, and the sum ``e`` of the two side exponents: the
  squared norm of the scaled factors times ``2**(2e)`` is the squared norm.
  The Gram products of activations near 1e-19 and cotangents near 1e19 (a
  moderate gradient) would otherwise underflow to 0 or overflow; the scaling
  is exact. A side with a one-hot factor (0 or 1, paired with the dense ones
  in the cross terms of tied uses) keeps its scale."""
  factors = [_positionwise(a, b) for a, b in factors]
  out = [list(pair) for pair in factors]
  exponent = jnp.zeros((), jnp.int32)
  for side in (0, 1):
    if any(isinstance(pair[side], Index) for pair in factors):
      continue
    peak = jnp.max(jnp.stack([jnp.max(jnp.abs(pair[side])) for pair in factors]))
    e = jnp.clip(_exponent_of(peak), -126, 126)
    scale = _power_of_two(-e)
    for i, pair in enumerate(factors):
      out[i][side] = pair[side] * scale
    exponent = exponent + e
  return [(a, b) for a, b in out], exponent


def _positionwise(a: Factor, b: Factor) -> tuple[Factor, Factor]:
  """Dense factors balanced position by position: ``a_t`` and ``b_t`` scaled
  by ``2**-k_t`` and ``2**k_t`` so that their largest magnitudes meet
  halfway, which leaves every term ``<a_t, a_s> <b_t, b_s>`` as it is. A
  position whose other factor is zero adds nothing and is zeroed (unless not
  finite: the gradient is then NaN too), and so is a dense row paired with a
  dropped lookup row. Without this, one position far larger than the others
  (a padding value of 1e21 whose cotangent is 0) sets the side's scale and
  the others' products underflow."""
  if isinstance(a, Index) and isinstance(b, Index):
    return a, b
  if isinstance(a, Index) or isinstance(b, Index):
    # A lookup's dropped rows (out-of-range ids) add nothing to the gradient:
    # zeroed, they cannot set the scale of the side.
    ids, dense = (a, b) if isinstance(a, Index) else (b, a)
    dense = jnp.where(ids.valid[None, :, None], dense.astype(jnp.float32), 0)
    return (ids, dense) if isinstance(a, Index) else (dense, ids)
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  peak_a = jnp.max(jnp.abs(a), axis=-1, keepdims=True)
  peak_b = jnp.max(jnp.abs(b), axis=-1, keepdims=True)
  k = jnp.clip((_exponent_of(peak_a) - _exponent_of(peak_b)) >> 1, -126, 126)
  a = jnp.where((peak_b == 0) & jnp.isfinite(peak_a), 0, a * _power_of_two(-k))
  b = jnp.where((peak_a == 0) & jnp.isfinite(peak_b), 0, b * _power_of_two(k))
  return a, b


def _exponent_of(x: jax.Array) -> jax.Array:
  """The binary exponent of a float32 ``x >= 0`` (read from its bits, as
  `jnp.frexp` drops shardings), 0 for 0, inf or NaN."""
  e = (lax.bitcast_convert_type(x, jnp.int32) >> 23) - 127
  return jnp.where((x > 0) & jnp.isfinite(x), e, 0)


def _power_of_two(e: jax.Array) -> jax.Array:
  """``2.0**e`` in float32 for an integer ``-126 <= e <= 127``, exactly."""
  return lax.bitcast_convert_type((e + 127) << 23, jnp.float32)
