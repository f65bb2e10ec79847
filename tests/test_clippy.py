"""clippy (jaxclip/_clippy.py), run step by step against a NumPy transcription
of ClippyAdagrad from tensorflow/recommenders,
`tensorflow_recommenders/experimental/optimizers/clippy_adagrad.py`
(`shrink_by_references` and `ClippyAdagrad.update_step`; keras-rs'
`keras_rs/src/optimizers/clippy_adagrad.py` computes the same)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxclip

LR, INIT_ACC, EPS = 0.3, 0.1, 1e-7


def shrink_by_references(tensor, references, relative_factors, absolute_factor):
  max_delta = absolute_factor + sum(np.abs(r) * f for r, f in zip(references, relative_factors))
  safe = np.where(tensor == 0, 1.0, np.abs(tensor))
  per_element_scale = np.where(tensor == 0, 1.0, max_delta / safe)
  scale = min(1.0, per_element_scale.min())
  return tensor * scale, scale


def clippy_adagrad_reference(w, grads, relative, absolute, standard):
  """Per step, (variable after the step, clipping factor), as `update_step`
  with ``accumulator_relative_threshold=0`` and no accumulator clipping."""
  w = w.astype(np.float64)
  accumulator = np.full_like(w, INIT_ACC)
  out = []
  for grad in grads:
    grad = grad.astype(np.float64)
    if standard:
      accumulator = accumulator + np.square(grad)
    precondition = 1 / np.sqrt(accumulator + EPS)
    delta = LR * grad * precondition
    clipped_delta, factor = shrink_by_references(
      delta, [w, precondition], [relative, 0.0], absolute
    )
    if not standard:
      accumulator = accumulator + np.square(grad)
    w = w - clipped_delta
    out.append((w, factor))
  return out


def delayed_adagrad(learning_rate):
  """ClippyAdagrad's default preconditioner: the accumulator before this
  step's gradient is added (a test helper, not part of jaxclip)."""

  def init_fn(params):
    return jax.tree.map(lambda p: jnp.full_like(p, INIT_ACC), params)

  def update_fn(updates, state, params=None):
    del params
    new = jax.tree.map(lambda g, a: -learning_rate * g * jax.lax.rsqrt(a + EPS), updates, state)
    return new, jax.tree.map(lambda g, a: a + g * g, updates, state)

  return optax.GradientTransformation(init_fn, update_fn)


def _problem(steps=14, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"w": (5, 4), "b": (4,)}
  w0 = {
    k: (rng.choice([-1, 1], s) * rng.uniform(0.5, 3, s)).astype(np.float32)
    for k, s in shapes.items()
  }
  grads = []
  for t in range(steps):
    g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in w0.items()}
    if t % 4 == 2:  # spikes
      g["w"][rng.integers(5), rng.integers(4)] *= 100.0
    grads.append(g)
  return w0, grads


@pytest.mark.parametrize("standard", [True, False], ids=["standard", "delayed"])
@pytest.mark.parametrize("relative, absolute", [(0.1, 1e-7), (0.5, 1e-2)])
def test_matches_clippy_adagrad_step_by_step(standard, relative, absolute):
  w0, grads = _problem()
  inner = optax.adagrad(LR, INIT_ACC, EPS) if standard else delayed_adagrad(LR)
  opt = optax.chain(inner, jaxclip.clippy(relative, absolute))

  @jax.jit
  def step(params, state, g):
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, w0)
  state = opt.init(params)
  ours = []
  for g in grads:
    params, state = step(params, state, g)
    ours.append((params, state[1]))
  factors = []
  for i, key in enumerate(sorted(w0)):  # the order of jax.tree.leaves
    ref = clippy_adagrad_reference(w0[key], [g[key] for g in grads], relative, absolute, standard)
    for t, ((want_w, want_factor), (p, s)) in enumerate(zip(ref, ours)):
      np.testing.assert_allclose(p[key], want_w, rtol=1e-6, atol=1e-7, err_msg=f"step {t + 1}")
      # A ratio of two float32 quantities, each carrying the trajectory's rounding.
      np.testing.assert_allclose(s.scale[i], want_factor, rtol=2e-6, err_msg=f"step {t + 1}")
      assert bool(s.clipped[i]) == (want_factor < 1)
      factors.append(want_factor)
  assert min(factors) < 0.5 and max(factors) == 1.0  # clipped and unclipped steps


def test_each_step_respects_the_bound_and_keeps_the_direction():
  w0, grads = _problem(steps=6, seed=3)
  relative, absolute = 0.05, 1e-3
  opt = optax.chain(optax.sgd(1.0), jaxclip.clippy(relative, absolute))
  params = jax.tree.map(jnp.asarray, w0)
  state = opt.init(params)
  for g in grads:
    raw, _ = optax.sgd(1.0).update(g, optax.sgd(1.0).init(params))
    updates, state = opt.update(g, state, params)
    new = optax.apply_updates(params, updates)
    for key in w0:
      step = np.asarray(new[key], np.float64) - np.asarray(params[key], np.float64)
      bound = relative * np.abs(np.asarray(params[key], np.float64)) + absolute
      assert np.all(np.abs(step) <= bound * (1 + 1e-6) + 1e-7)
      s = float(state[1].scale[sorted(w0).index(key)])
      np.testing.assert_allclose(updates[key], s * raw[key], rtol=1e-6)  # w - lr * s * g
      assert 0 < s <= 1
    params = new


