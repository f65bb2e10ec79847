"""Tests of `jaxclip.compat` that need neither TensorFlow, PyTorch nor Keras."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.experimental import checkify

from jaxclip.compat import keras as ckeras
from jaxclip.compat import tf as ctf
from jaxclip.compat import torch as ctorch

F32 = np.float32


def test_tf_worked_examples():
  t = np.array([-2.0, 3.0, 6.0], F32)
  np.testing.assert_array_equal(ctf.clip_by_norm(t, 5.0), t * F32(5) / F32(7))
  ts = [t, np.array([-4.0, 6.0, 12.0], F32)]
  clipped, norm = ctf.clip_by_global_norm(ts, 14.5)
  assert float(norm) == pytest.approx(math.sqrt(245), rel=1e-7)
  scale = F32(14.5) * (F32(1) / np.asarray(norm))  # TensorFlow's reciprocal form
  for c, x in zip(clipped, ts):
    np.testing.assert_array_equal(c, x * scale)
    np.testing.assert_allclose(c, x * 14.5 / math.sqrt(245), rtol=2e-7)


def test_tf_edge_cases():
  x = np.array([3.0, 4.0], F32)
  np.testing.assert_array_equal(ctf.clip_by_norm(x, -1.0), [0, 0])  # negative acts as 0
  np.testing.assert_array_equal(ctf.clip_by_norm(np.zeros(2, F32), 1.0), [0, 0])
  assert np.all(np.isnan(ctf.clip_by_norm(np.zeros(2, F32), 0.0)))  # 0 / 0
  np.testing.assert_array_equal(ctf.clip_by_global_norm([x], -1.0)[0][0], x)  # no clip
  np.testing.assert_array_equal(ctf.clip_by_global_norm([np.zeros(2, F32)], 1.0)[0][0], [0, 0])
  for bad in (np.inf, np.nan):
    out, norm = ctf.clip_by_global_norm([np.array([1.0, bad], F32), x], 1.0)
    assert np.all(np.isnan(out[0])) and np.all(np.isnan(out[1]))
  # Below the threshold, TensorFlow's scale c * (1 / c) is not always 1.
  out, _ = ctf.clip_by_global_norm([np.array([0.1, 0.2], F32)], 1.85)
  assert np.asarray(out[0])[0] != F32(0.1)


def test_tf_none_pytrees_and_errors():
  out, norm = ctf.clip_by_global_norm([None, np.array([3.0, 4.0], F32)], 1.0)
  assert out[0] is None and float(norm) == 5.0
  tree = {"a": jnp.ones(2), "n": jnp.arange(3)}
  out, _ = ctf.clip_by_global_norm(tree, 1.0)
  np.testing.assert_array_equal(out["n"], jnp.arange(3))  # integers pass through
  with pytest.raises(TypeError, match="one dtype"):
    ctf.global_norm([jnp.ones(2), jnp.ones(2, jnp.float16)])
  with pytest.raises(TypeError, match="floating-point"):
    ctf.clip_by_norm(jnp.arange(3), 1.0)
  with pytest.raises(ValueError, match="scalar"):
    ctf.clip_by_norm(jnp.ones(3), jnp.ones(2))


def test_jit_matches_eager():
  gs = [jnp.array([3.0, -4.0, 0.5]), jnp.array([[1.0, 2.0]], jnp.float16)]
  f32 = [gs[0], gs[1].astype(jnp.float32)]
  cases = [
    (lambda g: ctf.clip_by_norm(g[0], 1.0), gs),
    (lambda g: ctf.clip_by_global_norm(g, 1.0), f32),
    (lambda g: ctf.clip_by_value(g[0], -1.0, 1.0), gs),
    (lambda g: ctorch.clip_grad_norm(g, 1.0, 3.0), gs),
    (lambda g: ctorch.clip_grad_norm(g, 1.0, "inf"), gs),
    (lambda g: ctorch.clip_grad_value(g, 0.7), gs),
  ]
  for fn, args in cases:
    jax.tree.map(np.testing.assert_array_equal, jax.jit(fn)(args), fn(args))


def test_traced_thresholds():
  g = [jnp.array([3.0, 4.0])]
  out = jax.jit(lambda g, c: ctf.clip_by_global_norm(g, c)[0])(g, 1.0)
  np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)
  out = jax.jit(lambda g, c: ctorch.clip_grad_norm(g, c)[0])(g, 1.0)
  np.testing.assert_allclose(out[0], [0.6, 0.8], rtol=1e-6)


def test_torch_edge_cases():
  g = [jnp.array([3.0, 4.0])]
  out, norm = ctorch.clip_grad_norm(g, -1.0)  # PyTorch flips the sign
  assert np.all(np.asarray(out[0]) < 0)
  out, norm = ctorch.clip_grad_norm([jnp.array([1.0, jnp.inf])], 1.0)
  assert float(out[0][0]) == 0 and np.isnan(out[0][1]) and np.isinf(norm)
  out, _ = ctorch.clip_grad_norm([jnp.array([1e-7, 0.0])], 1e-7)  # the 1e-6 epsilon
  assert float(out[0][0]) < 1e-7 / 5
  assert float(ctorch.get_total_norm([jnp.array([1.0, 0.0]), jnp.zeros(2)], 0)) == 1.0
  assert float(ctorch.get_total_norm([jnp.array([3.0, 4.0]), jnp.array([1.0])], -math.inf)) == 1
  assert float(ctorch.get_total_norm([])) == 0.0
  out, _ = ctorch.clip_grad_norm({"a": None, "b": jnp.ones(2)}, 1.0)
  assert out["a"] is None


def test_torch_generators_of_gradients():
  # PyTorch's `clip_grad_norm_(model.parameters(), ...)` idiom: a generator
  # is read once; an empty one warns (clip_grad_norm_ only) and gives 0.
  g = [jnp.array([3.0, 4.0])]
  clipped, norm = ctorch.clip_grad_norm((x for x in g), 1.0)
  np.testing.assert_allclose(clipped[0], [0.6, 0.8], rtol=1e-5)
  assert float(norm) == 5.0
  assert float(ctorch.get_total_norm(x for x in g)) == 5.0
  np.testing.assert_array_equal(ctorch.clip_grad_value((x for x in g), 1.0)[0], [1.0, 1.0])
  with pytest.warns(UserWarning, match="`parameters` is an empty generator"):
    clipped, norm = ctorch.clip_grad_norm((x for x in []), 1.0)
  assert clipped == [] and float(norm) == 0.0


def test_torch_errors():
  with pytest.raises(ValueError, match="norm_type"):
    ctorch.get_total_norm([jnp.ones(2)], "euclid")
  with pytest.raises(ValueError, match="norm_type"):
    ctorch.clip_grad_norm_transform(1.0, "two")
  with pytest.raises(RuntimeError, match="non-finite"):
    ctorch.get_total_norm([jnp.array([jnp.nan])], error_if_nonfinite=True)


@pytest.mark.parametrize(
  "make, arg",
  [(ctorch.clip_grad_norm_transform, "max_norm"), (ctorch.clip_grad_value_transform, "clip_value")],
)
def test_torch_transforms_check_their_threshold_when_built(make, arg):
  # PyTorch's own wording first, then jaxclip's: at construction, not at the
  # first step of training.
  with pytest.raises(ValueError, match=rf"could not convert string to float.*`{arg}`"):
    make("abc")
  with pytest.raises(TypeError, match=rf"float\(\) argument.*`{arg}`"):
    make(None)


def test_torch_error_if_nonfinite_under_jit():
  step = jax.jit(lambda g: ctorch.clip_grad_norm(g, 1.0, error_if_nonfinite=True))
  checked = checkify.checkify(step)
  err, (out, norm) = checked([jnp.array([3.0, 4.0])])
  err.throw()  # finite: no error
  assert float(norm) == 5.0
  err, _ = checked([jnp.array([1.0, jnp.inf])])
  with pytest.raises(checkify.JaxRuntimeError, match="non-finite"):
    err.throw()


def test_transforms_are_chainable():
  g = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([0.0])}
  for clip in (
    ctf.clip_by_global_norm_transform(1.0),
    ctf.clip_by_norm_transform(1.0),
    ctf.clip_by_value_transform(-1.0, 1.0),
    ctorch.clip_grad_norm_transform(1.0),
    ctorch.clip_grad_value_transform(1.0),
    ckeras.with_clipping(optax.identity(), clipnorm=1.0),
  ):
    tx = optax.chain(clip, optax.sgd(1.0))
    state = tx.init(g)
    updates, state = jax.jit(tx.update)(g, state, g)
    assert float(optax.tree.norm(updates)) <= math.sqrt(2) + 1e-6  # clipped from 5
    assert isinstance(clip, optax.GradientTransformationExtraArgs)


def test_keras_validation():
  with pytest.raises(ValueError, match="Only one"):
    ckeras.with_clipping(optax.sgd(0.1), clipnorm=1.0, clipvalue=1.0)
  for name in ("clipnorm", "clipvalue", "global_clipnorm"):
    with pytest.raises(ValueError, match=name):
      ckeras.with_clipping(optax.sgd(0.1), **{name: -1.0})
    with pytest.raises(TypeError, match=name):
      ckeras.with_clipping(optax.sgd(0.1), **{name: "1"})


def test_keras_zero_disables_and_extra_args():
  g = {"w": jnp.array([3.0, 4.0])}
  tx = ckeras.with_clipping(optax.identity(), clipnorm=0.0)
  np.testing.assert_array_equal(tx.update(g, tx.init(g))[0]["w"], g["w"])
  tx = ckeras.with_clipping(optax.identity(), clipvalue=1.0)
  np.testing.assert_array_equal(tx.update(g, tx.init(g), g, value=1.0)[0]["w"], [1.0, 1.0])


# Cases of TensorFlow's own tests (tensorflow/python/kernel_tests/math_ops/
# clip_ops_test.py), with TensorFlow's expected values. IndexedSlices and
# clip_by_average_norm have no counterpart here and are left out.

TF_INT_AND_FLOAT = [jnp.float16, jnp.float32, jnp.bfloat16, jnp.int16, jnp.int32, jnp.uint8]


def test_tf_clip_by_value_cases():
  x = jnp.array([[-5.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
  np.testing.assert_allclose(ctf.clip_by_value(x, -4.4, 4.4), [[-4.4, 2, 3], [4, 4.4, 4.4]])
  nonfinite = ctf.clip_by_value(jnp.array([np.nan, np.inf, -np.inf]), -4.0, 4.0)
  np.testing.assert_array_equal(nonfinite, [np.nan, 4.0, -4.0])


@pytest.mark.parametrize("dtype", TF_INT_AND_FLOAT)
def test_tf_clip_by_value_scalar_and_tensor_bounds(dtype):
  x = jnp.arange(1, 7).reshape(2, 3).astype(dtype)

  def t(*values):  # a bound of x's shape and dtype
    return jnp.array(values).reshape(2, 3).astype(dtype)

  cases = [
    (2, 4, [[2, 2, 3], [4, 4, 4]]),
    (t(2, 2, 2, 3, 3, 3), 4, [[2, 2, 3], [4, 4, 4]]),
    (4, t(6, 6, 6, 6, 6, 6), [[4, 4, 4], [4, 5, 6]]),
    (t(2, 2, 2, 5, 5, 5), t(5, 5, 5, 7, 7, 7), [[2, 2, 3], [5, 5, 6]]),
  ]
  for lo, hi, want in cases:
    got = ctf.clip_by_value(x, lo, hi)
    assert got.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), want)


def test_tf_clip_by_value_bad_shapes():
  x = jnp.arange(6.0).reshape(2, 3, 1)
  clip = jnp.array([1.0, 2.0])  # broadcasting would make the result (2, 3, 2)
  with pytest.raises(ValueError, match=r"`clip_value_max` has shape \(2,\).*\(2, 3, 1\)"):
    ctf.clip_by_value(x, -clip, clip)
  with pytest.raises(ValueError, match="clip_value_min"):
    ctf.clip_by_value(x, clip, 10.0)
  with pytest.raises(ValueError, match=r"\(3, 2\)"):  # a larger bound
    ctf.clip_by_value(jnp.ones(2), -1.0, jnp.ones((3, 2)))
  with pytest.raises(ValueError, match=r"\(1, 2, 3\)"):  # one more axis
    ctf.clip_by_value(jnp.ones((2, 3)), -1.0, jnp.ones((1, 2, 3)))
  with pytest.raises(ValueError, match=r"\(4,\)"):  # not broadcastable at all
    ctf.clip_by_value(jnp.ones((2, 3)), -1.0, jnp.ones(4))
  # Bounds that broadcast without changing the shape are fine.
  got = ctf.clip_by_value([[-1.0, 0.0, 10.0], [-1.0, 0.0, 10.0]], [[2.0], [1.0]], 100.0)
  np.testing.assert_array_equal(got, [[2, 2, 10], [1, 1, 10]])
  assert ctf.clip_by_value(jnp.ones((2, 3)), -1.0, jnp.array([0.5, 1.5, 2.0])).shape == (2, 3)


def test_tf_clip_by_value_empty_and_gradient():
  empty = jnp.zeros((7, 0))
  for lo, hi in [(empty, empty), (1.0, 1.0), (empty, 1.0), (1.0, empty)]:
    assert ctf.clip_by_value(empty, lo, hi).shape == (7, 0)
  for lo, hi in [(0.5, 3.5), (jnp.full(4, 0.5), jnp.full(4, 3.5))]:
    grad = jax.grad(lambda x, lo=lo, hi=hi: ctf.clip_by_value(x, lo, hi).sum())
    np.testing.assert_array_equal(grad(jnp.array([1.0, 2.0, 3.0, 4.0])), [1, 1, 1, 0])


def test_tf_clip_by_value_converts_like_tensorflow():
  got = ctf.clip_by_value([-3.0, 0.5, 3.0], -1.0, 1.0)  # a list of floats: float32
  assert got.dtype == jnp.float32 and not got.weak_type
  np.testing.assert_array_equal(got, [-1, 0.5, 1])
  got = ctf.clip_by_value([-3, 0, 3], -1, 1)  # a list of ints: int32
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, [-1, 0, 1])
  assert ctf.clip_by_value(3.0, -1.0, 1.0).shape == ()
  # TensorFlow cannot convert a Python float to an integer tensor's dtype.
  with pytest.raises(TypeError, match="clip_value_min.*int32"):
    ctf.clip_by_value([-3, 0, 3], -1.5, 1)
  with pytest.raises(TypeError, match="clip_value_max"):
    ctf.clip_by_value(jnp.arange(3), -1, [1.0, 1.0, 1.0])
  # A NumPy float bound is cast, as in TensorFlow.
  np.testing.assert_array_equal(ctf.clip_by_value([-3, 0, 3], np.float32(-1.5), 1), [-1, 0, 1])
  with pytest.raises(ValueError, match="not rectangular"):
    ctf.clip_by_value([[1.0], [2.0, 3.0]], 0.0, 1.0)
  with pytest.raises(TypeError, match="complex"):
    ctf.clip_by_value(jnp.array([1 + 1j]), 0, 1)


def test_tf_clip_by_norm_cases():
  x = jnp.array([[-3.0, 0.0, 0.0], [4.0, 0.0, 0.0]])  # norm 5
  clipped = [[-2.4, 0, 0], [3.2, 0, 0]]
  np.testing.assert_allclose(ctf.clip_by_norm(x, 4.0), clipped, rtol=1e-6)
  np.testing.assert_allclose(ctf.clip_by_norm(x, jnp.array(4.0)), clipped, rtol=1e-6)
  np.testing.assert_allclose(ctf.clip_by_norm(x, 6.0), x, rtol=1e-6)  # not clipped
  np.testing.assert_array_equal(ctf.clip_by_norm(jnp.zeros((2, 3)), 6.0), jnp.zeros((2, 3)))
  y = jnp.array([[-3.0, 0.0, 0.0], [4.0, 0.0, 3.0]])
  np.testing.assert_allclose(ctf.clip_by_norm(y, 4.0, [0]), [[-2.4, 0, 0], [3.2, 0, 3]], rtol=1e-6)
  np.testing.assert_allclose(ctf.clip_by_norm(y, 4.0, [1]), [[-3, 0, 0], [3.2, 0, 2.4]], rtol=1e-6)
  np.testing.assert_allclose(ctf.clip_by_norm(y, 6.0, [1]), y, rtol=1e-6)
  # The gradient at zero is finite (TensorFlow's two-sided `where`).
  grad = jax.grad(lambda x: ctf.clip_by_norm(x, 1.0).sum())(jnp.zeros(3))
  np.testing.assert_array_equal(grad, [1, 1, 1])


def test_tf_clip_by_norm_shapes_and_conversion():
  with pytest.raises(ValueError, match=r"`clip_norm` has shape \(2,\).*\(2, 3, 1\)"):
    ctf.clip_by_norm(jnp.ones((2, 3, 1)), jnp.array([1.0, 2.0]))
  with pytest.raises(ValueError, match="clip_norm"):
    ctf.clip_by_norm(jnp.ones((2, 3)), [1.0, 2.0, 3.0, 4.0])
  # A threshold of a shape that broadcasts to t's: one threshold per column.
  t = [[3.0, 4.0, 0.0], [0.0, 1.0, 2.0]]
  got = ctf.clip_by_norm(t, [1.0, 2.0, 3.0])
  norm = math.sqrt(30)
  np.testing.assert_allclose(got, np.array(t) * [1, 2, 3] / [norm, norm, norm], rtol=1e-6)
  np.testing.assert_allclose(ctf.clip_by_norm([3.0, 4.0], 1.0), [0.6, 0.8], rtol=1e-6)
  assert float(ctf.clip_by_norm(5.0, 1.0)) == 1.0
  with pytest.raises(TypeError, match="floating-point"):
    ctf.clip_by_norm([3, 4], 1.0)


def _tf_x0_x1():
  x0 = jnp.array([[-2.0, 0.0, 0.0], [4.0, 0.0, 0.0]])
  x1 = jnp.array([1.0, -2.0])  # global norm of x0 and x1: sqrt(4 + 16 + 1 + 4) = 5
  return x0, x1


def test_tf_clip_by_global_norm_cases():
  x0, x1 = _tf_x0_x1()
  want = [[[-1.6, 0, 0], [3.2, 0, 0]], [0.8, -1.6]]  # scaled by 4 / 5
  for t_list in ([x0, x1], (x0, x1)):
    for clip_norm in (4.0, jnp.array(4.0)):
      clipped, norm = ctf.clip_by_global_norm(t_list, clip_norm)
      assert isinstance(clipped, list)  # a list, as TensorFlow returns
      np.testing.assert_allclose(norm, 5.0, rtol=1e-6)
      for c, w in zip(clipped, want):
        np.testing.assert_allclose(c, w, rtol=1e-6)
  clipped, norm = ctf.clip_by_global_norm((x0, None, x1, None), 4.0)
  assert clipped[1] is None and clipped[3] is None
  np.testing.assert_allclose(clipped[2], want[1], rtol=1e-6)
  clipped, norm = ctf.clip_by_global_norm([x0, x1], 6.0)  # not clipped
  np.testing.assert_allclose(clipped[0], x0, rtol=1e-6)
  np.testing.assert_allclose(norm, 5.0, rtol=1e-6)
  clipped, norm = ctf.clip_by_global_norm([jnp.zeros((2, 3)), jnp.zeros(2)], 6.0)
  assert float(norm) == 0.0 and not np.any(np.asarray(clipped[0]))
  x0_inf = x0.at[0, 2].set(np.inf)  # an inf global norm: every output NaN
  clipped, norm = ctf.clip_by_global_norm([x0_inf, x1], 6.0)
  assert float(norm) == np.inf
  assert np.all(np.isnan(clipped[0])) and np.all(np.isnan(clipped[1]))


def test_tf_global_norm_converts_like_tensorflow():
  # Each element of t_list is one tensor: [[3, 4]] is one of shape (2,).
  for t_list in ([[3.0, 4.0]], [3.0, 4.0], ([3.0], [4.0]), [[3.0], 4.0, None]):
    norm = ctf.global_norm(t_list)
    assert norm.dtype == jnp.float32 and not norm.weak_type and float(norm) == 5.0
  clipped, _ = ctf.clip_by_global_norm([[3.0, 4.0]], 1.0)
  assert len(clipped) == 1 and clipped[0].shape == (2,)
  clipped, _ = ctf.clip_by_global_norm([[3.0], 4.0, None], 1.0)
  assert [None if c is None else c.shape for c in clipped] == [(1,), (), None]
  np.testing.assert_allclose(ctf.global_norm([[[1.0, 2.0], [3.0, 4.0]]]), math.sqrt(30))
  assert float(ctf.global_norm([[]])) == 0.0
  # A list of arrays is packed into one tensor, as TensorFlow packs it.
  clipped, _ = ctf.clip_by_global_norm([[jnp.array([3.0]), jnp.array([4.0])]], 1.0)
  assert clipped[0].shape == (2, 1)
  with pytest.raises(ValueError, match=r"t_list\[0\].*not rectangular"):
    ctf.global_norm([[[1.0], [2.0, 3.0]]])
  with pytest.raises(ValueError, match="not rectangular"):
    ctf.global_norm([[jnp.ones(2), jnp.ones(3)]])
  # TensorFlow's l2_loss takes floating tensors only.
  for bad in ([[3, 4]], [jnp.ones(2), jnp.arange(3)], [[True]]):
    with pytest.raises(TypeError, match="TensorFlow's global norm"):
      ctf.global_norm(bad)
  with pytest.raises(TypeError, match="pytree"):
    ctf.global_norm([{"a": jnp.ones(2)}])
  # With a given norm nothing is measured: an integer tensor is scaled by the
  # scale cast to its dtype (0 here), as in TensorFlow.
  clipped, norm = ctf.clip_by_global_norm([[3, 4]], 1.0, use_norm=5.0)
  assert clipped[0].dtype == jnp.int32 and not np.any(np.asarray(clipped[0]))
  assert norm.dtype == jnp.float32 and not norm.weak_type


def test_tf_pytrees_and_transforms_keep_structure():
  # A dict (not accepted by TensorFlow) is walked as a pytree; Python numbers
  # in it are converted one by one, integer leaves pass through.
  clipped, norm = ctf.clip_by_global_norm({"a": [3.0, 4.0], "n": 3}, 1.0)
  assert float(norm) == 5.0 and int(clipped["n"]) == 3
  np.testing.assert_allclose([clipped["a"][0], clipped["a"][1]], [0.6, 0.8], rtol=1e-6)
  with pytest.raises(TypeError, match="complex"):
    ctf.global_norm({"z": jnp.array([1 + 1j])})
  # The transforms keep the structure of the updates, tuples included.
  updates = (jnp.array([3.0]), jnp.array([4.0]), jnp.arange(2))
  for tx in (
    ctf.clip_by_global_norm_transform(1.0),
    ctf.clip_by_norm_transform(1.0),
    ctf.clip_by_value_transform(-1.0, 1.0),
  ):
    out, _ = tx.update(updates, tx.init(updates))
    assert isinstance(out, tuple) and len(out) == 3
    np.testing.assert_array_equal(out[2], [0, 1])
    assert float(out[0][0]) < 3
  tx = ctf.clip_by_global_norm_transform(1.0)
  out, _ = tx.update({"w": [3.0, 4.0]}, tx.init(None))
  np.testing.assert_allclose([out["w"][0], out["w"][1]], [0.6, 0.8], rtol=1e-6)


# Cases of PyTorch's own tests (test/test_nn.py: test_clip_grad_norm,
# test_clip_grad_value, test_clip_grad_norm_error_if_nonfinite).

TORCH_NORM_TYPES = [0.5, 1.5, 2, 4, "inf"]


def _torch_linear_grads(weight, bias):
  return {"weight": jnp.asarray(weight, jnp.float32), "bias": jnp.asarray(bias, jnp.float32)}


def _np_norm(tree, norm_type):
  x = np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(tree)])
  p = float(norm_type)
  return np.abs(x).max() if p == math.inf else (np.abs(x) ** p).sum() ** (1 / p)


@pytest.mark.parametrize("norm_type", TORCH_NORM_TYPES)
def test_torch_clip_grad_norm_cases(norm_type):
  max_norm = 2
  grads = _torch_linear_grads(np.arange(1.0, 101).reshape(10, 10), np.ones(10) / 1000)
  clipped, norm = ctorch.clip_grad_norm(grads, max_norm, norm_type)
  np.testing.assert_allclose(norm, _np_norm(grads, norm_type), rtol=1e-5)
  np.testing.assert_allclose(_np_norm(clipped, norm_type), max_norm, rtol=1e-5)
  ratios = np.concatenate([np.ravel(clipped[k] / grads[k]) for k in grads])
  np.testing.assert_allclose(ratios, ratios[0], rtol=1e-6)  # one factor for all
  # Small gradients are left unchanged: the factor is clamped to exactly 1.
  small = _torch_linear_grads(np.random.default_rng(0).random((10, 10)) / 10000, np.ones(10) / 500)
  clipped, norm = ctorch.clip_grad_norm(small, max_norm, norm_type)
  np.testing.assert_allclose(norm, _np_norm(small, norm_type), rtol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, clipped, small)
  # A single array is a pytree of one leaf, like PyTorch's single tensor.
  g = jnp.arange(1.0, 101).reshape(10, 10)
  single, _ = ctorch.clip_grad_norm(g, max_norm, norm_type)
  listed, _ = ctorch.clip_grad_norm([g], max_norm, norm_type)
  np.testing.assert_array_equal(single, listed[0])


def test_torch_clip_grad_value_cases():
  clip_value = 2.5
  grad_w, grad_b = jnp.arange(-50.0, 50).reshape(10, 10) / 5, jnp.ones(10) * 2
  for grads in ([grad_w, grad_b], [grad_w, None]):
    clipped = ctorch.clip_grad_value(grads, clip_value)
    for c in clipped:
      if c is not None:
        assert float(c.max()) <= clip_value and float(c.min()) >= -clip_value
    assert (clipped[1] is None) == (grads[1] is None)
  np.testing.assert_array_equal(
    ctorch.clip_grad_value(grad_w, clip_value), ctorch.clip_grad_value([grad_w], clip_value)[0]
  )


# PyTorch's table of test_clip_grad_norm_error_if_nonfinite, in float32 (jax
# runs without float64 by default): its 2e22 (finite for every order) becomes
# 2e9, and its 2e200 (whose squares overflow and whose inverse squares
# underflow) becomes 2e25.
_POS = [0.1, 1, 2, 3.5, math.inf]
_NEG = [-0.1, -1, -2, -3.5]
_EXCEPT_0 = _POS + _NEG
_ALL = [*_EXCEPT_0, 0]
TORCH_NONFINITE_TABLE = [
  # one_elem, prefix_param, scalars, orders with a non-finite norm, finite ones
  (False, False, [math.inf, -math.inf], _EXCEPT_0, [0]),
  (False, True, [math.inf, -math.inf], _POS, [*_NEG, 0]),
  (True, False, [math.inf, -math.inf], _POS, [*_NEG, 0]),
  (True, True, [math.inf, -math.inf], _POS, [*_NEG, 0]),
  (False, False, [math.nan], _EXCEPT_0, [0]),
  (False, True, [math.nan], _EXCEPT_0, [0]),
  (True, False, [math.nan], _EXCEPT_0, [0]),
  (True, True, [math.nan], _EXCEPT_0, [0]),
  (False, False, [2e9, -2e9], [], _ALL),
  (False, True, [2e9, -2e9], [], _ALL),
  (True, False, [2e9, -2e9], [], _ALL),
  (True, True, [2e9, -2e9], [], _ALL),
  (False, False, [2e25, -2e25], [3.5, 2, -2, -3.5], [math.inf, 1, 0.1, 0, -1, -0.1]),
  (False, True, [2e25, -2e25], [3.5, 2], [*_NEG, math.inf, 1, 0.1, 0]),
  (True, False, [2e25, -2e25], [3.5, 2], [*_NEG, math.inf, 1, 0.1, 0]),
  (True, True, [2e25, -2e25], [3.5, 2], [*_NEG, math.inf, 1, 0.1, 0]),
]


def torch_nonfinite_grads(scalar, one_elem, prefix_param):
  """The gradients of PyTorch's test: `scalar` in one or all of 10 entries."""
  grad = np.zeros(10, np.float32) if one_elem else np.full(10, scalar, np.float32)
  if one_elem:
    grad[1] = scalar
  return [np.ones(1, np.float32), grad] if prefix_param else [grad]


