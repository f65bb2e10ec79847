"""Parity of `jaxclip.compat.keras.with_clipping` with Keras 3 optimizers."""

import os

# Keras picks its backend at import; the JAX backend needs no TensorFlow.
os.environ.setdefault("KERAS_BACKEND", "jax")

import pytest

keras = pytest.importorskip(
  "keras", minversion="3.0", reason="parity tests need Keras 3: pip install 'jaxclip[parity]'"
)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxclip.compat.keras import with_clipping  # noqa: E402
from tests._parity import assert_ulp, random_tensors  # noqa: E402

SHAPES = [(3, 4), (5,), (2, 3, 2)]
STEPS = 5


def _keras_run(kwargs, params, grads_per_step):
  variables = [keras.Variable(p) for p in params]
  opt = keras.optimizers.SGD(learning_rate=0.1, **kwargs)
  for grads in grads_per_step:
    opt.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in grads], variables))
  return [np.asarray(keras.ops.convert_to_numpy(v)) for v in variables]


def _optax_run(kwargs, params, grads_per_step):
  tx = with_clipping(optax.sgd(0.1), **kwargs)
  params = [jnp.asarray(p) for p in params]
  state = tx.init(params)
  for grads in grads_per_step:
    updates, state = tx.update([jnp.asarray(g) for g in grads], state, params)
    params = optax.apply_updates(params, updates)
  return [np.asarray(p) for p in params]


@pytest.mark.parametrize(
  "kwargs",
  [
    {"clipnorm": 1.0},
    {"clipnorm": 0.05},
    {"clipvalue": 0.5},
    {"global_clipnorm": 1.0},
    {"global_clipnorm": 100.0},
    {"clipnorm": 0.0},  # 0 disables clipping in Keras
    {},
  ],
)
def test_sgd_matches_keras(kwargs):
  params = random_tensors(0, SHAPES, np.float32)
  grads_per_step = [random_tensors(10 + k, SHAPES, np.float32, scale=k + 1.0) for k in range(STEPS)]
  grads_per_step[2][1][:] = 0.0  # a zero gradient in the middle
  want = _keras_run(kwargs, params, grads_per_step)
  got = _optax_run(kwargs, params, grads_per_step)
  # Keras on the JAX backend divides (clipnorm) with XLA:CPU's approximate
  # reciprocal; with_clipping divides exactly, as Keras on TensorFlow does.
  # Each step may differ by 1 ulp; over the 5 steps, by 2. On the TensorFlow
  # backend (Keras keeps the backend of its first import, which a TensorFlow
  # test earlier in the session may have made), TensorFlow sums the global
  # norm in its own order: 2 ulps there too.
  norm_based = "clipnorm" in kwargs or (
    "global_clipnorm" in kwargs and keras.backend.backend() != "jax"
  )
  maxulp = 2 if norm_based else 1
  for g, w in zip(got, want):
    assert_ulp(g, w, maxulp)


def test_clipping_arguments_are_exclusive_like_keras():
  with pytest.raises(ValueError, match="Only one"):
    keras.optimizers.SGD(clipnorm=1.0, global_clipnorm=1.0)
  with pytest.raises(ValueError, match="Only one"):
    with_clipping(optax.sgd(0.1), clipnorm=1.0, global_clipnorm=1.0)


@pytest.mark.parametrize("clipnorm", [0.55, 1.05, 1.15, 1.85, 3.4])
def test_global_clipnorm_reciprocal_matches_keras(clipnorm):
  # For these thresholds float32(1 / c) differs from 1 / float32(c): Keras
  # divides in Python, and so does with_clipping. Below the threshold, the
  # scale c * (1 / c) then decides the last bit.
  params = random_tensors(1, SHAPES, np.float32)
  grads = [random_tensors(2, SHAPES, np.float32, scale=0.01)]
  kwargs = {"global_clipnorm": clipnorm}
  for g, w in zip(_optax_run(kwargs, params, grads), _keras_run(kwargs, params, grads)):
    assert_ulp(g, w, 0)


def test_optimizer_test_cases_match_keras():
  # The inputs of Keras' optimizer_test (test_clip_norm, test_clip_value,
  # test_global_clip_norm), through the optimizer's own clipping.
  cases = [
    ({"clipnorm": 1}, [100.0, 100.0]),
    ({"clipvalue": 1}, [100.0, 100.0]),
    ({"global_clipnorm": 1}, [50.0, 100.0]),
  ]
  for kwargs, grad in cases:
    grad = np.array(grad, np.float32)
    want = keras.optimizers.SGD(**kwargs)._clip_gradients([keras.ops.convert_to_tensor(grad)])
    tx = with_clipping(optax.identity(), **kwargs)
    got = tx.update([jnp.asarray(grad)], tx.init(None))[0]
    assert_ulp(got[0], np.asarray(want[0]), 1)


def test_error_message_begins_with_keras():
  for kwargs in (
    {"clipnorm": 0.1, "clipvalue": 0.1},
    {"clipnorm": 0.1, "global_clipnorm": 0.1},
    {"clipnorm": 0, "clipvalue": 1.0, "global_clipnorm": 2},
  ):
    with pytest.raises(ValueError) as want:
      keras.optimizers.SGD(learning_rate=1.0, **kwargs)
    with pytest.raises(ValueError) as got:
      with_clipping(optax.sgd(1.0), **kwargs)
    assert str(got.value).startswith(str(want.value)), (str(got.value), str(want.value))


@pytest.mark.parametrize(
  "kwargs", [{"clipnorm": 0.5}, {"global_clipnorm": 0.5}, {"clipvalue": 0.2}]
)
def test_gradient_accumulation_matches_keras(kwargs):
  # Keras clips the averaged gradients; so does with_clipping inside
  # optax.MultiSteps.
  steps = 2
  params = random_tensors(3, SHAPES, np.float32)
  grads_per_step = [random_tensors(20 + k, SHAPES, np.float32, scale=2.0) for k in range(4)]
  variables = [keras.Variable(p) for p in params]
  opt = keras.optimizers.SGD(learning_rate=0.1, gradient_accumulation_steps=steps, **kwargs)
  for grads in grads_per_step:
    opt.apply_gradients(zip([keras.ops.convert_to_tensor(g) for g in grads], variables))
  tx = optax.MultiSteps(with_clipping(optax.sgd(0.1), **kwargs), steps)
  ours = [jnp.asarray(p) for p in params]
  state = tx.init(ours)
  for grads in grads_per_step:
    updates, state = tx.update([jnp.asarray(g) for g in grads], state, ours)
    ours = optax.apply_updates(ours, updates)
  for g, v in zip(ours, variables):
    assert_ulp(g, np.asarray(keras.ops.convert_to_numpy(v)), 2)
