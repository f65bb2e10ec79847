"""Tests of the norm kernel (`jaxclip._norms`)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip
from jaxclip import _norms

ORDS = [2, 1, math.inf, "inf", 0.5, 3]


def _np_norm(leaves, p):
  flat = np.concatenate([np.abs(np.asarray(x, np.float64)).ravel() for x in leaves])
  if p == math.inf:
    return flat.max(initial=0.0)
  return (flat**p).sum() ** (1 / p)


def _random_tree(key, n_small=0):
  k1, k2, k3 = jax.random.split(key, 3)
  tree = {
    "w": jax.random.normal(k1, (8, 5)),
    "b": [jax.random.normal(k2, (5,)), jax.random.normal(k3, ())],
  }
  for i in range(n_small):
    tree[f"s{i:03d}"] = jax.random.normal(jax.random.fold_in(key, i), (i % 5 + 1,))
  return tree


@pytest.mark.parametrize("ord", ORDS)
@pytest.mark.parametrize("n_small", [0, 100])  # 100 small leaves are bucketed
def test_matches_float64_reference(ord, n_small):
  tree = _random_tree(jax.random.key(0), n_small)
  p = math.inf if ord == "inf" else ord
  expected = _np_norm(jax.tree.leaves(tree), p)
  np.testing.assert_allclose(jaxclip.global_norm(tree, ord), expected, rtol=2e-6)
  np.testing.assert_allclose(
    jax.jit(jaxclip.global_norm, static_argnums=1)(tree, ord), expected, rtol=2e-6
  )


def test_bf16_accumulates_in_float32():
  tree = [jnp.ones((1000,), jnp.bfloat16) for _ in range(1000)]
  assert float(jaxclip.global_norm(tree)) == 1000.0
  assert jaxclip.global_norm(tree).dtype == jnp.float32


def test_fp16_squares_overflowing_fp16():
  x = jnp.full((10,), 60000.0, jnp.float16)  # 60000**2 overflows fp16
  np.testing.assert_allclose(jaxclip.global_norm(x), 60000.0 * math.sqrt(10), rtol=1e-6)


@pytest.mark.parametrize("value", [1e20, 1e30, 1e38])
@pytest.mark.parametrize("ord", [2, 3, 0.5])
def test_no_overflow_for_finite_float32(value, ord):
  x = jnp.full((4,), value, jnp.float32)
  expected = value * 4 ** (1 / ord)
  got = jax.jit(jaxclip.global_norm, static_argnums=1)(x, ord)
  if expected < float(jnp.finfo(jnp.float32).max):
    np.testing.assert_allclose(got, expected, rtol=1e-6)
  else:  # The true norm is not representable.
    assert got == jnp.inf


def test_tiny_values_keep_precision():
  x = jnp.full((4,), 1e-30, jnp.float32)  # squares underflow float32
  np.testing.assert_allclose(jaxclip.global_norm(x), 2e-30, rtol=1e-6)


def test_complex_leaves_use_modulus():
  assert float(jaxclip.global_norm(jnp.array([3 + 4j], jnp.complex64))) == 5.0


def test_empty_and_integer_trees_have_norm_zero():
  assert float(jaxclip.global_norm({})) == 0.0
  assert float(jaxclip.global_norm([jnp.arange(3), None])) == 0.0
  assert float(jaxclip.global_norm({"i": jnp.arange(3), "f": jnp.array([3.0, 4.0])})) == 5.0


@pytest.mark.parametrize("ord", ORDS)
def test_gradient_at_zero_is_finite(ord):
  grad = jax.grad(lambda x: jaxclip.global_norm(x, ord))(jnp.zeros(3))
  assert bool(jnp.all(jnp.isfinite(grad)))


def test_gradient_matches_analytic_away_from_zero():
  x = jnp.array([3.0, 4.0])
  np.testing.assert_allclose(jax.grad(jaxclip.global_norm)(x), x / 5.0, rtol=1e-6)


def test_non_finite_values():
  assert jaxclip.global_norm(jnp.array([1.0, jnp.inf])) == jnp.inf
  assert jnp.isnan(jaxclip.global_norm(jnp.array([1.0, jnp.nan])))
  assert jnp.isnan(jaxclip.global_norm([jnp.array([jnp.inf]), jnp.array([jnp.nan])]))
  assert jaxclip.global_norm(jnp.array([-jnp.inf, 1.0]), math.inf) == jnp.inf


def test_max_norm_keeps_nan_and_never_overflows():
  inf = math.inf
  assert jnp.isnan(jaxclip.global_norm(jnp.array([1.0, jnp.nan]), inf))
  assert jnp.isnan(jaxclip.global_norm(jnp.array([jnp.inf, jnp.nan]), inf))
  # The NaN-carrying sum of the largest floats must not overflow to inf.
  big = jnp.full((10_000,), jnp.finfo(jnp.float32).max)
  assert jaxclip.global_norm(big, inf) == jnp.finfo(jnp.float32).max
  assert jaxclip.global_norm([big, -big], inf) == jnp.finfo(jnp.float32).max


def test_max_norm_reads_each_leaf_once_on_one_device():
  """On one device the max keeps a NaN by itself: no second (NaN-carrying)
  pass over the leaf; the 8-device checks cover the pass that spans devices."""
  x = jnp.ones((64, 32))
  eqns = jax.make_jaxpr(lambda g: jaxclip.global_norm(g, math.inf))(x).jaxpr.eqns
  full = [
    e.primitive.name for e in eqns if any(getattr(v.aval, "size", 0) == x.size for v in e.invars)
  ]
  assert full.count("reduce_max") == 1
  assert "reduce_sum" not in full


@pytest.mark.parametrize("jit", [False, True])
def test_max_norm_of_signed_zero_and_complex_leaves(jit):
  # The largest magnitude is never -0.0, and the modulus for complex leaves.
  norm = jax.jit(jaxclip.global_norm, static_argnums=1) if jit else jaxclip.global_norm
  zero = norm(jnp.array([0.0, -0.0]), math.inf)
  assert float(zero) == 0.0 and not np.signbit(zero)
  assert float(norm([jnp.array([-3.0, 2.0]), jnp.array([1.0])], math.inf)) == 3.0
  assert float(norm(jnp.array([3 + 4j, -1j]), math.inf)) == 5.0
  per_unit = _norms.norm_along(jnp.array([[-3.0, 1.0], [2.0, -4.0]]), math.inf, 0)
  np.testing.assert_array_equal(per_unit, [[3.0, 4.0]])


def test_float64_accumulates_in_float64():
  with jax.enable_x64(True):
    x = jnp.array([1e200, 1e200], jnp.float64)
    got = jaxclip.global_norm(x)
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, 1e200 * math.sqrt(2), rtol=1e-12)


@pytest.mark.parametrize("ord", [1, 1.5, 2, 3, 8])
@pytest.mark.parametrize("scale", [1e-36, 1e-30, 1e-20, 1e-10, 1.0, 1e10, 1e20, 1e30, 1e37])
def test_norms_at_every_magnitude_match_float64(ord, scale):
  # Mixed magnitudes inside the leaf, at every scale of the float32 range.
  x = scale * np.array([1.0, -0.5, 3.0, 1e-3, 0.0, 2.5], np.float32)
  x[np.abs(x) < np.finfo(np.float32).tiny] = 0  # XLA flushes subnormals
  want = np.sum(np.abs(x.astype(np.float64)) ** ord) ** (1 / ord)
  got = jax.jit(jaxclip.global_norm, static_argnums=1)(jnp.asarray(x), ord)
  if want > np.finfo(np.float32).max:
    assert got == jnp.inf
  else:
    np.testing.assert_allclose(got, want, rtol=2e-6)


@pytest.mark.parametrize("scale", [3e-20, 5e-20, 1e-19, 3e-19])
def test_a_sum_whose_squares_partly_underflow_is_rescaled(scale):
  # Values near 1e-19: some squares are normal, many underflow, and the sum
  # is above the smallest normal float but below the rung's accurate bound.
  # Taken as it was, the norm lost 13% to 88%; the leaf's own norm (per
  # tensor, next to a normal leaf) as well.
  w = (scale * np.random.default_rng(0).standard_normal((64, 32))).astype(np.float32)
  want = np.sqrt(np.sum(w.astype(np.float64) ** 2))
  np.testing.assert_allclose(jax.jit(jaxclip.global_norm)(jnp.asarray(w)), want, rtol=1e-6)
  tx = jaxclip.clip_by_norm(1.0)
  tree = {"v": jnp.ones(512), "w": jnp.asarray(w)}
  _, state = jax.jit(tx.update)(tree, tx.init(tree))
  np.testing.assert_allclose(state.norm[1], want, rtol=1e-6)


@pytest.mark.parametrize("scale,again", [(1e-12, False), (1e-15, False), (1e-19, True)])
def test_small_but_accurate_sums_are_not_taken_again(monkeypatch, scale, again):
  # A sum of 2560 terms above 2560 * tiny * 2**24 cannot have lost a bit to
  # terms that underflowed: norms near 1e-12 * 45 or 1e-15 * 45 are accurate
  # in one pass, and a second pass at every step would cost a read of every
  # gradient. Near 1e-19 squares underflow, and the sum is taken again.
  calls = []
  rescaled = _norms._rescaled
  monkeypatch.setattr(_norms, "_rescaled", lambda *a: calls.append(1) or rescaled(*a))
  w = scale * np.random.default_rng(1).standard_normal((64, 32)).astype(np.float32)
  tree = {"v": jnp.ones(512), "w": jnp.asarray(w)}
  tx = jaxclip.clip_by_norm(1.0)
  _, state = tx.update(tree, tx.init(tree))  # eager: the branch is picked in Python
  assert bool(calls) == again
  np.testing.assert_allclose(state.norm[1], np.linalg.norm(w.astype(np.float64)), rtol=1e-6)


@pytest.mark.parametrize("ord", [1.5, 2])
@pytest.mark.parametrize("scale", [1e-30, 1e-20, 1.0, 1e20, 1e30])
def test_gradient_of_a_rescaled_norm(ord, scale):
  # d||x||_p / dx = sign(x) (|x| / ||x||)**(p - 1), the same at every scale.
  x = np.array([1.0, -0.5, 3.0, 0.25], np.float32)
  want = np.sign(x) * (np.abs(x) / np.sum(np.abs(x) ** ord) ** (1 / ord)) ** (ord - 1)
  got = jax.grad(jaxclip.global_norm)(jnp.asarray(scale * x), ord)
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-12, 1e-10, 1e-8, 1e30])
def test_gradient_of_a_norm_rescaled_for_another_leaf(scale):
  # The overflowing leaf sends every norm through the ladder; a small norm
  # then comes from the rung above 1, and its gradient must not underflow.
  x = np.array([1.0, -0.5, 3.0, 0.25], np.float32)
  want = x / np.linalg.norm(x)

  def total(leaves):
    return jnp.sum(_norms.leaf_norms(_norms.Layout(leaves), 2.0))

  got = jax.grad(total)([jnp.asarray(1e30 * x), jnp.asarray(scale * x)])
  np.testing.assert_allclose(got[0], want, rtol=1e-5)
  np.testing.assert_allclose(got[1], want, rtol=1e-5)


def test_each_norm_takes_its_own_rung():
  # One leaf overflows, one underflows, one is plain: one rescaling for all.
  leaves = [jnp.full((3,), 1e30), jnp.full((5,), 1e-30), jnp.arange(4.0)]
  got = _norms.leaf_norms(_norms.Layout(leaves), 2.0)
  want = [1e30 * np.sqrt(3), 1e-30 * np.sqrt(5), np.sqrt(14)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("ord", [1, 1.5, 2])
def test_rescaling_takes_one_pass_per_group(ord):
  # For 1 <= p <= 2 each norm is rescaled by its own factor, all in one pass:
  # the branch reduces each of the three leaves once.
  leaves = [jnp.full((3,), 1e30), jnp.full((5,), 1e-30), jnp.arange(4.0)]
  jaxpr = jax.make_jaxpr(lambda xs: _norms.leaf_norms(_norms.Layout(xs), ord))(leaves)
  (cond,) = [e for e in jaxpr.eqns if e.primitive.name == "cond"]
  plain, rescaled = cond.params["branches"]
  assert [e.primitive.name for e in rescaled.eqns].count("reduce_sum") == 3
  assert [e.primitive.name for e in plain.eqns].count("reduce_sum") == 0
  got = jax.jit(lambda xs: _norms.leaf_norms(_norms.Layout(xs), ord))(leaves)
  want = [
    _np_norm([np.full(3, 1e30)], ord),
    _np_norm([np.full(5, 1e-30)], ord),
    _np_norm([np.arange(4.0)], ord),
  ]
  np.testing.assert_allclose(got, want, rtol=2e-6)


@pytest.mark.parametrize("ord", [1.5, 2, 3])
def test_norms_not_rescaled_keep_their_plain_value(ord):
  # Another tensor's overflow sends every norm through the branch; those
  # that needed no rescaling are bit for bit what a plain step gives.
  others = [jax.random.normal(jax.random.key(i), (37, 11)) for i in range(2)]
  alone = _norms.leaf_norms(_norms.Layout(others), ord)
  with_big = _norms.leaf_norms(_norms.Layout([*others, jnp.full((3,), 1e30)]), ord)
  np.testing.assert_array_equal(with_big[:2], alone)
  np.testing.assert_allclose(with_big[2], _np_norm([np.full(3, 1e30)], ord), rtol=2e-6)


@pytest.mark.parametrize("grads_first", [True, False])
def test_rescaling_with_float32_and_float64_sums(grads_first):
  # AGC's float32 gradients with float64 parameters (x64): each sum is
  # rescaled on its own dtype's ladder.
  with jax.enable_x64(True):
    grads = [jnp.full((4, 3), 1e30, jnp.float32), jnp.ones((4, 3), jnp.float32)]
    params = [jnp.full((4, 3), 1e200, jnp.float64), jnp.ones((4, 3), jnp.float64)]
    first, second = (grads, params) if grads_first else (params, grads)
    a = _norms.Layout(first)
    b = _norms.Layout(second, like=a)
    out = jax.jit(lambda: _norms.paired_group_norms([a, b], 2.0, lambda shape: (0,)))()
    norms = dict(zip(("first", "second"), out))
    got_g, got_p = (
      (norms["first"], norms["second"]) if grads_first else (norms["second"], norms["first"])
    )
    np.testing.assert_allclose(got_g[0], 2e30, rtol=1e-6)
    np.testing.assert_allclose(got_g[1], 2.0, rtol=1e-6)
    np.testing.assert_allclose(got_p[0], 2e200, rtol=1e-12)
    np.testing.assert_allclose(got_p[1], 2.0, rtol=1e-12)
    assert got_g[0].dtype == jnp.float32 and got_p[0].dtype == jnp.float64


def test_per_example_norms_rescaled_across_stacked_and_unstacked_leaves():
  # Per-example norms (batch axis first) of 40 small leaves, stacked, and a
  # large one, in place: one example overflows, one underflows.
  scales = np.array([1e30, 1e-30, 1.0], np.float32)
  keys = jax.random.split(jax.random.key(0), 41)
  leaves = [jax.random.normal(k, (3, 4)) for k in keys[:40]]
  leaves.append(jax.random.normal(keys[40], (3, 200, 100)))
  leaves = [x * scales.reshape((3,) + (1,) * (x.ndim - 1)) for x in leaves]
  layout = _norms.Layout(leaves, 1)
  assert any(g.stacked for g in layout.groups) and any(not g.stacked for g in layout.groups)
  got = jax.jit(lambda xs: _norms.tree_norm(xs, 2.0, batch_ndim=1))(leaves)
  want = [_np_norm([np.asarray(x)[b] for x in leaves], 2) for b in range(3)]
  np.testing.assert_allclose(got, want, rtol=2e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("ord", [1, 1.5, 2, 3, 8])
def test_ladder_rungs_overlap_and_cover_the_range(dtype, ord):
  info = np.finfo(dtype)
  ladder = _norms._ladder(jnp.dtype(dtype), float(ord))
  emax, emin = info.maxexp, info.minexp
  # A rung below one that does not fit is accurate.
  assert np.log2(ladder.fits) - ladder.step * ord >= np.log2(ladder.accurate)
  # The lowest rung holds every finite norm; the highest lifts `tiny`.
  assert ord * (emax - ladder.below * ladder.step) <= emax - 2
  assert ord * (emin + ladder.above * ladder.step) >= emin


def test_agrees_with_optax_in_float32():
  tree = _random_tree(jax.random.key(1), 40)
  np.testing.assert_allclose(jaxclip.global_norm(tree), optax.tree.norm(tree), rtol=1e-6)


@pytest.mark.parametrize("ord", [0, -1, float("nan"), -math.inf])
def test_bad_ord_values(ord):
  with pytest.raises(ValueError, match="`ord`"):
    jaxclip.global_norm(jnp.ones(2), ord)


@pytest.mark.parametrize("ord", ["fro", True, [2]])
def test_bad_ord_types(ord):
  with pytest.raises((TypeError, ValueError), match="`ord`"):
    jaxclip.global_norm(jnp.ones(2), ord)


def test_ord_none_is_the_euclidean_norm_as_in_the_transforms():
  assert float(jaxclip.global_norm(jnp.array([3.0, 4.0]), None)) == 5.0


def _mixed_leaves(scale=1.0):
  """Leaves of every group kind: stacked (repeated shapes), padded (unique
  small shapes), in place (large), in a shuffled order."""
  leaves = [jnp.full((3,), float(i)) for i in range(40)]  # one shape: stacked
  leaves += [jnp.arange(1.0, n + 1.0) for n in (5, 7, 9, 33, 100)]  # unique: padded
  leaves += [jnp.full((2, 3, 4), -1.5), jnp.full((20000,), 2.0)]  # unique 3-D, large
  order = np.random.default_rng(0).permutation(len(leaves))
  return [scale * leaves[i] for i in order]


@pytest.mark.parametrize("scale", [1.0, 1e25, 1e-30])  # plain, overflowing, underflowing
def test_leaf_norms_keep_leaf_order_in_every_group_kind(scale):
  leaves = _mixed_leaves(scale)
  layout = _norms.Layout(leaves)
  assert {g.stacked for g in layout.groups} == {True, False}
  assert any(g.padded for g in layout.groups)
  got = _norms.leaf_norms(layout, 2.0)
  expected = [np.linalg.norm(np.asarray(x, np.float64)) for x in leaves]
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  total = _norms.tree_norm(leaves, 2.0)
  np.testing.assert_allclose(total, np.linalg.norm(expected), rtol=1e-6)


def test_grouped_programs_hold_no_per_element_constants():
  # 64 leaves of (128, 128): ids of the leaf of every element would be 1M
  # constants; the grouped program must stay small whatever the leaf size.
  tree = [jnp.ones((128, 128)) for _ in range(64)]
  for tx in (jaxclip.clip_by_norm(1.0), jaxclip.clip_by_block_rms(1.0)):
    text = jax.jit(tx.update).lower(tree, tx.init(tree)).as_text()
    assert len(text) < 200_000, len(text)


@pytest.mark.parametrize("n", [33, 46])  # the last stack of 4 partly filled
@pytest.mark.parametrize("scale", [1.0, 1e25, 1e-30])
def test_leaves_stacked_in_parts_keep_their_norms_and_gradients(n, scale):
  leaves = [scale * jax.random.normal(jax.random.key(i), (8, 8)) for i in range(n)]
  layout = _norms.Layout(leaves)
  assert [len(g.members) for g in layout.groups] == [n]
  np.testing.assert_array_equal(layout.groups[0].data, jnp.stack(leaves))
  expected = [np.linalg.norm(np.asarray(x, np.float64)) for x in leaves]
  np.testing.assert_allclose(_norms.leaf_norms(layout, 2.0), expected, rtol=1e-6)
  grads = jax.grad(lambda xs: _norms.tree_norm(xs, 2.0))(leaves)
  total = np.linalg.norm(expected)
  for x, g in zip(leaves, grads):
    np.testing.assert_allclose(g, np.asarray(x, np.float64) / total, rtol=1e-5, atol=1e-30)


def test_many_small_leaves_compile_to_short_concatenations():
  # One concatenation of 200 leaves of 64 entries takes XLA:CPU longer to
  # compile than the rest of the program: such leaves are stacked in parts
  # (the compiler would merge the parts back without the barrier between).
  tree = [jnp.ones((8, 8)) for _ in range(200)]
  text = jax.jit(jaxclip.global_norm).lower(tree).compile().as_text()
  operands = [
    line.split(" concatenate(")[1].split(")")[0].count("%")
    for line in text.splitlines()
    if " concatenate(" in line
  ]
  assert operands
  assert max(operands) <= 50, operands


def _count_eqns(jaxpr) -> int:
  """Equations of a jaxpr, those of the jaxprs inside it (jit, cond) included."""
  total = 0
  for eqn in jaxpr.eqns:
    inner = [v for v in eqn.params.values() if hasattr(v, "eqns") or hasattr(v, "jaxpr")]
    inner += [
      b for v in eqn.params.values() if isinstance(v, tuple) for b in v if hasattr(b, "jaxpr")
    ]
    total += 1 + sum(_count_eqns(getattr(j, "jaxpr", j)) for j in inner)
  return total


@pytest.mark.parametrize(
  "make, per_tensor",
  [(lambda: jaxclip.clip_by_norm(1.0), 20), (lambda: jaxclip.clip_by_block_rms(1.0), 20)],
  ids=["norm", "block_rms"],
)
def test_per_tensor_scalar_work_is_shared_by_all_tensors(make, per_tensor):
  # The rescaling decision, the roots, the scales and the records of a
  # whole-tensor clipper are computed on one vector, however many tensors
  # there are: a further tensor adds its reduction, its part of the
  # rescaling pass and its scaling (17 operations). Done per tensor, that
  # work came to about 75 operations each, and 300 tensors took 8 s to
  # compile.
  def eqns(n):
    tree = [jnp.ones((130 + i, 130)) for i in range(n)]  # distinct shapes: in place
    tx = make()
    return _count_eqns(jax.make_jaxpr(tx.update)(tree, tx.init(tree)).jaxpr)

  assert (eqns(40) - eqns(20)) / 20 <= per_tensor


@pytest.mark.parametrize("scale", [1.0, 1e25, 1e-30])  # plain, overflowing, underflowing
def test_joined_norms_of_layer_stacked_leaves(scale):
  # Stacked leaves with a lead (layer) axis, in place and grouped: one entry
  # per layer, in group order; in leaf order each leaf's layers in turn.
  leaves = [scale * jax.random.normal(jax.random.key(i), (3, 4, 5)) for i in range(34)]
  leaves += [scale * jnp.full((2, 20000), 1.5)]
  layout = _norms.Layout(leaves, 1)
  assert {g.stacked for g in layout.groups} == {True, False}
  got = layout.in_leaf_order(_norms.joined_norms(layout, 2.0))
  want = [np.linalg.norm(np.asarray(x, np.float64)[j]) for x in leaves for j in range(x.shape[0])]
  np.testing.assert_allclose(got, want, rtol=1e-6)
  sizes = layout.in_leaf_order(layout.entry_sizes())
  np.testing.assert_array_equal(sizes, [x[0].size for x in leaves for _ in range(x.shape[0])])


# Seen with jax 0.9.2 (not 0.12): |x|**3, and the squares of a reduction over
# some axes only (AGC's unit norms), are written out before they are reduced,
# in the plain pass as well as in the rescaling branch.
_OLD_XLA_WRITES_POWERS = pytest.mark.skipif(
  jax.__version_info__ < (0, 12), reason="this XLA writes powers out before reducing them"
)


@pytest.mark.parametrize(
  "make",
  [
    lambda: jaxclip.clip_by_global_norm(1.0),
    lambda: jaxclip.clip_by_norm(1.0),
    pytest.param(lambda: jaxclip.clip_by_norm(1.0, ord=3), marks=_OLD_XLA_WRITES_POWERS),
    lambda: jaxclip.clip_by_norm(1.0, axis=0),
    lambda: jaxclip.clip_by_block_rms(1.0),
    pytest.param(lambda: jaxclip.adaptive_grad_clip(0.01), marks=_OLD_XLA_WRITES_POWERS),
    lambda: jaxclip.zclip(),
  ],
  ids=["global", "norm", "norm_ord3", "norm_axis0", "block_rms", "agc", "zclip"],
)
def test_rescaling_holds_no_gradient_sized_temporaries(make):
  # The rescaling branch multiplies leaves of one shape by the same scalars;
  # XLA:CPU had written each out as a full-size array (two per shape, 1 MB
  # here, 400 MB in an AGC step on 40M parameters), even at steps that never
  # rescale. Each group now reads its own copy.
  tree = [jnp.full((256, 512), 2.0) for _ in range(4)]
  tx = make()
  compiled = jax.jit(tx.update).lower(tree, tx.init(tree), tree).compile()
  leaf_bytes = tree[0].size * tree[0].dtype.itemsize
  memory = compiled.memory_analysis()
  if memory is None:
    pytest.skip("this backend reports no memory analysis")
  assert memory.temp_size_in_bytes < leaf_bytes // 4
  big = [x * 1e30 for x in tree]  # squares overflow: the sums are rescaled
  _, state = tx.update(big, tx.init(tree), tree)
  for name, value in jaxclip.stats(state).items():
    assert np.all(np.isfinite(np.asarray(value, np.float64))), (name, value)


@pytest.mark.parametrize(
  "shape,axes",
  [
    ((5,), None),
    ((4, 3), (0,)),
    ((2, 4, 3), (0,)),
    ((3, 3, 2, 4), (0, 1, 2)),
    ((2, 2, 2, 3, 4), (0, 1, 2, 3)),
    ((1, 5), None),
  ],
)
def test_unitwise_norm_default_axes(shape, axes):
  x = jax.random.normal(jax.random.key(2), shape)
  ref = np.sqrt(np.sum(np.asarray(x, np.float64) ** 2, axis=axes, keepdims=True))
  got = jaxclip.unitwise_norm(x)
  assert got.shape == shape
  np.testing.assert_allclose(got, np.broadcast_to(ref, shape), rtol=1e-6)


def test_unitwise_norm_explicit_axis_and_rank_error():
  x = jnp.arange(12.0).reshape(3, 4)
  np.testing.assert_allclose(
    jaxclip.unitwise_norm(x, axis=1)[:, 0], np.linalg.norm(np.asarray(x), axis=1), rtol=1e-6
  )
  with pytest.raises(ValueError, match="axis="):
    jaxclip.unitwise_norm(jnp.ones((1, 2, 1, 2, 1, 2)))


def test_ord_infinity_as_optax_spells_it():
  tree = {"a": jnp.array([-3.0, 2.0])}
  assert (
    float(jaxclip.global_norm(tree, "infinity")) == 3.0 == float(optax.tree.norm(tree, "infinity"))
  )


def test_unitwise_norm_of_integers_as_optax():
  x = jnp.array([[3, 0], [4, 1]])
  np.testing.assert_array_equal(jaxclip.unitwise_norm(x), optax.transforms.unitwise_norm(x))
  assert jaxclip.unitwise_norm(x).dtype == jnp.float32


def _temp_bytes(fn, *args, donate=()):
  compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("guarded", [False, True])
def test_squares_are_not_shared_with_the_optimizers(guarded):
  # Adam squares the gradients too; shared with the norm's squares, XLA:CPU
  # wrote them out as a full-size temporary (a guarded Adam step cost 2.2x a
  # bare one). The norm of gradients that reach Adam unscaled (a guard, a
  # logged norm) needs no more temporary memory than a sum of magnitudes
  # beside Adam does (none with jax 0.12; older XLA:CPU writes a copy for
  # any reduction there).
  params = {"w": jnp.ones((512, 256)), "v": jnp.ones((256, 128))}
  grads = jax.tree.map(lambda x: x * 1e-3, params)
  adam = optax.adam(1e-3)
  opt = jaxclip.skip_nonfinite(adam) if guarded else adam

  def step(opt, measure):
    def fn(params, state, grads):
      updates, state = opt.update(grads, state, params)
      return optax.apply_updates(params, updates), state, measure(grads)

    return fn

  def abs_sum(grads):
    return sum(jnp.sum(jnp.abs(x)) for x in jax.tree.leaves(grads))

  args = (params, opt.init(params), grads)
  temp = _temp_bytes(step(opt, jaxclip.global_norm), *args, donate=(0, 1))
  floor = _temp_bytes(step(adam, abs_sum), params, adam.init(params), grads, donate=(0, 1))
  assert temp <= floor + 4096, (temp, floor)