def torch_nonfinite_cases():
  for one_elem, prefix, scalars, nonfinite, finite in TORCH_NONFINITE_TABLE:
    for scalar in scalars:
      for norm_type in nonfinite:
        yield torch_nonfinite_grads(scalar, one_elem, prefix), norm_type, True
      for norm_type in finite:
        yield torch_nonfinite_grads(scalar, one_elem, prefix), norm_type, False


def test_torch_error_if_nonfinite_table():
  for grads, norm_type, nonfinite in torch_nonfinite_cases():
    case = (grads, norm_type)
    _, norm = ctorch.clip_grad_norm(grads, 1, norm_type)  # never raises by default
    assert bool(np.isfinite(norm)) != nonfinite, case
    if nonfinite:
      # The regex of PyTorch's test.
      with pytest.raises(RuntimeError, match=f"The total norm of order {float(norm_type)} for"):
        ctorch.clip_grad_norm(grads, 1, norm_type=norm_type, error_if_nonfinite=True)
    else:
      ctorch.clip_grad_norm(grads, 1, norm_type=norm_type, error_if_nonfinite=True)


def _float_error(value):
  try:
    float(value)
  except (TypeError, ValueError) as e:
    return type(e), str(e)
  raise AssertionError(f"float({value!r}) did not raise")


