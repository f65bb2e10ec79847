"""Tests of per-example (DP-SGD) clipping (`jaxclip._per_example`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip


def _grads():
  k1, k2 = jax.random.split(jax.random.key(5))
  return {"w": jax.random.normal(k1, (6, 4, 3)), "b": 3.0 * jax.random.normal(k2, (6, 3))}


@pytest.mark.parametrize("clip", [0.0, 0.5, 2.0, 100.0])
def test_global_matches_optax(clip):
  g = _grads()
  ours = jaxclip.per_example_global_norm_clip(g, clip)
  theirs = optax.per_example_global_norm_clip(g, clip)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ours, theirs)


@pytest.mark.parametrize("uniform", [True, False])
def test_layer_matches_optax(uniform):
  g = _grads()
  ours = jaxclip.per_example_layer_norm_clip(g, 1.0, uniform)
  theirs = optax.per_example_layer_norm_clip(g, 1.0, uniform)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), ours, theirs)


def test_layer_clipping_of_an_empty_batch_is_zero():
  g = {"w": jnp.zeros((0, 4, 3)), "b": jnp.zeros((0, 3))}
  sums, counts = jaxclip.per_example_layer_norm_clip(g, 1.0, uniform=True)
  assert sums["w"].shape == (4, 3) and not jnp.any(sums["w"]) and int(counts["b"]) == 0
  theirs = optax.per_example_layer_norm_clip(g, 1.0, uniform=True)
  jax.tree.map(np.testing.assert_array_equal, (sums, counts), theirs)


@pytest.mark.parametrize("uniform", [True, False])
def test_layer_clip_norm_keeps_float64(uniform):
  # The per-layer clip norm is not rounded to float32 for float64 gradients.
  with jax.enable_x64(True):
    g = jax.tree.map(lambda x: x.astype(jnp.float64), _grads())
    ours = jaxclip.per_example_layer_norm_clip(g, 0.3, uniform)
    theirs = optax.per_example_layer_norm_clip(g, 0.3, uniform)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-13), ours, theirs)


def test_each_example_bounded():
  g = _grads()
  for i in range(6):
    one = {k: v[i : i + 1] for k, v in g.items()}
    s, _ = jaxclip.per_example_global_norm_clip(one, 0.5)
    assert float(jaxclip.global_norm(s)) <= 0.5 * (1 + 1e-6)


def test_bf16_kept_and_jit():
  g = jax.tree.map(lambda x: x.astype(jnp.bfloat16), _grads())
  s, n = jax.jit(jaxclip.per_example_global_norm_clip)(g, 1.0)
  assert s["w"].dtype == jnp.bfloat16 and n.dtype == jnp.int32


def test_missing_batch_axis():
  with pytest.raises(ValueError, match="batch"):
    jaxclip.per_example_global_norm_clip({"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}, 1.0)
  with pytest.raises(ValueError, match="batch"):
    jaxclip.per_example_layer_norm_clip([jnp.ones(())], 1.0)
  with pytest.raises(ValueError, match="no gradients"):
    jaxclip.per_example_global_norm_clip([], 1.0)


def test_negative_clip():
  with pytest.raises(ValueError, match="l2_norm_clip"):
    jaxclip.per_example_global_norm_clip(_grads(), -1.0)


def test_complex_gradients_keep_their_imaginary_part():
  g = [jnp.array([[1 + 2j, 0j], [3 + 4j, 0j]], jnp.complex64)]
  (s,), n = jaxclip.per_example_global_norm_clip(g, 100.0)
  np.testing.assert_allclose(s, [4 + 6j, 0j])
  assert s.dtype == jnp.complex64 and int(n) == 0


def test_quantile_clip_per_example_uses_the_same_norms():
  g = {"w": jnp.array([[3.0], [0.0]]), "i": jnp.array([[4], [0]], jnp.int32)}
  ours, _ = jaxclip.per_example_global_norm_clip(g, 1.0)
  tx = jaxclip.quantile_clip(initial_max_norm=1.0, per_example=True)
  theirs, _ = tx.update(g, tx.init(g))
  jax.tree.map(np.testing.assert_allclose, ours, theirs)


@pytest.mark.parametrize("bad", [jnp.inf, jnp.nan])
def test_a_nonfinite_example_contributes_zero_and_is_counted(bad):
  # DP-SGD's bound: no example contributes more than the clip norm, also
  # when its gradient holds an inf or NaN next to finite entries.
  grads = {"w": jnp.array([[3.0, 4.0], [bad, 100.0], [0.3, 0.4]])}
  total, num_clipped = jaxclip.per_example_global_norm_clip(grads, 1.0)
  np.testing.assert_allclose(total["w"], [0.6 + 0.3, 0.8 + 0.4], rtol=1e-6)
  assert int(num_clipped) == 2  # the first scaled down, the second left out
  sums, counts = jaxclip.per_example_layer_norm_clip(grads, 1.0)
  assert bool(jnp.all(jnp.isfinite(sums["w"]))) and int(counts["w"]) == 2


@pytest.mark.parametrize("bad", [jnp.inf, jnp.nan])
def test_per_layer_drops_the_whole_nonfinite_example(bad):
  # The example is left out of every layer, not only of the one holding the
  # inf or NaN: "an example whose gradient has an inf or NaN contributes zero".
  grads = [jnp.array([[1.0, 0.0], [bad, 0.0], [0.0, 1.0]]), jnp.array([[1.0], [2.0], [3.0]])]
  sums, counts = jaxclip.per_example_layer_norm_clip(grads, 10.0)
  np.testing.assert_allclose(sums[0], [1.0, 1.0])
  np.testing.assert_allclose(sums[1], [4.0])  # 1 + 3: the second example is out
  assert [int(c) for c in counts] == [1, 1]


@pytest.mark.parametrize("bad", [jnp.nan, -1.0, -jnp.inf])
@pytest.mark.parametrize(
  "clip",
  [
    lambda g, c: jaxclip.per_example_global_norm_clip(g, c),
    lambda g, c: jaxclip.per_example_layer_norm_clip(g, c),
  ],
)
def test_a_traced_bad_clip_norm_keeps_no_example(bad, clip):
  # A concrete NaN or negative bound is a ValueError; a traced one cannot be
  # checked, and must not turn clipping off (NaN) or flip every sign.
  grads = [jnp.array([[30.0, 40.0], [3.0, 4.0], [0.3, 0.4]])]
  sums, counts = jax.jit(clip)(grads, bad)
  np.testing.assert_array_equal(jax.tree.leaves(sums)[0], [0.0, 0.0])
  assert int(jax.tree.leaves(counts)[0]) == 3


def test_quantile_clip_per_example_leaves_out_nonfinite_examples():
  tx = jaxclip.quantile_clip(0.5, 0.2, 1.0, per_example=True)
  grads = {"w": jnp.array([[3.0, 4.0], [jnp.nan, 1.0]])}
  out, state = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
  np.testing.assert_allclose(out["w"], [0.6, 0.8], rtol=1e-6)
  assert float(state.fraction_below) == 0.0
