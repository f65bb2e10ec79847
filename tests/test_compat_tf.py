"""Parity of `jaxclip.compat.tf` with TensorFlow itself (CPU)."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest

tf = pytest.importorskip(
  "tensorflow", reason="parity tests need TensorFlow: pip install 'jaxclip[parity]'"
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxclip.compat import tf as ctf  # noqa: E402
from tests._parity import assert_ulp, random_tensors  # noqa: E402

DTYPES = [np.float32, np.float16, jnp.bfloat16]
SHAPES = [[(7,)], [(3, 4), (5,), (2, 3, 5)], [(64, 33)], [(1,), (1000,)]]

# TensorFlow sums float16/bfloat16 squares in half precision on CPU, in an
# order of its own; the norm (and so every scaled entry) can then differ by a
# few half-precision ulps. float32 agrees to 1 ulp.
MAXULP = {np.dtype(np.float32): 1, np.dtype(np.float16): 4, np.dtype(jnp.bfloat16): 2}
# `clip_by_norm` divides by a norm whose sum of squares XLA and Eigen reduce in
# different orders (tensors of hundreds of entries, or reductions over
# non-contiguous axes): the norm can be 1 ulp apart, and the quotient 2.
NORM_MAXULP = {**MAXULP, np.dtype(np.float32): 2}


def _tf(x):
  return None if x is None else tf.constant(x)


def _np(t):
  return None if t is None else np.asarray(t.numpy())


def _maxulp(dtype):
  return MAXULP[np.dtype(dtype)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPES)
def test_global_norm(shapes, dtype):
  ts = random_tensors(0, shapes, dtype)
  assert_ulp(ctf.global_norm(ts), _np(tf.linalg.global_norm([_tf(t) for t in ts])), _maxulp(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0, 0.0, -1.0])
def test_clip_by_global_norm(shapes, dtype, ratio):
  ts = random_tensors(1, shapes, dtype)
  norm = float(tf.linalg.global_norm([_tf(t) for t in ts]))
  c = ratio * norm  # ratio 1.0: exactly at TensorFlow's norm.
  want, want_norm = tf.clip_by_global_norm([_tf(t) for t in ts], c)
  got, got_norm = ctf.clip_by_global_norm(ts, c)
  tol = _maxulp(dtype)
  assert_ulp(got_norm, _np(want_norm), tol)
  for g, w in zip(got, want):
    assert_ulp(g, _np(w), tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (3, 4), (64, 33), (2, 3, 5)])
@pytest.mark.parametrize("ratio", [0.5, 1.0, 2.0, 0.0, -1.0])
def test_clip_by_norm(shape, dtype, ratio):
  (t,) = random_tensors(2, [shape], dtype)
  norm = float(tf.norm(tf.constant(t, tf.float32)))
  c = ratio * norm
  tol = NORM_MAXULP[np.dtype(dtype)]
  assert_ulp(ctf.clip_by_norm(t, c), _np(tf.clip_by_norm(_tf(t), c)), tol)
  # A 0-d array threshold goes through TensorFlow's other branch (max 0, cast).
  c_arr = np.asarray(c, np.float32)
  assert_ulp(ctf.clip_by_norm(t, c_arr), _np(tf.clip_by_norm(_tf(t), c_arr)), tol)


@pytest.mark.parametrize("axes", [0, [1], [0, 2], (1, 2)])
def test_clip_by_norm_axes(axes):
  (t,) = random_tensors(3, [(4, 5, 6)], np.float32)
  want = _np(tf.clip_by_norm(_tf(t), 1.5, axes=axes))
  assert_ulp(ctf.clip_by_norm(t, 1.5, axes=axes), want, NORM_MAXULP[np.dtype(np.float32)])


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_by_value(dtype):
  (t,) = random_tensors(4, [(5, 7)], dtype, scale=3.0)
  t[0, :3] = [np.nan, np.inf, -np.inf]
  for lo, hi in [(-1.0, 1.0), (-0.3, 2.5), (0.0, 0.0), (1.0, -1.0)]:
    got = ctf.clip_by_value(t, lo, hi)
    assert_ulp(got, _np(tf.clip_by_value(_tf(t), lo, hi)), 0)


@pytest.mark.parametrize(
  "special",
  [
    [np.zeros(3), np.zeros((2, 2))],
    [np.array([1.0, np.inf]), np.ones(2)],
    [np.array([1.0, np.nan]), np.ones(2)],
    [np.array([np.inf, -np.inf])],
    [np.array([1e20, 1e20])],  # squares overflow float32
    [np.array([1e-25, 2e-25])],  # squares underflow float32
  ],
)
@pytest.mark.parametrize("c", [1.0, 0.0, -2.0])
def test_special_values(special, c):
  ts = [np.asarray(t, np.float32) for t in special]
  want, want_norm = tf.clip_by_global_norm([_tf(t) for t in ts], c)
  got, got_norm = ctf.clip_by_global_norm(ts, c)
  assert_ulp(got_norm, _np(want_norm))
  for g, w in zip(got, want):
    assert_ulp(g, _np(w))
  for t in ts:
    assert_ulp(ctf.clip_by_norm(t, c), _np(tf.clip_by_norm(_tf(t), c)))


def test_float16_overflow():
  # Squares above 65504 overflow in float16, in TensorFlow and here alike.
  t = np.array([300.0, 400.0], np.float16)
  assert_ulp(ctf.clip_by_norm(t, 1.0), _np(tf.clip_by_norm(_tf(t), 1.0)), 0)
  assert np.all(np.asarray(ctf.clip_by_norm(t, 1.0)) == 0)
  got, norm = ctf.clip_by_global_norm([t], 1.0)
  want, want_norm = tf.clip_by_global_norm([_tf(t)], 1.0)
  assert np.isinf(norm) and np.isinf(_np(want_norm))
  assert np.all(np.isnan(got[0])) and np.all(np.isnan(_np(want[0])))


def test_none_entries_and_empty():
  ts = [None, np.array([3.0, 4.0], np.float32), None]
  want, want_norm = tf.clip_by_global_norm([_tf(t) for t in ts], 1.0)
  got, got_norm = ctf.clip_by_global_norm(ts, 1.0)
  assert got[0] is None and got[2] is None and want[0] is None
  assert_ulp(got[1], _np(want[1]))
  assert_ulp(got_norm, _np(want_norm))
  want, want_norm = tf.clip_by_global_norm([], 1.0)
  got, got_norm = ctf.clip_by_global_norm([], 1.0)
  assert got == want == []
  assert_ulp(got_norm, _np(want_norm))
  assert_ulp(ctf.global_norm([]), _np(tf.linalg.global_norm([])))


def test_use_norm():
  ts = random_tensors(5, [(3,), (4, 2)], np.float32)
  want, _ = tf.clip_by_global_norm([_tf(t) for t in ts], 0.5, use_norm=tf.constant(2.0))
  got, norm = ctf.clip_by_global_norm(ts, 0.5, use_norm=2.0)
  assert float(norm) == 2.0
  for g, w in zip(got, want):
    assert_ulp(g, _np(w))


def test_transforms_match_tensorflow():
  ts = random_tensors(6, [(3, 3), (8,)], np.float32, scale=2.0)
  tree = {"a": ts[0], "b": ts[1]}
  want, _ = tf.clip_by_global_norm([_tf(t) for t in ts], 1.0)
  tx = ctf.clip_by_global_norm_transform(1.0)
  got, _ = tx.update(tree, tx.init(tree))
  assert_ulp(got["a"], _np(want[0]))
  assert_ulp(got["b"], _np(want[1]))
  tx = ctf.clip_by_norm_transform(1.0)
  got, _ = tx.update(tree, tx.init(tree))
  assert_ulp(got["a"], _np(tf.clip_by_norm(_tf(ts[0]), 1.0)), 2)
  assert_ulp(got["b"], _np(tf.clip_by_norm(_tf(ts[1]), 1.0)), 2)
  tx = ctf.clip_by_value_transform(-0.5, 0.5)
  got, _ = tx.update(tree, tx.init(tree))
  assert_ulp(got["a"], _np(tf.clip_by_value(_tf(ts[0]), -0.5, 0.5)), 0)


def test_worked_examples():
  t = np.array([-2.0, 3.0, 6.0], np.float32)
  assert_ulp(ctf.clip_by_norm(t, 5.0), _np(tf.clip_by_norm(_tf(t), 5.0)), 0)
  ts = [t, np.array([-4.0, 6.0, 12.0], np.float32)]
  want, want_norm = tf.clip_by_global_norm([_tf(x) for x in ts], 14.5)
  got, got_norm = ctf.clip_by_global_norm(ts, 14.5)
  assert_ulp(got_norm, _np(want_norm), 0)
  for g, w in zip(got, want):
    assert_ulp(g, _np(w), 0)


def _both_raise(fn_tf, fn_ours, ours_error):
  """TensorFlow raises (any error) and jaxclip raises `ours_error`."""
  with pytest.raises((ValueError, TypeError, tf.errors.InvalidArgumentError)):
    fn_tf()
  with pytest.raises(ours_error):
    fn_ours()


@pytest.mark.parametrize(
  "t_shape, bound_shape",
  [
    ((2, 3, 1), (2,)),  # clip_ops_test: broadcasting would give (2, 3, 2)
    ((2,), (3, 2)),  # a larger bound
    ((2, 3), (1, 2, 3)),  # one more axis
    ((2, 3), (1, 1, 2)),  # not broadcastable at all
    ((2, 3), (4,)),
  ],
)
def test_clip_by_value_bad_shapes_raise_like_tensorflow(t_shape, bound_shape):
  t, bound = np.ones(t_shape, np.float32), np.full(bound_shape, 0.5, np.float32)
  for lo, hi in [(-bound, bound), (-1.0, bound), (bound, 10.0)]:
    _both_raise(
      lambda lo=lo, hi=hi: tf.clip_by_value(_tf(t), lo, hi),
      lambda lo=lo, hi=hi: ctf.clip_by_value(t, lo, hi),
      ValueError,
    )
  _both_raise(
    lambda: tf.clip_by_norm(_tf(t), bound), lambda: ctf.clip_by_norm(t, bound), ValueError
  )


@pytest.mark.parametrize("t_shape, bound_shape", [((2, 3), (2, 1)), ((2, 3), (3,)), ((2, 3), ())])
def test_broadcastable_bounds_match_tensorflow(t_shape, bound_shape):
  (t,) = random_tensors(7, [t_shape], np.float32, scale=2.0)
  bound = np.abs(random_tensors(8, [bound_shape], np.float32)[0]) + 0.5
  want = _np(tf.clip_by_value(_tf(t), -bound, bound))
  assert_ulp(ctf.clip_by_value(t, -bound, bound), want, 0)
  want = _np(tf.clip_by_norm(_tf(t), bound, axes=[1]))
  assert_ulp(ctf.clip_by_norm(t, bound, axes=[1]), want, NORM_MAXULP[np.dtype(np.float32)])


@pytest.mark.parametrize(
  "t_list",
  [
    [[3.0, 4.0]],
    [3.0, 4.0],
    ([3.0], [4.0]),
    [[3.0], 4.0, None],
    [[[1.0, 2.0], [3.0, 4.0]], [0.5]],
    [[1, 2.5]],  # ints and floats: float32
    [[]],
    [None],
  ],
)
def test_nested_lists_match_tensorflow(t_list):
  assert_ulp(ctf.global_norm(t_list), _np(tf.linalg.global_norm(t_list)))
  for c in (1.0, 100.0):
    want, want_norm = tf.clip_by_global_norm(t_list, c)
    got, got_norm = ctf.clip_by_global_norm(t_list, c)
    assert isinstance(got, list) and len(got) == len(want)
    assert_ulp(got_norm, _np(want_norm))
    for g, w in zip(got, want):
      assert (g is None) == (w is None)
      if w is not None:
        assert_ulp(g, _np(w))


@pytest.mark.parametrize(
  "t_list, error",
  [
    ([[3, 4]], TypeError),  # int32: tf.nn.l2_loss raises
    ([[True]], TypeError),
    ([[[1.0], [2.0, 3.0]]], ValueError),  # ragged
    ([[1.0, [2.0]]], ValueError),  # mixed nesting
    ([np.ones(2, np.float32), np.ones(2, np.float16)], TypeError),  # mixed dtypes
  ],
)
def test_bad_lists_raise_like_tensorflow(t_list, error):
  _both_raise(lambda: tf.linalg.global_norm(t_list), lambda: ctf.global_norm(t_list), error)
  _both_raise(
    lambda: tf.clip_by_global_norm(t_list, 1.0),
    lambda: ctf.clip_by_global_norm(t_list, 1.0),
    error,
  )


def test_use_norm_with_integer_tensor_matches_tensorflow():
  want, _ = tf.clip_by_global_norm([[3, 4], [1.0]], 1.0, use_norm=tf.constant(5.0))
  got, _ = ctf.clip_by_global_norm([[3, 4], [1.0]], 1.0, use_norm=5.0)
  for g, w in zip(got, want):
    assert g.dtype == w.dtype.as_numpy_dtype
    np.testing.assert_array_equal(g, w.numpy())


@pytest.mark.parametrize(
  "t, lo, hi",
  [
    ([-3.0, 0.5, 3.0], -1.0, 1.0),
    (3.0, -1.0, 1.0),
    ([-3, 0, 3], -1, 1),  # int32
    ([[1, 2, 3], [4, 5, 6]], [[2, 2, 2], [3, 3, 3]], 4),
    ([-3, 0, 3], np.float32(-1.5), 1),  # a NumPy float bound is cast
    ([-3.0, 0.0, 3.0], -1, 1),  # int bounds, float t
    ([[-1.0, 0.0, 10.0], [-1.0, 0.0, 10.0]], [[2.0], [1.0]], 100.0),
  ],
)
def test_clip_by_value_conversion_matches_tensorflow(t, lo, hi):
  want = _np(tf.clip_by_value(t, lo, hi))
  got = np.asarray(ctf.clip_by_value(t, lo, hi))
  assert got.dtype == want.dtype and got.shape == want.shape
  np.testing.assert_array_equal(got, want)


def test_clip_by_value_float_bound_on_integers_raises_like_tensorflow():
  for lo, hi in [(-1.5, 1), (-1, 1.5), (-1.0, 1), ([-1.5, 0.0, 0.0], 1)]:
    _both_raise(
      lambda lo=lo, hi=hi: tf.clip_by_value([-3, 0, 3], lo, hi),
      lambda lo=lo, hi=hi: ctf.clip_by_value([-3, 0, 3], lo, hi),
      TypeError,
    )


@pytest.mark.parametrize(
  "dtype", [np.float16, np.float32, jnp.bfloat16, np.int16, np.int32, np.uint8]
)
def test_clip_ops_test_value_cases_match_tensorflow(dtype):
  # The inputs of TensorFlow's testClipByValue{0,1,2,3}Type.
  x = np.arange(1, 7).reshape(2, 3).astype(dtype)
  tfx = tf.constant(x.astype(np.float32)) if dtype == jnp.bfloat16 else tf.constant(x)
  tfx = tf.cast(tfx, tf.bfloat16) if dtype == jnp.bfloat16 else tfx

  def both(*values):
    a = np.array(values).reshape(2, 3).astype(dtype)
    return a, tf.cast(tf.constant(a.astype(np.float32)), tfx.dtype)

  lo1, tf_lo1 = both(2, 2, 2, 3, 3, 3)
  hi2, tf_hi2 = both(6, 6, 6, 6, 6, 6)
  lo3, tf_lo3 = both(2, 2, 2, 5, 5, 5)
  hi3, tf_hi3 = both(5, 5, 5, 7, 7, 7)
  for (lo, hi), (tlo, thi) in [
    ((2, 4), (2, 4)),
    ((lo1, 4), (tf_lo1, 4)),
    ((4, hi2), (4, tf_hi2)),
    ((lo3, hi3), (tf_lo3, tf_hi3)),
  ]:
    want = tf.clip_by_value(tfx, tlo, thi)
    got = ctf.clip_by_value(x, lo, hi)
    np.testing.assert_array_equal(np.asarray(got, np.float32), tf.cast(want, tf.float32).numpy())


@pytest.mark.parametrize("clip_norm", [0.01, 0.5, 10.0])
@pytest.mark.parametrize("shape", [(7,), (3, 4), (64, 33)])
def test_clip_by_average_norm_matches_tensorflow(shape, clip_norm):
  (t,) = random_tensors(3, [shape], np.float32, scale=3.0)
  theirs = _np(tf.compat.v1.clip_by_average_norm(_tf(t), clip_norm))
  # One factor scales every entry: its rsqrt of a sum reduced in another
  # order (2112 entries) puts whole results up to 4 ulps apart.
  assert_ulp(ctf.clip_by_average_norm(t, clip_norm), theirs, 4)


def test_gradients_at_ties_match_tensorflow():
  x = np.array([0.0, 6.0, 3.0], np.float32)
  for ours, theirs in [
    (lambda v: jnp.sum(ctf.clip_by_value(v, 0.0, 6.0)), lambda v: tf.clip_by_value(v, 0.0, 6.0)),
    (lambda v: jnp.sum(ctf.clip_by_norm(v, 5.0)), lambda v: tf.clip_by_norm(v, 5.0)),
  ]:
    for point in (x, np.array([3.0, 4.0], np.float32)):
      v = tf.Variable(point)
      with tf.GradientTape() as tape:
        y = tf.reduce_sum(theirs(v))
      np.testing.assert_allclose(jax.grad(ours)(jnp.asarray(point)), tape.gradient(y, v), atol=1e-6)