def test_torch_error_messages_begin_with_pytorchs():
  message = (
    "The total norm of order 2.0 for gradients from `parameters` is non-finite, so it cannot"
    " be clipped. To disable this error and scale the gradients by the non-finite norm anyway,"
    " set `error_if_nonfinite=False`"
  )
  with pytest.raises(RuntimeError) as info:
    ctorch.get_total_norm([jnp.array([1.0, jnp.inf])], error_if_nonfinite=True)
  assert str(info.value).startswith(message)
  err, _ = checkify.checkify(jax.jit(lambda g: ctorch.get_total_norm(g, error_if_nonfinite=True)))(
    [jnp.array([jnp.nan])]
  )
  with pytest.raises(checkify.JaxRuntimeError) as info:
    err.throw()
  assert str(info.value).startswith(message)
  # Arguments go through `float`, as in PyTorch, whose errors come first.
  for bad in ("euclid", None, [2.0], object()):
    error, text = _float_error(bad)
    for call in (
      lambda bad=bad: ctorch.get_total_norm([jnp.ones(2)], bad),
      lambda bad=bad: ctorch.clip_grad_norm_transform(1.0, bad),
      lambda bad=bad: ctorch.clip_grad_norm([jnp.ones(2)], bad),
      lambda bad=bad: ctorch.clip_grad_value([jnp.ones(2)], bad),
    ):
      with pytest.raises(error) as info:
        call()
      assert str(info.value).startswith(text), (str(info.value), text)
  for call in (
    lambda: ctorch.clip_grad_norm([jnp.ones(2)], jnp.ones(2)),
    lambda: ctorch.clip_grad_value([jnp.ones(2)], jnp.ones(2)),
    lambda: jax.jit(lambda c: ctorch.clip_grad_value([jnp.ones(2)], c))(jnp.ones(2)),
  ):
    with pytest.raises(ValueError, match="^only one element tensors can be converted"):
      call()
  # What PyTorch accepts: numeric strings, one-element arrays, bools.
  g = [jnp.array([3.0, 4.0])]
  ref, _ = ctorch.clip_grad_norm(g, 1.0, 2.0)
  for max_norm, norm_type in [("1.0", "2"), (jnp.ones(1), 2), (1.0, jnp.array(2.0))]:
    np.testing.assert_array_equal(ctorch.clip_grad_norm(g, max_norm, norm_type)[0][0], ref[0])
  assert float(ctorch.get_total_norm(g, True)) == 7.0  # float(True) == 1: the 1-norm
  with pytest.raises(TypeError, match=r"\['w'\]"):
    ctorch.clip_grad_norm({"w": 3.0}, 1.0)


