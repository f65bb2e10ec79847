"""Tests of adaptive gradient clipping (`jaxclip._agc`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip


def _params_and_grads():
  keys = jax.random.split(jax.random.key(3), 6)
  params = {
    "dense": jax.random.normal(keys[0], (8, 4)),
    "conv": jax.random.normal(keys[1], (3, 3, 2, 4)),
    "bias": jnp.zeros((4,)),
  }
  grads = {
    "dense": 5.0 * jax.random.normal(keys[2], (8, 4)),
    "conv": 0.01 * jax.random.normal(keys[3], (3, 3, 2, 4)),
    "bias": jax.random.normal(keys[4], (4,)),
  }
  return params, grads


def test_matches_optax():
  params, grads = _params_and_grads()
  tx = jaxclip.adaptive_grad_clip(0.1)
  ours, state = tx.update(grads, tx.init(params), params)
  theirs, _ = optax.adaptive_grad_clip(0.1).update(grads, optax.EmptyState(), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), ours, theirs)
  assert state.norm.shape == (3,) and bool(jnp.any(state.clipped))


def test_unit_norms_bounded_by_ratio():
  params, grads = _params_and_grads()
  tx = jaxclip.adaptive_grad_clip(0.1, eps=1e-3)
  out, _ = tx.update(grads, tx.init(params), params)
  for name in params:
    g = jaxclip.unitwise_norm(out[name])
    w = jnp.maximum(jaxclip.unitwise_norm(params[name]), 1e-3)
    assert bool(jnp.all(g <= 0.1 * w * (1 + 1e-5)))


def test_needs_params():
  params, grads = _params_and_grads()
  tx = jaxclip.adaptive_grad_clip(0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update(grads, tx.init(params))


def test_bad_arguments():
  with pytest.raises(ValueError, match="clipping"):
    jaxclip.adaptive_grad_clip(-1.0)
  with pytest.raises(ValueError, match="eps"):
    jaxclip.adaptive_grad_clip(0.1, eps=float("nan"))


def test_unitwise_clip_matches_optax_and_checks_shapes():
  g = jax.random.normal(jax.random.key(4), (5, 3))
  n = jaxclip.unitwise_norm(g)
  m = jnp.full_like(n, 0.5)
  np.testing.assert_allclose(
    jaxclip.unitwise_clip(n, m, g), optax.transforms.unitwise_clip(n, m, g), rtol=1e-6
  )
  with pytest.raises(ValueError, match="shape"):
    jaxclip.unitwise_clip(n[:1], m, g)


def test_params_must_match_updates():
  p = jnp.ones((2, 2))
  tx = jaxclip.adaptive_grad_clip(0.1)
  with pytest.raises(ValueError, match="the leaves of the updates"):
    tx.update({"a": p, "b": p}, tx.init({"a": p}), {"a": p})


def test_integer_params_and_gradients_count_as_numbers():
  # As in optax: an integer parameter's norm is that of its values, and an
  # integer gradient given to `unitwise_clip` comes back clipped, as floats.
  g, p = {"b": jnp.array([3.0, 4.0])}, {"b": jnp.array([1, 0])}
  tx = jaxclip.adaptive_grad_clip(0.1)
  out, _ = tx.update(g, tx.init(p), p)
  theirs, _ = optax.adaptive_grad_clip(0.1).update(g, optax.EmptyState(), p)
  np.testing.assert_allclose(out["b"], theirs["b"], rtol=1e-6)
  clipped = jaxclip.unitwise_clip(jnp.full((2, 1), 5.0), jnp.ones((2, 1)), jnp.array([[3], [4]]))
  assert jnp.issubdtype(clipped.dtype, jnp.floating)
  np.testing.assert_allclose(clipped, [[0.6], [0.8]], rtol=1e-6)


def test_eps_is_not_a_schedule():
  with pytest.raises(TypeError, match="schedule"):
    jaxclip.adaptive_grad_clip(0.1, eps=lambda step: 1e-3)


@pytest.mark.parametrize(
  "eps,scale",
  [(0.0, 1.0), (1e-3, 1e36)],  # a zero parameter norm with eps=0; a ratio beyond float32
)
def test_a_finite_gradient_with_an_infinite_ratio_is_clipped(eps, scale):
  """A finite unit gradient whose ratio to max(||w||, eps) is infinite is
  clipped to (about) 0, as optax does, not passed through as a non-finite
  gradient is; a zero gradient over zero parameters stays zero."""
  params = {"w": jnp.zeros((2, 1)), "b": jnp.zeros((2,))}
  grads = {"w": scale * jnp.array([[3.0], [4.0]]), "b": jnp.zeros((2,))}
  tx = jaxclip.adaptive_grad_clip(0.01, eps=eps)
  out, state = tx.update(grads, tx.init(params), params)
  expected, _ = optax.adaptive_grad_clip(0.01, eps=eps).update(grads, None, params)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(out["w"], 0.0)
  assert list(np.asarray(state.clipped)) == [False, True]  # b, w
  assert list(np.asarray(state.norm)) == [0.0, np.finfo(np.float32).max]


def test_a_non_finite_gradient_still_passes_through():
  params = {"w": jnp.ones((2, 1))}
  for bad in (jnp.inf, jnp.nan):
    grads = {"w": jnp.array([[bad], [4.0]])}
    tx = jaxclip.adaptive_grad_clip(0.01)
    out, state = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(out["w"], grads["w"])
    assert not bool(state.clipped[0])
