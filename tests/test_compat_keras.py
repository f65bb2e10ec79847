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
  # Each step may differ by 1 ulp; over the 5 steps, by 2.
  maxulp = 2 if "clipnorm" in kwargs else 1
  for g, w in zip(got, want):
    assert_ulp(g, w, maxulp)


def test_clipping_arguments_are_exclusive_like_keras():
  with pytest.raises(ValueError, match="Only one"):
    keras.optimizers.SGD(clipnorm=1.0, global_clipnorm=1.0)
  with pytest.raises(ValueError, match="Only one"):
    with_clipping(optax.sgd(0.1), clipnorm=1.0, global_clipnorm=1.0)