# Cases of Keras' own tests (keras/src/optimizers/optimizer_test.py).


def _keras_clip(grads, **kwargs):
  tx = ckeras.with_clipping(optax.identity(), **kwargs)
  return tx.update(grads, tx.init(grads))[0]


def test_keras_optimizer_test_cases():
  grad = [jnp.array([100.0, 100.0])]
  np.testing.assert_allclose(_keras_clip(grad, clipnorm=1)[0], [2**0.5 / 2] * 2, rtol=1e-6)
  np.testing.assert_array_equal(_keras_clip(grad, clipvalue=1)[0], [1.0, 1.0])
  grad = np.array([50.0, 100.0], np.float32)
  clipped = _keras_clip([jnp.asarray(grad)], global_clipnorm=1)[0]
  np.testing.assert_allclose(clipped, grad / np.linalg.norm(grad), rtol=1e-6)
  for kwargs in ({"clipnorm": 0.1, "clipvalue": 0.1}, {"clipnorm": 0.1, "global_clipnorm": 0.1}):
    with pytest.raises(
      ValueError, match="Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can"
    ):
      ckeras.with_clipping(optax.sgd(1.0), **kwargs)
  # The whole of Keras' message comes first; 0 counts as set, as in Keras.
  with pytest.raises(ValueError) as info:
    ckeras.with_clipping(optax.sgd(1.0), clipnorm=0, clipvalue=0.5)
  assert str(info.value).startswith(
    "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set. Received:"
    " clipnorm=0, clipvalue=0.5, global_clipnorm=None"
  )