def test_zero_updates_and_zero_bounds():
  tx = jaxclip.clippy(0.1, 0.0)
  params = {"a": jnp.array([0.0, 2.0]), "b": jnp.zeros(2)}
  u = {"a": jnp.array([0.0, 0.1]), "b": jnp.array([0.0, 1.0])}
  out, state = tx.update(u, tx.init(params), params)
  np.testing.assert_allclose(out["a"], [0.0, 0.1])  # u_0 = 0 imposes nothing
  np.testing.assert_array_equal(out["b"], [0.0, 0.0])  # bound 0: no step at all
  np.testing.assert_allclose(state.scale, [1.0, 0.0])
  assert state.clipped.tolist() == [False, True]
  out, _ = tx.update(jax.tree.map(jnp.zeros_like, u), tx.init(params), params)
  assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(out))


@pytest.mark.parametrize("absolute", [0.0, 1e-3])  # zero bounds possible, or not
@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_nonfinite_update_or_parameter_passes_unscaled(bad, absolute):
  tx = jaxclip.clippy(0.1, absolute)
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  u = {"a": jnp.array([1.0, bad, 2.0]), "b": jnp.array([1.0, 0.5])}
  out, state = jax.jit(tx.update)(u, tx.init(params), params)
  np.testing.assert_array_equal(out["a"], u["a"])
  np.testing.assert_allclose(out["b"], np.array([1.0, 0.5]) * (0.1 + absolute), rtol=1e-6)
  assert state.clipped.tolist() == [False, True] and np.isnan(state.ratio[0])
  out, state = tx.update(
    params, tx.init(params), {"a": jnp.array([1.0, bad, 1.0]), "b": params["b"]}
  )
  if bad != bad:  # a NaN parameter: the factor is NaN, the update passes
    np.testing.assert_array_equal(out["a"], params["a"])
  else:  # an infinite parameter bounds nothing; the finite ones do
    np.testing.assert_allclose(out["a"], (0.1 + absolute) * np.ones(3), rtol=1e-6)


def test_bf16_complex_and_mixed_dtypes():
  params = {"h": jnp.array([1.0, 4.0], jnp.bfloat16), "z": jnp.array([3 + 4j], jnp.complex64)}
  u = {"h": jnp.array([0.5, 0.1], jnp.bfloat16), "z": jnp.array([1j], jnp.complex64)}
  out, state = jax.jit(jaxclip.clippy(0.1, 0.0).update)(u, jaxclip.clippy().init(params), params)
  assert out["h"].dtype == jnp.bfloat16 and out["z"].dtype == jnp.complex64
  assert state.scale.dtype == state.ratio.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out["h"], np.float32), [0.1, 0.02], rtol=1e-2)
  np.testing.assert_allclose(out["z"], [0.5j], rtol=1e-6)  # |u| <= 0.1 * |3 + 4j|


def test_schedules_stats_and_foreign_states():
  params = {"w": jnp.array([1.0, 10.0])}
  u = {"w": jnp.array([-0.5, 0.5])}
  tx = jaxclip.clippy(lambda step: 0.1 * (step + 1), 0.0)
  state = tx.init(params)
  out, state = tx.update(u, state, params)
  np.testing.assert_allclose(out["w"], [-0.1, 0.1], rtol=1e-6)
  out, state = tx.update(u, state, params)  # relative 0.2 at step 1
  np.testing.assert_allclose(out["w"], [-0.2, 0.2], rtol=1e-6)
  out = jaxclip.stats(state, params=params)
  np.testing.assert_allclose(out["clip/scale/w"], 0.4, rtol=1e-6)
  np.testing.assert_allclose(out["clip/ratio/w"], 2.5, rtol=1e-6)  # 0.5 / (0.2 * 1)
  assert int(out["clip/count"]) == 2 and bool(out["clip/clipped"])
  fixed = jaxclip.clippy(0.1, 0.0)
  out, same = fixed.update(u, optax.EmptyState(), params)  # stateless use
  assert same == optax.EmptyState()
  np.testing.assert_allclose(out["w"], [-0.1, 0.1], rtol=1e-6)
  with pytest.raises(ValueError, match="is a schedule"):
    tx.update(u, optax.EmptyState(), params)


def test_update_errors():
  tx = jaxclip.clippy()
  params = {"w": jnp.ones(2)}
  with pytest.raises(ValueError, match="call `update\\(updates, state, params\\)`"):
    tx.update(params, tx.init(params))
  with pytest.raises(ValueError, match="same floating leaves as the updates"):
    tx.update(params, tx.init(params), {"w": jnp.ones(3)})


@pytest.mark.parametrize(
  "kwargs, error, match",
  [
    (dict(relative=-0.1), ValueError, "`relative` must be >= 0"),
    (dict(absolute=float("nan")), ValueError, "`absolute` is NaN"),
    (dict(relative=True), TypeError, "`relative` must be a number"),
    (dict(absolute="1e-7"), TypeError, "`absolute` must be a number"),
  ],
)
def test_argument_errors(kwargs, error, match):
  with pytest.raises(error, match=match):
    jaxclip.clippy(**kwargs)
