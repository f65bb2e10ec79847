"""Tests of `jaxclip.compat` that need neither TensorFlow, PyTorch nor Keras."""

import math

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


def test_torch_errors():
  with pytest.raises(ValueError, match="norm_type"):
    ctorch.get_total_norm([jnp.ones(2)], "euclid")
  with pytest.raises(ValueError, match="norm_type"):
    ctorch.clip_grad_norm_transform(1.0, "two")
  with pytest.raises(RuntimeError, match="non-finite"):
    ctorch.get_total_norm([jnp.array([jnp.nan])], error_if_nonfinite=True)


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