def test_keras_global_clipnorm_divides_in_python():
  # Keras computes 1.0 / global_clipnorm in Python: below the threshold the
  # scale is float32(c) * float32(1 / c), not float32(c) * (1 / float32(c)).
  g = jnp.array([0.01, -0.02, 0.03])
  for c in (1.05, 1.15, 1.85):
    scale = np.float32(c) * np.float32(1.0 / c)
    got = _keras_clip([g], global_clipnorm=c)[0]
    np.testing.assert_array_equal(got, np.asarray(g) * scale)


@pytest.mark.parametrize("t_list", [lambda d: d.values(), lambda d: map(jnp.asarray, d.values())])
def test_tf_t_list_must_be_a_sequence(t_list):
  # TensorFlow raises for a dict view or an iterator; skipped as an opaque
  # leaf, it would give a norm of 0 and no clipping.
  d = {"a": jnp.array([3.0, 4.0])}
  with pytest.raises(TypeError, match="^t_list should be a sequence"):
    ctf.global_norm(t_list(d))
  with pytest.raises(TypeError, match="^t_list should be a sequence"):
    ctf.clip_by_global_norm(t_list(d), 1.0)


def test_tf_gradients_at_ties_go_where_tensorflow_sends_them():
  # TensorFlow's gradients (ClipByValue, Maximum, Minimum) at a tie, from
  # TensorFlow 2.21 on CPU.
  x = jnp.array([0.0, 6.0, 3.0])
  grad = jax.grad(lambda x: jnp.sum(ctf.clip_by_value(x, 0.0, 6.0)))(x)
  np.testing.assert_array_equal(grad, [1.0, 1.0, 1.0])
  x = jnp.array([3.0, 4.0])  # norm 5, the threshold itself
  grad = jax.grad(lambda x: jnp.sum(ctf.clip_by_norm(x, 5.0)))(x)
  np.testing.assert_allclose(grad, [0.16, -0.12], atol=1e-6)
  grad = jax.grad(lambda x: jnp.sum(ctf.clip_by_global_norm([x], 5.0)[0][0]))(x)
  np.testing.assert_allclose(grad, [0.16, -0.12], atol=1e-6)


