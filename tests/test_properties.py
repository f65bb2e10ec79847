"""Property tests of the clipping invariants, over random trees (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import jaxclip

# Jitted once per tree structure.
_update = jax.jit(lambda g, t: jaxclip.clip_by_global_norm(t).update(g, None)[0])
_per_leaf = jax.jit(lambda g, t: jaxclip.clip_by_norm(t).update(g, None)[0])
_value = jax.jit(lambda g, lo, hi: jaxclip.clip_by_value(lo, hi).update(g, None)[0])

_floats = st.floats(-1e4, 1e4, allow_nan=False, width=32)
_leaf = st.lists(_floats, min_size=1, max_size=6).map(lambda v: np.asarray(v, np.float32))
_trees = st.lists(_leaf, min_size=1, max_size=4)
_thresholds = st.floats(0.0, 1e3, allow_nan=False, width=32)


def _norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in tree)))


@given(_trees, _thresholds)
def test_global_norm_bounded_by_threshold(tree, t):
  out = _update(tree, t)
  assert _norm(out) <= t * (1 + 1e-5) + 1e-30


@given(_trees, _thresholds)
def test_direction_preserved(tree, t):
  out = _update(tree, t)
  a = np.concatenate(tree).astype(np.float64)
  b = np.concatenate([np.asarray(x) for x in out]).astype(np.float64)
  if np.linalg.norm(b) > 1e-20:
    cos = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    assert cos > 1 - 1e-5


@given(_trees, _thresholds)
def test_identity_below_threshold(tree, t):
  if _norm(tree) <= t * (1 - 1e-6):
    out = _update(tree, t)
    for x, y in zip(tree, out):
      np.testing.assert_array_equal(x, y)


@given(_trees, _thresholds)
def test_idempotent(tree, t):
  once = _update(tree, t)
  twice = _update(once, t)
  for x, y in zip(once, twice):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-30)


@given(_trees, _thresholds)
def test_per_leaf_norm_bounded(tree, t):
  for x in _per_leaf(tree, t):
    assert np.linalg.norm(np.asarray(x, np.float64)) <= t * (1 + 1e-5) + 1e-30


@given(_trees, _floats, _floats)
def test_value_bounds(tree, lo, hi):
  lo, hi = min(lo, hi), max(lo, hi)
  for x, y in zip(tree, _value(tree, lo, hi)):
    y = np.asarray(y)
    assert np.all(y >= np.float32(lo)) and np.all(y <= np.float32(hi))
    inside = (x >= lo) & (x <= hi)
    np.testing.assert_array_equal(y[inside], x[inside])


@given(_trees)
def test_global_norm_matches_float64(tree):
  np.testing.assert_allclose(float(jaxclip.global_norm(tree)), _norm(tree), rtol=1e-5)


def test_global_norm_jnp_inputs_same():
  tree = [jnp.arange(3.0), jnp.ones((2, 2))]
  np.testing.assert_allclose(float(jaxclip.global_norm(tree)), _norm(tree), rtol=1e-6)
