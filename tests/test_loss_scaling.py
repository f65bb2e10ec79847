"""Mixed precision with dynamic loss scaling (Flax's `DynamicScale`)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip

dynamic_scale = pytest.importorskip("flax.training.dynamic_scale")

MAX_NORM = 4.2
STEPS = 12


def _data():
  ks = jax.random.split(jax.random.key(5), 4)
  x = jax.random.normal(ks[0], (64, 16))
  y = jnp.sin(x @ jax.random.normal(ks[1], (16, 4)))
  params = {
    "w1": 0.5 * jax.random.normal(ks[2], (16, 32)),
    "b1": jnp.zeros(32),
    "w2": 0.5 * jax.random.normal(ks[3], (32, 4)),
  }
  return params, (x, y)


def _loss(params, batch, dtype):
  """The model computed in `dtype` (float16 for mixed precision) from float32
  master parameters; the loss itself is reduced in float32."""
  x, y = batch
  p = jax.tree.map(lambda w: w.astype(dtype), params)
  h = jnp.tanh(x.astype(dtype) @ p["w1"] + p["b1"])
  out = (h @ p["w2"]).astype(jnp.float32)
  return jnp.mean((out - y) ** 2)


def _optimizer():
  return jaxclip.skip_nonfinite(optax.chain(jaxclip.clip_by_global_norm(MAX_NORM), optax.sgd(0.3)))


def _fp16_run():
  """Full-batch training in float16 with a loss scale that starts far too
  high: the first steps overflow, are skipped, and the scale halves."""
  params, batch = _data()
  opt = _optimizer()
  scaler = dynamic_scale.DynamicScale(scale=2.0**20)

  @jax.jit
  def step(params, opt_state, scaler):
    grad_fn = scaler.value_and_grad(lambda p: _loss(p, batch, jnp.float16))
    scaler, finite, loss, grads = grad_fn(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, scaler, finite

  opt_state = opt.init(params)
  rows = []
  for _ in range(STEPS):
    params, opt_state, scaler, finite = step(params, opt_state, scaler)
    rows.append((bool(finite), float(scaler.scale), jaxclip.stats(opt_state)))
  return rows


def _float32_run(steps):
  params, batch = _data()
  opt = _optimizer()
  update = jax.jit(opt.update)
  opt_state = opt.init(params)
  out = []
  for _ in range(steps):
    grads = jax.grad(_loss)(params, batch, jnp.float32)
    updates, opt_state = update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    out.append(jaxclip.stats(opt_state))
  return out


def test_clipping_sees_unscaled_gradients_and_skips_overflows():
  rows = _fp16_run()
  finite = [f for f, _, _ in rows]
  scales = [s for _, s, _ in rows]
  # The scale adjusted: it halved on each overflow, then held.
  assert not finite[0] and finite[-1]
  assert scales[-1] < 2.0**20 and scales[-1] == scales[-2]
  assert all(b == a / 2 for a, b, f in zip([2.0**20, *scales], scales, finite) if not f)
  # The guard skipped exactly the steps the loss scale overflowed on.
  skipped = [bool(s["clip/skip_nonfinite/nonfinite"]) for _, _, s in rows]
  assert skipped == [not f for f in finite]
  assert int(rows[-1][2]["clip/skip_nonfinite/total_skipped"]) == finite.count(False)
  # Each applied step matches the float32 run's step of the same rank: the
  # norm is that of the unscaled gradient (to float16 precision) and the
  # clipping decision is the same.
  applied = [s for f, _, s in rows if f]
  reference = _float32_run(len(applied))
  assert len(applied) >= 4
  for got, want in zip(applied, reference):
    np.testing.assert_allclose(
      got["clip/clip_by_global_norm/global_norm"],
      want["clip/clip_by_global_norm/global_norm"],
      rtol=2e-2,
    )
    assert bool(got["clip/clip_by_global_norm/clipped"]) == bool(
      want["clip/clip_by_global_norm/clipped"]
    )
  decisions = [bool(s["clip/clip_by_global_norm/clipped"]) for s in reference]
  assert any(decisions) and not all(decisions), "both decisions should be compared"


def test_norm_of_float16_gradients_is_accumulated_in_float32():
  # Gradients kept in float16 (a pure-fp16 setup) whose squares overflow
  # float16: the norm is still right.
  g = {"w": jnp.full((1000,), 300.0, jnp.float16)}
  tx = jaxclip.clip_by_global_norm(1.0)
  clipped, state = tx.update(g, tx.init(g))
  np.testing.assert_allclose(state.norm, 300.0 * np.sqrt(1000.0), rtol=1e-3)
  assert clipped["w"].dtype == jnp.float16
  np.testing.assert_allclose(jnp.linalg.norm(clipped["w"].astype(jnp.float32)), 1.0, rtol=1e-2)