def test_tf_clip_by_value_keeps_tensorflow_values():
  x = jnp.array([-3.0, 0.5, jnp.nan, 9.0])
  np.testing.assert_array_equal(ctf.clip_by_value(x, -1.0, 1.0), [-1.0, 0.5, np.nan, 1.0])
  # Bounds the wrong way round: TensorFlow's max(min(t, hi), lo) gives lo.
  np.testing.assert_array_equal(ctf.clip_by_value(x, 2.0, 1.0), [2.0, 2.0, np.nan, 2.0])


@pytest.mark.parametrize("axes", [np.array([1]), jnp.array([1]), np.int64(1), [1]])
def test_tf_clip_by_norm_takes_numpy_and_jax_axes(axes):
  t = jnp.array([[3.0, 4.0], [0.3, 0.4]])
  np.testing.assert_allclose(ctf.clip_by_norm(t, 1.0, axes), [[0.6, 0.8], [0.3, 0.4]], rtol=1e-6)


def test_tf_clip_by_average_norm():
  # TensorFlow 1's formula, in NumPy float32 (test_compat_tf.py checks it
  # against tf.compat.v1.clip_by_average_norm).
  t = np.array([[1.0, 2.0], [3.0, 4.0]], F32)  # norm sqrt(30), 4 entries
  np.testing.assert_array_equal(ctf.clip_by_average_norm(t, 10.0), t)
  c = F32(0.5)
  expected = t * c * np.minimum(F32(1) / np.sqrt(F32(30)) * F32(4), F32(1) / c)
  np.testing.assert_allclose(ctf.clip_by_average_norm(t, 0.5), expected, rtol=1e-6)
  np.testing.assert_array_equal(ctf.clip_by_average_norm(np.zeros(3, F32), 1.0), np.zeros(3))
  with pytest.raises(TypeError, match="float32"):
    ctf.clip_by_average_norm(np.ones(2, np.float16), 1.0)
  # TensorFlow 2.21's gradients, finite at zero (rsqrt(0) is not differentiated).
  w = jnp.array([0.3, -0.7])
  for t0, want in (([0.0, 0.0], [0.3, -0.7]), ([3.0, 4.0], [0.52800006, -0.39599997])):
    got = jax.grad(lambda t: jnp.sum(ctf.clip_by_average_norm(t, 2.5) * w))(jnp.array(t0))
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_torch_clip_grad_value_raises_like_pytorch():
  # PyTorch 2.13's messages for a clamp it cannot apply.
  with pytest.raises(RuntimeError, match="^value cannot be converted to type c10::Half without"):
    ctorch.clip_grad_value([jnp.ones(2, jnp.float16)], 70000.0)
  with pytest.raises(RuntimeError, match="^value cannot be converted to type float without"):
    ctorch.clip_grad_value([jnp.ones(2)], 1e39)
  with pytest.raises(NotImplementedError, match="^clamp is not supported for complex types"):
    ctorch.clip_grad_value([jnp.array([3 + 4j])], 1.0)


def test_torch_functions_take_foreach():
  g = [jnp.array([3.0, 4.0])]
  for foreach in (None, False, True):
    np.testing.assert_array_equal(ctorch.clip_grad_value(g, 1.0, foreach=foreach)[0], [1.0, 1.0])
    clipped, norm = ctorch.clip_grad_norm(g, 10.0, foreach=foreach)
    assert float(norm) == 5.0 and float(ctorch.get_total_norm(g, foreach=foreach)) == 5.0
    np.testing.assert_array_equal(
      ctorch.clip_grads_with_norm(g, 10.0, norm, foreach=foreach)[0], clipped[0]
    )


@pytest.mark.parametrize("value", [jnp.float32(1.0), np.float64(1.0), np.array(1.0), 1])
def test_keras_takes_numpy_and_jax_scalars(value):
  tx = ckeras.with_clipping(optax.sgd(1.0), clipnorm=value)
  g = {"a": jnp.array([3.0, 4.0])}
  out, _ = tx.update(g, tx.init(g))
  np.testing.assert_allclose(out["a"], [-0.6, -0.8], rtol=1e-6)


def test_torch_infinite_and_empty_edge_cases():
  # Outcomes of PyTorch 2.13: clamping to an infinite bound is allowed (inf
  # leaves the gradients as they are, -inf sets every non-NaN entry to -inf),
  # float16 included; a total norm that is not 0-d is an error; an inf or
  # -inf norm of an empty gradient has no identity and is an error.
  g = [jnp.array([-3.0, 0.5, 2.0, jnp.inf, -jnp.inf, jnp.nan])]
  np.testing.assert_array_equal(ctorch.clip_grad_value(g, math.inf)[0], g[0])
  low = ctorch.clip_grad_value(g, -math.inf)[0]
  np.testing.assert_array_equal(low, [-np.inf] * 5 + [np.nan])
  half = [jnp.array([1.0, 60000.0, -1.0], jnp.float16)]
  np.testing.assert_array_equal(ctorch.clip_grad_value(half, math.inf)[0], half[0])
  for total in (jnp.array([5.0, 0.5]), jnp.array([5.0]), jnp.array([[5.0]])):
    text = f"scalar tensor expected to be 0 dim but it has {total.ndim} dimensions and {total.size} elements."
    with pytest.raises(RuntimeError, match="^" + re.escape(text)):
      ctorch.clip_grads_with_norm([jnp.array([3.0, 4.0])], 1.0, total)
  empty = [jnp.zeros((0,)), jnp.array([1.0, 2.0])]
  cases = [
    (math.inf, None, "_foreach_norm cannot compute the infinity norm on an empty tensor"),
    (math.inf, False, "linalg.vector_norm cannot compute the inf norm on an empty tensor"),
    (-math.inf, None, "linalg.vector_norm cannot compute the -inf norm on an empty tensor"),
  ]
  for norm_type, foreach, text in cases:
    with pytest.raises(RuntimeError, match="^" + re.escape(text)):
      ctorch.get_total_norm(empty, norm_type, foreach=foreach)
    with pytest.raises(RuntimeError, match="^" + re.escape(text)):
      ctorch.clip_grad_norm(empty, 1.0, norm_type, foreach=foreach)
  assert ctorch.get_total_norm(empty, 2.0) == jnp.sqrt(jnp.float32(5.0))
  assert float(ctorch.get_total_norm([], math.inf)) == 0.0
